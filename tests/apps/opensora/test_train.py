"""Training through the core loop: debug-preset loss curve vs stored values, exact resume, Gemini ==
plain in fp32, an overfit bound, and the CLI end to end (train, then sample an mp4 read back by PyAV)."""

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ferryman.apps.opensora.cli import main as opensora
from ferryman.apps.opensora.config import Bucket, DataConfig, OpenSoraConfig, RuntimeConfig
from ferryman.apps.opensora.presets import model_preset
from ferryman.apps.opensora.sample import load_for_sampling
from ferryman.apps.opensora.train import run_train
from ferryman.core.gemini import GeminiConfig, OptimConfig
from ferryman.core.training import TrainConfig

from .conftest import CLIPS

# 4 steps of the debug preset on the sample clips, CPU fp32; after an intended change to the model,
# data pipeline or loss, rewrite it with FERRYMAN_UPDATE_GOLDEN=1 pytest tests/apps/opensora -k loss_curve
GOLDEN = Path(__file__).with_name("debug_loss_curve.json")
OVERFIT_STEPS, OVERFIT_BOUND = 60, 0.35  # mean loss of the last 10 steps; it starts near 0.95


def _cfg(tmp_path, tiny_models, *, csv=CLIPS / "clips.csv", steps=4, buckets=None, **train_kw) -> OpenSoraConfig:
    t5, vae = tiny_models
    train = dict(out_dir=str(tmp_path), max_steps=steps, precision="fp32", optim=OptimConfig(lr=1e-3),
                 schedule="constant", ema_decay=0.9, progress=False, plot=False, seed=0)
    return OpenSoraConfig(
        model=model_preset("debug"), runtime=RuntimeConfig(attention_backend="torch", norm_backend="torch"),
        text_encoder=t5, vae=vae,
        data=DataConfig(csv=csv, buckets=buckets or [Bucket(resolution=32, num_frames=8, batch_size=2)],
                        aspect_ratios=[0.75, 1.0, 1.3333], size_multiple=8),
        train=TrainConfig(**(train | train_kw)),
    )


def test_debug_preset_loss_curve_matches_stored_values_and_resume_is_exact(tmp_path, tiny_models):
    straight = run_train(_cfg(tmp_path / "a", tiny_models), quiet=True)
    if os.environ.get("FERRYMAN_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"device": "cpu", "precision": "fp32", "losses": straight.losses}, indent=1) + "\n")
    stored = json.loads(GOLDEN.read_text())["losses"]
    assert straight.losses == pytest.approx(stored, rel=1e-4)
    run_train(_cfg(tmp_path / "b", tiny_models, steps=2, ckpt_every=2), quiet=True)
    resumed = run_train(_cfg(tmp_path / "b", tiny_models, resume="latest"), quiet=True)
    assert resumed.losses == straight.losses[2:]  # data order, noise and weights all continue exactly


def test_gemini_engine_trains_like_plain_pytorch_in_fp32(tmp_path, tiny_models):
    plain = run_train(_cfg(tmp_path / "plain", tiny_models, steps=3), quiet=True)
    gcfg = GeminiConfig(placement="static", param_host_fraction=0.5, optim_host_fraction=0.5, min_num_chunks=4)
    chunked = run_train(_cfg(tmp_path / "gemini", tiny_models, steps=3, engine="gemini", gemini=gcfg), quiet=True)
    assert chunked.losses == pytest.approx(plain.losses, rel=1e-5, abs=1e-6)
    a, b = plain.engine.state_dict(), chunked.engine.state_dict()
    for name, value in a.items():
        assert torch.allclose(b[name], value, atol=1e-6), name
    # a Gemini checkpoint samples like any other
    model, _ = load_for_sampling(tmp_path / "gemini", torch.device("cpu"), use_ema=False)
    assert torch.allclose(model.state_dict()["final_layer.linear.weight"], a["final_layer.linear.weight"], atol=1e-6)


def test_overfits_two_clips_below_the_stated_bound(tmp_path, tiny_models):
    for name in ("circle_diag.mp4", "square_diag.mp4"):
        shutil.copy(CLIPS / name, tmp_path / name)
    rows = (CLIPS / "clips.csv").read_text().splitlines()
    (tmp_path / "two.csv").write_text("\n".join([rows[0]] + [r for r in rows if "_diag" in r]) + "\n")
    cfg = _cfg(tmp_path / "run", tiny_models, csv=tmp_path / "two.csv", steps=OVERFIT_STEPS,
               optim=OptimConfig(lr=1e-2), ema_decay=0.0)
    # vae_sample=False: the posterior noise of a random VAE would set a floor above the bound
    cfg = replace(cfg, diffusion=replace(cfg.diffusion, caption_dropout=0.0), vae_sample=False)
    losses = run_train(cfg, quiet=True).losses
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > 0.8 and last < OVERFIT_BOUND, (first, last)


def test_cli_trains_then_samples_an_mp4_pyav_reads_back(tmp_path, tiny_models):
    import av

    t5, vae = tiny_models
    run = tmp_path / "run"
    args = ["train", "--csv", str(CLIPS / "clips.csv"), "--text-encoder", str(t5), "--vae", str(vae),
            "--preset", "debug", "--bucket", "32:8:2", "--max-steps", "2", "--precision", "fp32", "--out", str(run),
            "--set", "data.size_multiple=8", "--set", "train.progress=false", "--set", "runtime.attention_backend=torch",
            "--set", "runtime.norm_backend=torch"]
    result = CliRunner().invoke(opensora, args)
    assert result.exit_code == 0, result.output
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG" and (run / "opensora.yaml").is_file()
    out = tmp_path / "clip.mp4"
    result = CliRunner().invoke(opensora, ["sample", "--ckpt", str(run), "--prompt", "a red circle moving right",
                                           "--num-frames", "6", "--resolution", "24x40", "--steps", "3",
                                           "--cfg-scale", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(frames) == 6 and frames[0].shape == (24, 40, 3)
    assert json.loads(out.with_suffix(".json").read_text())["prompt"] == "a red circle moving right"


def test_cli_errors_are_one_line(tmp_path, tiny_models):
    t5, vae = tiny_models
    result = CliRunner().invoke(opensora, ["train", "--csv", str(CLIPS / "clips.csv"), "--text-encoder", str(t5),
                                           "--vae", str(vae), "--bucket", "32:30:2", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "gives no full batch" in result.output
    result = CliRunner().invoke(opensora, ["train", "--csv", str(CLIPS / "clips.csv"), "--text-encoder", str(t5),
                                           "--vae", str(vae), "--preset", "tiny", "--set", "model.caption_channels=16",
                                           "--bucket", "32:8:2", "--set", "data.size_multiple=8", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "model.caption_channels=16 but the T5 encoder" in result.output
    result = CliRunner().invoke(opensora, ["sample", "--ckpt", str(tmp_path), "--prompt", "x"])
    assert result.exit_code == 2 and "no checkpoint here" in result.output
    result = CliRunner().invoke(opensora, ["data", "check", str(CLIPS / "clips.csv"), "--bucket", "32:8"])
    assert result.exit_code == 2 and result.output.strip() == "Error: --bucket '32:8': expected RES:FRAMES:BATCH, e.g. 256:16:2"


def _sp_train_worker(rank, world_size, cfg):
    result = run_train(cfg, quiet=True)
    return result.losses


@pytest.mark.distributed
def test_sequence_parallel_training_on_two_ranks_matches_one_process(tmp_path, tiny_models):
    """torchrun-style: 2 gloo ranks share each sample's patches, on the Gemini engine with checkpointed
    blocks, against one plain process (the gradient hooks must feed Gemini's chunks the summed gradient)."""
    from ferryman.core.parallel import run_distributed

    single = run_train(_cfg(tmp_path / "one", tiny_models, steps=3), quiet=True).losses
    cfg = _cfg(tmp_path / "two", tiny_models, steps=3, engine="gemini")
    cfg = replace(cfg, sp=2, runtime=replace(cfg.runtime, grad_checkpointing=True))
    for losses in run_distributed(_sp_train_worker, 2, cfg):
        assert losses == pytest.approx(single, rel=1e-5)


def test_ddpm_option_trains_and_samples(tmp_path, tiny_models):
    from ferryman.apps.opensora.sample import sample_latents
    from ferryman.apps.opensora.train import build_encoders

    cfg = _cfg(tmp_path, tiny_models, steps=2)
    cfg = replace(cfg, diffusion=replace(cfg.diffusion, kind="ddpm"))
    result = run_train(cfg, quiet=True)
    assert all(0.5 < loss < 2.0 for loss in result.losses)  # epsilon MSE of a fresh model is about 1
    model, saved = load_for_sampling(tmp_path, torch.device("cpu"))
    assert saved.diffusion.kind == "ddpm"
    latents = sample_latents(model, build_encoders(saved, torch.device("cpu")), saved.diffusion, ["a dog"],
                             num_frames=3, height=16, width=24, steps=4, cfg_scale=2.0, fps=8)
    assert latents.shape == (1, 4, 3, 8, 12) and torch.isfinite(latents).all()


def test_data_check_command_prints_the_bucket_table():
    result = CliRunner().invoke(opensora, ["data", "check", str(CLIPS / "clips.csv"), "--bucket", "32:8:2",
                                           "--set", "data.size_multiple=8", "--set", "data.aspect_ratios=[0.75,1.0]"])
    assert result.exit_code == 0, result.output
    assert "32px/8f/ar0.75" in result.output and "6 clips, 0 unreadable, 6 in buckets, 3 batches per epoch" in result.output
    assert "32px/8f/ar1                32x32      8     2     4       2" in result.output  # portrait clips join ar 1
