"""Rectified flow and DDPM at settings other than the defaults, against values computed here:
the timesteps drawn for a logit-normal with a location, scale and shift factor that are not 0, 1
and 1; the DDPM target that makes the loss exactly zero; a linear beta schedule at other ends and
length; and every step of the ancestral sampler, whose intermediate samples must follow the
forward process' marginals (the last step alone returns x0 whatever the earlier ones did)."""

import math

import pytest
import torch

from ferryman.apps.opensora.config import DiffusionConfig
from ferryman.apps.opensora.diffusion import DDPM, RectifiedFlow


def test_rectified_flow_draws_logit_normal_t_with_its_location_scale_and_shift():
    cfg = DiffusionConfig(logit_normal_loc=0.7, logit_normal_scale=0.5, base_resolution=32 * 32, base_num_frames=2,
                          shift_scale=1.5, num_timesteps=800)
    seen = []
    x0 = torch.zeros(5, 2, 3, 4, 4)  # T = 3 latent frames
    RectifiedFlow(cfg).training_loss(lambda x, t: seen.append(t) or torch.zeros_like(x), x0, height=64, width=32,
                                     generator=torch.Generator().manual_seed(4))
    normal = torch.randn(5, generator=torch.Generator().manual_seed(4))
    t = torch.sigmoid(normal * 0.5 + 0.7)
    r = math.sqrt(64 * 32 / (32 * 32)) * math.sqrt(3 / 2) * 1.5  # Open-Sora 1.2's timestep_transform
    expected = r * t / (1 + (r - 1) * t) * 800
    assert torch.allclose(seen[0], expected, rtol=1e-6, atol=0)


def test_ddpm_schedule_and_the_noise_target_that_costs_nothing():
    cfg = DiffusionConfig(kind="ddpm", num_timesteps=50, beta_start=1e-3, beta_end=0.05)
    ddpm = DDPM(cfg)
    betas = [1e-3 + (0.05 - 1e-3) * i / 49 for i in range(50)]
    assert ddpm.alphas_cumprod.tolist() == pytest.approx([math.prod(1 - b for b in betas[: i + 1]) for i in range(50)],
                                                          rel=1e-12)
    x0 = torch.randn(6, 2, 1, 3, 3, generator=torch.Generator().manual_seed(1))

    def exact(x, t):  # x_t = sqrt(ab) x0 + sqrt(1 - ab) eps  =>  eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)
        assert t.dtype == torch.float32 and bool(((t >= 0) & (t < 50) & (t == t.round())).all())
        ab = ddpm.alphas_cumprod[t.long()].view(-1, 1, 1, 1, 1).float()
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    kw = dict(height=8, width=8)
    assert ddpm.training_loss(exact, x0, generator=torch.Generator().manual_seed(0), **kw).item() < 1e-10
    negated = ddpm.training_loss(lambda x, t: -exact(x, t), x0, generator=torch.Generator().manual_seed(0), **kw)
    assert negated.item() > 1.0


def test_every_ancestral_step_follows_the_forward_marginals():
    """With the exact noise predictor for a point mass x0, q(x_t | x0) = N(sqrt(ab_t) x0, 1 - ab_t)
    is carried to q(x_s | x0) by each step (the posterior of Ho et al. 2020, eq. 6-7, on respaced
    steps): check the mean and variance of the samples the model is called on at every step,
    within 5 standard errors of 20 000 draws."""
    ddpm = DDPM(DiffusionConfig(kind="ddpm"))
    x0 = torch.tensor([1.5, -0.5]).view(1, 2, 1, 1, 1)
    ab = ddpm.alphas_cumprod
    gen = torch.Generator().manual_seed(0)
    n, first = 20_000, 999
    start = (ab[first].sqrt() * x0 + (1 - ab[first]).sqrt() * torch.randn(n, 2, 1, 1, 1, generator=gen, dtype=torch.float64))
    calls = []

    def eps(x, t):
        a = ab[t.long()].view(-1, 1, 1, 1, 1)
        calls.append((int(t[0]), x.clone()))
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    out = ddpm.sample(eps, start, steps=6, height=8, width=8, generator=gen)
    assert [s for s, _ in calls] == [999, 799, 599, 400, 200, 0]
    for step, x in calls:
        mean, var = x.mean(0).flatten(), x.var(0).flatten()
        want_mean, want_var = (ab[step].sqrt() * x0).flatten(), (1 - ab[step]).expand(2)
        assert torch.all((mean - want_mean).abs() < 5 * (want_var / n).sqrt()), (step, mean, want_mean)
        assert torch.all((var - want_var).abs() < 5 * want_var * math.sqrt(2 / n)), (step, var, want_var)
    assert torch.allclose(out, x0.expand_as(out).double(), atol=1e-9)  # the last step returns x0 itself
