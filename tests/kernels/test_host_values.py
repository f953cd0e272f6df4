"""The host side of the fused ops, value by value: launch tiles, broadcast strides, gradient
reduction and backend choice.

The parity tests run the kernels under the interpreter, where the wrappers pick interpreter tiles;
the tiles a GPU gets (the ones tests/kernels/test_gpu_compile.py compiles for sm_90 and checks
against its shared memory) are pinned here by switching the interpreter flag off in the module
that reads it.
"""

import importlib

import pytest
import torch

from ferryman.kernels import _layout, interpreter_enabled, resolve_backend
from ferryman.kernels import backend as backend_mod

ATTENTION = importlib.import_module("ferryman.kernels.attention")
LAYER_NORM = importlib.import_module("ferryman.kernels.layer_norm")
SOFTMAX = importlib.import_module("ferryman.kernels.softmax")


@pytest.mark.parametrize(("n", "want"), [(0, 1), (1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (1023, 1024), (1024, 1024)])
def test_next_pow2(n, want):
    assert _layout.next_pow2(n) == want


@pytest.mark.parametrize(("rows", "cols", "interpreted", "want"), [
    # GPU: at most 4096 elements (and 4096 rows) per program, 4..16 warps, one warp per 1024 elements.
    (8192, 1024, False, (4, 1024, 4)),
    (8192, 64, False, (64, 64, 4)),
    (100000, 1, False, (4096, 1, 4)),
    (3, 100, False, (4, 128, 4)),
    (2, 65536, False, (1, 65536, 16)),
    (2, 8192, False, (1, 8192, 8)),
    # Interpreter: up to 64 rows and 65536 elements per program.
    (1000, 1024, True, (64, 1024, 16)),
    (1000, 128, True, (64, 128, 8)),
    (1000, 8, True, (64, 8, 4)),
    (5, 10, True, (8, 16, 4)),
    (2, 32768, True, (2, 32768, 16)),
    (5, 131072, True, (1, 131072, 16)),
])
def test_row_launch_config(rows, cols, interpreted, want):
    got = _layout.row_launch_config(rows, cols, interpreted)
    assert got == want
    assert all(type(v) is int for v in got)  # compile-time constants of the kernels: 4.0 is no tile size


def test_row_kernels_ask_for_the_tiles_of_where_they_run(monkeypatch):
    for module in (LAYER_NORM, SOFTMAX):
        assert module._launch_config(1000, 128) == (64, 128, 8)  # the tests run interpreted
        monkeypatch.setattr(module, "interpreter_enabled", lambda: False)
        assert module._launch_config(8192, 1024) == (4, 1024, 4)


def test_layer_norm_partial_sums_per_program(monkeypatch):
    # dweight/dbias: one fp32 partial per program, at most 4 interpreted and 256 on a GPU.
    assert LAYER_NORM._num_partials(300, 64) == 4
    assert LAYER_NORM._num_partials(100, 64) == 2
    assert LAYER_NORM._num_partials(1, 64) == 1
    monkeypatch.setattr(LAYER_NORM, "interpreter_enabled", lambda: False)
    assert LAYER_NORM._num_partials(100000, 4) == 256
    assert LAYER_NORM._num_partials(40, 4) == 10


@pytest.mark.parametrize(("kind", "n_q", "head_block", "dtype", "want"), [
    ("fwd", 1024, 32, torch.bfloat16, (128, 64, 4, 3)),
    ("fwd", 1024, 128, torch.bfloat16, (128, 64, 8, 3)),
    ("fwd", 1024, 64, torch.float16, (128, 64, 4, 3)),
    ("fwd", 1024, 32, torch.float32, (64, 32, 4, 2)),
    ("bwd", 1024, 32, torch.bfloat16, (64, 64, 4, 2)),
    ("bwd", 1024, 128, torch.bfloat16, (64, 64, 8, 2)),
    ("bwd", 1024, 64, torch.bfloat16, (64, 64, 4, 2)),
    ("bwd", 1024, 32, torch.float32, (32, 32, 4, 2)),
    ("fwd", 1024, 256, torch.bfloat16, (64, 32, 8, 2)),
    ("bwd", 1024, 256, torch.float32, (64, 32, 8, 2)),
    ("fwd", 5, 32, torch.bfloat16, (16, 64, 4, 3)),  # a few queries: the smallest tl.dot tile
    ("fwd", 40, 32, torch.bfloat16, (64, 64, 4, 3)),
    ("bwd", 20, 32, torch.float32, (32, 32, 4, 2)),
])
def test_attention_gpu_tiles(monkeypatch, kind, n_q, head_block, dtype, want):
    monkeypatch.setattr(ATTENTION, "interpreter_enabled", lambda: False)
    got = ATTENTION.kernel_config(kind, n_q, head_block, dtype)
    assert got == dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), want))


