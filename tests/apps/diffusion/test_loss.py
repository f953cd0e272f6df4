"""The training objective against diffusers' own scheduler math, and the EMA update rule."""

import numpy as np
import pytest
import torch

from ferryman.apps.diffusion.loss import LossConfig, NoisePredictionLoss, TrainModule
from ferryman.core.errors import ConfigError
from tests.tolerance import approx, assert_close


def _loss(tiny_model, **cfg):
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel

    scheduler = DDPMScheduler.from_pretrained(str(tiny_model), subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(str(tiny_model), subfolder="vae")
    text = CLIPTextModel.from_pretrained(str(tiny_model), subfolder="text_encoder")
    fn = NoisePredictionLoss(vae=vae, scheduler=scheduler, cfg=LossConfig(**cfg), frozen_text_encoder=text,
                             device=torch.device("cpu"))
    return fn, scheduler


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_noisy_latents_and_targets_match_diffusers_scheduler(tiny_model, kind):
    fn, scheduler = _loss(tiny_model, prediction_type=kind)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([0, 500, 999])
    noisy, target = fn.noisy_and_target(latents, noise, timesteps)
    torch.testing.assert_close(noisy, scheduler.add_noise(latents, noise, timesteps))
    expected = noise if kind == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    torch.testing.assert_close(target, expected)


def test_min_snr_weights_follow_the_paper(tiny_model):
    from diffusers.training_utils import compute_snr

    timesteps = torch.tensor([1, 100, 400, 900])
    snr = compute_snr(_loss(tiny_model)[1], timesteps)
    eps, _ = _loss(tiny_model, prediction_type="epsilon", snr_gamma=5.0)
    v, _ = _loss(tiny_model, prediction_type="v_prediction", snr_gamma=5.0)
    torch.testing.assert_close(eps.snr_weights(timesteps), torch.minimum(snr, torch.tensor(5.0)) / snr)
    torch.testing.assert_close(v.snr_weights(timesteps), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    # by hand at t=1: SNR = a / (1 - a) with a = (1 - b0)(1 - b1) of the scaled-linear betas, weight 5 / SNR
    a1 = (1 - 0.00085) * (1 - (0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) / 999) ** 2)
    assert eps.snr_weights(timesteps)[0].item() == approx(5 / (a1 / (1 - a1)), ulps=64)
    assert eps.snr_weights(timesteps)[-1] == 1.0  # SNR below gamma: weight 1


def test_loss_depends_only_on_batch_seed(tiny_model):
    from diffusers import UNet2DConditionModel

    fn, _ = _loss(tiny_model, prediction_type="epsilon", noise_offset=0.1)
    model = TrainModule(UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet"))
    batch = {"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1, "input_ids": torch.randint(0, 600, (2, 77)),
             "noise_seed": torch.tensor(123)}
    first = fn(model, batch)
    torch.randn(100)  # global RNG use in between must not matter
    assert torch.equal(first, fn(model, batch))
    assert not torch.equal(first, fn(model, {**batch, "noise_seed": torch.tensor(124)}))
    first.backward()
    assert all(p.grad is not None for p in model.unet.parameters() if p.requires_grad)


def test_loss_config_rejects_unknown_prediction_type():
    with pytest.raises(ConfigError, match="prediction_type"):
        LossConfig(prediction_type="sample")


def test_ema_decay_warms_up_like_diffusers():
    from diffusers.training_utils import EMAModel

    from ferryman.core.training.schedule import ema_decay_at

    # EMAModel.step counts the update first, then asks get_decay(count): ours takes the updates before
    for decay in (0.9999, 0.99):
        ema = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=decay)
        for done in (0, 1, 2, 90, 10_000):
            assert ema_decay_at(decay, done) == pytest.approx(ema.get_decay(done + 1))
    assert ema_decay_at(0.9999, 0) == 0.0 and ema_decay_at(0.99, 10_000) == 0.99


def _scaled_linear_alphas_cumprod() -> np.ndarray:
    """SD's noise schedule by hand, in float64: betas linear in sqrt from 0.00085 to 0.012 over 1000 steps."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return np.cumprod(1 - betas)


@pytest.mark.parametrize("kind, gamma", [("epsilon", 2.0), ("v_prediction", 3.0)])
def test_min_snr_and_prior_weights_at_non_trivial_values_against_hand_computation(tiny_model, kind, gamma):
    """DreamBooth batch (2 instance, 2 class samples): loss = mean_i(w_i e_i) + 0.3 mean_c(w_c e_c), with
    w = min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v), SNR from the schedule computed by hand."""
    from diffusers import UNet2DConditionModel

    plain, _ = _loss(tiny_model, prediction_type=kind)
    weighted, _ = _loss(tiny_model, prediction_type=kind, snr_gamma=gamma, prior_loss_weight=0.3)
    model = TrainModule(UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet"))
    gen = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1, "input_ids": torch.randint(0, 600, (2, 77), generator=gen),
             "prior_pixel_values": torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1,
             "prior_input_ids": torch.randint(0, 600, (2, 77), generator=gen), "noise_seed": torch.tensor(8)}
    with torch.no_grad():
        errors, timesteps = plain.per_sample(model, batch)  # [4] unweighted, the instance samples first
        loss = weighted(model, batch).item()
    alphas = _scaled_linear_alphas_cumprod()[timesteps.numpy()]
    snr = alphas / (1 - alphas)
    assert (snr < gamma).any() and (snr > gamma).any()  # both sides of the clip are exercised
    w = np.minimum(snr, gamma) / (snr if kind == "epsilon" else snr + 1)
    e = errors.double().numpy()
    expected = np.mean(w[:2] * e[:2]) + 0.3 * np.mean(w[2:] * e[2:])
    assert loss == approx(expected, ulps=64)


def test_micro_batches_draw_their_own_rows_of_the_global_batch(tiny_model):
    """Two halves of a global batch of 4 (two processes, or two accumulation steps), DreamBooth
    class images and offset noise included, get the timesteps and noise the whole batch gets."""
    from diffusers import UNet2DConditionModel

    from ferryman.apps.diffusion.data import collate

    fn, _ = _loss(tiny_model, prediction_type="epsilon", noise_offset=0.1)
    model = TrainModule(UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet"))
    gen = torch.Generator().manual_seed(0)
    samples = [{"pixel_values": torch.rand(3, 32, 32, generator=gen) * 2 - 1, "input_ids": torch.randint(0, 600, (77,), generator=gen),
                "prior_pixel_values": torch.rand(3, 32, 32, generator=gen) * 2 - 1,
                "prior_input_ids": torch.randint(0, 600, (77,), generator=gen)} for _ in range(4)]
    whole = collate(samples, seed=3, global_batch=4, first=8)  # the third global batch
    halves = [collate(samples[:2], seed=3, global_batch=4, first=8), collate(samples[2:], seed=3, global_batch=4, first=10)]
    with torch.no_grad():
        errors, timesteps = fn.per_sample(model, whole)  # [8]: instances 0-3, then class images 0-3
        parts = [fn.per_sample(model, half) for half in halves]
    order = [0, 1, 4, 5, 2, 3, 6, 7]  # half 0: instances 0-1, classes 0-1; half 1: instances 2-3, classes 2-3
    assert torch.equal(torch.cat([t for _, t in parts]), timesteps[order])
    assert_close(torch.cat([e for e, _ in parts]), errors[order], ulps=64)
    other = fn.per_sample(model, collate(samples, seed=3, global_batch=4, first=12))[1]
    assert not torch.equal(other, timesteps)  # the next global batch draws afresh
