"""AlphaFold-Multimer with recycling (Evans et al. 2021; AF2 ``modules_multimer.AlphaFold``).

The same model tree as the monomer (``alphafold.AlphaFold``): the recycling and extra-MSA
embedders, the extra-MSA stack, the Evoformer (its blocks run the outer product mean first, set
by ``cfg.multimer``), the heads. Multimer modules replace the input embedder
(``multimer_embedders``), the template embedder (``multimer_template``) and the structure module
(``multimer_structure``); ipTM joins the confidence outputs.

Input features (one complex, no batch dimension; N = residues of all chains, S = sampled MSA
rows, E = extra rows, T = template slots; ``data.multimer_transforms`` makes them)::

    aatype [N], residue_index [N] (from 0 in each chain), asym_id, entity_id, sym_id [N] (int)
    seq_mask [N], target_feat [N, 21] (one_hot(aatype, 21)), msa_feat [S, N, 49], msa_mask [S, N]
    extra_msa [E, N] (0..22), extra_msa_mask, extra_has_deletion, extra_deletion_value [E, N]
    template_aatype [T, N] (0..21), template_all_atom_positions [T, N, 37, 3],
    template_all_atom_mask [T, N, 37]

Outputs: the monomer's (``alphafold.py``), with ``masked_msa_logits`` over 22 classes, ``frames``
``[L, N, 4, 4]``, and ``iptm``, ``ranking_confidence`` (0.8 ipTM + 0.2 pTM) and
``num_recycles`` (those run before the last iteration; fewer than asked when the early stop fired).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ferryman.apps.fastfold.model.alphafold import REQUIRED_FEATURES, AlphaFold
from ferryman.apps.fastfold.model.config import AlphaFoldConfig
from ferryman.apps.fastfold.model.embedders import ExtraMSAEmbedder, RecyclingEmbedder
from ferryman.apps.fastfold.model.evoformer import EvoformerStack
from ferryman.apps.fastfold.model.heads import (
    DistogramHead,
    ExperimentallyResolvedHead,
    MaskedMsaHead,
    PredictedAlignedErrorHead,
    PredictedLDDTHead,
)
from ferryman.apps.fastfold.model.multimer_embedders import MultimerInputEmbedder
from ferryman.apps.fastfold.model.multimer_heads import interface_tm, ranking_confidence
from ferryman.apps.fastfold.model.multimer_structure import MultimerStructureModule
from ferryman.apps.fastfold.model.multimer_template import MultimerTemplateEmbedder
from ferryman.apps.fastfold.model.options import RunOptions
from ferryman.core.errors import UserError

MULTIMER_FEATURES = (*REQUIRED_FEATURES, "asym_id", "entity_id", "sym_id")
TEMPLATE_FEATURES = ("template_aatype", "template_all_atom_positions", "template_all_atom_mask")


def ca_distance_change(before: Tensor, after: Tensor, seq_mask: Tensor) -> float:
    """RMS change of all CA-CA distances between two atom37 structures (AF2-Multimer's early stop,
    after AF2Complex): sqrt(mean_ij (d_ij(before) - d_ij(after))^2 + 1e-8)."""
    ca = 1

    def distances(points: Tensor) -> Tensor:
        points = points[:, ca].float()
        return torch.sqrt(((points[:, None] - points[None, :]) ** 2).sum(-1))

    mask = seq_mask[:, None].float() * seq_mask[None, :].float()
    sq = (distances(before) - distances(after)) ** 2
    return float(torch.sqrt((sq * mask).sum() / (mask.sum() + 1e-10) + 1e-8))


class AlphaFoldMultimer(AlphaFold):
    """AlphaFold-Multimer: multimer embedders, template embedding and structure module around the
    shared Evoformer, extra-MSA stack and heads."""

    def __init__(self, cfg: AlphaFoldConfig):
        nn.Module.__init__(self)
        if not cfg.multimer:
            raise ValueError("AlphaFoldMultimer needs a config with multimer=True")
        self.cfg = cfg
        self.input_embedder = MultimerInputEmbedder(cfg)
        self.recycling_embedder = RecyclingEmbedder(cfg)
        self.template_embedder = MultimerTemplateEmbedder(cfg) if cfg.template.enabled else None
        self.extra_msa_embedder = ExtraMSAEmbedder(cfg)
        self.extra_msa_stack = EvoformerStack(cfg, extra=True)
        self.evoformer = EvoformerStack(cfg)
        self.structure_module = MultimerStructureModule(cfg)
        self.predicted_lddt_head = PredictedLDDTHead(cfg)
        self.distogram_head = DistogramHead(cfg)
        self.masked_msa_head = MaskedMsaHead(cfg)
        self.experimentally_resolved_head = ExperimentallyResolvedHead(cfg)
        self.predicted_aligned_error_head = PredictedAlignedErrorHead(cfg)
        self.run_options = RunOptions()  # replaced by options.apply_run_options

    def iteration(self, batch: dict[str, Tensor], prev: dict[str, Tensor], chunk_size: int | None) -> dict:
        """One recycling iteration (AF2 ``modules_multimer.EmbeddingsAndEvoformer`` + structure module)."""
        dt, inplace = self.trunk_dtype, self.run_options.inplace
        seq_mask = batch["seq_mask"].to(dt)
        pair_mask = seq_mask[:, None] * seq_mask[None, :]
        m, z = self.input_embedder(batch["target_feat"].to(dt), batch["msa_feat"].to(dt), batch, chunk_size)
        prev_pair = prev.pop("prev_pair", None)  # popped: the caller's dict must not keep it alive
        m_row, z = self.recycling_embedder(
            z, batch["aatype"], prev["prev_pos"], prev["prev_msa_first_row"], prev_pair, chunk_size
        )
        del prev_pair
        m[0] = m[0] + m_row
        use_templates = self.template_embedder is not None and "template_aatype" in batch
        if use_templates:
            z = self.template_embedder.add_pair_embedding(z, batch, pair_mask, chunk_size, inplace)
        a = self.extra_msa_embedder(batch["extra_msa"], batch["extra_has_deletion"], batch["extra_deletion_value"])
        _, z = self.extra_msa_stack(a, z, batch["extra_msa_mask"].to(dt), pair_mask, chunk_size, inplace)
        del a
        num_seq, msa_mask = m.shape[0], batch["msa_mask"].to(dt)
        if use_templates:
            rows, rows_mask = self.template_embedder.single_embedding(batch, dt)
            m, msa_mask = torch.cat([m, rows], dim=0), torch.cat([msa_mask, rows_mask], dim=0)
        m, z = self.evoformer(m, z, msa_mask, pair_mask, chunk_size, inplace)
        single = self.evoformer.single_activations(m[0])
        sm = self.structure_module(single.float(), z, batch["aatype"], batch["seq_mask"].float(), chunk_size)
        return {"msa": m[:num_seq], "pair": z, "single": single, "sm": sm}

    def forward(self, batch: dict[str, Tensor], num_recycle: int | None = None, *,
                pair_logits: bool = True) -> dict[str, Tensor]:  # fmt: skip
        """Recycle up to ``num_recycle`` times (early stop at ``cfg.recycle_early_stop_tolerance``
        Angstrom of CA-distance change, when positive), then the last iteration and the heads."""
        missing = [k for k in MULTIMER_FEATURES if k not in batch]
        if missing:
            raise UserError(f"AlphaFold-Multimer input features lack {', '.join(missing)} "
                            "(see ferryman.apps.fastfold.model.multimer)")  # fmt: skip
        num_recycle = self.cfg.num_recycle if num_recycle is None else num_recycle
        chunk_size = self._chunk_size(batch)
        n, device, dt = batch["aatype"].shape[0], batch["aatype"].device, self.trunk_dtype
        prev = {
            "prev_pos": torch.zeros(n, 37, 3, device=device),
            "prev_msa_first_row": torch.zeros(n, self.cfg.c_m, device=device, dtype=dt),
        }
        done = 0
        with torch.no_grad():
            while done < num_recycle:
                out = self.iteration(batch, prev, chunk_size)
                positions = out["sm"]["final_atom_positions"].detach()
                change = ca_distance_change(prev["prev_pos"], positions, batch["seq_mask"])
                prev = {"prev_pos": positions, "prev_msa_first_row": out["msa"][0].detach(),
                        "prev_pair": out["pair"].detach()}  # fmt: skip
                del out
                done += 1
                if change <= self.cfg.recycle_early_stop_tolerance:
                    break
        out = self.iteration(batch, prev, chunk_size)
        result = self.heads(out, chunk_size, pair_logits=pair_logits)
        result["iptm"] = self._iptm(result, out["pair"], batch, chunk_size)
        result["ranking_confidence"] = ranking_confidence(result["iptm"], result["ptm"])
        result["num_recycles"] = torch.tensor(done)
        return result

    def _iptm(self, result: dict, pair: Tensor, batch: dict[str, Tensor], chunk_size: int | None) -> Tensor:
        head = self.predicted_aligned_error_head

        def row_logits(rows: slice) -> Tensor:
            # The lean path has no whole logits: one row block of the pair through the head at a time.
            return result["pae_logits"][rows] if "pae_logits" in result else head(pair[rows])

        return interface_tm(row_logits, head.breaks(pair.device), batch["asym_id"], batch["seq_mask"], chunk_size)
