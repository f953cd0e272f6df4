"""Clip dataset and bucketed batch sampler: table -> probed clips -> buckets -> batches of equal shape.

Unreadable clips (missing, corrupt, undecodable) are skipped and counted, at indexing time and
again at read time, never an exception in the middle of an epoch.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from ferryman.core.errors import UserError

from ..config import DataConfig
from .buckets import BucketKey, all_keys, assign, bucket_table, format_table, frames_needed
from .table import ClipRecord, read_table
from .video import UnreadableClip, VideoInfo, probe, read_frames


@dataclass(kw_only=True)
class ClipIndex:
    """The table with each clip's sizes and bucket; ``unreadable`` lists (path, reason) of skipped clips."""

    records: list[ClipRecord]
    infos: list[VideoInfo | None]
    keys: list[BucketKey | None]
    reasons: list[str]
    unreadable: list[tuple[Path, str]] = field(default_factory=list)


def index_clips(cfg: DataConfig) -> ClipIndex:
    if cfg.csv is None:
        raise UserError("no clip table given: pass a CSV (--csv or data.csv)")
    records = read_table(cfg.csv, cfg.root)
    index = ClipIndex(records=records, infos=[], keys=[], reasons=[])
    for rec in records:
        info, key, reason = None, None, ""
        try:
            if not rec.path.is_file():
                raise UnreadableClip(f"{rec.path}: file does not exist (row {rec.row})")
            info = (VideoInfo(rec.num_frames, rec.height, rec.width, rec.fps)  # type: ignore[arg-type]
                    if rec.has_sizes else probe(rec.path))
            key, reason = assign(info, cfg)
        except UnreadableClip as err:
            index.unreadable.append((rec.path, str(err)))
            reason = f"unreadable: {err}"
        index.infos.append(info)
        index.keys.append(key)
        index.reasons.append(reason)
    return index


def describe(index: ClipIndex, cfg: DataConfig, dp_size: int = 1) -> str:
    """The bucket table plus the clips that fit no bucket, as ``opensora data check`` prints it."""
    rows = bucket_table(index.infos, index.keys, cfg, dp_size)
    lines = [format_table(rows)]
    unplaced = [(r, why) for r, k, why in zip(index.records, index.keys, index.reasons) if k is None]
    if unplaced:
        lines.append(f"\n{len(unplaced)} clip(s) in no bucket:")
        lines += [f"  row {r.row} {r.path.name}: {why}" for r, why in unplaced]
    total = sum(r.num_batches for r in rows)
    lines.append(f"\n{len(index.records)} clips, {len(index.unreadable)} unreadable, "
                 f"{sum(k is not None for k in index.keys)} in buckets, {total} batches per epoch"
                 + (f" per rank ({dp_size} data-parallel ranks)" if dp_size > 1 else ""))
    return "\n".join(lines)


