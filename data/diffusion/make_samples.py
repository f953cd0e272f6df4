"""Regenerate the sample images in data/diffusion/ (PNG files plus metadata.jsonl).

Each image is a flat-coloured shape on a flat background, drawn with PIL, with a caption that
says what is drawn ("a red circle on a blue background"). The set is small on purpose: it is
what `make demo` and the tests finetune on. Run: ``python data/diffusion/make_samples.py``
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = 64

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (130, 50, 170),
    "orange": (245, 140, 20),
}

# (shape, colour, background)
SAMPLES = [
    ("circle", "red", "blue"),
    ("square", "yellow", "black"),
    ("triangle", "green", "white"),
    ("star", "orange", "purple"),
    ("circle", "white", "green"),
    ("square", "blue", "yellow"),
    ("triangle", "purple", "orange"),
    ("ring", "black", "white"),
]


def draw(shape: str, colour: str, background: str) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), COLOURS[background])
    pen = ImageDraw.Draw(image)
    fill, lo, hi, mid = COLOURS[colour], SIZE // 5, SIZE - SIZE // 5, SIZE // 2
    if shape == "circle":
        pen.ellipse((lo, lo, hi, hi), fill=fill)
    elif shape == "ring":
        pen.ellipse((lo, lo, hi, hi), outline=fill, width=SIZE // 10)
    elif shape == "square":
        pen.rectangle((lo, lo, hi, hi), fill=fill)
    elif shape == "triangle":
        pen.polygon([(mid, lo), (hi, hi), (lo, hi)], fill=fill)
    elif shape == "star":
        pen.regular_polygon((mid, mid, (hi - lo) // 2), n_sides=5, fill=fill)
        pen.regular_polygon((mid, mid, (hi - lo) // 2), n_sides=5, rotation=36, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def main() -> None:
    records = []
    for index, (shape, colour, background) in enumerate(SAMPLES):
        name = f"{index:02d}_{colour}_{shape}.png"
        draw(shape, colour, background).save(HERE / name)
        text = f"{_article(colour)} {colour} {shape} on {_article(background)} {background} background"
        records.append({"file_name": name, "text": text})
    with open(HERE / "metadata.jsonl", "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    print(f"wrote {len(records)} images and metadata.jsonl to {HERE}")


if __name__ == "__main__":
    main()
