"""T5 text features (with the on-disk cache) and the per-frame VAE, from tiny local folders."""

import json

import pytest
import torch

from ferryman.apps.opensora.text import T5TextEncoder
from ferryman.apps.opensora.vae import VideoVAE
from ferryman.core.errors import UserError


def test_t5_features_mask_padding_and_cache_returns_the_same_values(tiny_models, tmp_path):
    t5, _ = tiny_models
    enc = T5TextEncoder(t5, max_length=8, cache_dir=tmp_path / "cache")
    texts = ["a red circle", "a blue square moving up on a black background", "a red circle"]
    states, mask = enc.encode(texts)
    assert states.shape == (3, 8, 32) and mask.dtype == torch.bool
    assert mask[0].tolist() == [True] * 4 + [False] * 4  # 3 words + </s>
    assert mask[1].all()  # truncated to 8 tokens
    assert torch.equal(states[0], states[2])
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2
    enc.model = None  # from here on only the cache can answer
    cached, cached_mask = enc.encode(texts)
    assert torch.equal(cached, states) and torch.equal(cached_mask, mask)


def test_cache_is_keyed_by_token_count(tiny_models, tmp_path):
    t5, _ = tiny_models
    a = T5TextEncoder(t5, max_length=8, cache_dir=tmp_path)
    b = T5TextEncoder(t5, max_length=6, cache_dir=tmp_path)
    assert a.encode(["a dog"])[0].shape[1] == 8 and b.encode(["a dog"])[0].shape[1] == 6


def test_missing_or_wrong_model_folders_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"text encoder folder .* does not exist"):
        T5TextEncoder(tmp_path / "nope", max_length=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"has no config\.json"):
        VideoVAE(tmp_path / "empty")


def test_vae_per_frame_shapes_and_micro_batching(tiny_models):
    _, vae_dir = tiny_models
    video = torch.rand(2, 3, 5, 16, 24) * 2 - 1
    small, large = VideoVAE(vae_dir, micro_batch=3), VideoVAE(vae_dir, micro_batch=64)
    z = small.encode(video, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 5, 8, 12) and small.scaling == pytest.approx(0.18215)
    assert torch.allclose(small.decode(z), large.decode(z), atol=1e-5)
    # frame 2 of clip 1 is encoded on its own: the same as encoding that frame as an image
    frame = video[1, :, 2][None]  # [1, 3, H, W]
    mean = large.model.encode(frame).latent_dist.mean * large.scaling
    z_mean = small.model.encode(video[1].transpose(0, 1)).latent_dist.mean[2] * small.scaling
    assert torch.allclose(mean[0], z_mean, atol=1e-5)


def test_vae_scaling_comes_from_its_config(tiny_models, tmp_path):
    import shutil

    _, vae_dir = tiny_models
    other = tmp_path / "vae"
    shutil.copytree(vae_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["scaling_factor"] = 0.5
    (other / "config.json").write_text(json.dumps(config))
    video = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    a = VideoVAE(vae_dir).encode(video, generator=torch.Generator().manual_seed(0))
    b = VideoVAE(other).encode(video, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(b, a * 0.5 / 0.18215, atol=1e-5)


@pytest.mark.parametrize("kind", ["wan", "hunyuan", "ltx", "cogvideox"])
def test_video_vae_frame_rule_and_scaling_come_from_its_config(kind, tmp_path):
    """Each diffusers video VAE class: the compression read from its config is what its encoder does
    (9 frames of 16x24 -> 3 latent frames of 4x6 -> 9 frames), a count it cannot take is a UserError
    naming the valid ones, and latents are normalised with its own scaling_factor / latents_mean / std."""
    from ferryman.apps.opensora.tiny import write_tiny_video_vae

    vae = VideoVAE(write_tiny_video_vae(tmp_path / kind, kind), micro_batch=1, sample=False)
    assert not vae.per_frame and (vae.downsample, vae.temporal) == (4, 4)
    video = torch.rand(2, 3, 9, 16, 24) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (2, 4, vae.latent_frames(9), 4, 6) == (2, 4, 3, 4, 6)
    raw = vae.model.encode(video[:1]).latent_dist.mean  # [1, 4, 3, 4, 6] before normalisation
    config = json.loads((tmp_path / kind / "config.json").read_text())
    buffers = dict(vae.model.named_buffers())  # LTX-Video keeps them there
    mean = torch.as_tensor(config.get("latents_mean") or buffers.get("latents_mean", [0.0] * 4)).view(1, 4, 1, 1, 1)
    std = torch.as_tensor(config.get("latents_std") or buffers.get("latents_std", [1.0] * 4)).view(1, 4, 1, 1, 1)
    assert kind in ("hunyuan", "cogvideox") or not torch.equal(std, torch.ones_like(std))
    scaling = config.get("scaling_factor") or 1.0
    assert torch.allclose(z[:1], (raw - mean) * scaling / std, atol=1e-5)
    assert vae.decode(z).shape == video.shape
    bad = 8 if vae.frame_multiple == 8 else 6
    with pytest.raises(UserError, match=rf"num_frames={bad}: .* takes 1 \+ {vae.frame_multiple}k frames: {1 + vae.frame_multiple}, "):
        vae.latent_frames(bad)
    with pytest.raises(UserError, match="clip frames=8"):
        vae.encode(torch.zeros(1, 3, 8, 16, 16))


def test_compression_rule_of_a_patched_residual_wan_vae_matches_its_encoder():
    """Wan 2.2's VAE layout (2x2 pixel patches folded into 12 input channels, residual blocks) with
    one temporal downsample: 8x spatial, 2x temporal, and still Wan's groups of 4 frames."""
    from diffusers import AutoencoderKLWan

    from ferryman.apps.opensora.vae import compression

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
                           is_residual=True, patch_size=2, in_channels=12, out_channels=12,
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    assert compression("AutoencoderKLWan", dict(vae.config)) == (8, 2, 4)
    with torch.no_grad():
        z = vae.encode(torch.rand(1, 3, 9, 16, 32) * 2 - 1).latent_dist.mean
    assert z.shape == (1, 4, 5, 2, 4)  # 1 + (9 - 1) / 2 latent frames, 16x32 / 8


def test_unsupported_video_vae_is_a_clear_error(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLMochi"}))
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="AutoencoderKLMochi is not supported; use an image AutoencoderKL or one of"):
        VideoVAE(tmp_path / "vae")
