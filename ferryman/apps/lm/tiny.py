"""Tiny causal LM folders with random weights and a byte-level tokenizer, plus sample text, for
tests, the README's quick start and CPU trials.

``write_tiny_model(out, family)`` writes a 2-layer model of width 32 in transformers' layout
(config.json, model.safetensors, tokenizer files) for any of ``FAMILIES``; it loads with
``AutoModelForCausalLM.from_pretrained(out)`` like a real one. ``write_sample_data(out)`` writes
sums in words: ``sums.txt`` (plain text), ``sums.jsonl`` (prompt/completion pairs) and
``held_out.jsonl`` (sums the others lack), generated here with a fixed seed.

Run: ``python -m ferryman.apps.lm.tiny --family llama --out lm-tiny --data lm-data``
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0-3; the 256 byte symbols follow
FAMILIES = ("opt", "llama", "gpt2", "qwen2", "mistral")


def byte_symbols() -> list[str]:
    """The printable stand-in of each byte that byte-level BPE tokenizers (GPT-2's) use, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, shift = [], 0
    for byte in range(256):
        if byte in keep:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shift))
            shift += 1
    return symbols


def build_byte_tokenizer():
    """A byte-level tokenizer with no merges (one token per byte, any text round-trips), Llama's
    special-token layout, and ``<s>`` put before every sequence as Llama's tokenizer does."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + byte_symbols())}
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=4096)


def tiny_config(family: str, vocab_size: int, *, hidden: int = 32, layers: int = 2, max_positions: int = 256):
    """A transformers config of ``family`` at test size, dropout off (parity tests compare runs)."""
    import transformers

    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if family == "opt":  # OPT ties the output layer to the embedding
        return transformers.OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers, num_attention_heads=2,
                                      vocab_size=vocab_size, max_position_embeddings=max_positions,
                                      word_embed_proj_dim=hidden, dropout=0.0, attention_dropout=0.0, **ids)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=2, vocab_size=vocab_size, n_positions=max_positions,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=vocab_size, max_position_embeddings=max_positions, **ids)
    classes = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}
    if family not in classes:
        raise ValueError(f"family={family!r} is not one of {FAMILIES}")
    return classes[family](**common)


def write_tiny_model(out: str | Path, family: str = "llama", *, seed: int = 0, hidden: int = 32,
                     tokenizer_dir: str | Path | None = None, max_shard_size: str | None = None) -> Path:
    """A random-weight causal LM folder with the byte-level tokenizer (built here, or read from
    ``tokenizer_dir``); ``max_shard_size`` writes the weights in shards."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir)) if tokenizer_dir else build_byte_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer), hidden=hidden))
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(out)
    return out


def sums(seed: int = 0, count: int = 400) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(0, 20), rng.randint(0, 20)) for _ in range(count)]


def write_sample_data(out: str | Path) -> Path:
    """Sums in words: plain text, prompt/completion pairs, and held-out pairs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = sums()
    train, held_out = pairs[:360], pairs[360:]
    (out / "sums.txt").write_text("".join(f"{a} plus {b} is {a + b}.\n" for a, b in train), encoding="utf-8")
    with open(out / "sums.jsonl", "w", encoding="utf-8") as handle:
        for a, b in train:
            handle.write(json.dumps({"prompt": f"{a} plus {b} is", "completion": f" {a + b}."}) + "\n")
    with open(out / "held_out.jsonl", "w", encoding="utf-8") as handle:
        for a, b in held_out:
            handle.write(json.dumps({"text": f"{a} plus {b} is {a + b}."}) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--family", choices=FAMILIES, default="llama")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--data", type=Path, default=None, help="also write the sample text to this folder")
    args = parser.parse_args()
    print(f"wrote {write_tiny_model(args.out, args.family, hidden=args.hidden)}")
    if args.data:
        print(f"wrote {write_sample_data(args.data)}")


if __name__ == "__main__":
    main()
