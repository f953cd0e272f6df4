"""core/gemini/lazy.py on transformers models: a model built on the meta device holds no weights
until an engine is built, Gemini then reads them chunk by chunk (the host never holds the whole
model besides the engine's own state), and both engines start from exactly the folder's weights."""

import weakref

import pytest
import torch

from ferryman.core.errors import UserError
from ferryman.core.gemini import GeminiConfig, OptimConfig, gemini
from ferryman.core.gemini.lazy import WeightFiles, empty_weights, is_deferred, load_later
from ferryman.core.training import PlainEngine


def _lazy(folder):
    from transformers import AutoConfig, AutoModelForCausalLM

    with empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
    load_later(model, folder)
    return model


def _eager(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder))


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_a_lazy_model_holds_no_weights_and_both_engines_start_from_the_folder(models, family):
    folder = models[family]
    model = _lazy(folder)
    params = list(model.named_parameters())
    assert all(is_deferred(p) and p.untyped_storage().nbytes() <= p.element_size() for _, p in params)
    if family == "opt":
        assert model.lm_head.weight is model.model.decoder.embed_tokens.weight  # still tied
    expected = _eager(folder).state_dict()
    gemini_engine = gemini(model, GeminiConfig(placement="static", precision="fp32", param_host_fraction=0.5), OptimConfig())
    plain_engine = PlainEngine(_lazy(folder), OptimConfig(), torch.float32, torch.device("cpu"))
    for engine in (gemini_engine, plain_engine):
        state = engine.state_dict()
        assert not any(is_deferred(p) for p in engine.module.parameters())
        for name, value in expected.items():
            assert torch.equal(state[name], value), (type(engine).__name__, name)


def test_gemini_reads_one_chunk_at_a_time(models, monkeypatch):
    """Each tensor is read once, in chunk order, and dropped once its chunk is packed: the weights
    read and still alive never exceed one chunk (the whole model is never on the host at once)."""
    folder = models["llama"]
    reads: list[str] = []
    live = {"now": 0, "peak": 0}
    original = WeightFiles.read

    def read(self, key):
        value = original(self, key)
        reads.append(key)
        live["now"] += value.nbytes
        live["peak"] = max(live["peak"], live["now"])
        weakref.finalize(value, lambda n=value.nbytes: live.__setitem__("now", live["now"] - n))
        return value

    monkeypatch.setattr(WeightFiles, "read", read)
    engine = gemini(_lazy(folder), GeminiConfig(placement="auto", precision="bf16"), OptimConfig())
    chunk_keys = [[slot.name for slot in chunk.slots] for chunk in engine.chunks]
    assert reads == [name for names in chunk_keys for name in names]
    assert len(chunk_keys) >= 4
    assert live["peak"] == max(4 * sum(slot.numel for slot in chunk.slots) for chunk in engine.chunks)
    assert live["now"] == 0


def test_checkpoints_of_the_base_model_load_through_its_prefix(models, tmp_path):
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(str(models["opt"]))
    full.model.save_pretrained(tmp_path)  # keys decoder.*, as OPT's original checkpoints have them
    assert all(not k.startswith("model.") for k in WeightFiles(tmp_path).where)
    engine = PlainEngine(_lazy_with(models["opt"], tmp_path), OptimConfig(), torch.float32, torch.device("cpu"))
    state = engine.state_dict()
    for name, value in full.state_dict().items():
        assert torch.equal(state[name], value), name


def _lazy_with(config_folder, weights_folder):
    from transformers import AutoConfig, AutoModelForCausalLM

    with empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(config_folder)))
    load_later(model, weights_folder)
    return model


def test_weights_that_do_not_fit_the_model_are_refused_by_name(models, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(models["opt"] / "model.safetensors"))
    missing = {k: v for k, v in weights.items() if not k.endswith("fc1.weight")}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=r"no tensor model.decoder.layers.0.fc1.weight"):
        _lazy_with(models["opt"], tmp_path)
    reshaped = weights | {"model.decoder.layers.0.fc1.weight": torch.zeros(3, 3)}
    save_file(reshaped, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=r"model.decoder.layers.0.fc1.weight has shape \[3, 3\]"):
        _lazy_with(models["opt"], tmp_path)
