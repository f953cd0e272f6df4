"""Caption features from a T5 encoder in a local transformers folder, with an optional on-disk cache.

Open-Sora conditions on T5-XXL (DeepFloyd ``t5-v1_1-xxl``) encoder states padded to a fixed
number of tokens. Any T5 encoder folder works (config.json, weights, tokenizer files); tests use
a tiny one. Cached embeddings are keyed by the model's files, the token count and the text, so a
changed model never reads stale entries.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from ferryman.core.errors import UserError
from ferryman.core.io import atomic_path

_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def check_model_folder(folder: Path, what: str, hint: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} folder {folder} does not exist ({hint})")
    if not (folder / "config.json").is_file():
        raise UserError(f"{what} folder {folder} has no config.json ({hint})")
    return folder


def _fingerprint(folder: Path) -> str:
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for name in (*_WEIGHTS, "tokenizer.json", "spiece.model"):
        path = folder / name
        if path.is_file():
            stat = path.stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


class T5TextEncoder:
    """Caption -> ([L, C] encoder states, [L] mask) for ``max_length`` tokens (padded or truncated)."""

    def __init__(
        self, folder: Path, *, max_length: int, device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32, cache_dir: Path | None = None,
    ):
        from transformers import AutoTokenizer, T5EncoderModel

        hint = "expected a transformers T5 folder: config.json, model weights and tokenizer files"
        self.folder = check_model_folder(folder, "text encoder", hint)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
            self.model = T5EncoderModel.from_pretrained(self.folder, dtype=dtype)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load the T5 encoder in {self.folder}: {str(err).splitlines()[0]}") from None
        self.model.to(device).eval().requires_grad_(False)
        self.device, self.max_length = torch.device(device), max_length
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._key = f"{_fingerprint(self.folder)}:{max_length}"

    @property
    def hidden_size(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def _run(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, C]
        return states.float().cpu(), mask.bool().cpu()

    def _cache_path(self, text: str) -> Path:
        assert self.cache_dir is not None
        name = hashlib.sha256(f"{self._key}\n{text}".encode()).hexdigest()
        return self.cache_dir / name[:2] / f"{name}.safetensors"

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """[B, L, C] float32 features and [B, L] bool mask (True = a real token), on the CPU."""
        if self.cache_dir is None:
            return self._run(texts)
        from safetensors.torch import load_file, save_file

        found: dict[str, tuple[Tensor, Tensor]] = {}
        for text in set(texts):
            path = self._cache_path(text)
            if path.is_file():
                entry = load_file(path)
                found[text] = (entry["states"], entry["mask"].bool())
        missing = sorted(set(texts) - set(found))
        if missing:
            states, mask = self._run(missing)
            for text, s, m in zip(missing, states, mask):
                with atomic_path(self._cache_path(text)) as tmp:
                    save_file({"states": s.contiguous(), "mask": m.to(torch.uint8)}, str(tmp))
                found[text] = (s, m)
        return torch.stack([found[t][0] for t in texts]), torch.stack([found[t][1] for t in texts])
