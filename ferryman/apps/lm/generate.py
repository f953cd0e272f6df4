"""`ferryman generate`: continue prompts with a finetuned (or any) causal LM folder, or a LoRA
adapter on its base, read the way users read them (transformers and peft)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ferryman.apps.lm.config import GenerateConfig
from ferryman.apps.lm.model import causal_lm_config, load_tokenizer
from ferryman.core.errors import UserError
from ferryman.core.files import check_model_folder, reading
from ferryman.core.runtime import parse_dtype, pick_device

ADAPTER = "adapter_config.json"


def load(cfg: GenerateConfig, device: torch.device):
    """(model, tokenizer) from ``cfg.model``: a model folder, or an adapter folder on its base."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # the printed continuations are the command's whole output
    folder = Path(cfg.model)
    dtype = parse_dtype(cfg.precision)
    if (folder / ADAPTER).is_file():
        check_model_folder(folder, "adapter folder (--model)")
        base = Path(cfg.base or _adapter_base(folder))
        causal_lm_config(base, "--base")
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder))
        tokenizer_folder = folder if (folder / "tokenizer_config.json").is_file() else base
    else:
        causal_lm_config(folder)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        tokenizer_folder = folder
    return model.to(device).eval(), load_tokenizer(tokenizer_folder)


def _adapter_base(folder: Path) -> str:
    with reading(folder / ADAPTER, "adapter config"):
        base = json.loads((folder / ADAPTER).read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise UserError(f"{folder / ADAPTER}: its base model {base!r} is not a folder here; name it with --base")
    return base


def generate(cfg: GenerateConfig) -> list[str]:
    """The continuation of each prompt (the new text only)."""
    if not cfg.model or not cfg.prompts:
        raise UserError("--model and at least one --prompt are required")
    device = pick_device(cfg.device, flag="--device")
    model, tokenizer = load(cfg, device)
    torch.manual_seed(cfg.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.temperature > 0 else {"do_sample": False}
    texts = []
    for prompt in cfg.prompts:  # one at a time: no padding, so each reads exactly as it would alone
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)  # [1, T]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                                 pad_token_id=pad, **sampling)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts
