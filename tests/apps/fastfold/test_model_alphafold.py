"""The whole AlphaFold2 model: outputs, chunking, in-place updates, kernels, precision."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ferryman.apps.fastfold.model import (
    AlphaFoldConfig,
    RunOptions,
    apply_run_options,
    build_model,
    random_weights_model,
)
from ferryman.apps.fastfold.model.alphafold import auto_chunk_size
from ferryman.apps.fastfold.presets import tiny
from ferryman.core.errors import ConfigError, UserError

from ._model_inputs import random_features, ref_run

FLOAT_KEYS = ("final_atom_positions", "plddt", "distogram_logits", "pae_logits", "masked_msa_logits", "pair", "single")


@pytest.fixture(scope="module")
def tiny_run():
    model = random_weights_model(tiny(), seed=1, run=ref_run())
    batch = random_features()
    with torch.no_grad():
        out = model(batch)
    return model, batch, out



def test_outputs_shapes_and_ranges(tiny_run):
    _, batch, out = tiny_run
    n, s = batch["aatype"].shape[0], batch["msa_feat"].shape[0]
    assert out["final_atom_positions"].shape == (n, 37, 3)
    assert out["final_atom14_positions"].shape == (n, 14, 3)
    assert out["plddt"].shape == (n,) and ((out["plddt"] >= 0) & (out["plddt"] <= 100)).all()
    assert out["distogram_logits"].shape == (n, n, 64)
    torch.testing.assert_close(out["distogram_logits"], out["distogram_logits"].transpose(0, 1))
    assert out["masked_msa_logits"].shape == (s, n, 23)
    assert out["experimentally_resolved_logits"].shape == (n, 37)
    assert out["predicted_aligned_error"].shape == (n, n) and 0 < out["ptm"] <= 1
    assert out["predicted_aligned_error"].max() <= out["max_predicted_aligned_error"]
    # Atoms a residue type lacks are exactly zero; the ones it has are placed.
    absent = out["final_atom_mask"] == 0
    assert (out["final_atom_positions"][absent] == 0).all()
    assert out["final_atom_positions"][~absent].abs().sum(-1).gt(0).all()
    # Backbone geometry comes from the literature positions: N-CA is 1.46 A in every residue.
    n_ca = (out["final_atom_positions"][:, 0] - out["final_atom_positions"][:, 1]).norm(dim=-1)
    torch.testing.assert_close(n_ca, torch.full_like(n_ca, 1.46), atol=0.02, rtol=0)


def _max_diff(a: dict, b: dict) -> dict:
    return {k: (a[k] - b[k]).abs().max().item() for k in FLOAT_KEYS}


def _run_as(model, run: RunOptions, batch: dict) -> dict:
    """The model's outputs under ``run``, its own options restored afterwards."""
    before = model.run_options
    apply_run_options(model, run)
    try:
        with torch.no_grad():
            return model(batch)
    finally:
        apply_run_options(model, before)


def test_chunked_equals_unchunked(tiny_run):
    model, batch, out = tiny_run
    chunked = _run_as(model, ref_run(chunk_size=3), batch)
    for key in FLOAT_KEYS:
        torch.testing.assert_close(chunked[key], out[key], rtol=1e-5, atol=2e-5, msg=key)


def test_inplace_updates_change_nothing(tiny_run):
    model, batch, out = tiny_run
    assert model.run_options.inplace
    plain = _run_as(model, ref_run(inplace=False), batch)
    assert max(_max_diff(plain, out).values()) == 0.0


def test_triton_kernels_match_torch(monkeypatch):
    """kernels='triton' (the interpreter on CPU) against the PyTorch reference, whole model."""
    pytest.importorskip("triton")
    import importlib

    calls = {}
    for op in ("attention", "softmax", "layer_norm"):
        module = importlib.import_module(f"ferryman.kernels.{op}")
        real = getattr(module, f"{op}_triton")

        def counting(*args, _real=real, _op=op, **kwargs):
            calls[_op] = calls.get(_op, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, f"{op}_triton", counting)
    model = random_weights_model(tiny(num_recycle=0, num_evoformer_blocks=1), seed=2, run=ref_run())
    batch = random_features(n_res=8, n_seq=3, n_extra=3, n_templ=1)
    with torch.no_grad():
        ref = model(batch)
        assert not calls  # kernels='torch': the tiny preset's run options
        apply_run_options(model, dataclasses.replace(model.run_options, kernels="triton"))
        fused = model(batch)
    assert all(m.backend == "triton" for m in model.modules() if hasattr(m, "backend"))
    assert set(calls) == {"attention", "softmax", "layer_norm"}
    for key in FLOAT_KEYS:
        torch.testing.assert_close(fused[key], ref[key], rtol=1e-3, atol=1e-3, msg=key)


