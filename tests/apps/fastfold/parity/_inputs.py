"""Inputs of the parity suite: a small config both implementations can build, and processed
features of the villin headpiece (35 residues) with a synthetic MSA and its real structure as a
template, made once by Ferryman's feature pipeline and handed to both models as they are."""

from __future__ import annotations

import numpy as np
import torch

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.data.features import make_features
from ferryman.apps.fastfold.data.msa import Msa
from ferryman.apps.fastfold.data.transforms import InputConfig, make_model_inputs
from ferryman.apps.fastfold.model.config import AlphaFoldConfig, HeadsConfig, StructureConfig, TemplateConfig
from ferryman.apps.fastfold.model.options import RunOptions
from tests.apps.fastfold._structures import VILLIN_SEQUENCE, villin_protein

# Weight scale of the whole-model comparisons: at AF2's init scale (1 / sqrt(fan_in)) random
# weights make the network chaotic once MSA, templates or recycling are on (a 1e-6 relative
# weight change moves atoms by Angstroms), which would hide any real deviation.
WHOLE_MODEL_SCALE = 0.15
MODULE_SCALE = 1.0  # single modules: order-1 activations, as the 1e-4 bound assumes
# The structure module and the heads are not iterated 48 times over recycled inputs: at the usual
# scale they unfold the chain (about 9 Angstrom across its CA atoms here) where 0.15 leaves a
# 1-2 Angstrom clump, on which an Angstrom bound would be easy to meet.
OUTPUT_SCALES = {path: 1.0 for path in ("structure_module/", "predicted_lddt_head/", "distogram_head/",
                 "predicted_aligned_error_head/", "experimentally_resolved_head/", "masked_msa_head/")}  # fmt: skip

# The oracle's model inputs (everything else in the feature dict is Ferryman's or unused there).
AF2_KEYS = (
    "aatype", "residue_index", "seq_mask", "target_feat", "msa_feat", "msa_mask", "extra_msa", "extra_msa_mask",
    "extra_has_deletion", "extra_deletion_value", "atom14_atom_exists", "residx_atom14_to_atom37",
    "residx_atom37_to_atom14", "atom37_atom_exists", "template_aatype", "template_all_atom_positions",
    "template_mask", "template_pseudo_beta", "template_pseudo_beta_mask",
)  # fmt: skip


# The PyTorch reference ops (the spec of the fused kernels, which have their own parity tests),
# unchunked, in fp32: the plain path the whole-model and module comparisons read.
PARITY_RUN = RunOptions(kernels="torch")


def parity_config(**overrides) -> AlphaFoldConfig:
    """Every module present at reduced widths, per-head widths = channels / heads as AF2 derives them."""
    base = dict(
        c_m=32, c_z=16, c_s=32, c_e=16, msa_heads=4, c_hidden_msa=8, pair_heads=2, c_hidden_pair=8,
        c_hidden_mul=16, c_hidden_opm=8, transition_factor=4, num_evoformer_blocks=2,
        num_extra_msa_blocks=1, extra_msa_heads=4, c_hidden_extra=4, num_recycle=1,
        template=TemplateConfig(
            enabled=True, embed_torsion_angles=True, c_t=16, num_blocks=2, num_heads=2, c_hidden_att=8,
            c_hidden_mul=16, transition_factor=2, pointwise_heads=2, c_hidden_pointwise=8,
        ),
        structure=StructureConfig(num_layers=4, num_heads=4, c_hidden_scalar=8, num_qk_points=4, num_v_points=4,
                                  c_resnet=16),
        heads=HeadsConfig(plddt_channels=16, ptm=True),
    )  # fmt: skip
    base.update(overrides)
    return AlphaFoldConfig(**base)


def synthetic_msa(sequence: str, num_rows: int, seed: int) -> Msa:
    """The query and ``num_rows - 1`` mutants: substitutions, gaps and deletion counts."""
    rng = np.random.default_rng(seed)
    letters = np.array(list(rc.restypes))
    rows, deletions = [sequence], [[0] * len(sequence)]
    for _ in range(num_rows - 1):
        seq = np.array(list(sequence))
        sub = rng.random(len(seq)) < 0.3
        seq[sub] = rng.choice(letters, sub.sum())
        seq[rng.random(len(seq)) < 0.1] = "-"
        dels = np.where(rng.random(len(seq)) < 0.1, rng.integers(1, 6, len(seq)), 0)
        rows.append("".join(seq))
        deletions.append(dels.tolist())
    return Msa(sequences=rows, deletions=deletions)


