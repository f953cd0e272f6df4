"""The model folder: checked, its config and tokenizer read, the model built without its weights
(core/gemini/lazy.py: the engine reads them from the folder's safetensors), LoRA added with peft."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ferryman.apps.lm.config import FinetuneConfig, LoraConfig
from ferryman.core.errors import UserError
from ferryman.core.files import check_model_folder


@dataclass
class ModelFolder:
    """A checked causal LM folder: its transformers config and tokenizer."""

    path: Path
    config: object
    tokenizer: object

    @property
    def dtype(self) -> torch.dtype:
        """The dtype its weights are published in (config ``dtype``; fp32 if unsaid)."""
        dtype = getattr(self.config, "dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        return dtype if isinstance(dtype, torch.dtype) else torch.float32


def causal_lm_config(folder: str | Path, flag: str = "--model"):
    """The transformers config of ``folder``, refused in one line unless AutoModelForCausalLM has a class for it."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    folder = Path(folder)
    check_model_folder(folder, f"model folder ({flag})")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: no config.json; not a transformers model folder ({flag})")
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, OSError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{folder}/config.json: transformers cannot read this model config ({reason[:200]})") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"{folder}: a '{config.model_type}' model, not a causal language model (AutoModelForCausalLM "
                        f"has no class for it); {flag} takes a decoder such as OPT, GPT-2, Llama, Qwen or Mistral")
    return config


def load_tokenizer(folder: str | Path, flag: str = "--model"):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (ValueError, KeyError, OSError, TypeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{folder}: no tokenizer transformers can load ({reason[:200]}); {flag} needs the tokenizer files") from None


def open_model_folder(folder: str | Path) -> ModelFolder:
    """Check the folder (no pickled weights, sound safetensors headers, a causal LM config, a tokenizer)."""
    from ferryman.core.gemini.lazy import WeightFiles

    config = causal_lm_config(folder)
    WeightFiles(folder)  # safetensors weights are there and their headers are sound
    return ModelFolder(Path(folder), config, load_tokenizer(folder))


def build_model(cfg: FinetuneConfig, folder: ModelFolder) -> nn.Module:
    """The model on the meta device with its weights named in ``folder`` (read by the engine),
    gradient checkpointing and LoRA applied as configured."""
    from transformers import AutoModelForCausalLM

    from ferryman.core.gemini.lazy import empty_weights, load_later

    with empty_weights():
        model = AutoModelForCausalLM.from_config(folder.config)
    load_later(model, folder.path)
    model.config.use_cache = False  # a training forward keeps no key/value cache
    if cfg.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise UserError(f"{folder.path}: {type(model).__name__} does not support --gradient-checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.use_lora:
        model = add_lora(model, cfg.lora)
    return model.train()


def add_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """``model`` frozen, with trainable rank-``cfg.rank`` adapters on ``cfg.targets`` (a PeftModel)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = cfg.targets if cfg.targets == "all-linear" else [t.strip() for t in cfg.targets.split(",") if t.strip()]
    config = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.scale_alpha, lora_dropout=cfg.dropout, target_modules=targets,
                            task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # no module matched the targets
        raise UserError(f"lora.targets={cfg.targets!r}: {(str(err).splitlines() or ['no match'])[0][:200]}") from None
