"""The causal LM loss and the held-out evaluation (loss and perplexity) run between updates."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ferryman.apps.lm.data import IGNORE, Blocks, eval_batches
from ferryman.core.training.metrics import MetricsLog, plot_metric


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: summed next-token negative log-likelihood and the number of predicted tokens."""
    shifted = logits[:, :-1].float()  # [B, L-1, V]: position t predicts token t + 1
    targets = labels[:, 1:]  # [B, L-1]
    nll = F.cross_entropy(shifted.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")  # [B, L-1]
    return nll.sum(dim=1), (targets != IGNORE).sum(dim=1)


def causal_lm_loss(engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over the micro-batch's predicted tokens (0 when all are prompt tokens,
    where transformers' own loss would be 0/0)."""
    logits = engine(input_ids=batch["input_ids"]).logits  # [B, L, V]
    nll, count = token_nll(logits, batch["labels"])
    return nll.sum() / count.sum().clamp(min=1)


def evaluate(engine, blocks: Blocks, *, batch_size: int, rank: int, world: int, group=None) -> dict[str, float]:
    """Loss and perplexity over every held-out block, each rank taking its share (all ranks call it)."""
    totals = torch.zeros(2, dtype=torch.float64)
    engine.eval()
    with torch.no_grad():
        for batch, weights in eval_batches(blocks, batch_size=batch_size, rank=rank, world=world):
            logits = engine(input_ids=batch["input_ids"].to(engine.device)).logits
            nll, count = token_nll(logits, batch["labels"].to(engine.device))
            totals += torch.stack([(nll.double().cpu() * weights).sum(), (count.double().cpu() * weights).sum()])
    engine.train()
    if world > 1:
        on_device = totals.to(engine.device)
        dist.all_reduce(on_device, group=group)
        totals = on_device.cpu()
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "eval_tokens": int(totals[1].item())}


@dataclass(kw_only=True)
class Evaluator:
    """The core loop's ``on_step`` hook: the held-out loss every ``every`` updates and at the last,
    into eval.jsonl (rank 0) and the progress bar's log."""

    blocks: Blocks | None
    out: Path
    every: int
    batch_size: int
    rank: int = 0  # data-parallel rank and world
    world: int = 1
    group: object = None
    main: bool = True  # the process that writes
    progress: bool = True
    results: list[dict] = field(default_factory=list)
    _log: MetricsLog | None = None

    def on_step(self, info) -> None:
        due = info.is_last or (self.every and info.step % self.every == 0)
        if self.blocks is None or not due:
            return
        result = {"step": info.step} | evaluate(info.engine, self.blocks, batch_size=self.batch_size, rank=self.rank,
                                                world=self.world, group=self.group)
        self.results.append(result)
        if not self.main:
            return
        if self._log is None:  # on resume: forget the evaluations of the steps being redone
            self._log = MetricsLog(self.out / "eval.jsonl", start_step=info.step - 1)
        self._log.write(result)
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(f"step {info.step}: eval loss {result['eval_loss']:.4f}, perplexity {result['perplexity']:.2f}")
        if info.is_last:
            plot_metric(self._log.read(), self.out / "eval_loss.png", key="eval_loss", ylabel="loss",
                        title="held-out loss")