def villin_template(gap: slice | None = None, *, hide_undefined: bool = True) -> dict[str, np.ndarray]:
    """Raw template features of the villin structure aligned to itself; ``gap`` leaves those
    query residues unaligned (gap letter, no atoms), as a real hit with an indel would.

    The pre-omega torsion of a residue without a predecessor (the first aligned one, the first
    after a gap) comes from a degenerate frame: (0, 0) in exact arithmetic and in Ferryman, but
    AF2 under XLA with fused multiply-adds turns the rounding residual into a random unit vector
    (docs/fidelity.md). ``hide_undefined`` drops the O atom of those residues: their template-row
    position is then masked (its mask is the psi mask), and a masked MSA position never reaches
    any other, so the comparisons measure the models rather than the oracle's rounding.
    """
    prot = villin_protein()
    seq = list(VILLIN_SEQUENCE)
    positions, mask = prot.atom_positions.copy(), prot.atom_mask.copy()
    if gap is not None:
        positions[gap], mask[gap] = 0.0, 0.0
        seq[gap] = ["-"] * len(seq[gap])
    if hide_undefined:
        present = mask[:, rc.atom_order["CA"]] > 0
        first = present & ~np.concatenate([[False], present[:-1]])  # present, predecessor absent
        positions[first, rc.atom_order["O"]], mask[first, rc.atom_order["O"]] = 0.0, 0.0
    return {
        "template_aatype": rc.sequence_to_onehot("".join(seq), rc.HHBLITS_AA_TO_ID)[None].astype(np.float32),
        "template_all_atom_masks": mask[None].astype(np.float32),
        "template_all_atom_positions": positions[None].astype(np.float32),
        "template_domain_names": np.array([b"1vii_A"], dtype=object),
        "template_sequence": np.array(["".join(seq).encode()], dtype=object),
        "template_sum_probs": np.array([[100.0]], np.float32),
    }


def villin_features(*, msa_rows: int = 1, clusters: int = 8, extra: int = 16, templates: tuple = (),
                    seed: int = 0) -> dict[str, np.ndarray]:  # fmt: skip
    """Processed model inputs (numpy) of villin: ``msa_rows`` alignment rows split into at most
    ``clusters`` cluster centres and ``extra`` extra rows, and one template per entry of
    ``templates`` (raw template dicts from ``villin_template``)."""
    msa = synthetic_msa(VILLIN_SEQUENCE, msa_rows, seed)
    raw_templates = None
    if templates:
        raw_templates = {k: np.concatenate([t[k] for t in templates]) for k in templates[0]}
    raw = make_features(VILLIN_SEQUENCE, "villin", [msa], raw_templates)
    cfg = InputConfig(max_msa_clusters=clusters, max_extra_msa=extra, max_templates=4)
    feats = make_model_inputs(raw, cfg, seed)
    if feats["extra_msa"].shape[0] == 0:  # AF2 pads the extra MSA; one masked row stands for it
        for key in ("extra_msa", "extra_msa_mask", "extra_has_deletion", "extra_deletion_value"):
            feats[key] = np.zeros((1, *feats[key].shape[1:]), feats[key].dtype)
    if not templates:
        feats = {k: v for k, v in feats.items() if not k.startswith("template_")}
    return feats


def to_torch(feats: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feats.items() if v.dtype != object}


def to_af2(feats: dict[str, np.ndarray], templates: bool) -> dict[str, np.ndarray]:
    """The oracle's batch: its key names, int32 indices, float32 values; templates only when its
    config embeds them (it reads every ``template_*`` key it is given)."""
    out = {}
    for key in AF2_KEYS:
        if key.startswith("template_") and not templates:
            continue
        value = feats[key]
        out[key] = value.astype(np.int32) if value.dtype.kind in "iu" else value.astype(np.float32)
    if templates:
        out["template_all_atom_masks"] = feats["template_all_atom_mask"].astype(np.float32)
    return out
