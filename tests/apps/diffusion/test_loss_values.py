"""The latent-diffusion loss's draws and inputs against independent values: the latents are the
VAE posterior sampled as diffusers samples it, the offset noise adds one constant per sample and
channel (Guttenberg 2023) on top of the per-element noise, timesteps cover the scheduler's range,
the model is called on the noisy latents and the text encoder's states, and each bad setting is
refused in one line naming it."""

import pytest
import torch

from ferryman.apps.diffusion.loss import LossConfig
from ferryman.core.errors import ConfigError
from tests.apps.diffusion.test_loss import _loss


def test_latents_are_the_vae_posterior_sampled_as_diffusers_does(tiny_model):
    fn, _ = _loss(tiny_model, prediction_type="epsilon")
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        latents = fn.encode_images(pixels, torch.Generator().manual_seed(5))
        expected = fn.vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(5))
    assert fn.scaling_factor == fn.vae.config.scaling_factor != 1.0
    torch.testing.assert_close(latents, expected * fn.scaling_factor, rtol=0, atol=0)


@pytest.mark.parametrize("offset", [0.0, 0.25])
def test_offset_noise_is_one_constant_per_sample_and_channel_on_top_of_the_noise(tiny_model, offset):
    fn, _ = _loss(tiny_model, prediction_type="epsilon", noise_offset=offset)
    latents = torch.zeros(3, 4, 8, 8)
    noise, timesteps = fn.draw_noise(latents, torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(3, 4, 8, 8, generator=gen)
    shift = torch.randn(3, 4, 1, 1, generator=gen) if offset else torch.zeros(3, 4, 1, 1)
    torch.testing.assert_close(noise, base + offset * shift, rtol=0, atol=0)
    assert timesteps.tolist() == torch.randint(0, 1000, (3,), generator=gen).tolist()


def test_the_model_sees_the_noisy_latents_and_the_frozen_text_states(tiny_model):
    fn, _ = _loss(tiny_model, prediction_type="epsilon")
    seen = {}

    def model(noisy, timesteps, text):
        seen.update(noisy=noisy, timesteps=timesteps, text=text)
        return torch.zeros_like(noisy)

    gen = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1, "input_ids": torch.randint(0, 600, (2, 77), generator=gen),
             "noise_seed": torch.tensor(9)}
    with torch.no_grad():
        errors, timesteps = fn.per_sample(model, batch)
        g = torch.Generator().manual_seed(9)
        latents = fn.encode_images(batch["pixel_values"], g)
        noise, drawn = fn.draw_noise(latents, g)
        noisy, _ = fn.noisy_and_target(latents, noise, drawn)
        text = fn.text_encoder(batch["input_ids"])[0]
    assert torch.equal(timesteps, drawn) and torch.equal(seen["timesteps"], drawn)
    torch.testing.assert_close(seen["noisy"], noisy, rtol=0, atol=0)
    torch.testing.assert_close(seen["text"], text, rtol=0, atol=0)
    torch.testing.assert_close(errors, noise.square().mean(dim=(1, 2, 3)))  # a zero prediction of the noise


@pytest.mark.parametrize(("fields", "message"), [
    ({"prediction_type": "sample"}, "prediction_type='sample' must be one of ('epsilon', 'v_prediction')"),
    ({"snr_gamma": -1.0}, "snr_gamma, noise_offset and prior_loss_weight must be >= 0"),
    ({"noise_offset": -0.1}, "snr_gamma, noise_offset and prior_loss_weight must be >= 0"),
    ({"prior_loss_weight": -0.5}, "snr_gamma, noise_offset and prior_loss_weight must be >= 0"),
])
def test_a_bad_loss_setting_is_refused_in_one_line(fields, message):
    with pytest.raises(ConfigError) as err:
        LossConfig(**fields)
    assert str(err.value) == message


def test_settings_at_their_edges_are_accepted():
    cfg = LossConfig(prediction_type="", snr_gamma=0.0, noise_offset=0.0, prior_loss_weight=0.0)
    assert (cfg.snr_gamma, cfg.noise_offset, cfg.prior_loss_weight) == (0.0, 0.0, 0.0)
