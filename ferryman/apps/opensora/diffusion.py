"""Training losses and samplers: rectified flow (Open-Sora 1.2) and DDPM (Ho et al. 2020).

Both take ``model_fn(x_t, timestep) -> prediction`` with ``timestep`` a [B] float tensor in
[0, num_timesteps); the caller binds the text, fps and size conditions and classifier-free
guidance (``guided``) into it.

Rectified flow (Liu et al. 2022; Esser et al. 2024 for logit-normal t and the resolution shift):
x_t = t * noise + (1 - t) * x_0 with t in (0, 1); the model predicts the velocity x_0 - noise, and
the Euler sampler walks t from 1 down to 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import DiffusionConfig

ModelFn = Callable[[Tensor, Tensor], Tensor]


def guided(cond_fn: Callable[[Tensor, Tensor, bool], Tensor], scale: float) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale * (cond - uncond) in one batched call.

    ``cond_fn(x, t, both)`` runs the model on [x; x] with the caption kept in the first half and
    dropped in the second when ``both`` is True, and on x with the caption when False.
    """

    def fn(x: Tensor, t: Tensor) -> Tensor:
        if scale == 1.0:
            return cond_fn(x, t, False)
        out = cond_fn(torch.cat([x, x]), torch.cat([t, t]), True)
        cond, uncond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    return fn


class RectifiedFlow:
    """Rectified-flow loss with logit-normal, resolution-shifted t, and the Euler sampler."""

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg

    def shift(self, t: Tensor, height: float, width: float, num_frames: int) -> Tensor:
        """Open-Sora 1.2 ``timestep_transform``: larger videos spend more of the schedule near noise."""
        if not self.cfg.timestep_shift:
            return t
        ratio_space = (height * width / self.cfg.base_resolution) ** 0.5
        ratio_time = (max(num_frames, 1) / self.cfg.base_num_frames) ** 0.5
        ratio = ratio_space * ratio_time * self.cfg.shift_scale
        return ratio * t / (1 + (ratio - 1) * t)

    def training_loss(
        self, model_fn: ModelFn, x0: Tensor, *, height: float, width: float, generator: torch.Generator | None = None
    ) -> Tensor:
        """x0: [B, C, T, H, W] clean latents; height/width: the pixel size, for the shift."""
        b = x0.shape[0]
        normal = torch.randn(b, generator=generator, device=x0.device) * self.cfg.logit_normal_scale
        t = torch.sigmoid(normal + self.cfg.logit_normal_loc)
        t = self.shift(t, height, width, x0.shape[2])
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        tt = t.view(b, 1, 1, 1, 1).to(x0.dtype)
        x_t = tt * noise + (1 - tt) * x0
        pred = model_fn(x_t, t * self.cfg.num_timesteps)
        return F.mse_loss(pred.float(), (x0 - noise).float())

    @torch.no_grad()
    def sample(
        self, model_fn: ModelFn, noise: Tensor, *, steps: int, height: float, width: float,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Euler steps from pure noise at t = 1 to t = 0 (deterministic: ``generator`` is unused)."""
        ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        ts = self.shift(ts, height, width, noise.shape[2])
        x = noise
        for i in range(steps):
            t = torch.full((x.shape[0],), float(ts[i]) * self.cfg.num_timesteps, device=x.device)
            v = model_fn(x, t)
            x = x + v.to(x.dtype) * float(ts[i] - ts[i + 1])
        return x


class DDPM:
    """Epsilon-prediction DDPM with a linear beta schedule and ancestral sampling on respaced steps."""

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    def training_loss(
        self, model_fn: ModelFn, x0: Tensor, *, height: float, width: float, generator: torch.Generator | None = None
    ) -> Tensor:
        b = x0.shape[0]
        t = torch.randint(0, self.cfg.num_timesteps, (b,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        ab = self.alphas_cumprod.to(x0.device)[t].view(b, 1, 1, 1, 1).to(x0.dtype)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        pred = model_fn(x_t, t.float())
        return F.mse_loss(pred.float(), noise.float())

    @torch.no_grad()
    def sample(
        self, model_fn: ModelFn, noise: Tensor, *, steps: int, height: float, width: float,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Respaced DDPM (Nichol & Dhariwal 2021): the betas implied by the chosen alphas_cumprod."""
        timesteps = torch.linspace(self.cfg.num_timesteps - 1, 0, steps).round().long()
        x = noise
        for i, step in enumerate(timesteps.tolist()):
            ab = float(self.alphas_cumprod[step])
            ab_prev = float(self.alphas_cumprod[timesteps[i + 1]]) if i + 1 < steps else 1.0
            eps = model_fn(x, torch.full((x.shape[0],), float(step), device=x.device)).to(x.dtype)
            x0 = (x - (1 - ab) ** 0.5 * eps) / ab**0.5
            beta = 1 - ab / ab_prev
            mean = (ab_prev**0.5 * beta / (1 - ab)) * x0 + ((1 - beta) ** 0.5 * (1 - ab_prev) / (1 - ab)) * x
            if i + 1 < steps:
                var = beta * (1 - ab_prev) / (1 - ab)
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                mean = mean + var**0.5 * z
            x = mean
        return x


def build_scheduler(cfg: DiffusionConfig) -> RectifiedFlow | DDPM:
    return RectifiedFlow(cfg) if cfg.kind == "rflow" else DDPM(cfg)
