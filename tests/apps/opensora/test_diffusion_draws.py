"""The draws of the rectified-flow and DDPM losses, by hand: t and the noise come from the
generator passed in (in that order), the noisy latents keep the latents' dtype (bfloat16 under
mixed precision, float32 against DDPM's float64 schedule), and the loss of a zero prediction is
the target's mean square computed here. Classifier-free guidance at a scale other than 1 and on
an odd batch, and the scheduler each ``kind`` builds."""

import math

import pytest
import torch

from ferryman.apps.opensora.config import DiffusionConfig
from ferryman.apps.opensora.diffusion import DDPM, RectifiedFlow, build_scheduler, guided


def _zero_model(seen: list):
    def model_fn(x, t):
        seen.append((x, t))
        return torch.zeros_like(x)

    return model_fn


def _within_roundings(actual, want, scale):
    """Each element within four roundings of its dtype at the size of its two terms (the weights
    and the product and sum may each be rounded), element by element: small values get small bounds."""
    bound = 4 * torch.finfo(actual.dtype).eps * scale
    assert ((actual.double() - want).abs() <= bound).all(), (actual.double() - want).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rectified_flow_loss_by_hand_from_the_generator(dtype):
    """No shift (the identity at base size): t = sigmoid(0.3 + 0.8 n) for n the generator's first
    normal draw, then the noise; x_t = t noise + (1 - t) x0 in x0's dtype; loss = mean (x0 - noise)^2."""
    cfg = DiffusionConfig(logit_normal_loc=0.3, logit_normal_scale=0.8, base_resolution=16 * 16, base_num_frames=2)
    x0 = torch.randn(3, 2, 2, 2, 2, generator=torch.Generator().manual_seed(7)).to(dtype)
    seen = []
    loss = RectifiedFlow(cfg).training_loss(_zero_model(seen), x0, height=16, width=16,
                                            generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    t = torch.sigmoid(torch.randn(3, generator=gen) * 0.8 + 0.3)
    noise = torch.randn(x0.shape, generator=gen, dtype=dtype)
    x_t, timesteps = seen[0]
    assert x_t.dtype == dtype
    torch.testing.assert_close(timesteps, t * 1000, rtol=0, atol=0)
    tt = t.double().view(3, 1, 1, 1, 1)
    a, b = tt * noise.double(), (1 - tt) * x0.double()
    _within_roundings(x_t, a + b, a.abs() + b.abs())
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-7  # the mean of squares of 48 values rounded to the dtype
    assert loss.item() == pytest.approx((x0.double() - noise.double()).square().mean().item(), rel=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ddpm_loss_by_hand_from_the_generator(dtype):
    """t uniform on {0, ..., 39} from the generator, then the noise; x_t = sqrt(ab) x0 + sqrt(1 - ab)
    noise with ab of the linear schedule by hand, in x0's dtype (not the schedule's float64)."""
    cfg = DiffusionConfig(kind="ddpm", num_timesteps=40, beta_start=2e-3, beta_end=0.1)
    x0 = torch.randn(16, 2, 1, 2, 2, generator=torch.Generator().manual_seed(7)).to(dtype)
    seen = []
    loss = DDPM(cfg).training_loss(_zero_model(seen), x0, height=8, width=8, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(0, 40, (16,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen, dtype=dtype)
    x_t, timesteps = seen[0]
    assert timesteps.dtype == torch.float32 and timesteps.tolist() == t.float().tolist()
    assert x_t.dtype == dtype
    betas = [2e-3 + (0.1 - 2e-3) * i / 39 for i in range(40)]
    ab = torch.tensor([math.prod(1 - b for b in betas[: int(s) + 1]) for s in t], dtype=torch.float64).view(16, 1, 1, 1, 1)
    ab = ab.to(dtype).double()  # the schedule's value is taken in x0's dtype first, then used exactly
    a, b = ab.sqrt() * x0.double(), (1 - ab).sqrt() * noise.double()
    _within_roundings(x_t, a + b, a.abs() + b.abs())
    assert loss.item() == pytest.approx(noise.double().square().mean().item(), rel=1e-6)


def test_guidance_at_scale_two_on_an_odd_batch_calls_the_model_once_on_both_halves():
    """cond_fn: x + t with the caption, x - t without. Scale 2: uncond + 2 (cond - uncond) = x + 3t,
    from one call on [x; x] at [t; t]; scale 1: the captioned prediction alone, one call on x."""
    calls = []

    def cond_fn(x, t, both):
        calls.append((x.shape[0], t.tolist(), both))
        tt = t.view(-1, 1)
        if not both:
            return x + tt
        half = x.shape[0] // 2
        return torch.cat([x[:half] + tt[:half], x[half:] - tt[half:]])

    x, t = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([10.0, 20.0, 30.0])
    assert guided(cond_fn, 2.0)(x, t).flatten().tolist() == [31.0, 62.0, 93.0]
    assert calls == [(6, [10.0, 20.0, 30.0] * 2, True)]
    calls.clear()
    assert guided(cond_fn, 1.0)(x, t).flatten().tolist() == [11.0, 22.0, 33.0]
    assert calls == [(3, [10.0, 20.0, 30.0], False)] and calls[0][2] is False


@pytest.mark.parametrize(("kind", "cls"), [("rflow", RectifiedFlow), ("ddpm", DDPM)])
def test_each_kind_builds_its_scheduler_with_the_config(kind, cls):
    cfg = DiffusionConfig(kind=kind, num_timesteps=30)
    scheduler = build_scheduler(cfg)
    assert type(scheduler) is cls and scheduler.cfg is cfg
