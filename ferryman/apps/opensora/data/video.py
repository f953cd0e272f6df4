"""Reading frames from video files (PyAV, or decord) and writing H.264 mp4 (PyAV).

The PyAV reader decodes only a window: it seeks to the key frame before the first wanted frame
and stops after the last one, which costs a fraction of decoding the whole clip. Containers are
always closed and frames copied out at once, the cure for the host-memory growth seen when
readers keep PyAV objects alive. decord 0.6.0 fails (or crashes) on some widths (48 and 72 px
seen); the decord reader checks the frame size it got and falls back to PyAV when it differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from ferryman.core.errors import UserError
from ferryman.core.io import atomic_path


class UnreadableClip(UserError):
    """A clip that cannot be opened or decoded; loaders skip and count these."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    height: int
    width: int
    fps: float


def probe(path: Path) -> VideoInfo:
    """Frame count, size and frame rate from the container (decoding only when the count is missing)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            count = stream.frames
            if not count:  # mkv/webm keep no frame count
                count = sum(1 for _ in container.decode(stream))
            return VideoInfo(num_frames=int(count), height=stream.height, width=stream.width, fps=fps)
    except (av.error.FFmpegError, IndexError, OSError) as err:
        raise UnreadableClip(f"{path}: cannot read video ({_why(err)})") from None


def _why(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def read_frames_pyav(path: Path, indices: list[int]) -> np.ndarray:
    """Frames at ``indices`` (sorted, 0-based) as uint8 [T, H, W, 3], decoding only the window."""
    import av

    wanted = set(indices)
    found: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate or Fraction(25)
            base, start = stream.time_base, stream.start_time or 0
            first = min(indices)
            if first > 0 and base is not None:
                container.seek(start + int(first / rate / base), stream=stream, backward=True, any_frame=False)
            for position, frame in enumerate(container.decode(stream)):
                index = position if frame.pts is None else round(float((frame.pts - start) * base * rate))
                if index in wanted:
                    found[index] = frame.to_ndarray(format="rgb24")
                if index >= max(indices):
                    break
    except (av.error.FFmpegError, IndexError, OSError) as err:
        raise UnreadableClip(f"{path}: cannot decode ({_why(err)})") from None
    return _complete(path, indices, found)


def _complete(path: Path, indices: list[int], found: dict[int, np.ndarray]) -> np.ndarray:
    """Stack the frames; a frame or two missing at the end (frame counts are often off by one) repeats the last."""
    if len(found) < max(1, len(indices) // 2):
        raise UnreadableClip(f"{path}: only {len(found)} of {len(indices)} requested frames could be decoded")
    frames, last = [], None
    for i in indices:
        last = found.get(i, last)
        if last is None:
            last = found[min(found)]
        frames.append(last)
    return np.stack(frames)


def read_frames_decord(path: Path, indices: list[int]) -> np.ndarray:
    """Same frames as ``read_frames_pyav``, read with decord (falls back to PyAV on decord's width bug)."""
    import decord

    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        frames = reader.get_batch(indices).asnumpy()
        del reader
    except decord.DECORDError:
        return read_frames_pyav(path, indices)
    except (RuntimeError, IndexError, OSError) as err:
        raise UnreadableClip(f"{path}: cannot decode with decord ({_why(err)})") from None
    return frames


def read_frames(path: Path, indices: list[int], backend: str = "pyav") -> np.ndarray:
    if backend == "decord":
        return read_frames_decord(path, indices)
    return read_frames_pyav(path, indices)


def write_mp4(path: str | Path, video: np.ndarray, fps: float, *, crf: int = 18) -> Path:
    """Write uint8 [T, H, W, 3] frames as H.264 (yuv420p), atomically. H and W must be even."""
    import av

    _, h, w, _ = video.shape
    if h % 2 or w % 2:
        raise UserError(f"{path}: H.264 in yuv420p needs an even width and height, got {w}x{h}")
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)
