"""checkpoint-N/ folders: everything a resumed run needs, and weights diffusers can read directly.

Layout (N = optimizer steps taken), written by the core training loop through ``DiffusersCheckpoints``:

    checkpoint-N/trainer_state.json          step, data position, losses so far, base model, run kind
    checkpoint-N/engine/                     the core engine's state: weights and AdamW moments
                                             (safetensors; Gemini writes its shards here). LoRA runs
                                             keep only the adapters and their moments here
                                             (trainable.safetensors): the frozen base is --model
    checkpoint-N/unet/                       full finetune: UNet in diffusers layout (EMA weights
                                             under unet_ema/ when EMA is on), so
                                             UNet2DConditionModel.from_pretrained(ckpt, subfolder="unet")
                                             and `sd-generate --model checkpoint-N` work
    checkpoint-N/pytorch_lora_weights.safetensors   LoRA runs: load_lora_weights() reads it
    checkpoint-N/ema.safetensors             EMA of the trained weights by parameter name
    checkpoint-N/rng-rank00000.*             the process's RNG states

A checkpoint is written under .tmp-checkpoint-N and renamed when complete, so a crash never
leaves a folder that looks finished.
"""

from __future__ import annotations

import re
from pathlib import Path

from ferryman.core.errors import UserError
from ferryman.core.training import CheckpointStore

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


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


class DiffusersCheckpoints(CheckpointStore):
    """The core loop's checkpoint store for sd-finetune: diffusers' checkpoint-N/ names under the
    output folder, plus the diffusers-readable weights and the run's loss history.

    ``--resume latest`` with no checkpoint yet starts fresh, as diffusers' scripts do.
    """

    trainer_file = STATE_FILE
    pointer = None
    fresh_if_none = True

    def __init__(self, run) -> None:
        cfg = run.cfg
        super().__init__(run.out, keep_last=cfg.train.keep_last, trainable_only=cfg.use_lora)
        self.run = run

    def name(self, step: int) -> str:
        return f"checkpoint-{step}"

    def engine_folder(self, folder: Path) -> Path:
        return folder / "engine"

    def complete(self) -> list[Path]:
        return list_checkpoints(self.root)

    def resolve(self, resume: str) -> Path | None:
        return resolve_resume(self.root, resume)

    def export(self, folder: Path, engine, ema_named: dict | None, *, rank: int) -> None:
        # Every rank: under data-parallel Gemini, reading the weights is a collective; rank 0 writes.
        self.run.export_weights(folder, engine, ema_named)

    def extra_state(self) -> dict:
        return self.run.checkpoint_state()

    def load(self, folder: Path, engine, *, rank: int) -> tuple[dict, dict | None]:
        trainer, ema = super().load(folder, engine, rank=rank)
        if self.run.cfg.use_ema and ema is None:
            raise UserError(f"checkpoint {folder} has no EMA weights but this run uses --ema")
        trainer.setdefault("loader", {"batch": trainer["step"]})  # written before the core loop ran sd-finetune
        self.run.restore(trainer)
        return trainer, ema
