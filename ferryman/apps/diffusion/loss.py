"""The latent-diffusion training objective: a plain function of (model, batch) -> loss.

Denoising objective of latent diffusion (Rombach et al. 2022, eq. 2): encode images with the
frozen VAE, add noise at a random timestep, predict the noise (epsilon) or the velocity
v = sqrt(a) * noise - sqrt(1 - a) * x0 (Salimans & Ho 2022) from the noisy latents and the text
embedding. Options: min-SNR-gamma loss weights (Hang et al. 2023), offset noise (Guttenberg 2023:
a per-channel constant added to the noise so the model can shift mean brightness), and a DreamBooth
prior-preservation term (Ruiz et al. 2023) on the class images carried in the same batch.

Noise, timesteps and the VAE posterior sample are drawn on the host from the batch's
``noise_seed``, so a step's numbers depend only on its data position, never on device or history.
They are drawn for the whole global batch and a micro-batch keeps its own rows (``noise_slice``),
so data-parallel processes and accumulation steps draw what one process with the whole batch does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ferryman.core.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(kw_only=True)
class LossConfig:
    prediction_type: str = ""  # "": what the model's scheduler config says
    snr_gamma: float = 0.0  # 0 disables min-SNR weighting; 5.0 is the paper's choice
    noise_offset: float = 0.0  # 0.05-0.1 is typical
    prior_loss_weight: float = 1.0  # DreamBooth only: weight of the class-image term

    def __post_init__(self) -> None:
        if self.prediction_type and self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"prediction_type={self.prediction_type!r} must be one of {PREDICTION_TYPES}")
        if self.snr_gamma < 0 or self.noise_offset < 0 or self.prior_loss_weight < 0:
            raise ConfigError("snr_gamma, noise_offset and prior_loss_weight must be >= 0")


class TrainModule(nn.Module):
    """The trained parts: the UNet and, when it is trained too, the text encoder.

    Frozen parts stay outside so that an engine placing this module's parameters (Gemini) never
    holds a frozen VAE. ``forward`` is the whole trained computation, so a wrapper such as
    ``GeminiEngine`` can be called in its place.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None = None):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``text``: token ids [B, L] when the text encoder is trained, else its hidden states [B, L, C]."""
        hidden = self.text_encoder(text)[0] if self.text_encoder is not None else text
        return self.unet(noisy, timesteps, hidden).sample  # [B, 4, h, w]


class NoisePredictionLoss:
    """``loss = NoisePredictionLoss(...)(model, batch)`` for a TrainModule ``model``.

    ``frozen_text_encoder`` is used (without gradients) when the model has no text encoder.
    ``offload`` keeps the frozen modules on the host and moves each to the device only for its
    forward pass.
    """

    def __init__(self, *, vae: nn.Module, scheduler, cfg: LossConfig, frozen_text_encoder: nn.Module | None,
                 device: torch.device, offload: bool = False):
        self.vae, self.text_encoder, self.cfg = vae, frozen_text_encoder, cfg
        self.device, self.offload = torch.device(device), offload
        self.num_timesteps = scheduler.config.num_train_timesteps
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)  # [T]
        self.scaling_factor = vae.config.scaling_factor

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``model``: a TrainModule, or anything called like one (a GeminiEngine wrapping it)."""
        errors, timesteps = self.per_sample(model, batch)
        return self.reduce(errors * self.snr_weights(timesteps), prior="prior_pixel_values" in batch)

    def per_sample(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's unweighted mean squared error and its timestep, [B'] each (B' = 2B with
        DreamBooth class images: the instance samples first)."""
        generator = torch.Generator().manual_seed(int(batch["noise_seed"]))
        pixels, ids = batch["pixel_values"], batch["input_ids"]
        start, total = batch["noise_slice"].tolist() if "noise_slice" in batch else (0, pixels.shape[0])
        rows = torch.arange(start, start + pixels.shape[0])
        if "prior_pixel_values" in batch:  # the global draw holds every instance row, then every class row
            pixels = torch.cat([pixels, batch["prior_pixel_values"]])  # [2B, 3, H, W]
            ids = torch.cat([ids, batch["prior_input_ids"]])  # [2B, L]
            rows, total = torch.cat([rows, rows + total]), 2 * total
        latents = self.encode_images(pixels, generator, rows=rows, total=total)  # [B', 4, h, w]
        noise, timesteps = self.draw_noise(latents, generator, rows=rows, total=total)
        noisy, target = self.noisy_and_target(latents, noise, timesteps)
        ids = ids.to(self.device)
        text = ids if self.text_encoder is None else self.encode_frozen_text(ids)
        pred = model(noisy, timesteps, text)  # the engine applies autocast / the compute dtype
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)), timesteps  # [B']

    def reduce(self, weighted: torch.Tensor, *, prior: bool) -> torch.Tensor:
        """The batch loss from weighted per-sample errors: their mean, or with class images the
        instance mean plus ``prior_loss_weight`` times the class mean (Ruiz et al. 2023, eq. 2)."""
        if prior:
            instance, klass = weighted.chunk(2)
            return instance.mean() + self.cfg.prior_loss_weight * klass.mean()
        return weighted.mean()

    def noisy_and_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """x_t = sqrt(a) x0 + sqrt(1 - a) eps, and eps or v = sqrt(a) eps - sqrt(1 - a) x0 as target."""
        alphas = self.alphas_cumprod.to(latents.device)[timesteps].view(-1, 1, 1, 1)  # [B, 1, 1, 1]
        noisy = alphas.sqrt() * latents + (1 - alphas).sqrt() * noise
        if self.cfg.prediction_type == "epsilon":
            return noisy, noise
        return noisy, alphas.sqrt() * noise - (1 - alphas).sqrt() * latents

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator, *, rows: torch.Tensor | None = None,
                      total: int = 0) -> torch.Tensor:
        """Latents sampled from the VAE posterior; ``rows`` of a draw for ``total`` samples (default: all)."""
        with self._frozen_on_device(self.vae) as vae:
            moments = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
            # Sample the posterior from host noise so the result does not depend on the device.
            eps = _draw(torch.randn, moments.mean.shape, generator, rows, total).to(self.device, moments.mean.dtype)
            latents = moments.mean + moments.std * eps
        return latents.float() * self.scaling_factor

    def draw_noise(self, latents: torch.Tensor, generator: torch.Generator, *, rows: torch.Tensor | None = None,
                   total: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise (with the offset, if on) and timesteps; ``rows`` of a draw for ``total`` samples."""
        batch, channels = latents.shape[:2]
        noise = _draw(torch.randn, latents.shape, generator, rows, total)
        if self.cfg.noise_offset:
            noise = noise + self.cfg.noise_offset * _draw(torch.randn, (batch, channels, 1, 1), generator, rows, total)
        timesteps = _draw(lambda shape, generator: torch.randint(0, self.num_timesteps, shape, generator=generator),
                          (batch,), generator, rows, total)
        return noise.to(self.device), timesteps.to(self.device)

    @torch.no_grad()
    def encode_frozen_text(self, ids: torch.Tensor) -> torch.Tensor:
        with self._frozen_on_device(self.text_encoder) as encoder:
            return encoder(ids)[0].float()  # [B, L, C]

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v; ones when off."""
        if not self.cfg.snr_gamma:
            return torch.ones(timesteps.shape, device=timesteps.device)
        alphas = self.alphas_cumprod.to(timesteps.device)[timesteps]
        snr = alphas / (1 - alphas)
        clipped = snr.clamp(max=self.cfg.snr_gamma)
        return clipped / (snr + 1) if self.cfg.prediction_type == "v_prediction" else clipped / snr

    @contextlib.contextmanager
    def _frozen_on_device(self, module: nn.Module):
        if not self.offload:
            yield module
            return
        module.to(self.device, non_blocking=True)
        try:
            yield module
        finally:
            module.to("cpu")


def _draw(sample, shape, generator: torch.Generator, rows: torch.Tensor | None, total: int) -> torch.Tensor:
    """``sample(shape)`` as rows ``rows`` of one draw for ``total`` samples (the global batch)."""
    if rows is None:
        return sample(tuple(shape), generator=generator)
    return sample((total, *shape[1:]), generator=generator)[rows]