def test_bf16_trunk_runs_and_tracks_fp32():
    cfg = tiny(num_recycle=0)
    model = random_weights_model(cfg, seed=4, run=ref_run())
    batch = random_features(seed=5)
    with torch.no_grad():
        ref = model(batch)
        apply_run_options(model, ref_run(precision="bf16"))
        low = model(batch)
    assert model.evoformer.blocks[0].msa_transition.transition1.weight.dtype == torch.bfloat16
    assert model.structure_module.initial_projection.weight.dtype == torch.float32
    assert low["final_atom_positions"].dtype == torch.float32
    assert torch.isfinite(low["final_atom_positions"]).all()
    rel = (low["pair"] - ref["pair"]).norm() / ref["pair"].norm()
    assert rel < 0.05


def test_training_gradients_with_and_without_checkpointing():
    model = random_weights_model(tiny(num_recycle=1), seed=6, run=ref_run()).train()
    batch = random_features(n_res=8, n_seq=3, n_extra=4, n_templ=1)

    def grads():
        model.zero_grad()
        out = model(batch)
        (out["final_atom_positions"].pow(2).mean() + out["distogram_logits"].mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.evoformer.activation_checkpointing = True
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 100
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_auto_chunk_size_follows_memory():
    cfg, run = tiny(), ref_run(auto_chunk=True)
    assert auto_chunk_size(cfg, run, 16, 8, torch.device("cpu"), fraction=1.0) is None
    small = auto_chunk_size(cfg, run, 4096, 512, torch.device("cpu"), fraction=1e-6)
    assert small is not None and small >= 1 and small & (small - 1) == 0


def test_missing_features_and_bad_config_fail_clearly():
    model = build_model("tiny")
    batch = random_features()
    del batch["extra_msa"]
    with pytest.raises(UserError, match="extra_msa"):
        model(batch)
    with pytest.raises(ConfigError, match="kernels"):
        RunOptions(kernels="cuda")
    with pytest.raises(ConfigError, match="chunk_size"):
        RunOptions(chunk_size=0)
    with pytest.raises(ConfigError, match="unknown model preset"):
        build_model("model_9")


def test_config_holds_sizes_and_run_options_leave_parameters_alone():
    """AlphaFoldConfig is the network alone; no run option changes a parameter name or shape, and
    applying one changes nothing about the config."""
    assert not {"chunk_size", "auto_chunk", "kernels", "inplace", "precision"} & set(AlphaFoldConfig.__dataclass_fields__)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny().num_recycle = 2
    cfg = tiny()
    plain = build_model(cfg, run=ref_run())
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    for run in (ref_run(chunk_size=4), ref_run(precision="bf16"), RunOptions(kernels="triton", inplace=False)):
        model = build_model(cfg, run=run)
        assert model.run_options is run and model.cfg == cfg
        assert {k: v.shape for k, v in model.state_dict().items()} == shapes


def _pad_residues(batch: dict, pad: int) -> dict:
    residue_dim = {"aatype": 0, "residue_index": 0, "seq_mask": 0, "target_feat": 0, "msa_feat": 1, "msa_mask": 1,
                   "extra_msa": 1, "extra_msa_mask": 1, "extra_has_deletion": 1, "extra_deletion_value": 1,
                   "template_aatype": 1, "template_all_atom_positions": 1, "template_all_atom_masks": 1}  # fmt: skip
    padded = {}
    for key, value in batch.items():
        if key not in residue_dim:
            padded[key] = value
            continue
        shape = list(value.shape)
        shape[residue_dim[key]] = pad
        padded[key] = torch.cat([value, value.new_zeros(shape)], dim=residue_dim[key])
    return padded


def test_padded_residues_do_not_change_real_ones(tiny_run):
    """Residues with seq_mask = 0 (and zero MSA/template masks) are invisible to the real ones."""
    model, batch, out = tiny_run
    n = batch["aatype"].shape[0]
    with torch.no_grad():
        padded = model(_pad_residues(batch, 3))
    for key in ("final_atom_positions", "plddt", "single", "experimentally_resolved_logits"):
        torch.testing.assert_close(padded[key][:n], out[key], rtol=1e-4, atol=2e-4, msg=key)
    torch.testing.assert_close(padded["pair"][:n, :n], out["pair"], rtol=1e-4, atol=2e-4)
