"""The run's result, in the layouts users load without Ferryman:

    full finetune  config.json, generation_config.json, model.safetensors (or model-0000k-of-0000n
                   shards and model.safetensors.index.json), tokenizer files:
                   ``AutoModelForCausalLM.from_pretrained(out)``
    LoRA           adapter_config.json (the base model's absolute path inside),
                   adapter_model.safetensors, tokenizer files:
                   ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)``

Every rank calls ``save_output`` (gathering Gemini's shards is a collective); rank 0 writes. Files
are written into a hidden folder and moved in, configs last, so nothing half-written is left.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from ferryman.apps.lm.config import FinetuneConfig
from ferryman.apps.lm.model import ModelFolder
from ferryman.core.runtime import parse_dtype

LAST = ("adapter_config.json", "config.json", "tokenizer_config.json")


def save_output(cfg: FinetuneConfig, folder: ModelFolder, engine, *, rank: int) -> Path:
    out = Path(cfg.out)
    if cfg.use_lora:
        values = engine.export_trainable().values  # a collective
        if rank == 0:
            _save_adapter(engine.module, values, out, base=folder.path)
    else:
        dtype = folder.dtype if cfg.save_dtype == "auto" else parse_dtype(cfg.save_dtype, "save_dtype")
        engine.module.config.use_cache = True  # switched off for training; generation wants it
        engine.save_pretrained(out, dtype=dtype, max_shard_bytes=cfg.max_shard_mb * 10**6)
    if rank == 0:
        with _staging(out) as tmp:
            folder.tokenizer.save_pretrained(str(tmp))
    return out


def _save_adapter(module, values: dict[str, torch.Tensor], out: Path, *, base: Path) -> None:
    module.peft_config["default"].base_model_name_or_path = str(base.resolve())
    with _staging(out) as tmp:
        module.save_pretrained(str(tmp), state_dict=values, safe_serialization=True)


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A hidden folder inside ``out`` whose files move into ``out`` when the block succeeds (configs last)."""
    tmp = out / ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name in LAST):
            entry.replace(out / entry.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
