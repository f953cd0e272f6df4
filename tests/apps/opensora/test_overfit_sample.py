"""End to end: a tiny STDiT overfit on one clip samples that clip back, and planted bugs fail the check.

A loss curve cannot tell these apart: with its zero-initialised output layer, an STDiT trained
towards the negated velocity starts from the same losses, and a model that writes its patches to
the wrong places can still lower its loss. Sampling can: the clip (a white square moving across
black, 6 frames of 16x16) goes through ``opensora train`` (``tiny`` preset, fp32, plain engine,
a pass-through VAE so that pixels are latents) and ``opensora sample`` with its own caption, and
the mp4 written is compared with the frames the loader trained on.

Measured on the 2-core CPU of the dev machine (300 steps, about 14 s of CPU per training; PSNR of
the sample against the training clip): clean 21.4 dB; velocity target negated 3.1 dB; patches
written to the transposed grid position (in training and sampling alike) 11.2 dB. Not caught by
the 16 dB bound: the timestep shift dropped from training only (15.5 dB, too near the bound to
assert), pixels transposed inside each patch (21.5 dB: the output layer learns the permutation
back) and the shift dropped from sampling only (21.4 dB: an overfit flow is nearly straight).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import ferryman.apps.opensora.diffusion as diffusion
from ferryman.apps.opensora.cli import main as opensora
from ferryman.apps.opensora.data import read_frames, write_mp4
from ferryman.apps.opensora.model import STDiT
from ferryman.apps.opensora.tiny import write_passthrough_vae

FRAMES, SIDE, CAPTION = 6, 16, "a white square moving right"
STEPS, LR = 300, "2e-3"
BOUND_DB = 16.0  # clean 21.4 dB; the two planted bugs 3.1 and 11.2 dB


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A clip table with one clip, and the pass-through VAE beside it."""
    root = tmp_path_factory.mktemp("one_clip")
    video = np.zeros((FRAMES, SIDE, SIDE, 3), np.uint8)
    for t in range(FRAMES):
        video[t, 3 + t : 9 + t, 2 + 2 * t : 8 + 2 * t] = 255  # down 1 px, right 2 px per frame
    write_mp4(root / "square.mp4", video, fps=8)
    (root / "clips.csv").write_text(f"path,text\nsquare.mp4,{CAPTION}\n")
    write_passthrough_vae(root / "vae")
    return root / "clips.csv"


def test_the_pass_through_vae_returns_its_input(clip):
    from ferryman.apps.opensora.vae import VideoVAE

    vae = VideoVAE(clip.parent / "vae")
    video = torch.rand(1, 3, 2, 8, 10) * 2 - 1
    latents = vae.encode(video, generator=torch.Generator().manual_seed(0))
    assert vae.downsample == 1 and (latents[:, :3] - video).abs().max() < 1e-4 and latents[:, 3].abs().max() < 1e-4
    assert (vae.decode(latents) - video).abs().max() < 1e-4


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return 10 * math.log10(255**2 / mse)


def _train_then_sample(tmp: Path, clip: Path, t5: Path) -> float:
    """PSNR (dB) of ``opensora sample``'s mp4 against the frames ``opensora train`` read."""
    # base_resolution 16 x 16: the clip's own size, so the timestep shift is that of its 6 frames
    train = ["train", "--csv", str(clip), "--text-encoder", str(t5), "--vae", str(clip.parent / "vae"),
             "--preset", "tiny", "--bucket", f"{SIDE}:{FRAMES}:1", "--max-steps", str(STEPS), "--lr", LR,
             "--precision", "fp32", "--memory", "plain", "--ema-decay", "0", "--checkpoint-every", "0",
             "--out", str(tmp / "run"), "--set", "data.size_multiple=2", "--set", "data.aspect_ratios=[1.0]",
             "--set", f"diffusion.base_resolution={SIDE * SIDE}", "--set", "diffusion.caption_dropout=0",
             "--set", "train.progress=false", "--set", "train.plot=false",
             "--set", "runtime.attention_backend=torch", "--set", "runtime.norm_backend=torch"]
    result = CliRunner().invoke(opensora, train)
    assert result.exit_code == 0, result.output
    out = tmp / "sample.mp4"
    sample = ["sample", "--ckpt", str(tmp / "run"), "--prompt", CAPTION, "--num-frames", str(FRAMES),
              "--resolution", str(SIDE), "--steps", "30", "--cfg-scale", "1", "--out", str(out)]
    result = CliRunner().invoke(opensora, sample)
    assert result.exit_code == 0, result.output
    frames = list(range(FRAMES))
    return _psnr(read_frames(out, frames), read_frames(clip.parent / "square.mp4", frames))


def _transposed_grid(self: STDiT, x, nt: int, nh: int, nw: int):
    """unpatchify with the patch rows and columns swapped: token (i, j) lands at (j, i)."""
    pt, ph, pw = self.cfg.patch_size
    b, c = x.shape[0], self.cfg.in_channels
    x = x.reshape(b, nt, nw, nh, pt, ph, pw, c).permute(0, 7, 1, 4, 3, 5, 2, 6)  # [B, C, T', pt, H', ph, W', pw]
    return x.reshape(b, c, nt * pt, nh * ph, nw * pw)


def _negated_target(pred, target):
    return F.mse_loss(pred, -target)


@pytest.mark.parametrize("bug", [None, "negated velocity target", "patches written to transposed positions"])
def test_tiny_stdit_overfit_on_one_clip_samples_it_back(tmp_path, clip, tiny_models, monkeypatch, bug):
    if bug == "negated velocity target":
        monkeypatch.setattr(diffusion, "F", SimpleNamespace(mse_loss=_negated_target))
    elif bug is not None:
        monkeypatch.setattr(STDiT, "unpatchify", _transposed_grid)
    psnr = _train_then_sample(tmp_path, clip, tiny_models[0])
    if bug is None:
        assert psnr > BOUND_DB, f"sampled {psnr:.1f} dB from the clip it was trained on"
    else:
        assert psnr < BOUND_DB, f"planted bug ({bug}) still sampled {psnr:.1f} dB"
