"""Text in, packed token blocks out: reading .txt/.jsonl/.parquet, tokenizing, packing, the held-out
split and the loader that gives each data-parallel rank its share of every batch.

Reading comes first and is cheap (no tokenizer, no model), so a bad file ends the run in a second
with one line naming the file, the line or row, and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ferryman.apps.lm.config import DataConfig
from ferryman.core.errors import UserError
from ferryman.core.files import reading

SUFFIXES = (".txt", ".jsonl", ".parquet")
IGNORE = -100  # label of a token the loss skips (a prompt), as transformers' losses take it


@dataclass(frozen=True)
class Example:
    """One document: plain text (``prompt`` empty), or a prompt and the completion to learn."""

    prompt: str
    completion: str


def find_files(path: str | Path, flag: str = "--data") -> list[Path]:
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise UserError(f"{path}: {flag} takes {', '.join(SUFFIXES)} files (or a folder of them), not {path.suffix or 'this file'}")
        return [path]
    if not path.is_dir():
        raise UserError(f"{path}: no such file or folder ({flag})")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
    if not files:
        raise UserError(f"{path}: no {', '.join(SUFFIXES)} files in this folder ({flag})")
    return files


def read_examples(path: str | Path, cfg: DataConfig, flag: str = "--data") -> list[Example]:
    """Every document of the file or folder, in file order (files sorted by path)."""
    examples: list[Example] = []
    for file in find_files(path, flag):
        suffix = file.suffix.lower()
        with reading(file, "data file"):
            if suffix == ".txt":
                found = _read_txt(file)
            elif suffix == ".jsonl":
                found = _read_jsonl(file, cfg)
            else:
                found = _read_parquet(file, cfg)
        if not found:
            raise UserError(f"{file}: empty file (no text to train on)")
        examples += found
    return examples


def _read_txt(file: Path) -> list[Example]:
    text = file.read_text(encoding="utf-8")
    return [Example("", text)] if text.strip() else []


def _read_jsonl(file: Path, cfg: DataConfig) -> list[Example]:
    found = []
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{file} line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{file} line {number}: expected a JSON object, got {type(record).__name__}")
            found.append(_example(record, cfg, f"{file} line {number}"))
    return found


def _read_parquet(file: Path, cfg: DataConfig) -> list[Example]:
    import pyarrow.parquet as pq

    table = pq.read_table(file)
    columns = set(table.column_names)
    wanted = [cfg.text_field] if cfg.text_field in columns else [cfg.prompt_field, cfg.completion_field]
    if not set(wanted) <= columns:
        raise UserError(_no_field(f"{file}", cfg, sorted(columns)))
    rows = table.select(wanted).to_pylist()
    return [_example(row, cfg, f"{file} row {number}") for number, row in enumerate(rows, 1)]


def _example(record: dict, cfg: DataConfig, where: str) -> Example:
    if cfg.text_field in record:
        return Example("", _string(record, cfg.text_field, where))
    if cfg.prompt_field in record and cfg.completion_field in record:
        return Example(_string(record, cfg.prompt_field, where), _string(record, cfg.completion_field, where))
    raise UserError(_no_field(where, cfg, sorted(record)))


def _no_field(where: str, cfg: DataConfig, found: list[str]) -> str:
    return (f"{where}: no '{cfg.text_field}' field (nor '{cfg.prompt_field}' and '{cfg.completion_field}'); "
            f"it has {', '.join(map(repr, found[:8])) or 'no fields'}; name the text field with --text-field")


def _string(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise UserError(f"{where}: '{key}' is {type(value).__name__}, not a string")
    return value


# -- tokens -----------------------------------------------------------------------------------------
@dataclass
class Blocks:
    """Packed training blocks: ``input_ids`` and ``labels`` [N, seq_len] (labels ``IGNORE`` on prompts)."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def take(self, index: torch.Tensor) -> Blocks:
        return Blocks(self.input_ids[index], self.labels[index])

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def tokenize(examples: list[Example], tokenizer, *, train_on_prompt: bool,
             batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """One token stream of every example, each closed by end-of-sequence, and which tokens the loss
    covers (int64 ids, bool mask: compact arrays, not Python lists, so large corpora fit)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    for start in range(0, len(examples), batch):
        group = examples[start : start + batch]
        texts = _encode(tokenizer, [e.completion for e in group if not e.prompt], special=True)
        prompts = _encode(tokenizer, [e.prompt for e in group if e.prompt], special=True)
        completions = _encode(tokenizer, [e.completion for e in group if e.prompt], special=False)
        for example in group:
            if example.prompt:
                prompt = next(prompts)
                ids = [*prompt, *next(completions), *eos]
                keep = np.ones(len(ids), dtype=bool)
                keep[: len(prompt)] = train_on_prompt
            else:
                ids = [*next(texts), *eos]
                keep = np.ones(len(ids), dtype=bool)
            pieces.append(np.asarray(ids, dtype=np.int64))
            masks.append(keep)
    if not pieces:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    return np.concatenate(pieces), np.concatenate(masks)


def _encode(tokenizer, texts: list[str], *, special: bool) -> Iterator[list[int]]:
    return iter(tokenizer(texts, add_special_tokens=special, verbose=False)["input_ids"] if texts else [])


def pack(ids: np.ndarray, keep: np.ndarray, seq_len: int) -> Blocks:
    """Cut the stream into blocks of ``seq_len`` tokens; the remainder is dropped."""
    count = len(ids) // seq_len
    tokens = torch.from_numpy(np.asarray(ids[: count * seq_len], dtype=np.int64)).view(count, seq_len)  # [N, L]
    mask = torch.from_numpy(np.asarray(keep[: count * seq_len], dtype=bool)).view(count, seq_len)  # [N, L]
    return Blocks(tokens, tokens.masked_fill(~mask, IGNORE))


def build_blocks(cfg: DataConfig, train: list[Example], held_out: list[Example] | None, tokenizer, *,
                 seed: int) -> tuple[Blocks, Blocks | None]:
    """Training blocks and held-out blocks (from ``held_out``, else ``eval_fraction`` of the blocks)."""
    blocks = pack(*tokenize(train, tokenizer, train_on_prompt=cfg.train_on_prompt), cfg.seq_len)
    if len(blocks) == 0:
        raise UserError(f"{cfg.path}: the text makes fewer than --seq-len {cfg.seq_len} tokens; lower --seq-len or add text")
    if held_out is not None:
        evaluation = pack(*tokenize(held_out, tokenizer, train_on_prompt=cfg.train_on_prompt), cfg.seq_len)
        if len(evaluation) == 0:
            raise UserError(f"{cfg.eval_path}: the held-out text makes fewer than --seq-len {cfg.seq_len} tokens")
        return blocks, evaluation
    num_eval = round(cfg.eval_fraction * len(blocks))
    if cfg.eval_fraction > 0 and num_eval == 0:
        num_eval = 1 if len(blocks) > 1 else 0
    if num_eval == 0:
        return blocks, None
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    return blocks.take(order[num_eval:].sort().values), blocks.take(order[:num_eval].sort().values)


class BlockLoader:
    """Batches of training blocks; every pass draws a new order from the global torch RNG (the core
    loop seeds it per epoch, so a resumed run replays the order) and hands this rank its rows of
    each global batch of ``batch_size x world`` blocks. An incomplete last batch is dropped."""

    def __init__(self, blocks: Blocks, *, batch_size: int, rank: int = 0, world: int = 1) -> None:
        self.blocks, self.batch_size, self.rank, self.world = blocks, batch_size, rank, world
        if len(blocks) < batch_size * world:
            raise UserError(f"the data makes {len(blocks)} training blocks, fewer than one batch "
                            f"(--batch-size {batch_size} x {world} processes); lower --batch-size or --seq-len, or add text")

    def __len__(self) -> int:
        return len(self.blocks) // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.randperm(len(self.blocks))
        span = self.batch_size * self.world
        for start in range(0, len(self) * span, span):
            rows = order[start + self.rank * self.batch_size : start + (self.rank + 1) * self.batch_size]
            yield {"input_ids": self.blocks.input_ids[rows], "labels": self.blocks.labels[rows]}


def eval_batches(blocks: Blocks, *, batch_size: int, rank: int, world: int) -> Iterator[tuple[dict, torch.Tensor]]:
    """This rank's share of the held-out blocks, with a weight per row: every rank runs the same
    number of batches (a forward under data-parallel Gemini is a collective), so the short ones
    repeat their last block at weight 0."""
    mine = torch.arange(rank, len(blocks), world)
    per_rank = -(-len(blocks) // world)
    weights = torch.ones(per_rank)
    if len(mine) < per_rank:
        weights[len(mine):] = 0.0
        mine = torch.cat([mine, mine.new_full((per_rank - len(mine),), len(blocks) - 1)])
    for start in range(0, per_rank, batch_size):
        rows = mine[start : start + batch_size]
        yield {"input_ids": blocks.input_ids[rows], "labels": blocks.labels[rows]}, weights[start : start + batch_size]
