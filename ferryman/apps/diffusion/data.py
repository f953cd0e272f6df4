"""Image-caption folders for sd-finetune: discovery, checks and deterministic augmentation.

A data folder holds images and their captions in one of three layouts, tried in this order:

1. ``metadata.jsonl``: one JSON object per line with the image file name and caption
   (``{"file_name": "0001.png", "text": "a red circle"}``, the diffusers/``imagefolder`` layout);
2. ``metadata.csv`` or ``captions.csv`` with a header naming the same two columns;
3. a ``.txt`` file beside each image holding its caption (``0001.png`` + ``0001.txt``).

A missing caption or image column, a line that is not JSON, or a file that is not UTF-8 text
is an error naming the file and the line. A missing or unreadable image, or an image without a
caption, is skipped, counted and named in the summary (``on_bad="error"`` makes it an error
instead). Every random choice (sample order, crop, flip, and the noise of the loss) is a function
of the run seed and the sample's position in the stream, so a resumed run sees exactly the same
batches, and so does a run that splits each batch over processes or accumulation steps (``Share``).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ferryman.core.errors import UserError
from ferryman.core.files import reading

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
IMAGE_COLUMNS = ("file_name", "image", "path", "file")


@dataclass(kw_only=True)
class Record:
    path: Path
    caption: str


NAMED_SKIPS = 5  # skipped images named in the summary; the rest are counted


@dataclass(kw_only=True)
class Scan:
    """What a data folder yielded: usable records and the skipped ones by reason."""

    records: list[Record]
    skipped: Counter = field(default_factory=Counter)
    skipped_files: list[str] = field(default_factory=list)  # the first NAMED_SKIPS, "name (why)"
    source: str = ""

    def summary(self) -> str:
        text = f"{len(self.records)} images with captions from {self.source}"
        if self.skipped:
            text += " (skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
            more = sum(self.skipped.values()) - len(self.skipped_files)
            text += ": " + ", ".join(self.skipped_files) + (f" and {more} more" if more > 0 else "") + ")"
        return text


def scan_folder(root: str | Path, *, caption_column: str = "text", image_column: str = "",
                on_bad: str = "skip") -> Scan:
    """Find the images and captions under ``root``; see the module docstring for layouts."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist or is not a folder")
    if on_bad not in ("skip", "error"):
        raise UserError(f"on_bad={on_bad!r} must be 'skip' or 'error'")
    if (root / "metadata.jsonl").is_file():
        rows, source = _read_jsonl(root / "metadata.jsonl"), root / "metadata.jsonl"
    elif csvs := [root / n for n in ("metadata.csv", "captions.csv") if (root / n).is_file()]:
        rows, source = _read_csv(csvs[0]), csvs[0]
    else:
        return check_records(_sidecar_records(root), root, on_bad, f"{root} (.txt sidecars)")
    records = _rows_to_records(rows, root, source, caption_column, image_column)
    return check_records(records, root, on_bad, str(source))


