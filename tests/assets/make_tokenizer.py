"""Regenerate the tiny CLIP tokenizer in tests/assets/clip_tokenizer/ (vocab.json + merges.txt).

The files follow the layout of OpenAI CLIP's byte-level BPE: 256 byte symbols, the same symbols with
the end-of-word marker ``</w>``, learned merges, then ``<|startoftext|>`` and ``<|endoftext|>``.
Merges are learned here by plain BPE (most frequent pair first, ties broken by the pair's text)
on a small caption vocabulary, so the output is the same on every run. Load it with
``CLIPTokenizer.from_pretrained(dir, model_max_length=77)``.

Run: ``python tests/assets/make_tokenizer.py``
"""

from __future__ import annotations

import collections
import itertools
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "clip_tokenizer"
NUM_MERGES = 240  # an upper bound: learning stops when no pair is left to merge
EOW = "</w>"

COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "white", "black", "pink", "brown", "grey", "cyan", "magenta"]
SHAPES = ["circle", "square", "triangle", "star", "ring", "cross", "diamond", "stripe", "dot", "line", "box", "ellipse"]
WORDS = (
    ["a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "drawing", "painting", "image", "small", "large", "big", "tiny", "background", "dog", "cat", "person", "sks", "style"]
)


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable character, as byte-level BPE tokenizers do.

    Printable Latin-1 bytes map to themselves; the rest are shifted above U+0100 in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, shift = {}, 0
    for byte in range(256):
        if byte in keep:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + shift)
            shift += 1
    return mapping


def corpus_words() -> collections.Counter:
    """Word frequencies of captions like "a red circle on a blue background"."""
    counts: collections.Counter = collections.Counter()
    for colour in COLOURS:
        for shape in SHAPES:
            counts.update(["a", colour, shape, "on", "background"])
    counts.update(WORDS)
    return counts


def learn_merges(counts: collections.Counter, num_merges: int) -> list[tuple[str, str]]:
    words = {tuple([*word[:-1], word[-1] + EOW]): freq for word, freq in counts.items()}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter = collections.Counter()
        for symbols, freq in words.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = {_merge(symbols, best): freq for symbols, freq in words.items()}
    return merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def build() -> tuple[dict[str, int], list[tuple[str, str]]]:
    base = list(bytes_to_unicode().values())
    tokens = base + [symbol + EOW for symbol in base]
    merges = learn_merges(corpus_words(), NUM_MERGES)
    tokens += ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}, merges


def main() -> None:
    vocab, merges = build()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (OUT / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {OUT}")


if __name__ == "__main__":
    main()
