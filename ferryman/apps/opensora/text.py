"""Caption features from a T5 encoder in a local transformers folder, with an optional on-disk cache.

Open-Sora conditions on T5-XXL (DeepFloyd ``t5-v1_1-xxl``) encoder states padded to a fixed
number of tokens. Any T5 encoder folder works (config.json, safetensors weights, tokenizer files);
tests use a tiny one. Cached embeddings are keyed by the model's files, the token count and the
text, so a changed model never reads stale entries; an entry that cannot be read (a crash, a full
disk, a stray edit) is computed again and rewritten, never fatal.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from ferryman.core import files
from ferryman.core.errors import UserError
from ferryman.core.io import atomic_path

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def require_config(folder: Path, what: str, hint: str) -> Path:
    """The folder exists and has a config.json (the weights are checked by ``check_weights``)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} folder {folder} is a file, not a folder ({hint})")
    if not folder.is_dir():
        raise UserError(f"{what} folder {folder} does not exist ({hint})")
    if not (folder / "config.json").is_file():
        raise UserError(f"{what} folder {folder} has no config.json ({hint})")
    return folder


def check_weights(folder: Path, what: str) -> None:
    """Before transformers/diffusers read a user's folder: every weight file in it is a sound
    safetensors file, and no pickle (which could run code) stands where they would fall back to it."""
    files.check_model_folder(folder, f"{what} folder")


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Without transformers' per-tensor "Loading weights" bar, which would otherwise stand above
    any one-line error the command ends with; the library's setting is restored afterwards."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


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
        self.folder = require_config(folder, "text encoder", hint)
        check_weights(self.folder, "text encoder")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
            with _quiet_loading():
                self.model = T5EncoderModel.from_pretrained(self.folder, dtype=dtype)
        except (OSError, ValueError, RuntimeError) as err:
            raise UserError(f"cannot load the T5 encoder in {self.folder}: {str(err).splitlines()[0]}") from None
        self.model.to(device).eval().requires_grad_(False)
        self._width = int(self.model.config.d_model)
        self.device, self.max_length = torch.device(device), max_length
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._key = f"{_fingerprint(self.folder)}:{max_length}"

    @property
    def hidden_size(self) -> int:
        return self._width

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

    def _cached(self, text: str) -> tuple[Tensor, Tensor] | None:
        """The cache entry of ``text``, or None when it is missing or unreadable (then recomputed)."""
        path = self._cache_path(text)
        if not path.is_file():
            return None
        try:
            entry = files.load_safetensors(path, "text cache entry")
        except UserError:
            return None
        states, mask = entry.get("states"), entry.get("mask")
        if states is None or mask is None or states.shape != (self.max_length, self.hidden_size) \
                or mask.shape != (self.max_length,):
            return None
        return states, mask.bool()

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """[B, L, C] float32 features and [B, L] bool mask (True = a real token), on the CPU."""
        if self.cache_dir is None:
            return self._run(texts)
        from safetensors.torch import save_file

        found = {text: entry for text in set(texts) if (entry := self._cached(text)) is not None}
        missing = sorted(set(texts) - set(found))
        if missing:
            states, mask = self._run(missing)
            for text, s, m in zip(missing, states, mask):
                with atomic_path(self._cache_path(text)) as tmp:
                    save_file({"states": s.contiguous(), "mask": m.to(torch.uint8)}, str(tmp))
                found[text] = (s, m)
        return torch.stack([found[t][0] for t in texts]), torch.stack([found[t][1] for t in texts])
