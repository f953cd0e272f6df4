"""Rectified flow and DDPM: shift, samplers reaching a known target, guidance, losses."""

import pytest
import torch

from ferryman.apps.opensora.config import DiffusionConfig
from ferryman.apps.opensora.diffusion import DDPM, RectifiedFlow, guided

TARGET = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1, 1)  # a point mass: the exact predictor is known


def _x0_like(x):
    return TARGET.expand_as(x)


def test_shift_is_identity_at_base_size_and_moves_toward_noise_for_larger_videos():
    rf = RectifiedFlow(DiffusionConfig(base_resolution=64 * 64, base_num_frames=1))
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(rf.shift(t, 64, 64, 1), t)
    bigger = rf.shift(t, 128, 128, 4)
    assert torch.all(bigger[1:-1] > t[1:-1]) and bigger[0] == 0 and bigger[-1] == 1
    assert torch.all(bigger[1:] >= bigger[:-1])


@pytest.mark.parametrize("shift", [False, True])
def test_euler_sampler_with_exact_velocity_reaches_the_data(shift):
    rf = RectifiedFlow(DiffusionConfig(timestep_shift=shift, base_resolution=32 * 32))

    def velocity(x, t):
        frac = (t / 1000).view(-1, 1, 1, 1, 1)
        noise = (x - (1 - frac) * _x0_like(x)) / frac
        return _x0_like(x) - noise

    noise = torch.randn(2, 3, 2, 4, 4)
    out = rf.sample(velocity, noise, steps=7, height=64, width=64)
    assert torch.allclose(out, _x0_like(out), atol=1e-5)


def test_ddpm_sampler_with_exact_noise_reaches_the_data():
    ddpm = DDPM(DiffusionConfig(kind="ddpm"))

    def eps(x, t):
        ab = ddpm.alphas_cumprod[t.long()].view(-1, 1, 1, 1, 1).float()
        return (x - ab.sqrt() * _x0_like(x)) / (1 - ab).sqrt()

    out = ddpm.sample(eps, torch.randn(2, 3, 2, 4, 4), steps=10, height=32, width=32,
                      generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, _x0_like(out), atol=1e-4)


def test_guidance_combines_conditional_and_unconditional_predictions():
    def cond_fn(x, t, both):  # captioned: x + 1; null caption (second half when both): x - 1
        if not both:
            return x + 1.0
        half = x.shape[0] // 2
        return torch.cat([x[:half] + 1.0, x[half:] - 1.0])

    x, t = torch.zeros(2, 1), torch.zeros(2)
    assert torch.equal(guided(cond_fn, 1.0)(x, t), x + 1)
    assert torch.equal(guided(cond_fn, 4.0)(x, t), torch.full_like(x, -1 + 4 * 2))


@pytest.mark.parametrize("kind", ["rflow", "ddpm"])
def test_training_loss_targets_and_timesteps(kind):
    cfg = DiffusionConfig(kind=kind)
    sched = RectifiedFlow(cfg) if kind == "rflow" else DDPM(cfg)
    seen = []

    def model_fn(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    x0 = torch.randn(64, 2, 1, 2, 2)
    loss = sched.training_loss(model_fn, x0, height=256, width=256, generator=torch.Generator().manual_seed(0))
    t = seen[0]
    assert t.shape == (64,) and t.min() >= 0 and t.max() < 1000 and t.std() > 100
    # a zero prediction costs E|x0 - noise|^2 = 2 for rectified flow, E|noise|^2 = 1 for DDPM
    assert abs(loss.item() - (2.0 if kind == "rflow" else 1.0)) < 0.3


def test_shift_has_the_exact_value_of_open_soras_formula():
    """r = sqrt(128*128 / 64^2) * sqrt(4 / 1) = 4, so t = 0.5 -> 4 * 0.5 / (1 + 3 * 0.5) = 0.8."""
    rf = RectifiedFlow(DiffusionConfig(base_resolution=64 * 64, base_num_frames=1))
    assert rf.shift(torch.tensor([0.5, 0.25], dtype=torch.float64), 128, 128, 4).tolist() == pytest.approx([0.8, 4 / 7], abs=1e-15)


def test_rectified_flow_target_is_data_minus_noise_exactly():
    """The model that returns x0 - noise (recovered from x_t and t) has zero loss; its negation,
    the velocity of the reverse direction, does not. A wrong sign or an x_t mixing the two the
    other way round fails here, whatever the loss curve looks like."""
    rf = RectifiedFlow(DiffusionConfig(base_resolution=32 * 32))
    x0 = torch.randn(3, 2, 2, 4, 4, generator=torch.Generator().manual_seed(1))

    def exact(x, t):  # x_t = t noise + (1 - t) x0  =>  x0 - noise = (x0 - x_t) / t
        return (x0 - x) / (t / 1000).view(-1, 1, 1, 1, 1)

    kw = dict(height=32, width=32)
    assert rf.training_loss(exact, x0, generator=torch.Generator().manual_seed(0), **kw).item() < 1e-10
    negated = rf.training_loss(lambda x, t: -exact(x, t), x0, generator=torch.Generator().manual_seed(0), **kw)
    assert negated.item() > 1.0


def test_uint8_conversion_and_resolution_parsing_give_exact_values():
    from ferryman.apps.opensora.sample import parse_resolution, to_uint8

    video = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 3.0]).view(1, 6, 1, 1).expand(3, 6, 1, 1)  # [3, T, H, W]
    frames = to_uint8(video)  # [T, H, W, 3]
    assert frames.shape == (6, 1, 1, 3) and frames[:, 0, 0, 0].tolist() == [0, 64, 128, 191, 255, 255]
    assert parse_resolution("48x64") == (48, 64) and parse_resolution("32") == (32, 32) and parse_resolution("24*40") == (24, 40)
