"""Metrics as JSON lines, and a loss-curve PNG drawn from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ferryman.core.io import atomic_path, write_text


class MetricsLog:
    """Appends one JSON object per logged step; on resume, drops lines past the resumed step.

    A line cut short (a kill or a full disk in the middle of an append) is dropped when read.
    """

    def __init__(self, path: Path, *, start_step: int = 0) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():  # keep the history up to the checkpoint, forget the steps redone
            kept = [r for r in self.read() if r.get("step", 0) <= start_step]
            write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [r for r in map(_parse, self.path.read_text(encoding="utf-8", errors="replace").splitlines()) if r]


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line) if line.strip() else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def plot_losses(records: list[dict[str, Any]], png: Path, title: str = "training loss") -> Path | None:
    """Draw loss against step."""
    return plot_metric(records, png, key="loss", ylabel="loss", title=title)


def plot_metric(
    records: list[dict[str, Any]],
    png: Path,
    *,
    key: str,
    ylabel: str,
    title: str,
    ylim: tuple[float, float] | None = None,
) -> Path | None:
    """Draw ``key`` against step from metrics records (matplotlib imported here, Agg backend:
    no display needed); None when no record has the key."""
    points = [(r["step"], r[key]) for r in records if key in r]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([s for s, _ in points], [v for _, v in points], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return png
