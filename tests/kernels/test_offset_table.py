"""The offset tables the Triton wrappers hand their kernels: columns placed by name, not by order."""

import importlib

import pytest
import torch

from ferryman.kernels import _layout

# The package re-exports the ops under the module names: fetch the modules themselves.
ATTENTION = importlib.import_module("ferryman.kernels.attention")
SOFTMAX = importlib.import_module("ferryman.kernels.softmax")


def test_each_operand_lands_in_its_named_column():
    full = torch.zeros(3, 2, 4, 5)  # batch (3, 2) of [4, 5] matrices
    shared = torch.zeros(1, 2, 4, 5)  # broadcast over the first batch dim
    (first, second), width = _layout.table_columns(2)
    table = _layout.offset_table((3, 2), {second: full, first: shared}, width, "cpu")
    assert table.shape == (6, 2)
    assert table[:, 1].tolist() == [i * 40 + j * 20 for i in range(3) for j in range(2)]
    assert table[:, 0].tolist() == [j * 20 for _ in range(3) for j in range(2)]


@pytest.mark.parametrize("columns", [[0], [0, 2], [1, 2]])
def test_a_missing_column_is_refused(columns):
    with pytest.raises(ValueError, match="name each column once"):
        _layout.offset_table((2,), dict.fromkeys(columns), 2, "cpu")


@pytest.mark.parametrize(("module", "prefix"), [(ATTENTION, "FWD_"), (ATTENTION, "BWD_"), (SOFTMAX, "FWD_"), (SOFTMAX, "BWD_")])
def test_kernel_columns_number_the_table_without_gaps(module, prefix):
    width = int(getattr(module, prefix + "WIDTH"))
    columns = sorted(int(v) for k, v in vars(module).items() if k.startswith(prefix) and k != prefix + "WIDTH")
    assert columns == list(range(width))
