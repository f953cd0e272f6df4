"""Clip tables, video decoding, buckets and the bucketed loader."""

from .buckets import BucketKey, assign, bucket_size
from .dataset import ClipIndex, build_loader, describe, index_clips, resize_crop
from .table import ClipRecord, read_table
from .video import UnreadableClip, VideoInfo, probe, read_frames, write_mp4

__all__ = [
    "BucketKey",
    "ClipIndex",
    "ClipRecord",
    "UnreadableClip",
    "VideoInfo",
    "assign",
    "bucket_size",
    "build_loader",
    "describe",
    "index_clips",
    "probe",
    "read_frames",
    "read_table",
    "resize_crop",
    "write_mp4",
]
