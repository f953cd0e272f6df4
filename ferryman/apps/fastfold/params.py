"""Which weights `fastfold predict` runs: AlphaFold2's model presets over a params folder, one
official ``.npz``, or a ``fastfold train`` run (its folder, a checkpoint folder in it, or a
Ferryman ``.safetensors`` file).

The official release (alphafold_params_2022-12-06) is one folder holding every kind:
``params_model_{1..5}.npz``, ``params_model_{1..5}_ptm.npz`` and
``params_model_{1..5}_multimer_v3.npz``. AF2's ``--model_preset`` picks among them; so does ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ferryman.core.errors import UserError

# AF2 run_alphafold.py --model_preset: monomer_casp14 runs the monomer files with 8 ensembles;
# multimer runs the v3 multimer files (AF2 v2.3) on complexes.
MODEL_PRESETS = {
    "monomer": [f"model_{i}" for i in range(1, 6)],
    "monomer_casp14": [f"model_{i}" for i in range(1, 6)],
    "monomer_ptm": [f"model_{i}_ptm" for i in range(1, 6)],
    "multimer": [f"model_{i}_multimer_v3" for i in range(1, 6)],
}
OLD_MULTIMER = ("multimer parameters before v3 (params_model_*_multimer.npz, *_multimer_v2.npz) are not supported: "
                "use the v3 files of alphafold_params_2022-12-06")  # fmt: skip
_OFFICIAL = re.compile(r"^params_(model_[1-5](?:_ptm|_multimer(?:_v\d)?)?)\.npz$")
NO_WEIGHTS = (
    "no weights given: pass --params with AlphaFold2 parameters (a params_model_*.npz file or the "
    "folder holding them, from https://storage.googleapis.com/alphafold/alphafold_params_2022-12-06.tar), "
    "or a fastfold train run folder, or --random-weights to try the pipeline with a small random model"
)
RUN_CONFIG = "fastfold_train.yaml"  # written by `fastfold train` next to its checkpoints/


@dataclass(kw_only=True)
class ModelSource:
    """One model to run: its output name, where its weights are, and how to read them."""

    name: str  # model_1, model_3_ptm, or a trained run's model preset
    path: Path | None  # None: random weights
    kind: str = "official"  # official (.npz) | checkpoint (a train checkpoint folder) | safetensors | random
    network: str | None = None  # network preset of a trained model (tiny, debug, model_1_ptm ...)
    run_config: Path | None = None  # the training run's fastfold_train.yaml, when known


def check_model_preset(preset: str) -> None:
    if preset not in MODEL_PRESETS:
        raise UserError(f"--model-preset {preset!r}: choose one of {', '.join(MODEL_PRESETS)}")


def official_files(folder: Path) -> dict[str, Path]:
    """model name -> file for every official-layout params file in ``folder``."""
    found = {}
    for path in sorted(folder.glob("params_*.npz")):
        match = _OFFICIAL.match(path.name)
        found[match.group(1) if match else path.name.removeprefix("params_").removesuffix(".npz")] = path
    return found


def _is_multimer(name: str) -> bool:
    return "_multimer" in name


def _check_kind(names: list[str], preset: str, flag: str) -> None:
    """Multimer weights run on complexes (--model-preset multimer) and only there."""
    for name in names:
        if _is_multimer(name) and not name.endswith("_multimer_v3"):
            raise UserError(f"{flag} {name}: {OLD_MULTIMER}")
        if _is_multimer(name) != (preset == "multimer"):
            hint = ("--model-preset multimer" if _is_multimer(name)
                    else "a monomer --model-preset (monomer, monomer_ptm, monomer_casp14)")  # fmt: skip
            raise UserError(f"{flag} {name} is a {'multimer' if _is_multimer(name) else 'monomer'} model; "
                            f"run it with {hint}")  # fmt: skip


def _from_folder(folder: Path, models: list[str] | None, preset: str) -> list[ModelSource]:
    found = official_files(folder)
    if not found:
        raise UserError(f"--params {folder}: no params_*.npz files in this folder (nor a fastfold train run)")
    if models:
        missing = [n for n in models if n not in found]
        if missing:
            raise UserError(f"--models {', '.join(missing)}: no params_<name>.npz in {folder} (have: {', '.join(found)})")
        _check_kind(models, preset, "--models")
        return [ModelSource(name=n, path=found[n]) for n in models]
    chosen = [n for n in MODEL_PRESETS[preset] if n in found]
    if not chosen:
        wanted = "params_model_{1..5}" + {"monomer_ptm": "_ptm", "multimer": "_multimer_v3"}.get(preset, "") + ".npz"
        others = [p for p in MODEL_PRESETS if p != preset and any(n in found for n in MODEL_PRESETS[p])]
        hint = f"; try --model-preset {others[0]}" if others else ""
        raise UserError(f"--params {folder}: no files of model preset {preset} ({wanted}) in this folder "
                        f"(have: {', '.join(found)}){hint}")  # fmt: skip
    return [ModelSource(name=n, path=found[n]) for n in chosen]


def _checkpoint_in_run(run: Path) -> Path:
    """The newest complete checkpoint of a training run folder (as the training loop resumes)."""
    from ferryman.core.training.checkpoint import CheckpointStore

    newest = CheckpointStore(run / "checkpoints").newest()
    if newest is None:
        raise UserError(f"--params {run}: a fastfold train run with no complete checkpoint under {run / 'checkpoints'}")
    return newest


def _run_config_for(checkpoint: Path) -> Path | None:
    for folder in (checkpoint.parent.parent, checkpoint.parent):  # <run>/checkpoints/step-N
        if (folder / RUN_CONFIG).is_file():
            return folder / RUN_CONFIG
    return None


def _trained(path: Path) -> ModelSource:
    """A training run folder, one of its checkpoint folders, or a Ferryman .safetensors file."""
    from ferryman.core.config import load_config

    if path.is_file():
        return ModelSource(name=path.stem, path=path, kind="safetensors")
    checkpoint = _checkpoint_in_run(path) if (path / RUN_CONFIG).is_file() else path
    config = _run_config_for(checkpoint)
    if config is None:
        raise UserError(f"--params {path}: a training checkpoint without its run's {RUN_CONFIG}, so the model "
                        "preset it was trained with is unknown; pass the run folder")  # fmt: skip
    from ferryman.apps.fastfold.train.config import FastfoldTrainConfig

    cfg = load_config(FastfoldTrainConfig, config)
    return ModelSource(name=cfg.preset.model, path=checkpoint, kind="checkpoint", network=cfg.preset.model,
                       run_config=config)  # fmt: skip


def resolve_sources(params: Path | None, models: list[str] | None, preset: str, random_weights: bool) -> list[ModelSource]:
    """What to run, checked before anything is loaded or written."""
    check_model_preset(preset)
    if random_weights:
        if params is not None:
            raise UserError("give either --params or --random-weights, not both")
        names = models or ["model_1_multimer_v3" if preset == "multimer" else "model_1_ptm"]
        _check_kind(names, preset, "--models")
        return [ModelSource(name=n, path=None, kind="random") for n in names]
    if params is None:
        raise UserError(NO_WEIGHTS)
    params = Path(params)
    if not params.exists():
        raise UserError(f"--params {params}: no such file or folder")
    if params.suffix == ".safetensors" or (params.is_dir() and ((params / RUN_CONFIG).is_file() or (params / "trainer.json").is_file())):
        if preset == "multimer":
            raise UserError(f"--params {params} is a trained monomer model; --model-preset multimer runs official "
                            "multimer v3 parameters")  # fmt: skip
        if models:
            raise UserError(f"--params {params} is a trained model; --models names official files only")
        return [_trained(params)]
    if params.is_file():
        match = _OFFICIAL.match(params.name)
        name = (models or [match.group(1) if match else params.stem.removeprefix("params_")])[0]
        if models and len(models) != 1:
            raise UserError(f"--params {params} is one model; name at most one with --models")
        _check_kind([name], preset, f"--params {params}:")
        return [ModelSource(name=name, path=params)]
    return _from_folder(params, models, preset)