@pytest.mark.parametrize(("n_q", "block_m"), [(1, 16), (20, 32), (64, 64), (1000, 64)])
def test_attention_interpreter_tiles(n_q, block_m):
    for kind in ("fwd", "bwd"):
        got = ATTENTION.kernel_config(kind, n_q, 256, torch.float32)
        assert got == dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=4, num_stages=1)


def test_lift_prepends_broadcast_dims():
    t = torch.arange(6.0).reshape(2, 3)
    assert _layout.lift(None, 4) is None
    assert _layout.lift(t, 2) is t
    lifted = _layout.lift(t, 4)
    assert lifted.shape == (1, 1, 2, 3) and torch.equal(lifted[0, 0], t)
    with pytest.raises(ValueError, match=r"^tensor of shape \(2, 3\) has more dims than the logits \(1\)$"):
        _layout.lift(t, 1)


def test_matrix_strides_are_zero_along_broadcast_dims():
    assert _layout.matrix_strides(None) == (0, 0)
    assert _layout.matrix_strides(torch.zeros(2, 3, 4)) == (4, 1)
    assert _layout.matrix_strides(torch.zeros(2, 1, 4)) == (0, 1)
    assert _layout.matrix_strides(torch.zeros(2, 3, 1)) == (1, 0)
    assert _layout.matrix_strides(torch.zeros(3, 2, 4)) == (4, 1)  # two rows are two rows
    assert _layout.matrix_strides(torch.zeros(3, 2)) == (2, 1)
    assert _layout.matrix_strides(torch.zeros(5, 3).t()) == (1, 3)
    assert _layout.matrix_strides(torch.zeros(1, 1)) == (0, 0)


def test_batch_strides_against_the_batch_shape():
    assert _layout.batch_strides(None, (3, 2)) == [0, 0]
    assert _layout.batch_strides(torch.zeros(3, 2, 4, 5), (3, 2)) == [40, 20]
    assert _layout.batch_strides(torch.zeros(3, 1, 4, 5), (3, 2)) == [20, 0]
    assert _layout.batch_strides(torch.zeros(2, 4, 5), (3, 2)) == [0, 20]  # lifted: broadcast over dim 0
    assert _layout.batch_strides(torch.zeros(1, 1, 4, 5), (1, 1)) == [0, 0]
    assert _layout.batch_strides(torch.zeros(2, 2, 4, 5).transpose(0, 1), (2, 2)) == [20, 40]
    with pytest.raises(ValueError, match=r"^shape \(2, 4, 5\) does not broadcast to batch \(3,\)$"):
        _layout.batch_strides(torch.zeros(2, 4, 5), (3,))
    with pytest.raises(ValueError, match=r"^shape \(3, 4, 5\) does not broadcast to batch \(2,\)$"):
        _layout.batch_strides(torch.zeros(3, 4, 5), (2,))


def test_table_columns_number_from_zero():
    columns, width = _layout.table_columns(3)
    assert [int(c) for c in columns] == [0, 1, 2] and int(width) == 3


