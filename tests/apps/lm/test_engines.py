"""`ferryman finetune` on tiny OPT (tied output layer) and Llama (untied, sharded weights): Gemini
equals the plain engine in fp32, and what the run writes loads with transformers and peft and gives
the engine's logits.

Gemini runs both ways --memory offers it: auto placement with a device budget of twice the fp32
weights (it must evict: the budget binds) and full offload. Gradient clipping is off in the parity
runs: the clip coefficient is a norm summed per chunk in Gemini and per tensor in torch, whose last
bit differs, and Adam turns that into differences far above an ulp; with clipping off every loss
and every weight must be equal, bit for bit.
"""

import math

import pytest
import torch

from ferryman.apps.lm.train import finetune
from tests.tolerance import approx

from .conftest import TOKENIZER, lm_config


def _num_params(folder) -> int:
    from ferryman.core.gemini.lazy import WeightFiles

    files = WeightFiles(folder)
    return sum(math.prod(files.shape(key)) for key in files.where)


def _held_out_logits(engine, blocks) -> torch.Tensor:
    engine.eval()
    with torch.no_grad():
        return engine(input_ids=blocks).logits


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_gemini_equals_plain_in_fp32_and_the_output_loads_with_transformers(models, sample_data, tmp_path, family):
    from transformers import AutoModelForCausalLM

    model = models[family]
    budget = 8 * _num_params(model)  # fp32 weights twice over: less than weights, gradients and AdamW state
    runs = {}
    for memory in ("plain", "gemini-auto", "gemini-offload"):
        extra = {"budget": budget} if memory == "gemini-auto" else {}
        cfg = lm_config(model, tmp_path / memory, sample_data / "sums.txt", memory=memory, max_grad_norm=0.0, **extra)
        runs[memory] = finetune(cfg, progress=False)
    plain = runs["plain"]
    expected = plain.engine.state_dict()
    initial = AutoModelForCausalLM.from_pretrained(str(model)).state_dict()
    assert max((expected[k] - v).abs().max().item() for k, v in initial.items()) > 1e-3  # the weights moved
    for memory in ("gemini-auto", "gemini-offload"):
        run = runs[memory]
        assert run.losses == plain.losses, memory
        assert run.evals == plain.evals, memory
        state = run.engine.state_dict()
        for name, value in expected.items():
            assert torch.equal(state[name], value), (memory, name)
    stats = runs["gemini-auto"].engine.stats()
    assert stats["evictions"] > 0 and stats["peak_bytes"] <= budget
    assert runs["gemini-offload"].engine.stats()["chunks_on_device"] == 0

    blocks = torch.randint(4, 260, (2, 24), generator=torch.Generator().manual_seed(1))
    for memory, run in runs.items():
        loaded = AutoModelForCausalLM.from_pretrained(str(run.out)).eval()
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=blocks).logits, _held_out_logits(run.engine, blocks)), memory
    assert (runs["plain"].out / "config.yaml").is_file() and (runs["plain"].out / "loss.png").is_file()


def test_lora_output_loads_with_peft_and_gives_the_engines_logits(models, sample_data, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = models["llama"]
    run = finetune(lm_config(model, tmp_path / "lora", sample_data / "sums.jsonl", memory="gemini-auto", lora_rank=4,
                             budget=8 * _num_params(model)), progress=False)
    adapter = load_file(str(run.out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in key for key in adapter)
    assert any(value.abs().max() > 0 for key, value in adapter.items() if "lora_B" in key)  # B starts at zero: it trained
    assert not (run.out / "model.safetensors").exists()  # the base stays in --model
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model)), str(run.out)).eval()
    blocks = torch.randint(4, 260, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=blocks).logits, _held_out_logits(run.engine, blocks))
    checkpoint = sorted((run.out / "checkpoints").glob("step-*"))[-1]
    assert (checkpoint / "trainable.safetensors").is_file() and not list(checkpoint.glob("shard-*"))


def test_gradient_checkpointing_and_accumulation_change_no_number(models, sample_data, tmp_path):
    """Recomputing activations in backward (under Gemini, whose hooks gather chunks again for the
    recomputation) gives the same losses as keeping them; 2 micro-batches of 1 give the updates of
    one batch of 2 (each micro-batch's mean loss, halved, summed: equal token counts per block)."""
    data = sample_data / "sums.txt"
    plain = finetune(lm_config(models["llama"], tmp_path / "plain", data, max_grad_norm=0.0), progress=False)
    recompute = finetune(lm_config(models["llama"], tmp_path / "recompute", data, memory="gemini-auto",
                                   gradient_checkpointing=True, max_grad_norm=0.0), progress=False)
    assert recompute.losses == plain.losses
    accumulated = finetune(lm_config(models["llama"], tmp_path / "accum", data, batch_size=1, grad_accum=2,
                                     max_grad_norm=0.0), progress=False)
    assert accumulated.losses == approx(plain.losses, ulps=8)


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "mistral"])
def test_the_other_families_finetune_and_load(family, sample_data, tmp_path):
    """GPT-2 (Conv1D weights, learned positions), Qwen2 (attention biases) and Mistral (sliding
    window) through the lazy Gemini path; the output loads and gives the engine's logits."""
    from transformers import AutoModelForCausalLM

    from ferryman.apps.lm.tiny import write_tiny_model

    model = write_tiny_model(tmp_path / family, family, tokenizer_dir=TOKENIZER)
    run = finetune(lm_config(model, tmp_path / "run", sample_data / "sums.txt", memory="gemini-auto", max_steps=2),
                   progress=False)
    assert run.losses[1] < run.losses[0]
    blocks = torch.randint(4, 260, (1, 16), generator=torch.Generator().manual_seed(1))
    loaded = AutoModelForCausalLM.from_pretrained(str(run.out)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=blocks).logits, _held_out_logits(run.engine, blocks))
