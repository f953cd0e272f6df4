"""The GPU build of every kernel, checked without a GPU: Triton compiles each kernel with the
tile sizes the host wrappers pick on CUDA, through ptxas, for an H100 (sm_90), and the shared
memory it asks for must fit the device. The interpreter tests check the numbers; this checks
the compiled path that only a GPU session can run.
"""

import json
import subprocess
import sys

import pytest

H100_SHARED_BYTES = 232448  # 227 KiB opt-in shared memory per block on sm_90

_SCRIPT = r"""
import importlib, inspect, json, sys
import torch, triton
from triton.backends.compiler import GPUTarget

att = importlib.import_module("ferryman.kernels.attention")
sm = importlib.import_module("ferryman.kernels.softmax")
ln = importlib.import_module("ferryman.kernels.layer_norm")
FP32_PTRS = {"LSE", "DELTA", "DB", "MEAN", "RSTD", "PARTIAL"}
FLOATS = {"scale_log2", "scale", "eps"}

def build(kernel, dtype, consts, launch):
    params = list(inspect.signature(kernel.fn).parameters)
    sig = {}
    for p in params:
        if p in consts:
            sig[p] = "constexpr"
        elif p == "MASK":
            sig[p] = "*u8"
        elif p == "TABLE":
            sig[p] = "*i64"
        elif p in FP32_PTRS:
            sig[p] = "*fp32"
        elif p.isupper() or p in ("B0", "B1"):
            sig[p] = "*" + dtype
        else:
            sig[p] = "fp32" if p in FLOATS else "i32"
    src = triton.compiler.ASTSource(fn=kernel, signature=sig,
                                    constexprs={(params.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch)
    return compiled.metadata.shared

out = []
torch_dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
for dtype, head_block in (("bf16", 32), ("bf16", 128), ("fp32", 32)):
    for kind, kernel, extra in (("fwd", att._attn_fwd_kernel, {}), ("bwd", att._attn_bwd_dkdv_kernel, {}),
                                ("bwd", att._attn_bwd_dq_db_kernel, {"COMPUTE_DQ": True, "COMPUTE_DB": True})):
        cfg = att.kernel_config(kind, 1024, head_block, torch_dtypes[dtype])
        launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
        consts = dict(NUM_BIAS=2, HAS_MASK=True, BLOCK_D=head_block, **cfg, **extra)
        out.append([kernel.fn.__name__, dtype, head_block, build(kernel, dtype, consts, launch)])
for mod, kernel, consts in ((sm, sm._softmax_fwd_kernel, dict(HAS_BIAS=True, HAS_MASK=True)),
                            (sm, sm._softmax_bwd_kernel, {}), (ln, ln._ln_fwd_kernel, dict(HAS_W=True, HAS_B=True)),
                            (ln, ln._ln_bwd_kernel, dict(HAS_W=True, NEED_WB=True))):
    block_r, block_c, warps = mod._launch_config(8192, 1024)
    shared = build(kernel, "bf16", dict(consts, BLOCK_R=block_r, BLOCK_C=block_c), {"num_warps": warps})
    out.append([kernel.fn.__name__, "bf16", block_c, shared])
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_kernels_compile_for_h100_and_fit_shared_memory():
    env = {"PATH": "/usr/bin:/bin", "TRITON_DEFAULT_FP_FUSION": "1"}  # no TRITON_INTERPRET: real JIT
    res = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    compiled = json.loads(line[len("RESULT "):])
    assert len(compiled) == 13
    for name, dtype, width, shared in compiled:
        assert 0 < shared <= H100_SHARED_BYTES, f"{name} {dtype} width {width}: {shared} bytes of shared memory"
