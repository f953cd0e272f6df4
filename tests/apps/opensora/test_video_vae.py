"""End to end with a diffusers video VAE (a tiny AutoencoderKLWan saved with save_pretrained):
`opensora train` on the sample clips, then `opensora sample` to an mp4 that PyAV decodes to the
requested frame count and size; frame counts the VAE cannot produce are one-line errors."""

import json

import pytest
import torch
from click.testing import CliRunner

from ferryman.apps.opensora.cli import main as opensora
from ferryman.apps.opensora.tiny import write_tiny_video_vae

from .conftest import CLIPS


@pytest.fixture(scope="module")
def wan_vae(tmp_path_factory):
    return write_tiny_video_vae(tmp_path_factory.mktemp("video_vae") / "wan", "wan")


def _train_args(t5, vae, run, bucket):
    return ["train", "--csv", str(CLIPS / "clips.csv"), "--text-encoder", str(t5), "--vae", str(vae),
            "--preset", "debug", "--bucket", bucket, "--max-steps", "2", "--precision", "fp32", "--out", str(run),
            "--set", "data.size_multiple=8", "--set", "train.progress=false", "--set", "runtime.attention_backend=torch",
            "--set", "runtime.norm_backend=torch", "--set", "model.patch_size=[2,2,2]"]


def test_train_and_sample_with_a_video_vae_writes_the_requested_frames(tmp_path, tiny_models, wan_vae):
    """9-frame clips -> 3 latent frames, which the STDiT's temporal patch of 2 pads to 4 and crops
    back; sampling 9 frames draws 3 latent frames that the Wan decoder expands to 9."""
    import av

    from ferryman.apps.opensora.sample import _app_config, find_checkpoint
    from ferryman.apps.opensora.train import build_encoders, build_loader, encode_batch

    t5, _ = tiny_models
    run = tmp_path / "run"
    result = CliRunner().invoke(opensora, _train_args(t5, wan_vae, run, "32:9:2"))
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(0.2 < m["loss"] < 5 and m["grad_norm"] > 0 for m in metrics)

    cfg = _app_config(find_checkpoint(run))
    encoders = build_encoders(cfg, torch.device("cpu"))
    batch = next(iter(build_loader(cfg)))
    latents = encode_batch(batch, encoders)["latents"]
    assert batch["video"].shape[2] == 9 and latents.shape[1:3] == (4, 3)  # [B, C, T', h, w]

    out = tmp_path / "clip.mp4"
    args = ["sample", "--ckpt", str(run), "--prompt", "a red circle moving right", "--num-frames", "9",
            "--resolution", "24x40", "--steps", "2", "--cfg-scale", "3", "--out", str(out)]
    result = CliRunner().invoke(opensora, args)
    assert result.exit_code == 0, result.output
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    assert len(frames) == 9 and frames[0].shape == (24, 40, 3)

    args[args.index("--num-frames") + 1] = "6"
    result = CliRunner().invoke(opensora, args)
    assert result.exit_code == 2
    assert result.output.strip().endswith("takes 1 + 4k frames: 5, 9, 13, 17, 21, ... (nearest below: 5)")
    assert "--num-frames=6: the video VAE" in result.output and "AutoencoderKLWan" in result.output


def test_a_bucket_frame_count_the_video_vae_cannot_take_fails_before_training(tmp_path, tiny_models, wan_vae):
    t5, _ = tiny_models
    result = CliRunner().invoke(opensora, _train_args(t5, wan_vae, tmp_path, "32:8:2"))
    assert result.exit_code == 2
    assert "bucket 32:8 num_frames=8: the video VAE" in result.output and "1 + 4k frames: 5, 9, 13" in result.output
