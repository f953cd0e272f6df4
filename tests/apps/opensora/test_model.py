"""STDiT: shapes, initialisation, presets, masks, and sequence parallelism on 2 gloo ranks vs 1 process."""

import pytest
import torch
from torch import nn

from ferryman.apps.opensora.config import RuntimeConfig, STDiTConfig
from ferryman.apps.opensora.model import STDiT, num_parameters
from ferryman.apps.opensora.parallel import parallelize
from ferryman.apps.opensora.presets import model_preset
from ferryman.apps.opensora.runtime import build_stdit
from ferryman.core.errors import ConfigError
from ferryman.core.parallel import reduce_partial_grads, run_distributed


def _cfg(**kw) -> STDiTConfig:
    base = dict(hidden_size=48, depth=2, num_heads=3, caption_channels=12, model_max_length=6)
    return STDiTConfig(**{**base, **kw})


def _model(cfg: STDiTConfig, **runtime) -> STDiT:
    return build_stdit(cfg, RuntimeConfig(**{"attention_backend": "torch", "norm_backend": "torch", **runtime}))


def _randomize(model: nn.Module, seed: int = 1) -> None:
    """Replace the zero-initialised branches with random values, so every path carries signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _inputs(b=2, t=3, h=6, w=10, seed=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, t, h, w, generator=gen)
    y = torch.randn(b, 6, 12, generator=gen)
    mask = torch.ones(b, 6, dtype=torch.bool)
    mask[1, 3:] = False
    kw = dict(fps=torch.tensor([8.0, 24.0])[:b], height=torch.tensor([48.0, 64.0])[:b], width=torch.tensor([80.0, 64.0])[:b])
    return x, torch.tensor([3.0, 700.0])[:b], y, mask, kw


def test_output_shape_matches_input_including_sizes_the_patch_does_not_divide():
    model = _model(_cfg())
    _randomize(model)
    x, t, y, mask, kw = _inputs(h=7, w=9)
    assert model(x, t, y, mask, **kw).shape == x.shape


def test_temporal_blocks_start_as_identity_and_output_starts_at_zero():
    model = _model(_cfg())
    x, t, y, mask, kw = _inputs()
    tokens = torch.randn(2, 3, 15, 48)
    t0 = model.t_block(model.condition(t, **kw))
    for block in model.temporal_blocks:
        assert torch.equal(block(tokens, model.y_embedder(y), t0, mask), tokens)
    assert torch.count_nonzero(model(x, t, y, mask, **kw)) == 0  # zero-initialised final layer


def test_padded_caption_tokens_are_ignored_and_null_caption_changes_the_output():
    model = _model(_cfg())
    _randomize(model)
    x, t, y, mask, kw = _inputs()
    out = model(x, t, y, mask, **kw)
    y2 = y.clone()
    y2[1, 3:] = 100.0  # only padding changes
    assert torch.allclose(model(x, t, y2, mask, **kw), out, atol=1e-5)
    dropped = model(x, t, y, mask, drop=torch.tensor([True, False]), **kw)
    assert not torch.allclose(dropped[0], out[0]) and torch.allclose(dropped[1], out[1], atol=1e-6)


def test_fps_and_size_conditioning_change_the_prediction():
    model = _model(_cfg())
    _randomize(model)
    x, t, y, mask, kw = _inputs()
    out = model(x, t, y, mask, **kw)
    assert not torch.allclose(model(x, t, y, mask, **{**kw, "fps": kw["fps"] * 2}), out)
    swapped = {**kw, "height": kw["width"], "width": kw["height"]}
    assert not torch.allclose(model(x, t, y, mask, **swapped)[0], out[0])


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain, ckpt = _model(_cfg()), _model(_cfg(), grad_checkpointing=True)
    _randomize(plain)
    ckpt.load_state_dict(plain.state_dict())
    x, t, y, mask, kw = _inputs()
    for m in (plain, ckpt):
        m(x, t, y, mask, **kw).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if name == "y_embedder.y_embedding":  # the null caption is used only when captions are dropped
            assert a.grad is None and b.grad is None
            continue
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_presets_span_debug_to_about_a_billion_parameters():
    sizes = {}
    for name in ("debug", "S/2", "XL/2"):
        with torch.device("meta"):
            sizes[name] = num_parameters(STDiT(model_preset(name)))
    assert sizes["debug"] < 200_000
    assert 1.0e9 < sizes["XL/2"] < 1.3e9
    xl = model_preset("XL/2")
    assert (xl.hidden_size, xl.depth, xl.num_heads, xl.patch_size) == (1152, 28, 16, (1, 2, 2))


@pytest.mark.parametrize(
    "kw, field",
    [(dict(hidden_size=50, num_heads=4), "num_heads"), (dict(patch_size=(1, 2)), "patch_size")],
)
def test_bad_model_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        _cfg(**kw)
    with pytest.raises(ConfigError, match=r"runtime\.attention_backend='xformers'"):
        RuntimeConfig(attention_backend="xformers")


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """Equal up to fp32 rounding, relative to the tensor's largest entry (sums are reordered across ranks)."""
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()


