"""Regenerate the tiny byte-level tokenizer in this folder (tokenizer.json + tokenizer_config.json).

One token per byte (the 256 byte symbols of GPT-2's byte-level BPE, no merges) after Llama's
special tokens: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3; ``<s>`` is put before every
sequence. Any text round-trips, and the files are the same on every run. The LM tests build their
tiny OPT and Llama folders around it; load it with ``AutoTokenizer.from_pretrained(this folder)``.

Run: ``python tests/assets/lm_tokenizer/make_lm_tokenizer.py``
"""

from __future__ import annotations

from pathlib import Path

from ferryman.apps.lm.tiny import build_byte_tokenizer

OUT = Path(__file__).resolve().parent


def main() -> None:
    build_byte_tokenizer().save_pretrained(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
