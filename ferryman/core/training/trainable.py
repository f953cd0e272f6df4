"""Engine state without the frozen weights: for adapters (LoRA) trained on a large frozen base.

A full engine checkpoint holds every parameter, so a LoRA run on Stable Diffusion would copy the
whole frozen base into every checkpoint. ``save_trainable`` writes only what training changes:

    trainable.safetensors   param.<name>, exp_avg.<name>, exp_avg_sq.<name> (fp32, consolidated)
    trainable.json          format, engine kind, AdamW step count per parameter, loss-scaler state
                            (scale and calm steps: the same for both engines), and a fingerprint
                            of the frozen weights (shape and float64 sum of each)

``load_trainable`` puts them back into an engine whose frozen weights were rebuilt the same way as
when the checkpoint was written (e.g. from the same base model folder); the fingerprint refuses a
resume on another base, and every tensor's shape is checked (a different LoRA rank is refused).
The engines hand their state over in the engine-neutral ``TrainableState``
(``Engine.export_trainable``/``import_trainable``); the numbers come back bit for bit, so a
resumed run repeats an uninterrupted one, and a checkpoint written by one engine resumes on the
other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ferryman.core.errors import UserError
from ferryman.core.io import atomic_path, write_text
from ferryman.core.optim import TrainableState
from ferryman.core.training.engine import Engine

FORMAT = "ferryman-trainable-1"
MOMENTS = ("exp_avg", "exp_avg_sq")


def trainable_names(engine: Engine) -> list[str]:
    return [n for n, p in engine.module.named_parameters() if p.requires_grad]


def frozen_fingerprint(named: dict[str, torch.Tensor], trainable: set[str]) -> dict[str, list]:
    """[shape, float64 sum] of each frozen weight: cheap, and enough to tell another base apart."""
    return {n: [list(v.shape), float(v.detach().double().sum())] for n, v in sorted(named.items()) if n not in trainable}


def save_trainable(engine: Engine, folder: str | Path) -> None:
    """Write the trainable weights and their optimizer state to ``folder`` (every rank calls it; rank 0 writes)."""
    folder = Path(folder)
    state = engine.export_trainable()
    frozen = frozen_fingerprint(engine.param_values(), set(state.values))
    if engine.rank != 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{n}": v.contiguous() for n, v in state.values.items()}
    tensors |= {f"{k}.{n}": m[k].contiguous() for n, m in state.moments.items() for k in MOMENTS}
    with atomic_path(folder / "trainable.safetensors") as tmp:
        save_file(tensors, str(tmp))
    meta = {"format": FORMAT, "engine": engine.kind, "steps": {n: m["step"] for n, m in state.moments.items()},
            "scaler": {"scale": state.scale, "calm_steps": state.calm_steps}, "frozen": frozen}
    write_text(folder / "trainable.json", json.dumps(meta, indent=1))


def load_trainable(engine: Engine, folder: str | Path) -> None:
    """Load what ``save_trainable`` wrote; the engine's frozen weights stay as they are."""
    folder = Path(folder)
    if not (folder / "trainable.json").is_file():
        raise UserError(f"{folder}: no trainable.json; not a trainable-only checkpoint")
    meta = json.loads((folder / "trainable.json").read_text())
    tensors = load_file(str(folder / "trainable.safetensors"))
    values = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    wanted = trainable_names(engine)
    if sorted(values) != sorted(wanted):
        extra, missing = sorted(set(values) - set(wanted)), sorted(set(wanted) - set(values))
        raise UserError(f"{folder}: the trainable parameters differ from this run's "
                        f"(only in the checkpoint: {extra[:3]}, only in this run: {missing[:3]})")
    moments = {n: {k: tensors[f"{k}.{n}"] for k in MOMENTS} | {"step": step} for n, step in meta["steps"].items()}
    _check_shapes(engine, folder, values, moments)
    if "frozen" in meta:  # absent in checkpoints written before the fingerprint existed
        _check_frozen(folder, meta["frozen"], frozen_fingerprint(engine.param_values(), set(wanted)))
    scaler = meta["scaler"]
    engine.import_trainable(TrainableState(values=values, moments=moments, scale=float(scaler["scale"]),
                                           calm_steps=int(scaler["calm_steps"])))


def _check_shapes(engine: Engine, folder: Path, values: dict, moments: dict) -> None:
    shapes = {n: tuple(p.shape) for n, p in engine.module.named_parameters() if p.requires_grad}
    for name, value in values.items():
        saved = [tuple(value.shape)] + [tuple(moments[name][k].shape) for k in MOMENTS if name in moments]
        if any(shape != shapes[name] for shape in saved):
            raise UserError(f"{folder}: {name} has shape {list(saved[0])} in the checkpoint but "
                            f"{list(shapes[name])} in this run (was it written with another adapter rank or model?)")


def _check_frozen(folder: Path, saved: dict[str, list], now: dict[str, list]) -> None:
    for name in sorted(set(saved) | set(now)):
        if name not in saved or name not in now or saved[name][0] != now[name][0]:
            raise UserError(f"{folder}: this run's frozen base differs from the checkpoint's (at {name}); "
                            "resume with the base model the run started from")
        (_, a), (_, b) = saved[name], now[name]
        if abs(a - b) > 1e-3 * max(1.0, abs(a), abs(b)):
            raise UserError(f"{folder}: this run's frozen base weights differ from the checkpoint's (at {name}); "
                            "resume with the base model the run started from")
