"""AlphaFold-Multimer's own JAX code (``modules_multimer``, ``folding_multimer``) as the oracle:
its config sized like a Ferryman multimer config, random parameters in the official multimer v3
layout (fused triangle multiplications), and the whole-model runner.

The monomer suite's helpers (``_af2``) do the rest: parameters are drawn by
``random_official_params`` over the same model's monomer-named table, then renamed, reshaped and
fused into the v3 layout by Ferryman's own ``multimer_weights`` (so a wrong table shows up as a
shape or key error in the oracle, which reads the arrays by its own names).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import haiku as hk
import jax
import numpy as np
import torch
from alphafold.model import config as af2_configs
from alphafold.model import modules_multimer
from alphafold.model.geometry import Rigid3Array

from ferryman.apps.fastfold import multimer_weights
from ferryman.apps.fastfold.model import build_model
from ferryman.apps.fastfold.model.config import AlphaFoldConfig
from ferryman.apps.fastfold.model.options import RunOptions

from ._af2 import _resize_heads, _resize_templates, _resize_trunk, random_official_params

UNCAPPED = 1 << 16  # num_msa / num_extra_msa: the features are sampled by Ferryman beforehand


def af2_multimer_config(cfg: AlphaFoldConfig, *, bf16: bool = False):
    """AF2's ``model_1_multimer_v3`` ConfigDict (``.model``) resized to ``cfg``, fp32 unless ``bf16``."""
    c = af2_configs.model_config("model_1_multimer_v3").model
    c.calc_extended_ptm = c.use_probs_extended = False
    gc = c.global_config
    gc.bfloat16, gc.deterministic, gc.subbatch_size = bf16, True, 1 << 20
    e = c.embeddings_and_evoformer
    _resize_trunk(e, cfg)
    e.max_relative_idx, e.max_relative_chain = cfg.max_relative_feature, cfg.max_relative_chain
    e.num_msa, e.num_extra_msa = UNCAPPED, UNCAPPED
    _resize_templates(e.template, cfg.template)
    e.template.num_channels = cfg.template.c_t
    _resize_heads(c.heads, cfg)
    c.heads.structure_module.position_scale = cfg.structure.position_scale
    return c


def random_multimer_params(cfg: AlphaFoldConfig, *, scale: float, seed: int = 0,
                           scales: dict[str, float] | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Random arrays at every official multimer v3 key of ``cfg``'s model (see the module doc)."""
    flat = random_official_params(cfg, scale=scale, seed=seed, scales=scales)
    with torch.device("meta"):
        table = multimer_weights.official_table(build_model(cfg))
    renamed = {}
    for key, value in flat.items():
        new = multimer_weights._rename(key)
        renamed[new] = value.reshape(table[new].full_shape)
    return multimer_weights.fuse(renamed)


def ferryman_multimer(cfg: AlphaFoldConfig, params: dict[str, np.ndarray], run: RunOptions):
    """Ferryman's multimer model with ``params`` loaded through its official-npz importer, run as
    ``run`` says."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params_model_1_multimer_v3.npz"
        np.savez(path, **params)
        return multimer_weights.model_from_official_params(cfg, path, run=run)


def whole_multimer(c):
    """Jitted ``apply(params, batch)`` of one AF2-Multimer iteration (``batch['prev']`` in, out)."""

    def forward(batch):
        return modules_multimer.AlphaFold(c)(batch, is_training=False, return_representations=True)

    apply = jax.jit(hk.transform(forward).apply)
    return lambda params, batch: apply(params, jax.random.PRNGKey(0), batch)


class _SubtractFirst:
    def __init__(self, rigid: Rigid3Array):
        self.rigid = rigid

    def apply_to_point(self, point):
        return self.rigid.apply_inverse_to_point(point)  # R^T (p - t)


@contextlib.contextmanager
def exact_self_vectors():
    """While active (the oracle is traced inside it), AF2-Multimer's template unit vectors are
    measured as R^T (p - t), as Ferryman measures them, instead of R^T p + (-R^T t).

    The two agree to rounding except from a residue to itself: there AF2's form leaves a rounding
    residual of ~1e-6 A, which ``normalized`` (its norm clipped below at 1e-6) turns into a vector
    of length up to 1 in an arbitrary direction, a different one for every compiler and machine;
    exact arithmetic gives 0. ``Rigid3Array.inverse`` is used by nothing else the oracle runs here
    (its other callers are losses).
    """
    original = Rigid3Array.inverse
    Rigid3Array.inverse = lambda self: _SubtractFirst(self)
    try:
        yield
    finally:
        Rigid3Array.inverse = original


# The oracle's model inputs when the MSA is sampled beforehand (its ``presampled`` path).
AF2_KEYS = (
    "aatype", "residue_index", "asym_id", "entity_id", "sym_id", "seq_mask", "msa", "msa_mask", "deletion_matrix",
    "cluster_profile", "cluster_deletion_mean", "extra_msa", "extra_msa_mask", "extra_deletion_matrix",
    "template_aatype", "template_all_atom_positions", "template_all_atom_mask",
)  # fmt: skip


def to_af2_multimer(feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The oracle's batch: int32 indices, float32 values, and the dummy atoms its iteration needs
    before it runs the structure module."""
    out = {}
    for key in AF2_KEYS:
        value = feats[key]
        out[key] = value.astype(np.int32) if value.dtype.kind in "iu" else value.astype(np.float32)
    out["all_atom_positions"] = np.zeros((len(feats["aatype"]), 37, 3), np.float32)
    return out
