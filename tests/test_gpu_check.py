"""The GPU check (benchmarks/gpu_check.py) and the generated benchmark page, checked without a GPU.

The dry run is the GPU check's own code path on CPU at toy sizes: every step must run or be
skipped with its stated reason, every JSON it writes must say where and how it was made, and
every package a step imports must be on the device image or declared, so a broken step shows
up here instead of on a 15-minute device loan. The CUDA-only code the check relies on is checked
as far as a machine without CUDA can: the kernels' sm_90 build is tests/kernels/test_gpu_compile.py;
the stream and pinned-memory paths are resolved against this torch below.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import report  # noqa: E402
from gpu_steps import BUDGET_S, HARNESS_S, STEPS  # noqa: E402


def run_check(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(Path.home())}
    return subprocess.run([sys.executable, "benchmarks/gpu_check.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry")
    proc = run_check("--dry-run", "--out", str(out), "--results", str(out))
    assert (out / "gpu_check.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out, json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow
def test_dry_run_runs_every_step_or_says_why(dry_run):
    proc, _, bundle = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r["step"] for r in bundle["steps"]] == [s.name for s in STEPS]
    for step, record in zip(STEPS, bundle["steps"]):
        expected = gpu_check.skip_reason(step, dry=True)
        if expected is None:
            assert record["status"] == "ok", record
            assert record["json"] and record["wall_s"] > 0
        else:
            assert record["status"] == "skipped" and record["reason"] == expected and expected.strip()
    assert sum(r["status"] == "ok" for r in bundle["steps"]) >= 6  # the tests and five benchmarks at least


@pytest.mark.slow
def test_dry_run_json_names_device_and_command(dry_run):
    _, out, bundle = dry_run
    ran = [r for r in bundle["steps"] if r["status"] == "ok"]
    for record in ran:
        payload = json.loads((out / Path(record["json"]).name).read_text())
        assert payload == bundle["results"][record["step"]]
        assert report.env_of(payload)["device"].startswith("cpu: ")
        assert report.env_of(payload)["date"]
        step = next(s for s in STEPS if s.name == record["step"])
        command = payload["gpu_check"]["command"]
        assert (step.script in command) if step.script != "pytest" else ("-m gpu" in command), command
        assert report.bench_key(payload, Path(record["json"])) == step.benchmark
    tests = bundle["results"]["pytest_gpu"]
    assert tests["tests"] > 0 and tests["skipped"] == tests["tests"]  # collected, and skipped without CUDA


@pytest.mark.slow
def test_dry_run_summary_lists_every_step_and_prints_last(dry_run):
    proc, out, _ = dry_run
    summary = (out / "summary.md").read_text()
    for step in STEPS:
        assert re.search(rf"^\| {step.name} \| (ok|skipped) \|", summary, re.M), step.name
    assert proc.stdout.rstrip().endswith(summary.rstrip())
    plan_at = proc.stdout.index("Estimated GPU time: at most")
    assert plan_at < proc.stdout.index(f"== {STEPS[0].name}")


@pytest.mark.slow
def test_every_import_a_step_needs_is_on_the_device_or_declared(dry_run):
    _, _, bundle = dry_run
    for record in bundle["steps"]:
        assert record.get("undeclared_imports", []) == [], (
            f"{record['step']} imports {record['undeclared_imports']}, which the device image lacks: add them to "
            f"the step's needs in benchmarks/gpu_steps.py (make gpu-wheels then carries them)")


def test_gpu_caps_fit_the_loan():
    gpu = [s for s in STEPS if s.gpu is not None]
    assert sum(s.cap_s for s in gpu) + HARNESS_S <= BUDGET_S <= 8 * 60
    assert all(s.cap_s > 0 for s in gpu)
    assert len({s.name for s in STEPS}) == len(STEPS)
    assert all(s.skip_gpu for s in STEPS if s.gpu is None) and all(s.skip_dry for s in STEPS if s.dry is None)


@pytest.mark.parametrize("step", [s for s in STEPS if s.script != "pytest" and (ROOT / s.script).is_file()],
                         ids=lambda s: s.name)
def test_step_flags_exist_in_the_script(step):
    """The GPU arguments never run here: a flag renamed in a script must fail now, not on the device."""
    source = (ROOT / step.script).read_text()
    declared = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", source))
    used = {a for a in (*(step.gpu or ()), *(step.dry or ()), step.json_flag) if a.startswith("--")}
    assert used <= declared, f"{step.script} has no {sorted(used - declared)}"


def _fake_script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_step_over_its_cap_is_killed_and_the_rest_go_on(tmp_path, monkeypatch):
    pid_file = tmp_path / "grandchild.pid"
    slow = _fake_script(tmp_path, "slow", f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(120)
    """)
    good = _fake_script(tmp_path, "good", """
        import json, sys
        json.dump({"env": {"device": "cpu: test", "command": "good.py"}, "rows": [{"a": 1}]}, open(sys.argv[-1], "w"))
    """)
    broken = _fake_script(tmp_path, "broken", "raise ModuleNotFoundError(\"No module named 'nothere'\")\n")
    steps = (gpu_check.Step(name="slow", script=slow, claim="sleeps", gpu=(), dry=(), cap_s=5, dry_cap_s=3),
             gpu_check.Step(name="good", script=good, claim="writes JSON", gpu=(), dry=(), cap_s=5),
             gpu_check.Step(name="broken", script=broken, claim="fails", gpu=(), dry=(), cap_s=5),
             gpu_check.Step(name="lacking", script=good, claim="needs", gpu=(), dry=(), cap_s=5,
                            needs=("no-such-distribution-xyz",)))  # fmt: skip
    monkeypatch.setattr(gpu_check, "STEPS", steps)
    code = gpu_check.main(["--dry-run", "--out", str(tmp_path / "out"), "--results", str(tmp_path / "res")])
    bundle = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    status = {r["step"]: r for r in bundle["steps"]}
    assert code == 1
    assert status["slow"]["status"] == "timeout" and status["slow"]["wall_s"] < 30
    assert not _running(int(pid_file.read_text()))  # the step's whole process group went
    assert status["good"]["status"] == "ok" and (tmp_path / "res" / "good-dry.json").is_file()
    assert status["broken"]["status"] == "failed" and "module nothere is missing" in status["broken"]["reason"]
    assert status["lacking"]["status"] == "skipped" and "no-such-distribution-xyz" in status["lacking"]["reason"]

    unpacked = tmp_path / "unpacked"
    gpu_check.main(["--unpack", str(tmp_path / "out" / "gpu_check.json"), "--results", str(unpacked)])
    assert [p.name for p in unpacked.glob("*.json")] == ["good-dry.json"]
    assert json.loads((unpacked / "good-dry.json").read_text())["gpu_check"]["status"] == "ok"


