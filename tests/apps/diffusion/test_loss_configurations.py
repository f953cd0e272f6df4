"""The latent-diffusion loss in the configurations the other tests leave out, against values
computed here: a trained text encoder (the model encodes the token ids itself), a DreamBooth batch
of three instance and three class samples, a schedule held in float64 by the scheduler, and the
targets of both prediction types for known x0, noise and timesteps, by hand."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ferryman.apps.diffusion.loss import LossConfig, NoisePredictionLoss, TrainModule
from tests.apps.diffusion.test_loss import _loss, _scaled_linear_alphas_cumprod


def _parts(tiny_model):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet")
    text = CLIPTextModel.from_pretrained(str(tiny_model), subfolder="text_encoder")
    return unet, text


def _from_schedule(cfg: LossConfig) -> NoisePredictionLoss:
    """The loss on SD's schedule held in float64 (as a scheduler may hold it), without models."""
    scheduler = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000),
                                alphas_cumprod=torch.from_numpy(_scaled_linear_alphas_cumprod()))
    vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=0.5))
    return NoisePredictionLoss(vae=vae, scheduler=scheduler, cfg=cfg, frozen_text_encoder=None, device=torch.device("cpu"))


def _batch(n: int, seed: int = 0, prior: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    batch = {"pixel_values": torch.rand(n, 3, 32, 32, generator=gen) * 2 - 1,
             "input_ids": torch.randint(0, 600, (n, 77), generator=gen), "noise_seed": torch.tensor(11)}
    if prior:
        batch |= {"prior_pixel_values": torch.rand(n, 3, 32, 32, generator=gen) * 2 - 1,
                  "prior_input_ids": torch.randint(0, 600, (n, 77), generator=gen)}
    return batch


def test_a_trained_text_encoder_encodes_the_token_ids_inside_the_model(tiny_model):
    unet, text = _parts(tiny_model)
    model = TrainModule(unet, text)
    gen = torch.Generator().manual_seed(3)
    noisy, ids = torch.randn(2, 4, 8, 8, generator=gen), torch.randint(0, 600, (2, 77), generator=gen)
    timesteps = torch.tensor([10, 700])
    with torch.no_grad():
        out = model(noisy, timesteps, ids)
        expected = unet(noisy, timesteps, text(ids).last_hidden_state).sample
    assert out.shape == (2, 4, 8, 8)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_training_the_text_encoder_gives_the_loss_of_the_frozen_one_at_the_same_weights(tiny_model):
    """With ``frozen_text_encoder=None`` the model gets the token ids and encodes them itself;
    at equal weights the loss must be the frozen encoder's, to the bit."""
    unet, text = _parts(tiny_model)
    frozen, _ = _loss(tiny_model, prediction_type="epsilon")
    trained = NoisePredictionLoss(vae=frozen.vae, scheduler=_loss(tiny_model)[1], cfg=LossConfig(prediction_type="epsilon"),
                                  frozen_text_encoder=None, device=torch.device("cpu"))
    frozen.text_encoder = text
    batch = _batch(2)
    with torch.no_grad():
        expected = frozen(TrainModule(unet), batch)
        got = trained(TrainModule(unet, text), batch)
    assert got.item() == expected.item()


def test_a_dreambooth_batch_draws_what_a_plain_batch_of_its_instance_then_class_images_draws(tiny_model):
    """3 instance + 3 class samples take rows 0-2 and 3-5 of one draw for 6 samples: the same
    posterior sample, noise (with the offset) and timesteps as a plain batch of the 6 images."""
    fn, _ = _loss(tiny_model, prediction_type="v_prediction", noise_offset=0.2)
    seen = []

    def model(noisy, timesteps, text):
        seen.append((noisy, text))
        return torch.zeros_like(noisy)

    db = _batch(3, prior=True)
    plain = {"pixel_values": torch.cat([db["pixel_values"], db["prior_pixel_values"]]),
             "input_ids": torch.cat([db["input_ids"], db["prior_input_ids"]]), "noise_seed": db["noise_seed"]}
    with torch.no_grad():
        errors, timesteps = fn.per_sample(model, db)
        plain_errors, plain_timesteps = fn.per_sample(model, plain)
    assert timesteps.shape == (6,) and torch.equal(timesteps, plain_timesteps)
    torch.testing.assert_close(seen[0][0], seen[1][0], rtol=0, atol=0)
    torch.testing.assert_close(seen[0][1], seen[1][1], rtol=0, atol=0)
    torch.testing.assert_close(errors, plain_errors, rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_prior_loss_is_the_instance_mean_plus_the_weighted_class_mean(n):
    fn = _from_schedule(LossConfig(prediction_type="epsilon", prior_loss_weight=0.5))
    weighted = torch.arange(1.0, 2 * n + 1)  # instances 1..n, classes n+1..2n
    instance, klass = (n + 1) / 2, n + (n + 1) / 2
    assert fn.reduce(weighted, prior=True).item() == instance + 0.5 * klass
    assert fn.reduce(weighted, prior=False).item() == (2 * n + 1) / 2


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_targets_by_hand_from_a_float64_schedule_come_out_in_float32(kind):
    """A scheduler may hold its schedule in float64: the loss works in float32 anyway. x0 = 1,
    noise = -2 at t = 0, 499, 999 of SD's schedule: x_t = sqrt(a) - 2 sqrt(1 - a); the target is
    -2 (epsilon) or v = -2 sqrt(a) - sqrt(1 - a)."""
    alphas = _scaled_linear_alphas_cumprod()  # float64
    fn = _from_schedule(LossConfig(prediction_type=kind, snr_gamma=5.0))
    timesteps = torch.tensor([0, 499, 999])
    latents, noise = torch.ones(3, 4, 2, 2), torch.full((3, 4, 2, 2), -2.0)
    noisy, target = fn.noisy_and_target(latents, noise, timesteps)
    a = alphas[[0, 499, 999]].astype(np.float32).astype(np.float64)  # the schedule as float32 holds it
    want_noisy = np.sqrt(a) - 2 * np.sqrt(1 - a)
    want_target = np.full(3, -2.0) if kind == "epsilon" else -2 * np.sqrt(a) - np.sqrt(1 - a)
    assert noisy.dtype == target.dtype == torch.float32
    np.testing.assert_allclose(noisy[:, 0, 0, 0].double().numpy(), want_noisy, rtol=1e-6)
    np.testing.assert_allclose(target[:, 0, 0, 0].double().numpy(), want_target, rtol=1e-6)
    assert torch.equal(noisy, noisy[:, :1, :1, :1].expand_as(noisy))  # one value per sample
    weights = fn.snr_weights(timesteps)
    snr = a / (1 - a)
    want = np.minimum(snr, 5.0) / (snr if kind == "epsilon" else snr + 1)
    assert weights.dtype == torch.float32
    np.testing.assert_allclose(weights.double().numpy(), want, rtol=1e-6)
