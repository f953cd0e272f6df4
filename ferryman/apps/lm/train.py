"""`ferryman finetune`: check every input, pack the text, run the core loop, write a folder
transformers (or peft) loads.

The core training loop (``ferryman.core.training.train``) owns the steps: the plain or Gemini
engine (--memory), precision, gradient accumulation, clipping, the LR schedule, checkpoints under
``out/checkpoints`` (LoRA runs keep only the adapters there), exact resume, metrics.jsonl,
loss.png and the progress bar. This file hands it the lazily built model (the engine reads the
weights from the model folder, Gemini chunk by chunk), the packed blocks, the loss and the
held-out evaluation, then writes the result (export.py).

Under torchrun every process reads its rows of each global batch (``BlockLoader``); Gemini shards
chunks, gradients and optimizer state over the processes (ZeRO), the plain engine replicates
the model (DDP). Every process takes part in the collectives; rank 0 writes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ferryman.apps.lm.config import FinetuneConfig
from ferryman.apps.lm.data import BlockLoader, Blocks, build_blocks, read_examples
from ferryman.apps.lm.evaluate import Evaluator, causal_lm_loss
from ferryman.apps.lm.model import ModelFolder, build_model, open_model_folder
from ferryman.core.errors import UserError
from ferryman.core.files import check_writable


@dataclass(kw_only=True)
class FinetuneResult:
    out: Path
    losses: list[float] = field(default_factory=list)  # training loss of each update this call made
    evals: list[dict] = field(default_factory=list)  # held-out loss and perplexity when evaluated
    summary: str = ""  # what the data made
    engine: object = None  # the engine after the last update
    is_main: bool = True  # the process that wrote the outputs (rank 0 under torchrun)


@dataclass
class Prepared:
    cfg: FinetuneConfig  # with absolute paths (a run folder works from anywhere)
    folder: ModelFolder
    train: Blocks
    held_out: Blocks | None

    def summary(self) -> str:
        held = f", {len(self.held_out)} held out" if self.held_out is not None else ", none held out"
        return f"{len(self.train)} blocks of {self.cfg.data.seq_len} tokens{held}"


def prepare(cfg: FinetuneConfig) -> Prepared:
    """Every input checked, cheapest first, before anything is written or the model is built."""
    if not cfg.model or not cfg.out or not cfg.data.path:
        raise UserError("--model, --data and --out are required")
    check_writable(cfg.out, "output folder (--out)")
    train_text = read_examples(cfg.data.path, cfg.data)
    held_out = read_examples(cfg.data.eval_path, cfg.data, "--eval-data") if cfg.data.eval_path else None
    folder = open_model_folder(cfg.model)
    train, evaluation = build_blocks(cfg.data, train_text, held_out, folder.tokenizer, seed=cfg.train.seed)
    build_model(cfg, folder)  # on the meta device: weight names and shapes, LoRA targets (nothing is read)
    if cfg.train.resume:
        checkpoints(cfg).resolve(cfg.train.resume)
    absolute = lambda p: str(Path(p).resolve()) if p else p  # noqa: E731
    data = dataclasses.replace(cfg.data, path=absolute(cfg.data.path), eval_path=absolute(cfg.data.eval_path))
    resume = cfg.train.resume if cfg.train.resume in (None, "", "latest") else absolute(cfg.train.resume)
    loop = dataclasses.replace(cfg.train, out_dir=absolute(cfg.out), resume=resume)
    cfg = dataclasses.replace(cfg, model=absolute(cfg.model), data=data, train=loop)
    return Prepared(cfg, folder, train, evaluation)


def checkpoints(cfg: FinetuneConfig):
    """The run's checkpoint store: out/checkpoints/step-N/ (LoRA runs keep only the adapters' state)."""
    from ferryman.core.training import CheckpointStore

    return CheckpointStore(Path(cfg.out) / "checkpoints", keep_last=cfg.train.keep_last, trainable_only=cfg.use_lora)


def finetune(cfg: FinetuneConfig, *, progress: bool = True) -> FinetuneResult:
    """Run `ferryman finetune` as configured; see the command's --help for the outputs."""
    from ferryman.apps.lm.export import save_output
    from ferryman.core.config import save_config
    from ferryman.core.parallel import init_parallel
    from ferryman.core.training import train

    run = prepare(cfg)
    cfg = run.cfg
    dims = init_parallel()
    loader = BlockLoader(run.train, batch_size=cfg.batch_size, rank=dims.dp_rank, world=dims.dp)
    out = Path(cfg.out)
    if dims.is_main:
        save_config(cfg, out / "config.yaml")
        if progress:
            from tqdm.auto import tqdm

            tqdm.write(f"data: {run.summary()}")
    evaluator = Evaluator(blocks=run.held_out, out=out, every=cfg.eval_every, batch_size=cfg.batch_size,
                          rank=dims.dp_rank, world=dims.dp, group=dims.dp_group, main=dims.is_main, progress=progress)
    result = train(dataclasses.replace(cfg.train, progress=progress), lambda: build_model(cfg, run.folder), lambda: loader,
                   causal_lm_loss, dims=dims if dims.world_size > 1 else None, on_step=evaluator.on_step,
                   checkpoints=checkpoints(cfg))
    save_output(cfg, run.folder, result.engine, rank=dims.rank)
    return FinetuneResult(out=out, losses=result.losses, evals=evaluator.results, summary=run.summary(),
                          engine=result.engine, is_main=dims.is_main)
