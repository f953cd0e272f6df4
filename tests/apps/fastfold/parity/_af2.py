"""AlphaFold2's own JAX code (PyPI ``alphafold-colabfold``) as the oracle: its config sized like a
Ferryman config, random parameters in the official npz layout for both models, and runners.

Facts about that package this relies on (FIELD_NOTES.md): ``model_config`` defaults to bf16,
``RunModel`` casts outputs to fp16 and recycles outside ``apply``, so the references here are
plain ``hk.transform(...).apply`` calls in fp32 with the recycling loop written out; its config
fuses the triangle-multiplication weights, which ``utils.flat_params_to_haiku(fuse=True)``
builds from the unfused arrays the released npz files (and Ferryman's exporter) hold.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import torch
from alphafold.model import config as af2_configs
from alphafold.model import modules, utils

from ferryman.apps.fastfold.model import apply_run_options, build_model
from ferryman.apps.fastfold.model.config import AlphaFoldConfig
from ferryman.apps.fastfold.model.options import RunOptions
from ferryman.apps.fastfold.weights import PREFIX, load_official_params, official_table

_BIASES = ("bias", "output_b", "gating_b", "offset", "trainable_point_weights")


def af2_config(cfg: AlphaFoldConfig, *, bf16: bool = False):
    """AF2's ``model_1_ptm`` ConfigDict (``.model``) resized to ``cfg``, deterministic, fp32 unless
    ``bf16`` (AF2's own default)."""
    c = af2_configs.model_config("model_1_ptm").model
    c.calc_extended_ptm = c.use_probs_extended = False  # RunModel sets these; AlphaFold_noE reads them
    gc = c.global_config
    # One subbatch of any size: AF2 chunks only to save memory (the global attention needs a number).
    gc.bfloat16, gc.deterministic, gc.subbatch_size = bf16, True, 1 << 20
    _resize_trunk(c.embeddings_and_evoformer, cfg)
    _resize_templates(c.embeddings_and_evoformer.template, cfg.template)
    _resize_heads(c.heads, cfg)
    return c


def _resize_trunk(e, cfg: AlphaFoldConfig) -> None:
    # AF2 derives the Evoformer attentions' per-head widths as channels / heads and shares one
    # config between the Evoformer and the extra-MSA stack: Ferryman's config must follow suit.
    assert cfg.c_hidden_msa * cfg.msa_heads == cfg.c_m and cfg.c_hidden_pair * cfg.pair_heads == cfg.c_z
    assert cfg.extra_msa_heads == cfg.msa_heads and cfg.c_hidden_extra * cfg.msa_heads == cfg.c_e
    e.msa_channel, e.pair_channel, e.seq_channel, e.extra_msa_channel = cfg.c_m, cfg.c_z, cfg.c_s, cfg.c_e
    e.evoformer_num_block, e.extra_msa_stack_num_block = cfg.num_evoformer_blocks, cfg.num_extra_msa_blocks
    e.max_relative_feature = cfg.max_relative_feature
    e.prev_pos.update(min_bin=cfg.prev_pos_min_bin, max_bin=cfg.prev_pos_max_bin, num_bins=cfg.prev_pos_num_bins)
    ev = e.evoformer
    ev.msa_row_attention_with_pair_bias.num_head = ev.msa_column_attention.num_head = cfg.msa_heads
    ev.triangle_attention_starting_node.num_head = ev.triangle_attention_ending_node.num_head = cfg.pair_heads
    for name in ("triangle_multiplication_outgoing", "triangle_multiplication_incoming"):
        ev[name].num_intermediate_channel = cfg.c_hidden_mul
    ev.outer_product_mean.num_outer_channel = cfg.c_hidden_opm
    ev.msa_transition.num_intermediate_factor = ev.pair_transition.num_intermediate_factor = cfg.transition_factor


def _resize_templates(te, t) -> None:
    te.enabled, te.embed_torsion_angles = t.enabled, t.embed_torsion_angles
    te.use_template_unit_vector, te.subbatch_size = t.use_unit_vector, None
    width = t.pointwise_heads * t.c_hidden_pointwise
    te.attention.update(num_head=t.pointwise_heads, key_dim=width, value_dim=width)
    te.dgram_features.update(min_bin=t.dgram_min_bin, max_bin=t.dgram_max_bin, num_bins=t.dgram_num_bins)
    tp = te.template_pair_stack
    tp.num_block = t.num_blocks
    assert t.c_hidden_att * t.num_heads == t.c_t  # AF2 takes c_t from the ending node's value_dim
    for name in ("triangle_attention_starting_node", "triangle_attention_ending_node"):
        tp[name].update(num_head=t.num_heads, key_dim=t.c_t, value_dim=t.c_t)
    for name in ("triangle_multiplication_outgoing", "triangle_multiplication_incoming"):
        tp[name].num_intermediate_channel = t.c_hidden_mul
    tp.pair_transition.num_intermediate_factor = t.transition_factor


def _resize_heads(heads, cfg: AlphaFoldConfig) -> None:
    s, h = cfg.structure, cfg.heads
    heads.structure_module.update(
        num_layer=s.num_layers, num_channel=cfg.c_s, num_head=s.num_heads, num_scalar_qk=s.c_hidden_scalar,
        num_scalar_v=s.c_hidden_scalar, num_point_qk=s.num_qk_points, num_point_v=s.num_v_points,
        num_layer_in_transition=s.num_transition_layers, position_scale=s.position_scale,
    )  # fmt: skip
    heads.structure_module.sidechain.update(num_channel=s.c_resnet, num_residual_block=s.num_resnet_blocks)
    heads.predicted_lddt.update(num_channels=h.plddt_channels, num_bins=h.plddt_bins)
    heads.distogram.update(num_bins=h.distogram_bins, first_break=h.distogram_first_break,
                           last_break=h.distogram_last_break)  # fmt: skip
    heads.masked_msa.num_output = h.masked_msa_classes
    heads.predicted_aligned_error.update(weight=0.1 if h.ptm else 0.0, num_bins=h.pae_bins,
                                         max_error_bin=h.pae_max_error_bin)  # fmt: skip


def random_official_params(cfg: AlphaFoldConfig, *, scale: float, seed: int = 0,
                           scales: dict[str, float] | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Random arrays at every official key of ``cfg``'s model: weights ~ N(0, scale^2 / fan_in),
    biases and LayerNorm offsets ~ N(0, 0.1^2), LayerNorm scales ~ 1 + N(0, 0.1^2). ``scales``
    maps module paths (after ``alphafold/alphafold_iteration/``) to a scale of their own.

    Written straight in the official layout, so the oracle reads them as it reads the released
    files and Ferryman goes through its npz importer, as a user's run does.
    """
    with torch.device("meta"):
        table = official_table(build_model(cfg))
    rng = np.random.default_rng(seed)
    params = {}
    for key, entry in sorted(table.items()):
        name = key.rsplit("//", 1)[1]
        noise = rng.standard_normal(entry.full_shape).astype(np.float32)
        shape = entry.shape  # one layer's shape
        if name == "scale":
            params[key] = 1.0 + 0.1 * noise
        elif name in _BIASES or len(shape) == 1:
            params[key] = 0.1 * noise
        else:  # weights [in, out], attention [in, H, D], output_w [H, D, out] / [c, c, out]
            fan_in = math.prod(shape[:-1]) if name == "output_w" else shape[0]
            path = key.removeprefix(PREFIX)
            own = [v for k, v in (scales or {}).items() if path.startswith(k)]
            params[key] = noise * np.float32((own[0] if own else scale) / math.sqrt(fan_in))
    return params


def perturbed(params: dict[str, np.ndarray], rel: float, seed: int = 1) -> dict[str, np.ndarray]:
    """Every array times (1 + rel * N(0, 1)): the noise floor of a comparison."""
    rng = np.random.default_rng(seed)
    return {k: (v * (1 + rel * rng.standard_normal(v.shape))).astype(np.float32) for k, v in params.items()}


def ferryman_model(cfg: AlphaFoldConfig, params: dict[str, np.ndarray], run: RunOptions):
    """Ferryman's model with ``params`` loaded through its official-npz importer, run as ``run`` says."""
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params_model_1_ptm.npz"
        np.savez(path, **params)
        load_official_params(model, path)
    return apply_run_options(model, run).eval()


def haiku_params(params: dict[str, np.ndarray]) -> dict:
    """Official flat arrays -> the oracle's nested params, triangle weights fused as it expects."""
    return utils.flat_params_to_haiku(params, fuse=True)


def module_params(transformed, hparams: dict, layer: int, *args) -> dict:
    """The parameters ``transformed`` needs, taken from a full model's ``hparams``; arrays stacked
    over layers (Evoformer blocks, template pair blocks) give their ``layer``-th slice."""
    shapes = jax.eval_shape(transformed.init, jax.random.PRNGKey(0), *args)
    out = {}
    for scope, names in shapes.items():
        out[scope] = {}
        for name, spec in names.items():
            value = hparams[scope][name]
            if value.ndim == len(spec.shape) + 1:
                value = value[layer]
            assert value.shape == spec.shape, (scope, name, value.shape, spec.shape)
            out[scope][name] = value
    return out


def module_runner(fn, hparams: dict, *example_args, layer: int = 0):
    """``fn`` (Haiku code building AF2 modules under their official scopes) jitted once, with its
    parameters taken from ``hparams``: a function of new arguments shaped like ``example_args``
    returning numpy outputs."""
    transformed = hk.transform(fn)
    params = module_params(transformed, hparams, layer, *example_args)
    apply = jax.jit(transformed.apply)
    return lambda *args: jax.tree_util.tree_map(np.asarray, apply(params, jax.random.PRNGKey(0), *args))


def run_module(fn, hparams: dict, *args, layer: int = 0):
    """``fn(*args)`` once through ``module_runner``."""
    return module_runner(fn, hparams, *args, layer=layer)(*args)


def whole_model(c):
    """Jitted ``apply(params, batch)`` of one AF2 iteration (``AlphaFold_noE``: recycling is the
    caller's loop, every output kept in its compute dtype, representations returned)."""

    def forward(batch):
        return modules.AlphaFold_noE(c)(batch, is_training=False, return_representations=True)

    transformed = hk.transform(forward)
    apply = jax.jit(transformed.apply)
    return lambda params, batch: apply(params, jax.random.PRNGKey(0), batch)


def run_whole_model(apply, params: dict, batch: dict, cfg: AlphaFoldConfig, num_recycle: int) -> dict:
    """AF2 with ``num_recycle`` recycling iterations, each iteration's ``prev`` fed to the next."""
    n = batch["aatype"].shape[0]
    prev = {
        "prev_msa_first_row": jnp.zeros((n, cfg.c_m)),
        "prev_pair": jnp.zeros((n, n, cfg.c_z)),
        "prev_pos": jnp.zeros((n, 37, 3)),
    }
    for _ in range(num_recycle + 1):
        out = apply(params, {**batch, "prev": prev})
        prev = out["prev"]
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), out)


# what -> (max deviation, bound, max |AF2|) of every comparison run, for the session summary.
DEVIATIONS: dict[str, tuple[float, float, float]] = {}


def assert_matches(ours, ref, *, atol: float, what: str = "", min_scale: float = 0.1) -> float:
    """max |ours - ref| <= atol, with ``ref`` large enough (``min_scale``) for the bound to mean
    something; returns the deviation."""
    ours = ours.detach().float().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    ref = np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != AF2's {ref.shape}"
    err, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    DEVIATIONS[what] = (err, atol, scale)
    assert scale >= min_scale, f"{what}: AF2's output is too small ({scale:.2e}) to test against"
    assert err <= atol, f"{what}: max |Ferryman - AF2| = {err:.2e} > {atol:.0e} (max |AF2| = {scale:.2f})"
    return err
