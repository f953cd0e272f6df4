"""Raw features -> model inputs, following AlphaFold2's eval input pipeline (AF2 Suppl. 1.2).

Order as in AF2: map the HHblits alphabet to ours, squeeze, masks, HHblits profile, template
aatype and pseudo-beta, atom14 masks; then per sample: choose cluster centres (query first, rest
shuffled), BERT-style masking (Suppl. 1.2.7), assign extra sequences to their nearest centre,
summarise clusters, crop the extra MSA and build `msa_feat` (49 channels, Suppl. Table 1).

Outputs (no batch dim, OpenFold names): aatype [N], residue_index [N], seq_length [], seq_mask [N],
target_feat [N, 22], msa [S, N], msa_mask [S, N], msa_row_mask [S], bert_mask [S, N],
true_msa [S, N], msa_feat [S, N, 49], extra_msa [E, N], extra_msa_mask, extra_has_deletion,
extra_deletion_value [E, N], extra_msa_row_mask [E], extra_msa_feat [E, N, 25],
template_aatype [T, N], template_all_atom_positions [T, N, 37, 3], template_all_atom_mask
[T, N, 37], template_mask [T], template_pseudo_beta [T, N, 3], template_pseudo_beta_mask [T, N],
template_sum_probs [T, 1], atom14_atom_exists [N, 14], residx_atom14_to_atom37 [N, 14],
residx_atom37_to_atom14 [N, 37], atom37_atom_exists [N, 37].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.data.features import FeatureDict, make_atom14_masks

MSA_GAP = 21  # index of '-' in restypes_with_x_and_gap
MSA_MASK_TOKEN = 22  # the extra category BERT masking writes


@dataclass(kw_only=True)
class InputConfig:
    """AF2 eval settings (model_config: data.eval and data.common)."""

    max_msa_clusters: int = 512
    max_extra_msa: int = 1024
    max_templates: int = 4
    masked_msa_replace_fraction: float = 0.15
    uniform_prob: float = 0.1
    profile_prob: float = 0.1
    same_prob: float = 0.1

    def __post_init__(self) -> None:
        if self.max_msa_clusters < 1:
            raise ValueError("max_msa_clusters must be at least 1 (the query)")
        if self.max_extra_msa < 0 or self.max_templates < 0:
            raise ValueError("max_extra_msa and max_templates must be >= 0")


def one_hot(x: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[x]


def _deletion_value(deletions: np.ndarray) -> np.ndarray:
    return (np.arctan(deletions / 3.0) * (2.0 / np.pi)).astype(np.float32)


def nonensembled(raw: FeatureDict) -> FeatureDict:
    """The sample-independent part: alphabets, squeezes, masks, profile, templates, atom masks."""
    hh_to_ours = np.array(rc.MAP_HHBLITS_AATYPE_TO_OUR_AATYPE, dtype=np.int64)
    aatype = np.argmax(raw["aatype"], axis=-1).astype(np.int64)
    num_res = aatype.shape[0]
    msa = hh_to_ours[raw["msa"].astype(np.int64)]
    feats: FeatureDict = {
        "aatype": aatype,
        "residue_index": raw["residue_index"].astype(np.int64),
        "seq_length": np.asarray(num_res, dtype=np.int64),
        "between_segment_residues": raw["between_segment_residues"].astype(np.int64),
        "seq_mask": np.ones((num_res,), np.float32),
        "msa": msa,
        "deletion_matrix": raw["deletion_matrix_int"].astype(np.float32),
        "msa_mask": np.ones(msa.shape, np.float32),
        "msa_row_mask": np.ones(msa.shape[:1], np.float32),
    }
    feats["hhblits_profile"] = one_hot(msa, 22).mean(axis=0)
    feats.update(_template_features(raw, hh_to_ours))
    feats.update(make_atom14_masks(aatype))
    return feats


def _template_features(raw: FeatureDict, hh_to_ours: np.ndarray) -> FeatureDict:
    t_aatype = hh_to_ours[np.argmax(raw["template_aatype"], axis=-1).astype(np.int64)]
    if raw["template_aatype"].shape[0] == 0:
        t_aatype = np.zeros(raw["template_aatype"].shape[:2], np.int64)
    positions = raw["template_all_atom_positions"].astype(np.float32)
    masks = raw["template_all_atom_masks"].astype(np.float32)
    is_gly = t_aatype == rc.restype_order["G"]
    ca, cb = rc.atom_order["CA"], rc.atom_order["CB"]
    pseudo_beta = np.where(is_gly[..., None], positions[..., ca, :], positions[..., cb, :])
    pseudo_beta_mask = np.where(is_gly, masks[..., ca], masks[..., cb])
    return {
        "template_aatype": t_aatype,
        "template_all_atom_positions": positions,
        "template_all_atom_mask": masks,
        "template_mask": np.ones(t_aatype.shape[:1], np.float32),
        "template_pseudo_beta": pseudo_beta.astype(np.float32),
        "template_pseudo_beta_mask": pseudo_beta_mask.astype(np.float32),
        "template_sum_probs": raw["template_sum_probs"].astype(np.float32),
    }


def sample_msa(feats: FeatureDict, max_seq: int, rng: np.random.Generator) -> FeatureDict:
    """Query first, the rest shuffled; the first `max_seq` become cluster centres, the rest extra."""
    num_seq = feats["msa"].shape[0]
    order = np.concatenate([[0], rng.permutation(np.arange(1, num_seq))]).astype(np.int64)
    chosen, rest = order[:max_seq], order[max_seq:]
    out = dict(feats)
    for key in ("msa", "deletion_matrix", "msa_mask", "bert_mask", "true_msa"):
        if key in feats:
            out["extra_" + key] = feats[key][rest]
            out[key] = feats[key][chosen]
    out["msa_row_mask"] = np.ones((len(chosen),), np.float32)
    return out


def masked_msa(feats: FeatureDict, cfg: InputConfig, rng: np.random.Generator) -> FeatureDict:
    """BERT-style corruption (AF2 Suppl. 1.2.7): uniform / profile / same / mask-token replacement."""
    msa = feats["msa"]
    random_aa = np.array([0.05] * 20 + [0.0, 0.0], np.float32)
    probs = (
        cfg.uniform_prob * random_aa
        + cfg.profile_prob * feats["hhblits_profile"]
        + cfg.same_prob * one_hot(msa, 22)
    )  # [S, N, 22]
    mask_prob = 1.0 - cfg.profile_prob - cfg.same_prob - cfg.uniform_prob
    probs = np.concatenate([probs, np.full((*probs.shape[:-1], 1), mask_prob, np.float32)], axis=-1)
    cumulative = np.cumsum(probs, axis=-1)
    draw = rng.random((*msa.shape, 1), dtype=np.float32) * cumulative[..., -1:]
    sampled = np.minimum((draw > cumulative).sum(-1), 22)
    replace = rng.random(msa.shape, dtype=np.float32) < cfg.masked_msa_replace_fraction
    out = dict(feats)
    out["true_msa"] = msa
    out["bert_mask"] = replace.astype(np.float32)
    out["msa"] = np.where(replace, sampled, msa).astype(np.int64)
    return out


def cluster_extra_msa(feats: FeatureDict, block: int = 1024) -> FeatureDict:
    """Assign each extra sequence to its nearest centre by agreement (gaps weigh 0), then average.

    AF2's one-hot einsum and segment sums, done as matrix products over blocks of extra rows so
    that 5120 extra sequences of a long chain stay within memory and use BLAS.
    """
    num_seq, num_res = feats["msa"].shape
    weights = np.concatenate([np.ones(21), np.zeros(2)]).astype(np.float32)
    centres = (feats["msa_mask"][..., None] * one_hot(feats["msa"], 23) * weights).reshape(num_seq, -1)  # [S, N*23]
    msa_sum = one_hot(feats["msa"], 23).reshape(num_seq, -1)  # [S, N*23], each centre counts itself
    del_sum = feats["deletion_matrix"].astype(np.float32).copy()  # [S, N]
    counts = 1e-6 + feats["msa_mask"].astype(np.float32)  # [S, N]
    for start in range(0, feats["extra_msa"].shape[0], block):
        rows = slice(start, start + block)
        mask = feats["extra_msa_mask"][rows]  # [B, N]
        extra = (mask[..., None] * one_hot(feats["extra_msa"][rows], 23)).reshape(mask.shape[0], -1)  # [B, N*23]
        assignment = np.argmax(extra @ centres.T, axis=1)  # [B], first centre on ties like AF2's argmax
        member = np.zeros((num_seq, mask.shape[0]), np.float32)  # [S, B]
        member[assignment, np.arange(mask.shape[0])] = 1.0
        msa_sum += member @ extra
        del_sum += member @ (mask * feats["extra_deletion_matrix"][rows])
        counts += member @ mask
    out = dict(feats)
    out["cluster_profile"] = msa_sum.reshape(num_seq, num_res, 23) / counts[..., None]
    out["cluster_deletion_mean"] = del_sum / counts
    return out


def crop_extra_msa(feats: FeatureDict, max_extra: int, rng: np.random.Generator) -> FeatureDict:
    num_extra = feats["extra_msa"].shape[0]
    keep = rng.permutation(num_extra)[: min(max_extra, num_extra)]
    out = dict(feats)
    for key in [k for k in feats if k.startswith("extra_")]:
        out[key] = feats[key][keep]
    return out


def make_msa_feat(feats: FeatureDict) -> FeatureDict:
    """target_feat [N, 22], msa_feat [S, N, 49] and the extra-MSA channels (AF2 Suppl. Table 1)."""
    out = dict(feats)
    has_break = np.clip(feats["between_segment_residues"], 0, 1).astype(np.float32)
    out["target_feat"] = np.concatenate([has_break[:, None], one_hot(feats["aatype"], 21)], axis=-1)
    deletions = feats["deletion_matrix"]
    out["msa_feat"] = np.concatenate(
        [
            one_hot(feats["msa"], 23),
            np.clip(deletions, 0, 1)[..., None].astype(np.float32),
            _deletion_value(deletions)[..., None],
            feats["cluster_profile"].astype(np.float32),
            _deletion_value(feats["cluster_deletion_mean"])[..., None],
        ],
        axis=-1,
    )
    extra_del = feats["extra_deletion_matrix"]
    out["extra_has_deletion"] = np.clip(extra_del, 0, 1).astype(np.float32)
    out["extra_deletion_value"] = _deletion_value(extra_del)
    out["extra_msa_feat"] = np.concatenate(
        [one_hot(feats["extra_msa"], 23), out["extra_has_deletion"][..., None], out["extra_deletion_value"][..., None]],
        axis=-1,
    )
    out["extra_msa_row_mask"] = np.ones(extra_del.shape[:1], np.float32)
    return out


def crop_templates(feats: FeatureDict, max_templates: int) -> FeatureDict:
    out = dict(feats)
    for key in [k for k in feats if k.startswith("template_")]:
        out[key] = feats[key][:max_templates]
    return out


_DROP = ("hhblits_profile", "cluster_profile", "cluster_deletion_mean", "between_segment_residues")


def make_model_inputs(raw: FeatureDict, cfg: InputConfig, seed: int) -> FeatureDict:
    """One sample of model inputs; the same seed gives the same MSA clustering and masking."""
    rng = np.random.default_rng(seed)
    feats = nonensembled(raw)
    feats = sample_msa(feats, cfg.max_msa_clusters, rng)
    if cfg.masked_msa_replace_fraction > 0:
        feats = masked_msa(feats, cfg, rng)
    else:  # AF2 skips the step; keep the keys so the model sees one layout
        feats.update(true_msa=feats["msa"], bert_mask=np.zeros(feats["msa"].shape, np.float32))
    feats = cluster_extra_msa(feats)
    feats = crop_extra_msa(feats, cfg.max_extra_msa, rng)
    feats = make_msa_feat(feats)
    feats = crop_templates(feats, cfg.max_templates)
    feats["deletion_matrix"] = feats["deletion_matrix"].astype(np.float32)
    return {k: v for k, v in feats.items() if k not in _DROP}
