"""Official AlphaFold2 parameter files: strict import, export to the same layout, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ferryman.apps.fastfold.model import RunOptions, build_model, random_weights_model
from ferryman.apps.fastfold.weights import (
    PREFIX,
    load_checkpoint,
    load_official_params,
    model_from_official_params,
    official_params,
    official_table,
    save_checkpoint,
    save_official_params,
)
from ferryman.core.errors import UserError

from ._model_inputs import random_features

# Module names as AF2's Haiku code creates them (modules.py / folding.py), written out here so
# the test does not derive the expected keys from the code under test.
_ATT = ["query_w", "key_w", "value_w", "gating_w", "gating_b", "output_w", "output_b"]
_LN = ["scale", "offset"]
_LIN = ["weights", "bias"]



def _tri(prefix: str) -> list[str]:
    keys = []
    for d in ("outgoing", "incoming"):
        p = f"{prefix}triangle_multiplication_{d}/"
        keys += [p + f"{m}//{x}" for m in ("layer_norm_input", "center_layer_norm") for x in _LN]
        keys += [p + f"{m}//{x}" for m in ("left_projection", "right_projection", "left_gate", "right_gate",
                                            "output_projection", "gating_linear") for x in _LIN]  # fmt: skip
    for d in ("starting", "ending"):
        p = f"{prefix}triangle_attention_{d}_node/"
        keys += [p + f"query_norm//{x}" for x in _LN] + [p + "/feat_2d_weights"] + [p + f"attention//{x}" for x in _ATT]
    keys += [f"{prefix}pair_transition/input_layer_norm//{x}" for x in _LN]
    keys += [f"{prefix}pair_transition/transition{i}//{x}" for i in (1, 2) for x in _LIN]
    return keys


def _evo(prefix: str, column: str, global_column: bool) -> list[str]:
    keys = _tri(prefix)
    row = f"{prefix}msa_row_attention_with_pair_bias/"
    keys += [row + f"{m}//{x}" for m in ("query_norm", "feat_2d_norm") for x in _LN] + [row + "/feat_2d_weights"]
    keys += [row + f"attention//{x}" for x in _ATT]
    col_att = [x for x in _ATT]
    keys += [f"{prefix}{column}/query_norm//{x}" for x in _LN] + [f"{prefix}{column}/attention//{x}" for x in col_att]
    keys += [f"{prefix}msa_transition/input_layer_norm//{x}" for x in _LN]
    keys += [f"{prefix}msa_transition/transition{i}//{x}" for i in (1, 2) for x in _LIN]
    opm = f"{prefix}outer_product_mean/"
    keys += [opm + f"layer_norm_input//{x}" for x in _LN] + [opm + "/output_w", opm + "/output_b"]
    keys += [opm + f"{m}//{x}" for m in ("left_projection", "right_projection") for x in _LIN]
    return keys


def expected_official_keys(templates: bool, ptm: bool) -> set[str]:
    e = "evoformer/"
    keys = [e + f"{m}//{x}" for m in ("preprocess_1d", "preprocess_msa", "left_single", "right_single",
            "prev_pos_linear", "pair_activiations", "extra_msa_activations", "single_activations") for x in _LIN]  # fmt: skip
    keys += [e + f"{m}//{x}" for m in ("prev_msa_first_row_norm", "prev_pair_norm") for x in _LN]
    keys += _evo(e + "evoformer_iteration/", "msa_column_attention", False)
    keys += _evo(e + "extra_msa_stack/", "msa_column_global_attention", True)
    if templates:
        t = e + "template_embedding/"
        keys += _tri(t + "single_template_embedding/template_pair_stack/__layer_stack_no_state/")
        keys += [t + f"single_template_embedding/embedding2d//{x}" for x in _LIN]
        keys += [t + f"single_template_embedding/output_layer_norm//{x}" for x in _LN]
        keys += [t + f"attention//{x}" for x in ("query_w", "key_w", "value_w", "output_w", "output_b")]
        keys += [e + f"{m}//{x}" for m in ("template_single_embedding", "template_projection") for x in _LIN]
    sm = "structure_module/"
    keys += [sm + f"{m}//{x}" for m in ("single_layer_norm", "pair_layer_norm") for x in _LN]
    keys += [sm + f"initial_projection//{x}" for x in _LIN]
    fi = sm + "fold_iteration/"
    ipa = fi + "invariant_point_attention/"
    keys += [ipa + f"{m}//{x}" for m in ("q_scalar", "kv_scalar", "q_point_local", "kv_point_local",
             "attention_2d", "output_projection") for x in _LIN] + [ipa + "/trainable_point_weights"]  # fmt: skip
    keys += [fi + f"{m}//{x}" for m in ("attention_layer_norm", "transition_layer_norm") for x in _LN]
    keys += [fi + f"{m}//{x}" for m in ("transition", "transition_1", "transition_2", "affine_update") for x in _LIN]
    sc = fi + "rigid_sidechain/"
    keys += [sc + f"{m}//{x}" for m in ("input_projection", "input_projection_1", "resblock1", "resblock2",
             "resblock1_1", "resblock2_1", "unnormalized_angles") for x in _LIN]  # fmt: skip
    keys += [f"predicted_lddt_head/input_layer_norm//{x}" for x in _LN]
    keys += [f"predicted_lddt_head/{m}//{x}" for m in ("act_0", "act_1", "logits") for x in _LIN]
    keys += [f"{h}//{x}" for h in ("distogram_head/half_logits", "experimentally_resolved_head/logits",
             "masked_msa_head/logits") for x in _LIN]  # fmt: skip
    if ptm:
        keys += [f"predicted_aligned_error_head/logits//{x}" for x in _LIN]
    return {PREFIX + k for k in keys}


def _meta_model(preset: str):
    with torch.device("meta"):  # no memory, no initialisation: only names and shapes matter here
        return build_model(preset)


@pytest.mark.parametrize("preset,templates,ptm", [("model_1_ptm", True, True), ("model_3", False, False)])
def test_official_key_names(preset, templates, ptm):
    keys = set(official_table(_meta_model(preset)))
    assert keys == expected_official_keys(templates, ptm)


def test_official_shapes_of_model_1_ptm():
    table = official_table(_meta_model("model_1_ptm"))
    shapes = {k.removeprefix(PREFIX): v.full_shape for k, v in table.items()}
    expected = {
        "evoformer/preprocess_msa//weights": (49, 256),
        "evoformer/pair_activiations//weights": (65, 128),
        "evoformer/extra_msa_activations//weights": (25, 64),
        "evoformer/prev_pos_linear//weights": (15, 128),
        "evoformer/template_single_embedding//weights": (57, 256),
        "evoformer/template_embedding/single_template_embedding/embedding2d//weights": (88, 64),
        "evoformer/template_embedding/attention//query_w": (128, 4, 16),
        "evoformer/evoformer_iteration/msa_row_attention_with_pair_bias/attention//query_w": (48, 256, 8, 32),
        "evoformer/evoformer_iteration/msa_row_attention_with_pair_bias//feat_2d_weights": (48, 128, 8),
        "evoformer/evoformer_iteration/outer_product_mean//output_w": (48, 32, 32, 128),
        "evoformer/evoformer_iteration/triangle_attention_starting_node/attention//gating_b": (48, 4, 32),
        "evoformer/extra_msa_stack/msa_column_global_attention/attention//key_w": (4, 64, 8),
        "structure_module/fold_iteration/invariant_point_attention/output_projection//weights": (2112, 384),
        "structure_module/fold_iteration/invariant_point_attention/kv_point_local//weights": (384, 432),
        "structure_module/fold_iteration/rigid_sidechain/unnormalized_angles//weights": (128, 14),
        "predicted_aligned_error_head/logits//weights": (128, 64),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key


def test_full_size_npz_loads_runs_and_exports(tmp_path):
    """Random values at the official names and full shapes of model_1_ptm: strict load, a forward
    pass on a tiny input, and an export with the same keys and values."""
    rng = np.random.default_rng(0)
    table = official_table(_meta_model("model_1_ptm"))
    arrays = {k: (rng.standard_normal(e.full_shape, dtype=np.float32) * 0.02) for k, e in table.items()}
    src = tmp_path / "params_model_1_ptm.npz"
    np.savez(src, **arrays)
    model = model_from_official_params("model_1_ptm", src, run=RunOptions(kernels="torch"))  # the interpreter is slow
    assert sum(p.numel() for p in model.parameters()) == sum(a.size for a in arrays.values())
    batch = random_features(n_res=6, n_seq=2, n_extra=2, n_templ=1)
    with torch.no_grad():
        out = model(batch, num_recycle=0)
    assert torch.isfinite(out["final_atom_positions"]).all() and torch.isfinite(out["ptm"])
    dst = tmp_path / "exported.npz"
    save_official_params(model, dst)
    with np.load(dst) as exported:
        assert set(exported.files) == set(arrays)
        for key, value in arrays.items():
            np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_exported_layout_matches_af2_math():
    """The exported arrays, used the way AF2's Haiku code uses them, reproduce our modules."""
    model = random_weights_model("tiny", seed=7)
    params = official_params(model)
    opm_key = PREFIX + "evoformer/evoformer_iteration/outer_product_mean/"
    block = model.evoformer.blocks[0]
    m = torch.randn(3, 5, model.cfg.c_m)
    mask = torch.ones(3, 5)
    mask[1, 2] = 0
    p = {k.removeprefix(opm_key): v[0] for k, v in params.items() if k.startswith(opm_key)}
    act = torch.nn.functional.layer_norm(m, (m.shape[-1],), torch.tensor(p["layer_norm_input//scale"]),
                                         torch.tensor(p["layer_norm_input//offset"])).numpy()  # fmt: skip
    left = mask.numpy()[..., None] * (act @ p["left_projection//weights"] + p["left_projection//bias"])
    right = mask.numpy()[..., None] * (act @ p["right_projection//weights"] + p["right_projection//bias"])
    outer = np.einsum("sic,sje,cef->ijf", left, right, p["/output_w"]) + p["/output_b"]
    norm = np.einsum("si,sj->ij", mask.numpy(), mask.numpy())[..., None]
    expected = outer / (1e-3 + norm)
    torch.testing.assert_close(block.outer_product_mean(m, mask), torch.tensor(expected), rtol=1e-4, atol=1e-5)
    att_key = PREFIX + "evoformer/evoformer_iteration/msa_column_attention/attention//"
    x = torch.randn(4, model.cfg.c_m)
    q_af2 = np.einsum("qa,ahc->qhc", x.numpy(), params[att_key + "query_w"][0])
    att = block.msa_column_attention.attention
    q_ours = att.query_w(x).unflatten(-1, (att.num_heads, att.c_hidden))
    torch.testing.assert_close(q_ours, torch.tensor(q_af2), rtol=1e-5, atol=1e-5)


