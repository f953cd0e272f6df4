"""core/gemini/lazy.py on plain modules and hand-written safetensors files: which files a source
names, which tensor fills which parameter (prefixes, tied names), the placeholders, buffers, and
the one-line errors, each checked by value (the transformers models are in tests/apps/lm)."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ferryman.core.errors import UserError
from ferryman.core.gemini import GeminiConfig, OptimConfig, gemini
from ferryman.core.gemini.lazy import (
    InitialValues,
    WeightFiles,
    _candidates,
    empty_weights,
    is_deferred,
    load_later,
    materialize,
    take,
)


class Net(nn.Module):
    """Two layers, a frozen one, a tied head, a persistent and a non-persistent buffer."""

    base_model_prefix = ""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.lin = nn.Linear(3, 4)
        self.frozen = nn.Linear(4, 2)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(3))
        self.register_buffer("cache", torch.zeros(2), persistent=False)


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (5, 3), "lin.weight": (4, 3), "lin.bias": (4,), "frozen.weight": (2, 4),
              "frozen.bias": (2,), "scale": (3,)}
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def _lazy(source, cls=Net) -> nn.Module:
    with empty_weights():
        model = cls()
    load_later(model, source)
    return model


def test_a_file_a_folder_and_an_index_name_their_tensors(tmp_path):
    weights = _weights()
    single = tmp_path / "one.safetensors"
    save_file(weights, str(single), metadata={"format": "pt"})
    files = WeightFiles(single)
    assert files.source == single
    assert sorted(files.where) == sorted(weights)  # the header's __metadata__ is no tensor
    assert "__metadata__" not in files and "lin.weight" in files and "nope" not in files
    assert files.shape("lin.weight") == (4, 3) and files.shape("lin.bias") == (4,)
    assert torch.equal(files.read("frozen.weight"), weights["frozen.weight"])

    folder = tmp_path / "folder"
    folder.mkdir()
    names = sorted(weights)
    save_file({k: weights[k] for k in names[:3]}, str(folder / "b.safetensors"))
    save_file({k: weights[k] for k in names[3:]}, str(folder / "a.safetensors"))
    (folder / "notes.txt").write_text("not weights")
    files = WeightFiles(folder)  # every *.safetensors of the folder
    assert {k: p.name for k, p in files.where.items()} == {k: "b.safetensors" if k in names[:3] else "a.safetensors"
                                                           for k in names}
    assert all(torch.equal(files.read(k), weights[k]) for k in names)

    # with an index only the files it names count (a stray file's tensors are not the model's)
    save_file({"stray": torch.zeros(1)}, str(folder / "c.safetensors"))
    index = {"weight_map": {k: "b.safetensors" if k in names[:3] else "a.safetensors" for k in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    files = WeightFiles(folder)
    assert sorted(files.where) == names and "stray" not in files


def test_a_folder_without_weights_or_with_a_damaged_index_is_refused(tmp_path):
    with pytest.raises(UserError) as err:
        WeightFiles(tmp_path)
    assert str(err.value) == f"{tmp_path}: no safetensors weights (model.safetensors or model.safetensors.index.json)"
    (tmp_path / "model.safetensors.index.json").write_text("{")
    with pytest.raises(UserError, match=r"model\.safetensors\.index\.json: cannot read this weight index"):
        WeightFiles(tmp_path)


def test_prefix_candidates():
    assert _candidates("model.a.weight", "model") == ["model.a.weight", "a.weight"]
    assert _candidates("a.weight", "model") == ["a.weight", "model.a.weight"]
    assert _candidates("a.weight", "") == ["a.weight"]
    assert _candidates("modelx.a", "model") == ["modelx.a", "model.modelx.a"]  # a prefix is a whole name part


def test_placeholders_wait_for_the_files_and_engines_start_from_them(tmp_path):
    weights = _weights()
    save_file(weights, str(tmp_path / "model.safetensors"))
    model = _lazy(tmp_path)
    params = dict(model.named_parameters())
    assert all(is_deferred(p) for p in params.values())
    assert model.head.weight is model.embed.weight  # tied parameters stay one parameter
    for name, p in params.items():
        assert p.shape == weights[name].shape and p.dtype == torch.float32 and p.device.type == "cpu"
        assert torch.isnan(p).all() and p.untyped_storage().nbytes() == p.element_size()  # no storage
    assert [n for n, p in params.items() if not p.requires_grad] == ["frozen.weight", "frozen.bias"]
    assert torch.equal(model.scale, weights["scale"])  # persistent buffers are read at once
    assert torch.equal(model.cache, torch.zeros(2))

    values = InitialValues(params)
    assert list(values) == list(params) and len(values) == len(params)
    assert torch.equal(values["lin.weight"], weights["lin.weight"])
    assert not is_deferred(params["lin.weight"])  # read once, then forgotten
    assert torch.isnan(values["lin.weight"]).all()  # a second read gives the parameter as it is
    assert take(params["lin.weight"]) is None

    engine = gemini(_lazy(tmp_path), GeminiConfig(placement="static", precision="fp32"), OptimConfig())
    state = engine.state_dict()
    for name, value in weights.items():
        assert torch.equal(state[name], value), name
    assert torch.equal(state["head.weight"], weights["embed.weight"])


def test_materialize_reads_each_tensor_in_the_parameters_dtype(tmp_path):
    weights = _weights()
    save_file(weights, str(tmp_path / "model.safetensors"))
    model = _lazy(tmp_path)
    model.lin.weight.data = model.lin.weight.data.to(torch.float64)  # a parameter of another dtype
    extra = nn.Parameter(torch.full((2,), 7.0))
    model.extra = extra  # not deferred: kept as it is
    materialize(model, torch.device("cpu"))
    assert model.lin.weight.dtype == torch.float64
    assert torch.equal(model.lin.weight, weights["lin.weight"].double())
    for name in ("embed.weight", "lin.bias", "frozen.weight", "frozen.bias"):
        assert torch.equal(model.get_parameter(name), weights[name]), name
    assert model.head.weight is model.embed.weight and not any(is_deferred(p) for p in model.parameters())
    assert model.extra is extra and torch.equal(extra, torch.full((2,), 7.0))


class Prefixed(Net):
    base_model_prefix = "model"


def test_names_are_found_with_the_prefix_removed_or_added(tmp_path):
    weights = _weights()
    save_file({f"model.{k}": v for k, v in weights.items()}, str(tmp_path / "added.safetensors"))
    model = _lazy(tmp_path / "added.safetensors", Prefixed)  # the file has model.*, the model not
    materialize(model, torch.device("cpu"))
    assert torch.equal(model.lin.weight, weights["lin.weight"])
    assert torch.equal(model.scale, weights["scale"])

    class Outer(nn.Module):
        base_model_prefix = "model"

        def __init__(self) -> None:
            super().__init__()
            self.model = Net()

    save_file(weights, str(tmp_path / "bare.safetensors"))
    outer = _lazy(tmp_path / "bare.safetensors", Outer)  # the model has model.*, the file not
    materialize(outer, torch.device("cpu"))
    assert torch.equal(outer.model.frozen.bias, weights["frozen.bias"])
    assert torch.equal(outer.model.scale, weights["scale"])


def test_a_tied_parameter_is_found_under_any_of_its_names(tmp_path):
    weights = _weights()
    weights["head.weight"] = weights.pop("embed.weight")  # saved under the second name only
    save_file(weights, str(tmp_path / "model.safetensors"))
    model = _lazy(tmp_path)
    materialize(model, torch.device("cpu"))
    assert torch.equal(model.embed.weight, weights["head.weight"]) and model.head.weight is model.embed.weight


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    weights = _weights()
    path = tmp_path / "model.safetensors"
    save_file({k: v for k, v in weights.items() if k != "lin.bias"}, str(path))
    with pytest.raises(UserError) as err:
        _lazy(path)
    assert str(err.value) == f"{path}: no tensor lin.bias (nor -); are these the weights of this model?"
    save_file({k: v for k, v in weights.items() if k != "embed.weight"}, str(path))
    with pytest.raises(UserError) as err:
        _lazy(path)
    assert str(err.value) == f"{path}: no tensor embed.weight (nor head.weight); are these the weights of this model?"
    save_file({f"model.{k}": v for k, v in weights.items() if k != "lin.bias"}, str(path))
    with pytest.raises(UserError) as err:
        _lazy(path, Prefixed)
    assert str(err.value) == f"{path}: no tensor lin.bias (nor model.lin.bias); are these the weights of this model?"
    save_file(weights | {"lin.weight": torch.zeros(3, 4)}, str(path))
    with pytest.raises(UserError) as err:
        _lazy(path)
    assert str(err.value) == f"{path}: lin.weight has shape [3, 4], the model's lin.weight [4, 3]"


class MetaBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("table", torch.empty(3, device="meta", dtype=torch.float64))
        self.register_buffer("scratch", torch.empty(2, device="meta"), persistent=False)


def test_buffers_come_from_the_files_when_they_are_persistent(tmp_path):
    """A persistent buffer the model built on the meta device is filled from the files too (it
    was left on meta, where ``copy_`` does nothing, and building an engine ended in a traceback)."""
    weights = {"lin.weight": torch.ones(2, 2), "lin.bias": torch.zeros(2), "table": torch.arange(3.0),
               "scratch": torch.full((2,), 5.0)}
    path = tmp_path / "model.safetensors"
    save_file(weights, str(path))
    with empty_weights():
        model = MetaBuffer()
    model.scratch = torch.zeros(2)  # a non-persistent buffer made real by the model itself
    load_later(model, path)
    assert model.table.dtype == torch.float64 and torch.equal(model.table, torch.arange(3.0, dtype=torch.float64))
    assert torch.equal(model.scratch, torch.zeros(2))  # not in a state dict: never read from the files
    engine = gemini(model, GeminiConfig(precision="fp32"), OptimConfig())
    assert torch.equal(engine.state_dict()["table"], torch.arange(3.0, dtype=torch.float64))

    with empty_weights():
        model = MetaBuffer()
    model.table = torch.zeros(3)
    with pytest.raises(UserError) as err:
        load_later(model, path)  # scratch is still on meta and no file may fill it
    assert str(err.value) == f"{path}: no tensor for the buffer scratch, which the model built on the meta device"
    save_file({k: v for k, v in weights.items() if k != "table"}, str(path))
    with empty_weights():
        model = MetaBuffer()
    model.scratch = torch.zeros(2)
    with pytest.raises(UserError, match="no tensor for the buffer table,"):
        load_later(model, path)


def test_a_meta_buffer_of_a_submodule_is_filled_in_its_owner(tmp_path):
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = MetaBuffer()

    weights = {"inner.lin.weight": torch.ones(2, 2), "inner.lin.bias": torch.zeros(2), "inner.table": torch.arange(3.0)}
    save_file(weights, str(tmp_path / "model.safetensors"))
    with empty_weights():
        model = Outer()
    model.inner.scratch = torch.zeros(2)
    load_later(model, tmp_path)
    assert set(model.inner._buffers) == {"table", "scratch"} and not model._buffers
    assert torch.equal(model.inner.table, torch.arange(3.0, dtype=torch.float64))


def test_any_weight_source_object_serves(tmp_path):
    class Source:
        source = "generated"

        def __contains__(self, key):
            return key in {"lin.weight", "lin.bias", "table"}

        def shape(self, key):
            return {"lin.weight": (2, 2), "lin.bias": (2,), "table": (3,)}[key]

        def read(self, key):
            return torch.full(self.shape(key), float(len(key)))

    with empty_weights():
        model = MetaBuffer()
    model.scratch = torch.zeros(2)
    load_later(model, Source())
    materialize(model, torch.device("cpu"))
    assert torch.equal(model.lin.weight, torch.full((2, 2), 10.0))
    assert torch.equal(model.table, torch.full((3,), 5.0))


def test_damaged_weight_files_are_named_as_weight_files(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_weights(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-8])  # the header promises more than the file holds
    with pytest.raises(UserError, match=r"model\.safetensors: cannot read this weight file; it looks damaged"):
        WeightFiles(path)
    path.write_bytes(data)
    files = WeightFiles(path)
    path.write_bytes(data[:200])  # cut after the header was checked: the read fails
    with pytest.raises(UserError, match=r"model\.safetensors: cannot read this weight file; it looks damaged"):
        files.read("scale")


def test_placeholders_keep_the_parameters_dtype_and_real_parameters_are_left_alone(tmp_path):
    weights = _weights()
    save_file(weights, str(tmp_path / "model.safetensors"))
    with empty_weights():
        model = Net()
    model.lin.to(torch.bfloat16)
    model.frozen.weight = nn.Parameter(torch.ones(2, 4), requires_grad=False)  # real, before a meta one
    load_later(model, tmp_path)
    assert model.lin.weight.dtype == torch.bfloat16 and torch.isnan(model.lin.weight).all()
    assert not is_deferred(model.frozen.weight) and torch.equal(model.frozen.weight, torch.ones(2, 4))
    assert is_deferred(model.frozen.bias)  # the module's next parameter is still taken from the files
    materialize(model, torch.device("cpu"))
    assert torch.equal(model.frozen.bias, weights["frozen.bias"])
    assert torch.equal(model.lin.weight, weights["lin.weight"].bfloat16())


def test_the_missing_tensor_message_lists_every_name_tried(tmp_path):
    class TiedPrefixed(Net):
        base_model_prefix = "model"

    weights = {k: v for k, v in _weights().items() if k != "embed.weight"}
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError) as err:
        _lazy(tmp_path, TiedPrefixed)
    assert str(err.value) == (f"{tmp_path}: no tensor embed.weight (nor head.weight, model.embed.weight); "
                              "are these the weights of this model?")
    save_file({}, str(tmp_path / "model.safetensors"))
    with empty_weights():
        bare = MetaBuffer()  # no base_model_prefix at all: nothing else is tried
    with pytest.raises(UserError) as err:
        load_later(bare, tmp_path)
    assert str(err.value) == f"{tmp_path}: no tensor lin.weight (nor -); are these the weights of this model?"
