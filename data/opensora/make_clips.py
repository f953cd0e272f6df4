"""Regenerate the sample clips in data/opensora/ and their captions (clips.csv).

Each clip is a coloured shape sliding across a plain background, drawn with numpy and encoded
as H.264 (yuv420p, so width and height are even) with PyAV. The clip sizes cover landscape,
portrait and square frames and 8 to 24 frames, so the training buckets have something to sort.
Everything is computed from fixed numbers: running the script twice gives the same frames.

Run: ``python data/opensora/make_clips.py``
"""

from __future__ import annotations

import csv
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

HERE = Path(__file__).resolve().parent
FPS = 8
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 70),
    "blue": (40, 70, 220),
    "yellow": (235, 220, 50),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (150, 60, 200),
}
# name, width, height, frames, shape, colour, background, direction (dx, dy in px/frame)
CLIPS = [
    ("circle_right", 64, 48, 16, "circle", "red", "blue", (2, 0)),
    ("square_down", 48, 64, 16, "square", "yellow", "black", (0, 2)),
    ("circle_diag", 64, 64, 24, "circle", "white", "purple", (2, 2)),
    ("square_left", 64, 48, 8, "square", "green", "white", (-3, 0)),
    ("circle_up", 48, 64, 12, "circle", "blue", "yellow", (0, -3)),
    ("square_diag", 64, 64, 20, "square", "red", "green", (-2, 1)),
]


def draw_frame(width: int, height: int, shape: str, colour, background, cx: float, cy: float) -> np.ndarray:
    """One RGB frame [H, W, 3] with the shape (radius/half-side 9 px) centred at (cx, cy)."""
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:] = background
    ys, xs = np.mgrid[0:height, 0:width]
    if shape == "circle":
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= 9.0**2
    else:
        inside = (np.abs(xs - cx) <= 9) & (np.abs(ys - cy) <= 9)
    frame[inside] = colour
    return frame


def clip_frames(width, height, num_frames, shape, colour, background, direction) -> list[np.ndarray]:
    dx, dy = direction
    start_x = width / 2 - dx * num_frames / 2
    start_y = height / 2 - dy * num_frames / 2
    return [
        draw_frame(width, height, shape, COLOURS[colour], COLOURS[background], start_x + dx * i, start_y + dy * i)
        for i in range(num_frames)
    ]


def write_mp4(path: Path, frames: list[np.ndarray], fps: int) -> None:
    height, width = frames[0].shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # A fixed key-frame interval gives the windowed reader something to seek to.
        stream.options = {"crf": "18", "g": "4", "bf": "0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def caption(shape, colour, background, direction) -> str:
    dx, dy = direction
    moves = {(1, 0): "right", (-1, 0): "left", (0, 1): "down", (0, -1): "up"}
    heading = moves.get((int(np.sign(dx)), int(np.sign(dy))), "diagonally")
    return f"a {colour} {shape} moving {heading} on a {background} background"


def main() -> None:
    rows = []
    for name, width, height, num_frames, shape, colour, background, direction in CLIPS:
        frames = clip_frames(width, height, num_frames, shape, colour, background, direction)
        write_mp4(HERE / f"{name}.mp4", frames, FPS)
        rows.append([f"{name}.mp4", caption(shape, colour, background, direction), num_frames, height, width, FPS])
    with open(HERE / "clips.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "text", "num_frames", "height", "width", "fps"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} clips and clips.csv to {HERE}")


if __name__ == "__main__":
    main()
