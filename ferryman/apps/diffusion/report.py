"""What a run leaves for people to look at: validation image grids, loss.csv and the loss curve PNG."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from PIL import Image

from ferryman.core.io import atomic_open, atomic_path


def image_grid(images: list[Image.Image], columns: int = 0) -> Image.Image:
    """Tile equally sized images row by row (``columns`` 0: as square as possible)."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    return grid


def save_png(image: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def write_loss_csv(path: Path, losses: list[float], lrs: list[float]) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write("step,loss,lr\n")
        for step, (loss, lr) in enumerate(zip(losses, lrs), start=1):
            handle.write(f"{step},{loss:.6g},{lr:.6g}\n")


def plot_loss_curve(path: Path, losses: list[float], title: str = "sd-finetune") -> Path:
    """Per-step loss (faint) and, for runs long enough, its moving average over a tenth of the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(1, len(losses) + 1))
    window = len(losses) // 10
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35 if window > 1 else 1.0, linewidth=0.8, label="loss")
    if window > 1:
        sums = [0.0, *itertools.accumulate(losses)]
        smooth = [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(window, i + 1) for i in range(len(losses))]
        ax.plot(steps, smooth, color="tab:blue", linewidth=1.6, label=f"mean of {window} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
