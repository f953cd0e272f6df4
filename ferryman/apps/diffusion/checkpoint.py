"""checkpoint-N/ folders: everything a resumed run needs, and weights diffusers can read directly.

Layout (N = optimizer steps taken):

    checkpoint-N/trainer_state.json          step, losses so far, base model, run kind
    checkpoint-N/engine/                     the core engine's state: weights and AdamW moments
                                             (safetensors; Gemini writes its shards here)
    checkpoint-N/unet/                       full finetune: UNet in diffusers layout (EMA weights
                                             under unet_ema/ when EMA is on), so
                                             UNet2DConditionModel.from_pretrained(ckpt, subfolder="unet")
                                             and `sd-generate --model checkpoint-N` work
    checkpoint-N/pytorch_lora_weights.safetensors   LoRA runs: load_lora_weights() reads it
    checkpoint-N/ema.safetensors             EMA weights by parameter name

A checkpoint is written under checkpoint-N.tmp and renamed when complete, so a crash never
leaves a folder that looks finished.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from ferryman.core.errors import UserError

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def save_checkpoint(out: Path, step: int, *, engine, state: dict[str, Any], ema=None, export=None,
                    keep: int = 0) -> Path:
    """Write checkpoint-``step`` under ``out``; ``export(folder)`` adds the diffusers-readable weights."""
    final = out / f"checkpoint-{step}"
    tmp = out / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    engine.save(tmp / "engine")
    if ema is not None:
        named = engine.named_from(ema.shadow)
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in named.items()}, tmp / "ema.safetensors")
    if export is not None:
        export(tmp)
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1) + "\n", encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    return final


def list_checkpoints(out: Path) -> list[Path]:
    """Finished checkpoint folders under ``out``, oldest first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(out: Path, resume: str) -> Path | None:
    """The checkpoint folder ``resume`` names: "" none, "latest" the newest under ``out``, or a path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(out)
        return found[-1] if found else None  # nothing to resume: start fresh, as diffusers does
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE} inside)")
    return path


def load_checkpoint(path: Path, *, engine, with_ema: bool = False) -> dict[str, Any]:
    """Restore the engine (weights, optimizer) from ``path``; returns its trainer state, with the
    EMA weights by name under "ema" when ``with_ema``."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        engine.load(path / "engine")
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"checkpoint {path} cannot be loaded into this run: {err}") from None
    if with_ema:
        if not (path / "ema.safetensors").is_file():
            raise UserError(f"checkpoint {path} has no EMA weights but this run uses --ema")
        state["ema"] = load_file(path / "ema.safetensors")
    return state
