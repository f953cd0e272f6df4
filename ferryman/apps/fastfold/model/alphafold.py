"""The AlphaFold2 monomer model with recycling (AF2 Suppl. Alg. 2).

Input features (one protein, no batch dimension; AF2/OpenFold names; N = residues, S = clustered
MSA rows, E = extra MSA rows, T = templates)::

    aatype                  [N]          int, 0..20 in residue_constants.restypes order (20 = X)
    residue_index           [N]          int, residue numbers (gaps allowed)
    seq_mask                [N]          float, 1 for real residues
    target_feat             [N, 22]      float, one-hot: 0 = between-segment flag, 1..21 = aatype+1
    msa_feat                [S, N, 49]   float, one-hot MSA (23) + has_deletion + deletion_value
                                         + cluster profile (23) + cluster deletion mean
    msa_mask                [S, N]       float
    extra_msa               [E, N]       int, 0..22 (21 = gap, 22 = masked)
    extra_msa_mask          [E, N]       float
    extra_has_deletion      [E, N]       float
    extra_deletion_value    [E, N]       float
    template_aatype         [T, N]       int, 0..21 (only when the preset uses templates)
    template_all_atom_positions [T, N, 37, 3]  float, Angstrom
    template_all_atom_masks [T, N, 37]   float (``template_all_atom_mask`` is accepted too)
    template_mask           [T]          float, 1 for real templates
    template_pseudo_beta    [T, N, 3]    optional, computed from the atoms when absent
    template_pseudo_beta_mask [T, N]     optional

Outputs (float32): ``final_atom_positions`` [N, 37, 3], ``final_atom_mask`` [N, 37],
``final_atom14_positions`` [N, 14, 3], ``plddt`` [N] (0-100), ``plddt_logits`` [N, 50],
``distogram_logits`` [N, N, 64] with ``distogram_bin_edges`` [63], ``masked_msa_logits``
[S, N, 23], ``experimentally_resolved_logits`` [N, 37], ``single`` [N, c_s], ``pair`` [N, N, c_z],
``msa_first_row`` [N, c_m], structure-module trajectories (``traj`` [8, N, 7], ``angles_sin_cos``,
``positions`` [8, N, 14, 3], ``sidechain_frames``), and for the ``_ptm`` presets ``pae_logits``
[N, N, 64], ``predicted_aligned_error`` [N, N], ``max_predicted_aligned_error``,
``aligned_confidence_probs`` and ``ptm`` (a scalar). ``model(batch, pair_logits=False)`` leaves out
the two ``[N, N, 64]`` logits tensors (``distogram_logits``, ``pae_logits``), computing PAE and pTM
from row blocks of the pair instead.

Memory at inference: with a chunk size set, in-place updates on and no autograd recording (the
default inference path) every op adds its update into m or z block by block, so the trunk holds
z plus one hidden-width triangle product (and its projection blocks, an eighth of the hidden
width at a time): about 2.25 pair tensors in all, whatever N_res. The template stage holds at
most z, one template, its triangle product and a running pointwise-attention sum. Fully masked
attention rows (padding only) give zero output here and a uniform average in AF2; real residues
never see padding, so their outputs agree (tests/apps/fastfold/test_model_masking.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ferryman.apps.fastfold.model.config import AlphaFoldConfig
from ferryman.apps.fastfold.model.embedders import ExtraMSAEmbedder, InputEmbedder, RecyclingEmbedder
from ferryman.apps.fastfold.model.evoformer import EvoformerStack
from ferryman.apps.fastfold.model.heads import (
    DistogramHead,
    ExperimentallyResolvedHead,
    MaskedMsaHead,
    PredictedAlignedErrorHead,
    PredictedLDDTHead,
    compute_plddt,
    compute_predicted_aligned_error,
    compute_tm,
    confidence_from_pair,
)
from ferryman.apps.fastfold.model.options import RunOptions
from ferryman.apps.fastfold.model.primitives import add_, lean
from ferryman.apps.fastfold.model.structure_module import StructureModule
from ferryman.apps.fastfold.model.template import TemplateEmbedder
from ferryman.core.chunking import chunk_size_for_budget, free_memory_bytes
from ferryman.core.errors import UserError
from ferryman.kernels import resolve_backend

REQUIRED_FEATURES = (
    "aatype", "residue_index", "seq_mask", "target_feat", "msa_feat", "msa_mask",
    "extra_msa", "extra_msa_mask", "extra_has_deletion", "extra_deletion_value",
)  # fmt: skip
TEMPLATE_FEATURES = ("template_aatype", "template_all_atom_positions", "template_mask")


def auto_chunk_size(cfg: AlphaFoldConfig, run: RunOptions, n_res: int, n_seq: int, device: torch.device,
                    fraction: float = 0.4) -> int | None:  # fmt: skip
    """The largest power-of-two chunk whose per-chunk transients fit ``fraction`` of the memory
    left once the chunked path's resident pair buffers are counted (None: run every op whole).

    Resident on the chunked path: z, the hidden-width triangle product and its projection blocks,
    about 2.5 pair tensors. Per chunk row, the widest fp32 activation (the outer product's
    c_hidden_opm^2 channels or the pair transition's hidden layer) and, where the PyTorch
    reference attention runs, three copies of a row's logits (heads x N x N).
    """
    itemsize = run.trunk_dtype.itemsize
    pair_bytes = n_res * n_res * cfg.c_z * itemsize
    free = free_memory_bytes(device)
    budget = int(max(free - 2.5 * pair_bytes, free * 0.05) * fraction)
    heads = max(cfg.msa_heads, cfg.pair_heads, cfg.extra_msa_heads)
    widest = max(n_res, n_seq)
    bytes_per_row = 4 * widest * max(cfg.c_hidden_opm**2, cfg.c_z * cfg.transition_factor)
    if resolve_backend(run.kernels, torch.empty(0, device=device)) == "torch":
        bytes_per_row += 3 * 4 * heads * widest * widest
    return chunk_size_for_budget(num_rows=widest, bytes_per_row=bytes_per_row, budget_bytes=budget, minimum=1)


class AlphaFold(nn.Module):
    """AlphaFold2 monomer: embedders, extra-MSA stack, Evoformer, structure module and heads.

    Built in fp32 with ``RunOptions()``; ``options.apply_run_options`` changes how it runs.
    """

    TRUNK = ("input_embedder", "recycling_embedder", "template_embedder", "extra_msa_embedder",
             "extra_msa_stack", "evoformer")  # fmt: skip

    def __init__(self, cfg: AlphaFoldConfig):
        super().__init__()
        self.cfg = cfg
        self.input_embedder = InputEmbedder(cfg)
        self.recycling_embedder = RecyclingEmbedder(cfg)
        self.template_embedder = TemplateEmbedder(cfg) if cfg.template.enabled else None
        self.extra_msa_embedder = ExtraMSAEmbedder(cfg)
        self.extra_msa_stack = EvoformerStack(cfg, extra=True)
        self.evoformer = EvoformerStack(cfg)
        self.structure_module = StructureModule(cfg)
        self.predicted_lddt_head = PredictedLDDTHead(cfg)
        self.distogram_head = DistogramHead(cfg)
        self.masked_msa_head = MaskedMsaHead(cfg)
        self.experimentally_resolved_head = ExperimentallyResolvedHead(cfg)
        self.predicted_aligned_error_head = PredictedAlignedErrorHead(cfg) if cfg.heads.ptm else None
        self.run_options = RunOptions()  # replaced by options.apply_run_options

    @property
    def trunk_dtype(self) -> torch.dtype:
        return self.evoformer.blocks[0].msa_transition.transition1.weight.dtype

    def _chunk_size(self, batch: dict[str, Tensor]) -> int | None:
        run = self.run_options
        if not run.auto_chunk:
            return run.chunk_size
        n_seq = max(batch["msa_feat"].shape[0], batch["extra_msa"].shape[0])
        return auto_chunk_size(self.cfg, run, batch["aatype"].shape[0], n_seq, batch["aatype"].device)

    def iteration(self, batch: dict[str, Tensor], prev: dict[str, Tensor], chunk_size: int | None) -> dict:
        """One recycling iteration (AF2 Suppl. Alg. 2 lines 5-19)."""
        dt, inplace = self.trunk_dtype, self.run_options.inplace
        seq_mask = batch["seq_mask"].to(dt)
        pair_mask = seq_mask[:, None] * seq_mask[None, :]
        m, z = self.input_embedder(
            batch["target_feat"].to(dt), batch["msa_feat"].to(dt), batch["residue_index"], chunk_size
        )
        # Popped, not read: the caller's dict must not keep the previous pair alive all iteration.
        prev_pair = prev.pop("prev_pair", None)
        m_row, z = self.recycling_embedder(
            z, batch["aatype"], prev["prev_pos"], prev["prev_msa_first_row"], prev_pair, chunk_size
        )
        del prev_pair
        m[0] = m[0] + m_row
        msa_mask = batch["msa_mask"].to(dt)
        use_templates = self.template_embedder is not None and "template_aatype" in batch
        if use_templates and lean(chunk_size, inplace):
            z = self.template_embedder.add_pair_embedding_(z, batch, pair_mask, chunk_size)
        elif use_templates:
            z = add_(z, self.template_embedder.pair_embedding(z, batch, pair_mask, chunk_size, inplace), inplace)
        a = self.extra_msa_embedder(batch["extra_msa"], batch["extra_has_deletion"], batch["extra_deletion_value"])
        _, z = self.extra_msa_stack(a, z, batch["extra_msa_mask"].to(dt), pair_mask, chunk_size, inplace)
        del a
        num_seq = m.shape[0]
        if use_templates and self.cfg.template.embed_torsion_angles:
            rows, rows_mask = self.template_embedder.single_embedding(batch, dt)
            m, msa_mask = torch.cat([m, rows], dim=0), torch.cat([msa_mask, rows_mask], dim=0)
        m, z = self.evoformer(m, z, msa_mask, pair_mask, chunk_size, inplace)
        single = self.evoformer.single_activations(m[0])
        # The pair stays in the trunk dtype: an fp32 copy would double the largest tensor.
        sm = self.structure_module(single.float(), z, batch["aatype"], batch["seq_mask"].float(), chunk_size)
        return {"msa": m[:num_seq], "pair": z, "single": single, "sm": sm}

    def forward(self, batch: dict[str, Tensor], num_recycle: int | None = None, *,
                pair_logits: bool = True) -> dict[str, Tensor]:  # fmt: skip
        """Run the model; ``pair_logits=False`` leaves out the ``[N, N, 64]`` distogram and PAE
        logits, which structure prediction does not use (PAE and pTM are still computed)."""
        missing = [k for k in REQUIRED_FEATURES if k not in batch]
        if missing:
            raise UserError(f"AlphaFold input features lack {', '.join(missing)} (see ferryman.apps.fastfold.model.alphafold)")
        num_recycle = self.cfg.num_recycle if num_recycle is None else num_recycle
        chunk_size = self._chunk_size(batch)
        n, device, dt = batch["aatype"].shape[0], batch["aatype"].device, self.trunk_dtype
        prev = {  # no prev_pair: the recycling embedder reads its absence as zeros
            "prev_pos": torch.zeros(n, 37, 3, device=device),
            "prev_msa_first_row": torch.zeros(n, self.cfg.c_m, device=device, dtype=dt),
        }
        for cycle in range(num_recycle + 1):
            last = cycle == num_recycle
            with torch.set_grad_enabled(torch.is_grad_enabled() and last):
                out = self.iteration(batch, prev, chunk_size)
            if not last:
                prev = {
                    "prev_pos": out["sm"]["final_atom_positions"].detach(),
                    "prev_msa_first_row": out["msa"][0].detach(),
                    "prev_pair": out["pair"].detach(),
                }
                del out
        return self.heads(out, chunk_size, pair_logits=pair_logits)

    def heads(self, out: dict, chunk_size: int | None = None, *, pair_logits: bool = True) -> dict[str, Tensor]:
        sm, pair = out["sm"], out["pair"]
        result = {k: v for k, v in sm.items() if k != "single"}
        result["structure_single"] = sm["single"]
        result["single"] = out["single"].float()
        result["pair"] = pair  # trunk dtype
        result["msa_first_row"] = out["msa"][0].float()
        result["plddt_logits"] = self.predicted_lddt_head(result["structure_single"])
        result["plddt"] = compute_plddt(result["plddt_logits"])
        if pair_logits:
            result["distogram_logits"] = self.distogram_head(pair, chunk_size)
            result["distogram_bin_edges"] = self.distogram_head.bin_edges(pair.device)
        result["masked_msa_logits"] = self.masked_msa_head(out["msa"].float())
        result["experimentally_resolved_logits"] = self.experimentally_resolved_head(result["single"])
        if self.predicted_aligned_error_head is not None and not pair_logits:
            result.update(confidence_from_pair(self.predicted_aligned_error_head, pair, chunk_size))
        elif self.predicted_aligned_error_head is not None:
            head = self.predicted_aligned_error_head
            logits = head(pair, chunk_size)
            breaks = head.breaks(pair.device)
            result["pae_logits"] = logits
            result.update(compute_predicted_aligned_error(logits, breaks, chunk_size))
            result["ptm"] = compute_tm(logits, breaks, chunk_size=chunk_size)
        return result
