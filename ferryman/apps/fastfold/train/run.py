"""``fastfold train``: a folder of structures -> the core training loop with the AF2 loss.

Writes under ``out_dir``: the run config (``fastfold_train.yaml``, loadable with ``--config``),
``data.json`` (structures used, files skipped and why),
``metrics.jsonl``, ``loss.png`` and ``checkpoints/``, and ``lddt.png`` (lDDT-Cα per step).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from ferryman.apps.fastfold.train.config import FastfoldTrainConfig
from ferryman.apps.fastfold.train.dataset import StructureDataset
from ferryman.apps.fastfold.train.step import make_loss_fn
from ferryman.core.config import save_config
from ferryman.core.errors import ConfigError, UserError
from ferryman.core.files import check_writable
from ferryman.core.io import write_text
from ferryman.core.parallel import ParallelDims, init_parallel
from ferryman.core.training import TrainResult, train
from ferryman.core.training.metrics import plot_metric

log = logging.getLogger(__name__)


def build_training_model(cfg: FastfoldTrainConfig, dims: ParallelDims | None = None):
    """The preset's model with AF2 initialisation, on ``cfg.kernels`` (None: the preset's), DAP
    applied over ``dims`` (which also has the sharded parameters' gradients summed over it)."""
    from ferryman.apps.fastfold import presets
    from ferryman.apps.fastfold.model import build_model
    from ferryman.apps.fastfold.model.evoformer import EvoformerStack
    from ferryman.apps.fastfold.parallelize import parallelize

    run = presets.run_options(cfg.preset.model)
    if cfg.kernels is not None:
        run = dataclasses.replace(run, kernels=cfg.kernels)
    model = build_model(cfg.preset.model, run=run)
    if cfg.activation_checkpointing:  # recompute each Evoformer block in the backward pass
        for module in model.modules():
            if isinstance(module, EvoformerStack):
                module.activation_checkpointing = True
    if dims is not None and dims.dap > 1:
        parallelize(model, dims)
    return model


def plot_lddt(metrics_path: Path, png: Path) -> Path | None:
    """lDDT-Cα against step from the loop's metrics JSON lines."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line] if metrics_path.is_file() else []
    return plot_metric(records, png, key="lddt_ca", ylabel="lDDT-Cα", title="training lDDT-Cα", ylim=(0, 1))


def _check_resume(resume: str | None) -> None:
    """A --resume folder that is not a checkpoint fails before the run folder is touched."""
    if resume in (None, "latest"):
        return
    if not (Path(resume) / "trainer.json").is_file():
        raise UserError(f"--resume {resume}: not a checkpoint folder (no trainer.json); give 'latest' or a "
                        "checkpoints/step-N folder of a run")  # fmt: skip


def run(cfg: FastfoldTrainConfig, dims: ParallelDims | None = None) -> tuple[TrainResult, StructureDataset]:
    """Train as ``cfg`` says; returns the loop's result and the dataset (with its skip count).

    ``dims``: the processes torchrun started (None: joined here, ``init_parallel(dap=cfg.dap)``;
    one process without torchrun). They form data-parallel groups of ``cfg.dap`` DAP ranks: the
    ranks of a DAP group read the same examples and split each one's Evoformer work, the
    data-parallel groups split each epoch's examples and average their gradients. Rank 0 writes
    the files.
    """
    if not cfg.data:
        raise ConfigError("data: give a folder of PDB/mmCIF structures (--data DIR)")
    dims = dims if dims is not None else init_parallel(dap=cfg.dap)
    if cfg.dap != dims.dap:
        raise UserError(f"dap={cfg.dap} but the processes were grouped for dap={dims.dap}")
    main = dims.is_main
    out = Path(cfg.train.out_dir)
    check_writable(out, "--out run folder")
    _check_resume(cfg.train.resume)
    dataset = StructureDataset.from_folder(cfg.data, cfg.preset, msa_dir=cfg.msa_dir, dp_rank=dims.dp_rank, dp=dims.dp)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "fastfold_train.yaml")
        summary = {"structures": [c.name for c in dataset.chains], "num_skipped": dataset.skipped,
                   "skipped": dataset.skipped_reasons}  # fmt: skip
        write_text(out / "data.json", json.dumps(summary, indent=2) + "\n")
    if dataset.skipped and main:
        log.warning("%d structure file(s) in %s could not be read and were skipped (see data.json)", dataset.skipped, cfg.data)
    result = train(cfg.train, lambda: build_training_model(cfg, dims), lambda: dataset,
                   make_loss_fn(cfg.preset.weights), dims=dims)  # fmt: skip
    if cfg.train.plot and main:
        plot_lddt(out / "metrics.jsonl", out / "lddt.png")
    return result, dataset