def read_text(path: Path, what: str = "captions file") -> str:
    """A UTF-8 text file (a BOM is dropped); bytes that are not UTF-8 are named by line number."""
    with reading(path, what):
        raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path} line {line}: not UTF-8 text (byte {raw[err.start]:#04x}); "
                        f"is this the {what}?") from None


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append((f"line {number}", row))
    return rows


def _read_csv(path: Path) -> list[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        if not reader.fieldnames:
            raise UserError(f"{path} has no header row; expected columns such as file_name,text")
        return [(f"line {reader.line_num}", row) for row in reader]
    except csv.Error as err:  # DictReader's own line_num is the last good row's: the reader's counts the bad one
        raise UserError(f"{path} line {reader.reader.line_num}: not readable as CSV ({err})") from None


def _rows_to_records(rows, root: Path, source: Path, caption_column: str, image_column: str) -> list[Record]:
    if not rows:
        raise UserError(f"{source} lists no images")
    columns = sorted({key for _, row in rows for key in row})
    image_column = image_column or next((c for c in IMAGE_COLUMNS if c in columns), "")
    if not image_column or image_column not in columns:
        raise UserError(f"{source} has no image column (looked for {image_column or ', '.join(IMAGE_COLUMNS)}); "
                        f"its columns are: {', '.join(columns)}")
    records = []
    for where, row in rows:
        if caption_column not in row or row[caption_column] is None:
            raise UserError(f"{source} {where}: no caption column '{caption_column}' "
                            f"(columns: {', '.join(sorted(str(k) for k in row))}); set --caption-column to the right one")
        if row.get(image_column) in (None, ""):
            raise UserError(f"{source} {where}: no image file name in column '{image_column}' "
                            f"(columns: {', '.join(sorted(str(k) for k in row))})")
        records.append(Record(path=root / str(row[image_column]), caption=str(row[caption_column]).strip()))
    return records


def _sidecar_records(root: Path) -> list[Record]:
    records = []
    for path in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        sidecar = path.with_suffix(".txt")
        caption = read_text(sidecar, "caption file").strip() if sidecar.is_file() else None
        records.append(Record(path=path, caption=caption))  # type: ignore[arg-type]
    if not records:
        raise UserError(f"data folder {root} has no metadata.jsonl, metadata.csv/captions.csv, or images "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    return records


def check_records(records: list[Record], root: Path, on_bad: str, source: str) -> Scan:
    """Keep the usable records; skip and count (or, with on_bad="error", reject) the others."""
    scan = Scan(records=[], source=source)
    for record in records:
        problem = _problem(record)
        if problem is None:
            scan.records.append(record)
            continue
        if on_bad == "error":
            raise UserError(f"{record.path}: {problem}")
        scan.skipped[problem.split(" (")[0]] += 1
        if len(scan.skipped_files) < NAMED_SKIPS:
            scan.skipped_files.append(f"{record.path.name} ({problem})")
    if not scan.records:
        raise UserError(f"no usable images in {root}: {scan.summary()}")
    return scan


def scan_prompt_folder(path: str | Path, prompt: str, *, on_bad: str = "skip") -> Scan:
    """Every image in ``path`` with the one ``prompt`` (DreamBooth instance or class images)."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist")
    records = [Record(path=p, caption=prompt) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not records:
        raise UserError(f"image folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return check_records(records, folder, on_bad, f"{folder} (prompt {prompt!r})")


def _problem(record: Record) -> str | None:
    if record.caption is None:
        return "without caption"
    if not record.path.is_file():
        return "missing"
    try:
        with Image.open(record.path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path}: cannot decode image ({err})") from None


def transform(image: Image.Image, *, resolution: int, center_crop: bool, random_flip: bool,
              rng: random.Random) -> torch.Tensor:
    """Resize the short side to ``resolution``, crop a square, maybe flip; values in [-1, 1].

    Returns [3, resolution, resolution] float32.
    """
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    if center_crop:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    else:
        left, top = rng.randint(0, size[0] - resolution), rng.randint(0, size[1] - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # [H, W, 3]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # [3, H, W]


def _mix(*numbers: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() of ints is not mixed enough)."""
    value = 0x9E3779B97F4A7C15
    for number in numbers:
        value = (value ^ (number & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


class CaptionStream(torch.utils.data.Dataset):
    """An endless, seeded stream over records: sample ``k`` is a pure function of (seed, k).

    Sample k belongs to epoch k // N and takes position k % N of that epoch's permutation, so a
    loader started at sample k (a resumed run) yields what an uninterrupted run would have.
    With ``prior`` records (DreamBooth class images), each item also carries a class sample.
    """

    def __init__(self, records: list[Record], tokenizer, *, resolution: int, center_crop: bool,
                 random_flip: bool, seed: int, prior: list[Record] | None = None):
        self.records, self.prior, self.tokenizer, self.seed = records, prior or [], tokenizer, seed
        self.options = {"resolution": resolution, "center_crop": center_crop, "random_flip": random_flip}

    def _pick(self, records: list[Record], k: int, stream: int) -> tuple[Record, random.Random]:
        epoch, position = divmod(k, len(records))
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(_mix(self.seed, stream, epoch)))
        return records[int(order[position])], random.Random(_mix(self.seed, stream, epoch, position, 1))

    def _example(self, record: Record, rng: random.Random) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(record.caption, max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids[0]
        pixels = transform(load_image(record.path), rng=rng, **self.options)
        return {"pixel_values": pixels, "input_ids": ids}

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        item = self._example(*self._pick(self.records, k, 0))
        if self.prior:
            prior = self._example(*self._pick(self.prior, k, 1))
            item = {**item, **{f"prior_{key}": value for key, value in prior.items()}}
        return item


@dataclass(frozen=True, kw_only=True)
class Share:
    """One process's part of every optimizer step's samples.

    A step reads one global batch: ``accum * ranks`` consecutive micro-batches of the stream.
    Process ``rank`` (of ``ranks`` data-parallel ones) takes micro-batches ``a * ranks + rank``
    for a = 0 .. accum - 1. A sample's place in the global batch, and with it its noise, is the
    one it has when one process reads the whole global batch at once.
    """

    accum: int = 1
    ranks: int = 1
    rank: int = 0

    @property
    def per_step(self) -> int:
        return self.accum * self.ranks

    def micro(self, n: int) -> int:
        """The stream's micro-batch index of this process's ``n``-th micro-batch."""
        step, a = divmod(n, self.accum)
        return (step * self.accum + a) * self.ranks + self.rank


def collate(samples: list[dict[str, torch.Tensor]], *, seed: int, global_batch: int, first: int) -> dict:
    """Stack samples; ``noise_seed`` fixes the global batch's noise and timesteps from its
    position, and ``noise_slice`` ([first row, global batch size]) says which rows are these."""
    batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
    batch["noise_seed"] = torch.tensor(_mix(seed, 2, first // global_batch))
    batch["noise_slice"] = torch.tensor([first % global_batch, global_batch])
    return batch


class _Indexed(torch.utils.data.Dataset):
    """Passes the stream index along so the collate function can seed the batch's noise."""

    def __init__(self, stream: CaptionStream):
        self.stream = stream

    def __getitem__(self, k: int):
        return k, self.stream[k]


def _collate_indexed(items, seed: int, global_batch: int) -> dict:
    return collate([item for _, item in items], seed=seed, global_batch=global_batch, first=items[0][0])


class _MicroBatches:
    """Stream indices of this process's micro-batches ``first``, ``first + 1``, ... (``count`` of them, None: endless)."""

    def __init__(self, share: Share, batch_size: int, first: int, count: int | None):
        self.share, self.batch_size, self.first, self.count = share, batch_size, first, count

    def __iter__(self):
        numbers = itertools.count(self.first) if self.count is None else range(self.first, self.first + self.count)
        for n in numbers:
            start = self.share.micro(n) * self.batch_size
            yield from range(start, start + self.batch_size)


def stream_loader(stream: CaptionStream, *, batch_size: int, start_batch: int, num_batches: int | None,
                  num_workers: int = 0, share: Share = Share()) -> torch.utils.data.DataLoader:
    """This process's micro-batches ``start_batch .. start_batch + num_batches - 1`` (None: endless)."""
    import functools

    return torch.utils.data.DataLoader(
        _Indexed(stream), batch_size=batch_size, sampler=_MicroBatches(share, batch_size, start_batch, num_batches),
        num_workers=num_workers, persistent_workers=False, pin_memory=torch.cuda.is_available(),
        collate_fn=functools.partial(_collate_indexed, seed=stream.seed, global_batch=batch_size * share.per_step),
    )


class StreamLoader:
    """Endless micro-batches of a CaptionStream for the core training loop, from a position.

    Its state is the number of samples every process together has consumed (whole steps:
    checkpoints fall between steps), so a resumed run starts there directly instead of decoding
    every earlier image again, whatever its split over processes and accumulation steps.
    """

    def __init__(self, stream: CaptionStream, *, batch_size: int, share: Share = Share(), num_workers: int = 0):
        self.stream, self.batch_size, self.share, self.num_workers = stream, batch_size, share, num_workers
        self.position = 0  # micro-batches this process has handed out

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.share.per_step

    def __iter__(self):
        loader = stream_loader(self.stream, batch_size=self.batch_size, start_batch=self.position, num_batches=None,
                               num_workers=self.num_workers, share=self.share)
        for batch in loader:
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"samples": self.position // self.share.accum * self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "samples" not in state:  # written before Share: one micro-batch per step, one process
            self.position = int(state["batch"]) * self.share.accum
            return
        steps, rest = divmod(int(state["samples"]), self.global_batch)
        if rest:
            raise UserError(f"the checkpoint stopped after {state['samples']} samples, not a whole number of this "
                            f"run's global batches of {self.global_batch} (batch size x grad accumulation x processes)")
        self.position = steps * self.share.accum
