"""Buckets by resolution, frame count and aspect ratio, each with its own batch size (Open-Sora 1.1+).

A clip goes to the bucket of the largest resolution whose frame area it covers, the configured
aspect ratio (height/width) nearest its own on a log scale, and the longest frame count it holds
at the frame stride. Every bucket that ends with no full batch gets a reason, so that a config
never yields an empty loader without saying why.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from ..config import Bucket, DataConfig
from .video import VideoInfo


@dataclass(frozen=True, order=True)
class BucketKey:
    resolution: int
    num_frames: int
    aspect: float
    height: int
    width: int


def bucket_size(resolution: int, aspect: float, multiple: int) -> tuple[int, int]:
    """(height, width): about resolution^2 pixels at height/width ~= aspect, sides rounded to ``multiple``."""
    width = math.sqrt(resolution * resolution / aspect)
    h = max(multiple, round(width * aspect / multiple) * multiple)
    w = max(multiple, round(width / multiple) * multiple)
    return h, w


def nearest_aspect(height: int, width: int, aspects: list[float]) -> float:
    ratio = math.log(height / width)
    return min(aspects, key=lambda a: abs(math.log(a) - ratio))


def frames_needed(num_frames: int, stride: int) -> int:
    return (num_frames - 1) * stride + 1


def all_keys(cfg: DataConfig) -> list[tuple[BucketKey, Bucket]]:
    keys = []
    for bucket in cfg.buckets:
        for aspect in cfg.aspect_ratios:
            h, w = bucket_size(bucket.resolution, aspect, cfg.size_multiple)
            keys.append((BucketKey(bucket.resolution, bucket.num_frames, aspect, h, w), bucket))
    return keys


def assign(info: VideoInfo, cfg: DataConfig) -> tuple[BucketKey | None, str]:
    """The clip's bucket, or None and the reason it fits none."""
    aspect = nearest_aspect(info.height, info.width, cfg.aspect_ratios)
    candidates = [key for key, _ in all_keys(cfg) if key.aspect == aspect]
    big = [k for k in candidates if info.height * info.width >= k.height * k.width]
    if not big:
        smallest = min(candidates, key=lambda k: k.height * k.width)
        return None, f"too small: {info.width}x{info.height} < {smallest.width}x{smallest.height}"
    long = [k for k in big if info.num_frames >= frames_needed(k.num_frames, cfg.frame_stride)]
    if not long:
        shortest = min(big, key=lambda k: k.num_frames)
        need = frames_needed(shortest.num_frames, cfg.frame_stride)
        return None, f"too short: {info.num_frames} frames < {need} (num_frames {shortest.num_frames}, stride {cfg.frame_stride})"
    return max(long, key=lambda k: (k.resolution, k.num_frames)), ""


@dataclass(kw_only=True)
class BucketRow:
    key: BucketKey
    batch_size: int
    num_clips: int
    num_batches: int
    why_empty: str


def bucket_table(infos: list[VideoInfo | None], assigned: list[BucketKey | None], cfg: DataConfig,
                 dp_size: int = 1) -> list[BucketRow]:
    """One row per bucket: clips, full batches (per data-parallel rank) and, when none, why."""
    counts = Counter(k for k in assigned if k is not None)
    rows = []
    for key, bucket in all_keys(cfg):
        n = counts[key]
        batches = n // bucket.batch_size // dp_size
        why = "" if batches else _why_empty(key, bucket, n, infos, assigned, cfg, dp_size)
        rows.append(BucketRow(key=key, batch_size=bucket.batch_size, num_clips=n, num_batches=batches, why_empty=why))
    return rows


def _why_empty(key: BucketKey, bucket: Bucket, n: int, infos, assigned, cfg: DataConfig, dp_size: int) -> str:
    if n:
        return f"{n} clip(s) < batch size {bucket.batch_size} x {dp_size} rank(s); incomplete batches are dropped"
    readable = [i for i in infos if i is not None]
    same_aspect = [(i, k) for i, k in zip(infos, assigned)
                   if i is not None and nearest_aspect(i.height, i.width, cfg.aspect_ratios) == key.aspect]
    if not same_aspect:
        have = sorted({round(i.height / i.width, 2) for i in readable})
        return f"no clip has an aspect ratio near {key.aspect:g} (clips have {', '.join(map(str, have)) or 'none'})"
    area = key.height * key.width
    small = sum(1 for i, _ in same_aspect if i.height * i.width < area)
    short = sum(1 for i, _ in same_aspect if i.num_frames < frames_needed(key.num_frames, cfg.frame_stride))
    elsewhere = sum(1 for i, k in same_aspect if k is not None and k != key)
    parts = []
    if small:
        parts.append(f"{small} smaller than {key.width}x{key.height}")
    if short:
        parts.append(f"{short} shorter than {frames_needed(key.num_frames, cfg.frame_stride)} frames")
    if elsewhere:
        parts.append(f"{elsewhere} went to a larger or longer bucket")
    return f"of {len(same_aspect)} clip(s) at this aspect ratio: " + "; ".join(parts)


def format_table(rows: list[BucketRow]) -> str:
    lines = [f"{'bucket':<22} {'HxW':>9} {'frames':>6} {'batch':>5} {'clips':>5} {'batches':>7}  note"]
    for r in rows:
        k = r.key
        name = f"{k.resolution}px/{k.num_frames}f/ar{k.aspect:g}"
        lines.append(f"{name:<22} {f'{k.height}x{k.width}':>9} {k.num_frames:>6} {r.batch_size:>5} "
                     f"{r.num_clips:>5} {r.num_batches:>7}  {r.why_empty}")
    return "\n".join(lines)