def resize_crop(frames: np.ndarray, height: int, width: int, rng: random.Random | None = None) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, height, width] in [-1, 1]: scale to cover, then crop (centre or random)."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    h, w = video.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        video = F.interpolate(video, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top = (rng.randint(0, new_h - height) if rng else (new_h - height) // 2)
    left = (rng.randint(0, new_w - width) if rng else (new_w - width) // 2)
    video = video[:, :, top : top + height, left : left + width]
    return (video / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()  # [3, T, H, W]


class ClipDataset(Dataset):
    """Items are (clip index, seed); the seed picks the frame window (and crop), so runs repeat exactly.

    A clip that fails to decode is replaced by the next readable clip of the same bucket (at most
    ``max_substitutes`` tries), so batches stay full; every failure is reported in the item.
    """

    max_substitutes = 3

    def __init__(self, index: ClipIndex, cfg: DataConfig):
        self.index, self.cfg = index, cfg
        self.peers: dict[BucketKey, list[int]] = defaultdict(list)
        self.position: dict[int, int] = {}  # clip index -> its place among its bucket's peers
        for i, key in enumerate(index.keys):
            if key is not None:
                self.position[i] = len(self.peers[key])
                self.peers[key].append(i)

    def __len__(self) -> int:
        return len(self.index.records)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        i, seed = item
        key = self.index.keys[i]
        assert key is not None
        peers = self.peers[key]
        start = self.position[i]
        skipped = []
        for attempt in range(min(len(peers), 1 + self.max_substitutes)):
            j = peers[(start + attempt) % len(peers)]
            try:
                return {**self._load(j, seed), "skipped": skipped}
            except UnreadableClip as err:
                skipped.append(str(err))
        return {"skipped": skipped}

    def _load(self, i: int, seed: int) -> dict:
        rec, info, key = self.index.records[i], self.index.infos[i], self.index.keys[i]
        assert info is not None and key is not None
        rng = random.Random(seed * 1_000_003 + i)
        window = frames_needed(key.num_frames, self.cfg.frame_stride)
        start = rng.randint(0, max(0, info.num_frames - window))
        indices = [start + j * self.cfg.frame_stride for j in range(key.num_frames)]
        frames = read_frames(rec.path, indices, self.cfg.backend)
        video = resize_crop(frames, key.height, key.width, rng if self.cfg.random_crop else None)
        return {"video": video, "text": rec.text, "fps": info.fps / self.cfg.frame_stride,
                "height": key.height, "width": key.width, "seed": rng.randrange(2**62)}


def collate(items: list[dict]) -> dict:
    """Stack the readable clips of a batch; ``num_skipped`` counts failed reads (``video`` is None if none is left).

    ``seed`` (from the batch's own items) seeds the diffusion noise: identical on the
    sequence-parallel ranks that share a batch, different across batches.
    """
    good = [it for it in items if "video" in it]
    skipped = [msg for it in items for msg in it["skipped"]]
    batch: dict = {"num_skipped": len(skipped), "skipped": skipped}
    if not good:
        return {**batch, "video": None}
    return {
        **batch,
        "video": torch.stack([it["video"] for it in good]),  # [B, 3, T, H, W]
        "text": [it["text"] for it in good],
        "fps": torch.tensor([it["fps"] for it in good], dtype=torch.float32),
        "height": torch.tensor([it["height"] for it in good], dtype=torch.float32),
        "width": torch.tensor([it["width"] for it in good], dtype=torch.float32),
        "seed": good[0]["seed"],
    }


class BucketBatchSampler(Sampler):
    """Batches from one bucket at a time, each bucket with its own batch size; sharded over data-parallel ranks.

    Like torch's RandomSampler, each pass draws its shuffling seed from the global torch RNG, so a
    training loop that seeds it per epoch gets a new, repeatable order every epoch, and every
    rank the same permutation (of which each data-parallel rank takes its own slice).
    """

    def __init__(self, keys: list[BucketKey | None], batch_sizes: dict[BucketKey, int], *,
                 dp_rank: int = 0, dp_size: int = 1):
        self.keys, self.batch_sizes = keys, batch_sizes
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def _batches(self, rng: random.Random) -> list[list[int]]:
        groups: dict[BucketKey, list[int]] = defaultdict(list)
        for i, key in enumerate(self.keys):
            if key is not None:
                groups[key].append(i)
        batches = []
        for key in sorted(groups):
            members = groups[key]
            rng.shuffle(members)
            size = self.batch_sizes[key]
            batches += [members[j : j + size] for j in range(0, len(members) - size + 1, size)]
        rng.shuffle(batches)
        return batches

    def __len__(self) -> int:
        counts: dict[BucketKey, int] = defaultdict(int)
        for key in self.keys:
            if key is not None:
                counts[key] += 1
        return sum(n // self.batch_sizes[k] for k, n in counts.items()) // self.dp_size

    def __iter__(self):
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        batches = self._batches(random.Random(seed))
        per_rank = len(batches) // self.dp_size
        for position in range(per_rank):
            batch = batches[position * self.dp_size + self.dp_rank]
            yield [(i, seed + position * self.dp_size + self.dp_rank) for i in batch]


def build_loader(cfg: DataConfig, *, dp_rank: int = 0, dp_size: int = 1,
                 index: ClipIndex | None = None) -> tuple[DataLoader, ClipIndex]:
    """The bucketed loader; an epoch with no batch is a UserError that shows the bucket table."""
    index = index or index_clips(cfg)
    sizes = {key: bucket.batch_size for key, bucket in all_keys(cfg)}
    sampler = BucketBatchSampler(index.keys, sizes, dp_rank=dp_rank, dp_size=dp_size)
    if len(sampler) == 0:
        raise UserError(f"{cfg.csv}: the bucket config gives no full batch, so an epoch would be empty\n"
                        + describe(index, cfg, dp_size))
    loader = DataLoader(ClipDataset(index, cfg), batch_sampler=sampler, collate_fn=collate,
                        num_workers=cfg.num_workers, persistent_workers=False)
    return loader, index
