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


def test_video_vae_encodes_whole_clips(tmp_path):
    """A diffusers video VAE (a tiny CogVideoX one) takes [B, C, T, H, W] at once and may compress time."""
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        layers_per_block=1, norm_num_groups=4, sample_height=32, sample_width=32,
    ).save_pretrained(tmp_path / "video_vae")
    vae = VideoVAE(tmp_path / "video_vae", micro_batch=1)
    assert not vae.per_frame and vae.scaling == pytest.approx(1.15258426)
    video = torch.rand(2, 3, 9, 16, 16) * 2 - 1
    z = vae.encode(video, generator=torch.Generator().manual_seed(0))
    assert z.shape[:2] == (2, 4) and z.shape[2] < 9 and z.shape[3:] == (8, 8)
    assert vae.decode(z).shape == video.shape