def _sp_worker(rank, world_size, cfg, state, cases):
    import torch.distributed as dist

    group = dist.new_group(list(range(world_size)))
    results = []
    for x, t, y, mask, kw in cases:
        model = _model(cfg)
        model.load_state_dict(state)
        parallelize(model, group)
        out = model(x, t, y, mask, **kw)
        _loss(out).backward()
        reduce_partial_grads(model.parameters())  # what an engine does before it steps
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    return results


@pytest.mark.distributed
def test_sequence_parallel_on_two_ranks_equals_one_process():
    """Forward output and every parameter gradient; 3 heads over 2 ranks pads the head axis, and
    frames of 3x5 and 4x5 patches (widths 10 and 9, the latter not divisible by the patch) pad the
    patch axis on one and not the other."""
    cfg = _cfg()
    model = _model(cfg)
    _randomize(model)
    cases = [_inputs(w=10), _inputs(h=8, w=9, t=2)]
    results = run_distributed(_sp_worker, 2, cfg, model.state_dict(), cases)
    for i, (x, t, y, mask, kw) in enumerate(cases):
        model.zero_grad(set_to_none=True)
        out = model(x, t, y, mask, **kw)
        _loss(out).backward()
        for rank in range(2):
            sharded_out, grads = results[rank][i]
            assert _close(sharded_out, out.detach())
            for name, p in model.named_parameters():
                if p.grad is None:
                    assert grads[name] is None, name
                else:
                    assert _close(grads[name], p.grad), (rank, i, name)


def test_fused_kernels_give_the_reference_forward_and_gradients():
    """backend="triton" (the Triton interpreter on CPU) against backend="torch", masks included."""
    from ferryman.kernels import interpreter_enabled, triton_available

    if not (triton_available() and (torch.cuda.is_available() or interpreter_enabled())):
        pytest.skip("Triton cannot run here")
    cfg = STDiTConfig(hidden_size=32, depth=1, num_heads=2, caption_channels=8, model_max_length=4)
    ref = _model(cfg)
    _randomize(ref)
    fused = _model(cfg, attention_backend="triton", norm_backend="triton")
    fused.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(1, 4, 2, 4, 6, generator=gen), torch.randn(1, 4, 8, generator=gen)
    mask, t = torch.tensor([[True, True, False, False]]), torch.tensor([300.0])
    out_ref, out_fused = ref(x, t, y, mask), fused(x, t, y, mask)
    assert _close(out_fused, out_ref)
    _loss(out_ref).backward()
    _loss(out_fused).backward()
    for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
        if a.grad is not None:
            assert _close(b.grad, a.grad, tol=1e-4), name