def test_strict_import_names_offending_keys(tmp_path):
    model = random_weights_model("tiny")
    params = official_params(model)
    drop = PREFIX + "evoformer/preprocess_1d//bias"
    bad = PREFIX + "structure_module/initial_projection//weights"
    params.pop(drop)
    params[PREFIX + "evoformer/not_a_module//weights"] = np.zeros(3, np.float32)
    params[bad] = params[bad][:, :-1]
    path = tmp_path / "bad.npz"
    np.savez(path, **params)
    with pytest.raises(UserError) as info:
        load_official_params(model, path)
    message = str(info.value)
    assert "evoformer/preprocess_1d//bias" in message and "not_a_module" in message
    assert "initial_projection//weights" in message and "1 missing" in message
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match=r"junk\.npz"):
        load_official_params(model, tmp_path / "junk.npz")


def test_safetensors_checkpoint_round_trip(tmp_path):
    model = random_weights_model("tiny", seed=8)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(model, path, model.cfg)
    other = random_weights_model("tiny", seed=9)
    meta = load_checkpoint(other, path)
    assert '"c_m": 16' in meta["config"]
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(UserError, match="does not fit"):
        load_checkpoint(build_model("debug"), path)


def test_presets_cover_the_ten_official_models():
    from ferryman.apps.fastfold.presets import MODEL_NAMES, alphafold, data_settings

    assert len(MODEL_NAMES) == 10
    for name in MODEL_NAMES:
        cfg = alphafold(name)
        templates = name.startswith(("model_1", "model_2"))
        assert cfg.template.enabled == cfg.template.embed_torsion_angles == templates
        assert cfg.heads.ptm == name.endswith("_ptm")
        assert (cfg.num_evoformer_blocks, cfg.c_m, cfg.c_z, cfg.c_s, cfg.c_e) == (48, 256, 128, 384, 64)
        assert data_settings(name)["max_extra_msa"] == (5120 if name[6] in "134" else 1024)
