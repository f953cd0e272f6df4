"""Merged complex features -> AlphaFold-Multimer model inputs (AF2 ``modules_multimer``: the MSA
sampling AF2-Multimer does inside its model, here once per prediction in numpy).

Steps, as AF2: the MSA profile over all rows; cluster centres drawn without replacement by the
Gumbel trick, each chain's query row first (``cluster_bias_mask``) and fully masked rows last;
BERT-style masking within each chain's block (``bert_mask``); every extra row softly assigned to
the centres it agrees with (softmax of 1000 x agreement) for the cluster profile; the 49-channel
``msa_feat`` and the first ``max_extra_msa`` extra rows. Fully masked rows (AF2 pads the MSA to
512 rows) are then dropped: no real residue ever attends to them, so the model's outputs are the
same without them and the work is not spent.

Outputs (no batch dim): aatype [N], residue_index, asym_id, entity_id, sym_id [N], seq_mask [N],
target_feat [N, 21], msa [S, N], msa_mask, deletion_matrix, bert_mask, true_msa [S, N],
cluster_profile [S, N, 23], cluster_deletion_mean [S, N], msa_feat [S, N, 49], extra_msa [E, N],
extra_msa_mask, extra_deletion_matrix, extra_has_deletion, extra_deletion_value [E, N],
template_aatype [T, N], template_all_atom_positions [T, N, 37, 3], template_all_atom_mask
[T, N, 37], and the atom14/atom37 index maps and masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ferryman.apps.fastfold.data.features import FeatureDict, make_atom14_masks
from ferryman.apps.fastfold.data.transforms import one_hot

_MSA_KEYS = ("msa", "deletion_matrix", "msa_mask", "bert_mask")


@dataclass(kw_only=True)
class MultimerInputConfig:
    """AF2-Multimer's sampling settings (config.py ``embeddings_and_evoformer``: num_msa,
    num_extra_msa, masked_msa)."""

    max_msa_clusters: int = 508
    max_extra_msa: int = 2048
    masked_msa_replace_fraction: float = 0.15
    uniform_prob: float = 0.1
    profile_prob: float = 0.1
    same_prob: float = 0.1

    def __post_init__(self) -> None:
        if self.max_msa_clusters < 1:
            raise ValueError("max_msa_clusters must be at least 1 (the query)")
        if self.max_extra_msa < 0:
            raise ValueError("max_extra_msa must be >= 0")


def gumbel(rng: np.random.Generator, shape, eps: float = 1e-6) -> np.ndarray:
    uniform = rng.random(shape, dtype=np.float32)
    return -np.log(-np.log(uniform + eps) + eps)


def msa_profile(feats: FeatureDict) -> np.ndarray:
    """``[N, 22]`` frequency of each residue type over the unmasked rows (AF2 ``make_msa_profile``)."""
    mask = feats["msa_mask"][:, :, None]
    return (mask * one_hot(feats["msa"], 22)).sum(0) / (1e-10 + mask.sum(0))


def sample_msa(feats: FeatureDict, max_seq: int, rng: np.random.Generator) -> FeatureDict:
    """Cluster centres and extra rows in Gumbel order: queries first, empty rows last."""
    logits = (np.clip(feats["msa_mask"].sum(-1), 0.0, 1.0) - 1.0) * 1e6 + feats["cluster_bias_mask"] * 1e6
    order = np.argsort(-(logits + gumbel(rng, logits.shape)), kind="stable")
    chosen, rest = order[:max_seq], order[max_seq:]
    out = dict(feats)
    for key in _MSA_KEYS:
        out["extra_" + key] = feats[key][rest]
        out[key] = feats[key][chosen]
    return out


def masked_msa(feats: FeatureDict, profile: np.ndarray, cfg: MultimerInputConfig, rng: np.random.Generator) -> FeatureDict:
    """BERT corruption of the centres (AF2-Multimer ``make_masked_msa``), within chain blocks."""
    msa, mask = feats["msa"], feats["msa_mask"]
    random_aa = np.array([0.05] * 20 + [0.0, 0.0], np.float32)
    probs = cfg.uniform_prob * random_aa + cfg.profile_prob * profile + cfg.same_prob * one_hot(msa, 22)
    mask_prob = 1.0 - cfg.profile_prob - cfg.same_prob - cfg.uniform_prob
    probs = np.concatenate([probs, np.full((*probs.shape[:-1], 1), mask_prob, np.float32)], axis=-1)  # [S, N, 23]
    position = (rng.random(msa.shape, dtype=np.float32) < cfg.masked_msa_replace_fraction) * mask
    sampled = np.argmax(np.log(probs + 1e-6) + gumbel(rng, probs.shape), axis=-1)
    out = dict(feats)
    out["true_msa"] = msa
    out["msa"] = (np.where(position > 0, sampled, msa) * mask).astype(np.int64)
    out["bert_mask"] = feats["bert_mask"] * position.astype(np.float32)
    return out


def nearest_neighbor_clusters(feats: FeatureDict, gap_agreement_weight: float = 0.0) -> FeatureDict:
    """Cluster profile ``[S, N, 23]`` and deletion mean ``[S, N]``: each extra row shared among
    the centres by softmax(1000 x agreement) (AF2-Multimer ``nearest_neighbor_clusters``)."""
    weights = np.array([1.0] * 21 + [gap_agreement_weight] + [0.0], np.float32)
    msa_mask, extra_mask = feats["msa_mask"], feats["extra_msa_mask"]
    msa_onehot = msa_mask[..., None] * one_hot(feats["msa"], 23)  # [S, N, 23]
    extra_onehot = extra_mask[..., None] * one_hot(feats["extra_msa"], 23)  # [E, N, 23]
    agreement = np.einsum("mrc,nrc->nm", extra_onehot, weights * msa_onehot)  # [S, E]
    logits = 1e3 * agreement
    assignment = np.exp(logits - logits.max(0, keepdims=True))
    assignment /= assignment.sum(0, keepdims=True)
    # AF2 weights each assignment by the number of positions both rows have (not a 0/1 mask).
    assignment *= np.einsum("mr,nr->mn", msa_mask, extra_mask)
    count = assignment.sum(-1) + 1.0  # [S]; every centre counts itself
    profile = (np.einsum("nm,mrc->nrc", assignment, extra_onehot) + msa_onehot) / count[:, None, None]
    deletions = np.einsum("nm,mc->nc", assignment, extra_mask * feats["extra_deletion_matrix"])
    out = dict(feats)
    out["cluster_profile"] = profile.astype(np.float32)
    out["cluster_deletion_mean"] = ((deletions + feats["deletion_matrix"]) / count[:, None]).astype(np.float32)
    return out


def _deletion_value(x: np.ndarray) -> np.ndarray:
    return (np.arctan(x / 3.0) * (2.0 / np.pi)).astype(np.float32)


def make_msa_feat(feats: FeatureDict, max_extra: int) -> FeatureDict:
    """msa_feat ``[S, N, 49]``, target_feat ``[N, 21]`` and the first ``max_extra`` extra rows."""
    out = dict(feats)
    deletions = feats["deletion_matrix"]
    out["msa_feat"] = np.concatenate(
        [
            one_hot(feats["msa"], 23),
            np.clip(deletions, 0.0, 1.0)[..., None].astype(np.float32),
            _deletion_value(deletions)[..., None],
            feats["cluster_profile"],
            _deletion_value(feats["cluster_deletion_mean"])[..., None],
        ],
        axis=-1,
    )
    out["target_feat"] = one_hot(feats["aatype"], 21)
    for key in ("extra_msa", "extra_msa_mask", "extra_deletion_matrix", "extra_bert_mask"):
        out[key] = feats[key][:max_extra]
    out["extra_has_deletion"] = np.clip(out["extra_deletion_matrix"], 0.0, 1.0).astype(np.float32)
    out["extra_deletion_value"] = _deletion_value(out["extra_deletion_matrix"])
    return out


def drop_empty_rows(feats: FeatureDict) -> FeatureDict:
    """Remove MSA and extra rows with no unmasked position; an MSA or extra MSA left empty keeps
    one masked row, so every tensor the model reads has at least one row."""
    out = dict(feats)
    groups = {
        "msa_mask": ("msa", "msa_mask", "deletion_matrix", "bert_mask", "true_msa", "cluster_profile",
                     "cluster_deletion_mean", "msa_feat"),
        "extra_msa_mask": ("extra_msa", "extra_msa_mask", "extra_deletion_matrix", "extra_bert_mask",
                           "extra_has_deletion", "extra_deletion_value"),
    }  # fmt: skip
    for mask_key, keys in groups.items():
        keep = np.flatnonzero(feats[mask_key].sum(-1) > 0)
        for key in keys:
            value = feats[key][keep] if len(keep) else feats[key][:1]
            out[key] = value if len(value) else np.zeros((1, *value.shape[1:]), value.dtype)
    return out


def make_multimer_inputs(raw: FeatureDict, cfg: MultimerInputConfig, seed: int) -> FeatureDict:
    """One sample of model inputs from the merged features of ``multimer_pipeline``."""
    rng = np.random.default_rng(seed)
    feats = {k: v for k, v in raw.items() if not isinstance(v, np.ndarray) or v.dtype != object}
    for key in ("aatype", "residue_index", "asym_id", "entity_id", "sym_id", "msa", "template_aatype"):
        feats[key] = feats[key].astype(np.int64)
    feats["msa_mask"] = feats["msa_mask"].astype(np.float32)
    feats["deletion_matrix"] = feats["deletion_matrix"].astype(np.float32)
    profile = msa_profile(feats)
    feats = sample_msa(feats, cfg.max_msa_clusters, rng)
    feats = masked_msa(feats, profile, cfg, rng)
    feats = nearest_neighbor_clusters(feats)
    feats = make_msa_feat(feats, cfg.max_extra_msa)
    feats = drop_empty_rows(feats)
    feats.update(make_atom14_masks(feats["aatype"]))
    if "asym_chain_ids" in raw:  # which FASTA chain each asym_id is, for the outputs
        feats["asym_chain_ids"] = raw["asym_chain_ids"]
    return feats
