"""Damaged users' files become one UserError naming the file; pickles are refused unread."""

import os
import pickle
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ferryman.core.errors import UserError
from ferryman.core.files import (
    check_model_folder,
    check_safetensors,
    check_writable,
    load_npz,
    load_safetensors,
    reading,
)


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3)}, str(path))
    return path


def test_sound_safetensors_load(weights):
    assert load_safetensors(weights)["w"][999].item() == 999.0


@pytest.mark.parametrize("damage", ["truncate-data", "truncate-header", "zero-length", "garbage", "huge-header"])
def test_damaged_safetensors_name_the_file(weights, damage):
    data = weights.read_bytes()
    corrupted = {
        "truncate-data": data[: len(data) - 100],
        "truncate-header": data[:20],
        "zero-length": b"",
        "garbage": b"not a tensor file at all, just text" * 10,
        "huge-header": (2**40).to_bytes(8, "little") + data[8:],
    }[damage]
    weights.write_bytes(corrupted)
    with pytest.raises(UserError, match=rf"{weights}: cannot read this weights file; it looks damaged"):
        load_safetensors(weights)


def test_pickles_are_refused_by_name_and_by_content(tmp_path):
    bin_file = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, bin_file)
    with pytest.raises(UserError, match=r"pytorch_model.bin: LoRA weights in a pickle-based format"):
        check_safetensors(bin_file, "LoRA weights")
    disguised = tmp_path / "adapter.safetensors"
    disguised.write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))
    with pytest.raises(UserError, match=r"adapter.safetensors: weights in a pickle-based format"):
        load_safetensors(disguised, "weights")


def test_a_model_folder_with_a_pickled_weight_file_is_refused(tmp_path, weights):
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 8}')
    torch.save({"w": torch.ones(2)}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"text_encoder/pytorch_model.bin: weight file in text encoder"):
        check_model_folder(folder, "text encoder")
    (folder / "pytorch_model.bin").unlink()
    torch.save({"lr": 1e-4}, folder / "training_args.bin")  # a trainer's own pickle: from_pretrained never opens it
    check_model_folder(folder, "text encoder")
    (folder / "model.safetensors").write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"model.safetensors: cannot read this weight file"):
        check_model_folder(folder, "text encoder")
    (folder / "model.safetensors").write_bytes(weights.read_bytes())
    (folder / "config.json").write_text('{"hidden_size": ')
    with pytest.raises(UserError, match=r"config.json: cannot read this config file"):
        check_model_folder(folder, "text encoder")


@pytest.mark.parametrize("damage", ["truncate", "bit-flip"])
def test_damaged_npz_names_the_file(tmp_path, damage):
    path = tmp_path / "params_model_1.npz"
    np.savez(path, a=np.arange(5000, dtype=np.float32), b=np.ones(3))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # inside the first member's array data: only the CRC check sees it
        data[200] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"{path}: cannot read this parameter file"):
        load_npz(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match=r"nothing.npz: no such parameter file"):
        load_npz(tmp_path / "nothing.npz")
    with pytest.raises(UserError, match="no such checkpoint"), reading(tmp_path / "gone", "checkpoint"):
        pass


def test_check_writable(tmp_path):
    check_writable(tmp_path / "new" / "deeper")  # creatable: fine, and nothing is left behind
    assert sorted(os.listdir(tmp_path)) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"file: the output folder is an existing file"):
        check_writable(tmp_path / "file")
    with pytest.raises(UserError, match=r"cannot create the output folder: .*file is a file"):
        check_writable(tmp_path / "file" / "sub")
    with pytest.raises(UserError, match=r"the output video is an existing folder"):
        check_writable(tmp_path, "output video", is_dir=False)


def test_check_writable_probes_for_real(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        os.chmod(locked, 0o500)
        if os.access(locked, os.W_OK):
            pytest.skip("cannot make a folder unwritable here (root without chattr)")
    try:
        with pytest.raises(UserError, match=r"cannot write the output folder in .*locked"):
            check_writable(locked / "out")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
        os.chmod(locked, 0o700)


def test_a_json_header_that_is_not_a_safetensors_header_is_named(tmp_path):
    import json as _json
    import struct as _struct

    path = tmp_path / "odd.safetensors"
    header = _json.dumps({"w": None}).encode()
    path.write_bytes(_struct.pack("<Q", len(header)) + header)
    with pytest.raises(UserError, match=r"odd.safetensors: cannot read this weights file"):
        load_safetensors(path)