def test_offset_table_of_three_batch_dims_with_an_unread_column():
    batch = (2, 3, 2)
    full = torch.zeros(*batch, 4, 5)
    middle = torch.zeros(1, 3, 1, 4, 5)
    (a, b, c), width = _layout.table_columns(3)
    table = _layout.offset_table(batch, {a: full, b: middle, c: None}, width, "cpu")
    assert table.dtype == torch.int64 and table.shape == (12, 3)
    want_full = [i * 120 + j * 40 + k * 20 for i in range(2) for j in range(3) for k in range(2)]
    want_middle = [j * 20 for i in range(2) for j in range(3) for k in range(2)]
    assert table[:, 0].tolist() == want_full
    assert table[:, 1].tolist() == want_middle
    assert table[:, 2].tolist() == [0] * 12
    with pytest.raises(ValueError, match=r"^offset table of width 3 given columns \[0, 1\]: name each column once$"):
        _layout.offset_table(batch, {a: full, b: full}, width, "cpu")


def test_reduce_to_sums_broadcast_dims_in_fp32():
    grad = torch.arange(24.0).reshape(2, 3, 4)
    out = _layout.reduce_to(grad, (3, 1), torch.float64)
    assert out.dtype == torch.float64 and out.shape == (3, 1)
    assert out.flatten().tolist() == [grad[:, i].sum().item() for i in range(3)]
    same = _layout.reduce_to(grad, (2, 3, 4), torch.float16)
    assert same.dtype == torch.float16 and torch.equal(same, grad.half())
    lifted = _layout.reduce_to(grad, (1, 4), torch.float32)
    assert lifted.flatten().tolist() == grad.sum(dim=(0, 1)).tolist()
    # 3000 fp16 values of 1 + 2^-10: their sum, 3002.9296875, is exact in fp32; fp16 holds 3002 or 3004.
    many = torch.full((3000, 1), 1 + 2**-10, dtype=torch.float16)
    assert _layout.reduce_to(many, (1, 1), torch.float32).item() == 3002.9296875


def test_device_guard_on_cpu_is_a_no_op():
    with _layout.device_guard(torch.zeros(1)) as guard:
        assert guard is None


def test_interpreter_flag_is_read_when_asked(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreter_enabled() is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert interpreter_enabled() is False
    monkeypatch.delenv("TRITON_INTERPRET")
    assert interpreter_enabled() is False


def test_backend_messages(monkeypatch):
    cpu = torch.zeros(2)
    with pytest.raises(ValueError, match=r"^kernel backend must be one of auto, triton, torch, got 'cuda'$"):
        resolve_backend("cuda", cpu)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=(
            r"^kernel backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before ferryman\.kernels is "
            r"imported to run the kernels on CPU; use backend='torch' instead$")):
        resolve_backend("triton", cpu)
    monkeypatch.setattr(backend_mod, "_INTERPRETED_AT_IMPORT", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=(
            r"^kernel backend 'triton' on CPU tensors: TRITON_INTERPRET=1 was set after ferryman\.kernels was "
            r"imported; set it before the import, or use backend='torch'$")):
        resolve_backend("triton", cpu)
    monkeypatch.setattr(backend_mod, "triton_available", lambda: False)
    with pytest.raises(ValueError, match=(
            r"^kernel backend 'triton' was requested but triton is not installed \(pip install "
            r"'ferryman\[kernels\]'\), or use backend='torch'$")):
        resolve_backend("triton", cpu)


def test_backend_choice_table(monkeypatch):
    cpu = torch.zeros(2)
    assert resolve_backend("torch", cpu) == "torch"
    assert resolve_backend("auto", cpu) == "triton"  # interpreted, as the tests run
    assert resolve_backend("triton", cpu) == "triton"
    assert resolve_backend("auto") == "triton"
    monkeypatch.setattr(backend_mod, "_INTERPRETED_AT_IMPORT", False)
    assert resolve_backend("auto", cpu) == "torch"
    monkeypatch.setattr(backend_mod, "_INTERPRETED_AT_IMPORT", True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", cpu) == "torch"
