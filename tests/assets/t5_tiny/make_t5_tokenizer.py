"""Regenerate the tiny T5-style tokenizer in this folder (tokenizer.json + tokenizer_config.json).

A word-level vocabulary (``ferryman.apps.opensora.tiny.WORDS``: the words of the sample captions
in data/opensora/clips.csv and a few more) with T5's special tokens and ids: ``<pad>`` = 0,
``</s>`` = 1, ``<unk>`` = 2, and ``</s>`` appended to every sequence. The vocabulary is sorted, so
every run writes the same files. Load it with ``AutoTokenizer.from_pretrained("tests/assets/t5_tiny")``.

Run: ``python tests/assets/t5_tiny/make_t5_tokenizer.py``
"""

from __future__ import annotations

from pathlib import Path

from ferryman.apps.opensora.tiny import build_word_tokenizer

OUT = Path(__file__).resolve().parent


def main() -> None:
    build_word_tokenizer().save_pretrained(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