def test_a_gpu_run_without_cuda_ends_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_check("--only", "kernels", "--out", "/tmp/unused-gpu-check", timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["Error: no CUDA device here; on a machine without a GPU run --dry-run"]


# ------------------------------------------------------------------------ the generated page
def test_committed_page_is_what_the_generator_writes():
    assert (ROOT / "docs" / "benchmarks.md").read_text() == report.page(), (
        "docs/benchmarks.md is generated: edit benchmarks/notes/*.md or the results, then run make bench-report")


def _gpu_json(folder: Path, name: str, payload: dict, script: str = "") -> None:
    env = {"device": "cuda: NVIDIA H100 80GB HBM3", "date": "2026-12-06 10:00 UTC", "command": f"{script or name}.py"}
    (folder / f"{name}-cuda.json").write_text(json.dumps({"env": env, **payload}))


def _attn(case: str, k_len: int, fused: float, eager: float, sdpa: float, peak: float) -> dict:
    timing = lambda ms, mib=1.0: {"fwd": {"ms": ms, "peak_mib": mib}, "fwd_bwd": {"ms": ms, "peak_mib": mib}}  # noqa: E731
    return {"case": case, "k_len": k_len, "fused": timing(fused, peak), "eager": timing(eager), "sdpa": timing(sdpa)}


def test_targets_hold_miss_or_stay_undecided(tmp_path):
    _gpu_json(tmp_path, "kernels", {
        "attention": [_attn("af2_msa_row N=256", 256, 1.0, 2.5, 1.3, 1), _attn("af2_triangle N=256", 256, 1.0, 1.5, 1.1, 1),
                      _attn("scaling K=1024", 1024, 1, 1, 1, 10.0), _attn("scaling K=2048", 2048, 1, 1, 1, 20.5)]})
    _gpu_json(tmp_path, "kernels_bandwidth", {"softmax": [{"case": "s", "pct_of_copy_fwd": 81.0}],
                                              "layer_norm": [{"case": "l", "pct_of_copy_fwd": 52.0}]}, script="kernels")
    _gpu_json(tmp_path, "fastfold_inference", {"rows": [{"N_res": 1024, "speedup": 2.4}], "max_n_res_bf16": 10240,
                                               "find_max": {"start": 4096, "step": 2048, "limit": 12288, "at_limit": False}})
    _gpu_json(tmp_path, "gemini", {"rows": [{"method": m, "size": "1.3B", "tflops": t, "mfu": t / 989}
                                            for m, t in (("plain", 400.0), ("gemini", 380.0), ("fsdp2", 200.0))],
                                   "largest": [{"method": "plain", "largest": ">= 1.3B", "largest_M": 1300},
                                               {"method": "gemini", "largest": ">= 1.3B", "largest_M": 1300, "x_plain": 1.0}]})
    found = report.load_results(tmp_path)
    rows = [row for b in report.tables.BENCHES for row in report.target_rows(b, found.get(b.key, []))]
    status = {row["target"]: (row["measured on GPU"], row["status"]) for row in rows}
    assert len(rows) == len(status)  # targets split between two runs of one script: one row each
    assert status["attention with pair bias, fwd+bwd >= 2x the eager reference (every AF2 case)"] == ("1.5x", "**miss**")
    assert status["attention with pair bias, fwd+bwd >= 1.2x SDPA given the same bias (every AF2 case)"][1] == "**miss**"
    assert status["attention peak memory linear in key length"][1] == "**hold**"
    assert status["softmax forward >= 70% of the measured copy bandwidth (every case)"] == ("81%", "**hold**")
    assert status["LayerNorm forward >= 70% of the measured copy bandwidth (every case)"] == ("52%", "**miss**")
    assert status["10,000 residues in bf16 on one 80 GB GPU (FastFold's figure)"] == ("10,240 residues", "**hold**")
    assert status[">= 2x faster than eager at N_res 1024"] == ("2.4x", "**hold**")
    assert status["largest model >= 5x plain PyTorch's on the same GPU"][1] == "not decided"
    assert status["throughput >= 1.4x FSDP2 + CPUOffloadPolicy (largest size both train)"] == ("1.9x at 1.3B", "**hold**")
    assert status["MFU >= 45% (best size)"][1] == "**miss**"
    assert status["every test marked gpu passes"] == ("-", "not measured yet")

    text = report.page(tmp_path)
    kernels = text[text.index("## Kernels"):text.index("## Gemini")]
    assert "NVIDIA H100 80GB HBM3" in kernels and "Not measured yet" not in kernels
    assert "Not measured yet" in text[text.index("## SD finetune"):]


# ----------------------------------------------------------- GPU-only paths, checked on a CPU
def test_find_max_stops_at_its_limit():
    """fastfold_inference --find-max --max-n-res: at most one forward per try, doubling stopped at the limit."""
    import fastfold_inference

    def fake(limit):
        tried = []

        class Fake(torch.nn.Module):  # takes run options like the AlphaFold it stands for
            TRUNK = ()

            def forward(self, batch, **_):
                n = batch["aatype"].shape[0]
                tried.append(n)
                if n > limit:
                    raise torch.OutOfMemoryError("CUDA out of memory")

        return Fake(), tried

    model, tried = fake(10_500)
    assert fastfold_inference.find_max_n_res(model, torch.device("cpu"), 4096, 2048, limit=12288) == 10240
    assert tried == [4096, 8192, 12288, 10240]
    model, tried = fake(50_000)
    assert fastfold_inference.find_max_n_res(model, torch.device("cpu"), 4096, 2048, limit=12288) == 12288
    assert tried == [4096, 8192, 12288]


def _cuda_uses() -> dict[str, list]:
    """torch.cuda attributes, pinned allocations and stream methods used anywhere in ferryman/."""
    uses = {"attrs": [], "pinned": [], "streams": [], "methods": []}
    for path in sorted((ROOT / "ferryman").rglob("*.py")):
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "torch.cuda":
                uses["attrs"].append((where, node.attr))
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "pin_memory":
                        uses["pinned"].append((where, ast.unparse(node.func), ast.unparse(kw.value)))
                if ast.unparse(node.func) == "torch.cuda.Stream":
                    guard, up = None, parents.get(node)
                    while up is not None and guard is None:
                        guard = ast.unparse(up.test) if isinstance(up, ast.If | ast.IfExp) else None
                        up = parents.get(up)
                    uses["streams"].append((where, guard or ""))
                if isinstance(node.func, ast.Attribute) and node.func.attr in ("record_stream", "wait_stream", "wait_event"):
                    uses["methods"].append((where, node.func.attr))
    return uses


def test_stream_and_pinned_memory_paths_resolve_in_this_torch():
    """Constructing a CUDA stream or pinned buffer needs CUDA; what can be checked without one is that
    every torch.cuda name the code uses exists in this torch, that pinned allocations and side streams
    are switched on by the device being CUDA (so CPU runs never take them), and that the factory
    functions take the arguments the CUDA path passes."""
    uses = _cuda_uses()
    assert any("core/gemini" in w for w, _ in uses["streams"]), "the Gemini prefetch stream is gone from core/gemini"
    assert any("core/gemini" in w for w, *_ in uses["pinned"]), "Gemini's pinned host buffers are gone from core/gemini"
    missing = [(w, a) for w, a in uses["attrs"] if not hasattr(torch.cuda, a)]
    assert missing == [], f"torch {torch.__version__} has no torch.cuda.{missing}"
    for where, guard in uses["streams"]:
        assert "cuda" in guard, f"{where}: a CUDA stream created without a CUDA-device condition"
    for where, func, value in uses["pinned"]:
        assert "cuda" in value or value in ("False", "True"), f"{where}: pin_memory={value} is not tied to CUDA"
        if func.startswith("torch.") and func.split(".")[-1] in ("empty", "zeros", "empty_like", "zeros_like"):
            getattr(torch, func.split(".")[-1])(*([torch.ones(2)] if func.endswith("_like") else [2]), pin_memory=False)
    holders = {"record_stream": torch.Tensor, "wait_stream": torch.cuda.Stream, "wait_event": torch.cuda.Stream}
    assert all(hasattr(holders[m], m) for _, m in uses["methods"])
    assert hasattr(torch.cuda.Event, "record") and callable(torch.cuda.stream)


def test_gpu_summary_names_the_device_and_the_targets(tmp_path):
    _gpu_json(tmp_path, "fastfold_inference", {"rows": [{"N_res": 1024, "speedup": 1.7}], "max_n_res_bf16": 12288,
                                               "find_max": {"start": 4096, "step": 2048, "limit": 12288, "at_limit": True}})
    payload = json.loads((tmp_path / "fastfold_inference-cuda.json").read_text())
    payload["gpu_check"] = {"step": "fastfold_max_length", "benchmark": "fastfold_inference", "mode": "gpu"}
    bundle = {"mode": "gpu", "device": {"device": "cuda: NVIDIA H100 80GB HBM3", "date": "2026-12-06"}, "budget_s": 480,
              "planned_s": 380, "wall_s": 301.5, "results": {"fastfold_max_length": payload},
              "steps": [{"step": "fastfold_inference", "status": "ok", "wall_s": 61.0, "cap_s": 70, "json": "x.json"},
                        {"step": "kernels", "status": "timeout", "wall_s": 80.0, "cap_s": 80, "json": None,
                         "reason": "killed at its 80 s cap"}]}  # fmt: skip
    text = report.check_summary(bundle)
    assert text.startswith("# GPU check: cuda: NVIDIA H100 80GB HBM3")
    assert "| kernels | timeout | 80 | 80 | killed at its 80 s cap |" in text
    assert "| FastFold inference | 10,000 residues in bf16 on one 80 GB GPU (FastFold's figure) | >= 12,288 residues | **hold** |" in text
    assert "| FastFold inference | >= 2x faster than eager at N_res 1024 | 1.7x | **miss** |" in text


def test_a_version_bound_carries_the_package_the_image_has_too_old():
    import gpu_packages

    assert gpu_packages.missing(["torch>=999", "no-such-distribution-xyz"]) == [
        f"torch>=999 (found {torch.__version__})", "no-such-distribution-xyz"]
    specs = gpu_packages.wheel_specs(["transformers>=5.23"])
    assert [s.split("==")[0].lower() for s in specs] == ["transformers"]  # its requirements are on the image
    assert gpu_packages.wheel_specs(["transformers"]) == []  # on the image, and no bound asks for another
