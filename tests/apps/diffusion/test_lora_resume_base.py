"""A LoRA checkpoint holds only the adapters, so resuming it on another base must be refused
(the frozen weights' fingerprint in trainable.json), not silently train the adapters on the new base.
"""

import pytest

from ferryman.apps.diffusion.config import LoraConfig
from ferryman.apps.diffusion.presets import build_pipeline
from ferryman.apps.diffusion.train import finetune
from ferryman.core.errors import UserError

from .conftest import TOKENIZER, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file")

LORA = dict(lora=LoraConfig(rank=2), lr=1e-2, precision="fp32", memory="plain")


def test_lora_resume_on_another_base_model_is_refused(tiny_model, tmp_path):
    out = tmp_path / "run"
    finetune(tiny_config(tiny_model, out, max_steps=1, ckpt_every=1, **LORA), progress=False)
    other = tmp_path / "other-base"
    build_pipeline("tiny", TOKENIZER, seed=1).save_pretrained(str(other), safe_serialization=True)
    cfg = tiny_config(other, tmp_path / "resumed", max_steps=2, resume=str(out / "checkpoint-1"), **LORA)
    with pytest.raises(UserError, match="base"):
        finetune(cfg, progress=False)
