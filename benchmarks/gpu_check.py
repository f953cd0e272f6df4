"""Every GPU claim checked by one prepared command that fits a short device loan (issue #20).

Runs the GPU tests (``pytest -m gpu``), then each benchmark at a reduced but meaningful ladder
(the step table in benchmarks/gpu_steps.py), each as a subprocess under its own time cap, so one
slow step cannot eat the others' time: a step that overruns is killed, reported as such, and the
rest go on. The plan and its GPU-time estimate (the sum of the caps) print before anything runs;
the summary (device, per-step status, the targets that hold or miss) prints last.

On the GPU machine (python3 there holds torch, Triton and JAX; Ferryman comes from the working
tree, never installed): first, here, ``make gpu-wheels`` (the packages the image lacks, as
Python 3.12 wheels in .whl/), then one device call, with ``carry: [".whl"]`` and timeout_s 560:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT

$OUT then holds summary.md, gpu_check.json (every step's record and JSON) and gpu_check.log.
Back here: ``python benchmarks/gpu_check.py --unpack <files_at>/gpu_check.json`` writes each
benchmark's JSON to benchmarks/results/<step>-cuda.json; ``make bench-report`` renders them into
docs/benchmarks.md.

    python benchmarks/gpu_check.py --dry-run     # the same steps on CPU at toy sizes (make test runs it)
    python benchmarks/gpu_check.py --plan        # the plan and estimate only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_packages as packages
import report
from gpu_steps import BUDGET_S, HARNESS_S, STEPS, Step

from ferryman.core.io import atomic_open

ROOT = Path(__file__).resolve().parent.parent
LOG_TAIL = 40  # lines of a step's output kept in its record
LOG_MAX = 12 << 20  # a device call returns files of at most 16 MiB: a chattier step is cut off in the log


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def device_info(dry: bool) -> dict:
    """The machine the check runs on; refuses a GPU run without CUDA."""
    import platform

    import torch

    info = {"date": now(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "loadavg": os.getloadavg()}  # fmt: skip
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if dry:
        from common import cpu_model

        info["device"] = f"cpu: {cpu_model()} (dry run, toy sizes)"
        return info
    if not torch.cuda.is_available():
        raise SystemExit("Error: no CUDA device here; on a machine without a GPU run --dry-run")
    props = torch.cuda.get_device_properties(0)
    info["device"] = f"cuda: {props.name}"
    info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    info["capability"] = f"{props.major}.{props.minor}"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
        info["driver"] = smi.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    return info


def gpu_test_files() -> list[str]:
    """Test files with a test marked gpu: collecting only these keeps optional app imports out."""
    pattern = re.compile(r"mark\.gpu\b")
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if pattern.search(p.read_text()))


def skip_reason(step: Step, dry: bool) -> str | None:
    args = step.dry if dry else step.gpu
    if args is None:
        return step.skip_dry if dry else step.skip_gpu
    if step.script != "pytest" and not (ROOT / step.script).is_file():
        return f"{step.script} is not in this tree yet"
    lacking = packages.missing(step.needs)
    if lacking:
        return f"needs {', '.join(lacking)}, not met here (carry wheels: make gpu-wheels)"
    import shutil

    tools = [t for t in step.tools if shutil.which(t) is None]
    if tools:
        return f"needs {', '.join(tools)} on PATH"
    return None


def plan(steps, dry: bool) -> list[tuple[Step, str | None]]:
    return [(step, skip_reason(step, dry)) for step in steps]


def print_plan(planned, dry: bool, budget: float) -> None:
    runs = [s for s, why in planned if why is None]
    gpu_total = sum(s.cap_s for s in runs)
    mode = "dry run on CPU at toy sizes (caps below are the GPU plan)" if dry else "GPU"
    print(f"GPU check, {mode}: {len(runs)} of {len(planned)} steps run, each under its own cap")
    print(f"  {'step':<20} {'cap s':>6}  plan")
    for step, why in planned:
        cap = f"{step.cap_s:>6}" if why is None else f"{'-':>6}"
        print(f"  {step.name:<20} {cap}  {'run: ' + step.claim if why is None else 'skip: ' + why}")
    print(f"Estimated GPU time: at most {gpu_total} s ({gpu_total / 60:.1f} min) for these steps, plus "
          f"~{HARNESS_S} s for the check itself; budget {budget:.0f} s", flush=True)  # fmt: skip


def command(step: Step, json_path: Path, xml_path: Path, dry: bool) -> list[str]:
    if step.script == "pytest":
        return [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                "--junitxml", str(xml_path), *gpu_test_files()]  # fmt: skip
    args = step.dry if dry else step.gpu
    return [sys.executable, step.script, *args, step.json_flag, str(json_path)]


def child_env(dry: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    # No network on the device: a library that tries one must fail at once, not hang.
    env.update(PYTHONUNBUFFERED="1", MPLBACKEND="Agg", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")  # fmt: skip
    if dry:
        env.update(CUDA_VISIBLE_DEVICES="", PYTHONPROFILEIMPORTTIME="1")  # the import audit reads these lines
    return env


def run_process(cmd: list[str], env: dict, timeout: float, log, prefix: str) -> tuple[int | None, list[str], set[str]]:
    """(exit status or None if killed at the cap, output lines, top-level modules imported)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", process_group=0)  # fmt: skip
    lines: list[str] = []
    imports: list[str] = []

    def pump():
        for line in proc.stdout:
            if line.startswith("import time:"):
                imports.append(line)
                continue
            lines.append(line.rstrip("\n"))
            if log.tell() < LOG_MAX:
                log.write(line)
            print(f"{prefix}{line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    code = None
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:  # over its cap, or the check itself stopped (SIGTERM, Ctrl-C): the step's whole group goes
        _stop_group(proc)
    reader.join(timeout=10)
    return code, lines, packages.top_level_imports(imports)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)  # the group of the step we started (process_group=0): it and its children
            proc.wait(timeout=grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def pytest_payload(xml_path: Path) -> dict:
    """Counts and per-test outcomes from pytest's JUnit XML."""
    cases = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome, message = {"failure": "failed"}.get(kind, kind), (found.get("message") or "")[:200]
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "message": message})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"benchmark": "pytest_gpu", **counts, "tests": len(cases), "cases": cases}


def failure_reason(code: int | None, lines: list[str]) -> str:
    missing = next((m.group(1) for m in map(re.compile(r"No module named '([^']+)'").search, reversed(lines)) if m), None)
    if missing:
        return f"exit {code}: module {missing} is missing (add it to the step's needs and to make gpu-wheels)"
    last = next((ln.strip() for ln in reversed(lines) if ln.strip()), "no output")
    return f"exit {code}: {last[:160]}"


def finish_payload(step: Step, json_path: Path, xml_path: Path, record: dict, info: dict) -> dict | None:
    """The step's JSON with the check's record added, rewritten in place; None if there is none."""
    try:
        if step.script == "pytest":
            payload = pytest_payload(xml_path)
            xml_path.unlink()
        else:
            payload = json.loads(json_path.read_text())
    except (OSError, ValueError, ET.ParseError):
        return None
    if not report.env_of(payload).get("device"):
        payload["env"] = {**info, **report.env_of(payload)}
    report.env_of(payload).setdefault("date", info["date"])
    payload["gpu_check"] = {"benchmark": step.benchmark,
                            **{k: record[k] for k in ("step", "mode", "command", "status", "wall_s", "cap_s")}}
    with atomic_open(json_path) as handle:
        json.dump(payload, handle, indent=2, default=str)
        handle.write("\n")
    return payload


def run_step(step: Step, args, info: dict, timeout: float, log) -> tuple[dict, dict | None]:
    tag = "dry" if args.dry_run else "cuda"
    json_path, xml_path = args.results / f"{step.name}-{tag}.json", args.results / f".{step.name}-{tag}.xml"
    json_path.unlink(missing_ok=True)  # a stale file must not pass for this run's result
    cmd = command(step, json_path, xml_path, args.dry_run)
    shown = shlex.join([Path(cmd[0]).name, *(shorter(c) for c in cmd[1:])])
    record = {"step": step.name, "mode": "dry-run" if args.dry_run else "gpu", "claim": step.claim, "command": shown,
              "cap_s": step.cap_s, "timeout_s": round(timeout), "json": None}  # fmt: skip
    print(f"\n== {step.name} (up to {timeout:.0f} s): {shown}", flush=True)
    log.write(f"\n== {step.name}: {shown}\n")
    started = time.monotonic()
    code, lines, modules = run_process(cmd, child_env(args.dry_run), timeout, log, f"  [{step.name}] ")
    record["wall_s"] = round(time.monotonic() - started, 1)
    record["exit_code"] = code
    if code is None:
        record["status"], record["reason"] = "timeout", f"killed at its {timeout:.0f} s cap"
    elif code == 0:
        record["status"], record["reason"] = "ok", ""
    else:
        record["status"], record["reason"] = "failed", failure_reason(code, lines)
    payload = finish_payload(step, json_path, xml_path, record, info)
    if payload is not None:
        record["json"] = shorter(str(json_path))
    elif record["status"] == "ok":
        record["status"], record["reason"] = "failed", f"exit 0 but no readable JSON at {json_path}"
    record["log_tail"] = lines[-LOG_TAIL:]
    if args.dry_run:
        found = packages.audit(modules, step.needs)
        record["imports_off_device"], record["undeclared_imports"] = found["off_device"], found["undeclared"]
    print(f"== {step.name}: {record['status']} in {record['wall_s']} s {record['reason']}", flush=True)
    return record, payload


def shorter(arg: str) -> str:
    """A path inside the repository relative to its root (the device runs from there too)."""
    return os.path.relpath(arg, ROOT) if arg.startswith(str(ROOT) + os.sep) else arg


def skipped(step: Step, reason: str, dry: bool) -> dict:
    return {"step": step.name, "mode": "dry-run" if dry else "gpu", "claim": step.claim, "status": "skipped",
            "reason": reason, "cap_s": step.cap_s, "wall_s": 0.0, "json": None}  # fmt: skip


def write_outputs(out: Path, bundle: dict) -> str:
    """The bundle (records and every step's JSON) and the markdown summary, each written whole."""
    text = report.check_summary(bundle)
    with atomic_open(out / "gpu_check.json") as handle:
        json.dump(bundle, handle, indent=2, default=str)
        handle.write("\n")
    with atomic_open(out / "summary.md") as handle:
        handle.write(text)
    return text


def check(args) -> int:
    steps = [s for s in STEPS if (not args.only or s.name in args.only) and s.name not in args.skip]
    planned = plan(steps, args.dry_run)
    budget = args.budget_s or (sum(s.dry_cap_s for s in steps) if args.dry_run else BUDGET_S)
    print_plan(planned, args.dry_run, budget)
    if args.plan:
        return 0
    info = device_info(args.dry_run)
    print(f"device: {info['device']}; torch {info['torch']}, Python {info['python']}", flush=True)
    for folder in (args.out, args.results):
        folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    bundle = {"mode": "dry-run" if args.dry_run else "gpu", "device": info, "budget_s": budget,
              "planned_s": sum(s.cap_s for s, why in planned if why is None), "steps": [], "results": {}}  # fmt: skip
    with open(args.out / "gpu_check.log", "w") as log:
        for step, why in planned:
            left = budget - HARNESS_S - (time.monotonic() - started)
            cap = step.dry_cap_s if args.dry_run else step.cap_s
            if why is None and left < min(cap, 15):
                why = f"no time left in the {budget:.0f} s budget"
            if why is not None:
                print(f"\n== {step.name}: skipped: {why}", flush=True)
                bundle["steps"].append(skipped(step, why, args.dry_run))
            else:
                record, payload = run_step(step, args, info, min(cap, left), log)
                bundle["steps"].append(record)
                if payload is not None:
                    bundle["results"][step.name] = payload
            bundle["wall_s"] = round(time.monotonic() - started, 1)
            write_outputs(args.out, bundle)  # after every step: a run cut short still leaves its results
    print("\n" + write_outputs(args.out, bundle), flush=True)
    return 1 if any(r["status"] in ("failed", "timeout") for r in bundle["steps"]) else 0


def unpack(bundle_path: Path, results: Path) -> int:
    """Write each step's JSON from a device run's bundle into the results folder."""
    try:
        bundle = json.loads(bundle_path.read_text())
        if not isinstance(bundle.get("steps"), list) or not isinstance(bundle.get("results"), dict):
            raise ValueError("no steps or results")
    except (OSError, ValueError, AttributeError) as exc:
        raise SystemExit(f"Error: {bundle_path}: not a GPU check bundle ({exc!r})") from None
    for record in bundle["steps"]:
        payload = bundle["results"].get(record["step"])
        if payload is None:
            print(f"{record['step']}: {record['status']}, no JSON ({record.get('reason') or 'none written'})")
            continue
        path = results / Path(record["json"]).name
        with atomic_open(path) as handle:
            json.dump(payload, handle, indent=2, default=str)
            handle.write("\n")
        print(f"{record['step']}: {record['status']}, wrote {path}")
    print("next: make bench-report (regenerates docs/benchmarks.md)")
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same steps on CPU at toy sizes (no GPU needed)")
    parser.add_argument("--plan", action="store_true", help="print the plan and its GPU-time estimate, run nothing")
    parser.add_argument("--out", type=Path, help="summary.md, gpu_check.json, gpu_check.log (on the device: $OUT)")
    parser.add_argument("--results", type=Path, help="each step's JSON (default benchmarks/results; dry run: "
                        "benchmarks/results/dry-run)")  # fmt: skip
    parser.add_argument("--only", type=lambda s: s.split(","), default=[], help="comma-separated steps to run")
    parser.add_argument("--skip", type=lambda s: s.split(","), default=[], help="comma-separated steps to leave out")
    parser.add_argument("--budget-s", type=float, help=f"wall-clock budget of the whole check (GPU default {BUDGET_S})")
    parser.add_argument("--unpack", type=Path, metavar="BUNDLE", help="write a device run's step JSONs to --results")
    parser.add_argument("--wheel-specs", action="store_true", help="print name==version of every wheel the device lacks")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only + args.skip) - {s.name for s in STEPS})
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(s.name for s in STEPS)}")
    sub = "dry-run" if args.dry_run else "gpu-check"
    args.results = args.results or ROOT / "benchmarks" / "results" / ("dry-run" if args.dry_run else "")
    args.out = args.out or ROOT / "benchmarks" / "results" / sub
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # A device call that runs out of time ends with SIGTERM: turn it into an exception so the step
    # running then is stopped with its children (the results of earlier steps are already written).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.unpack:
        return unpack(args.unpack, args.results)
    if args.wheel_specs:
        try:
            present = [s for s in STEPS if s.gpu is not None and (s.script == "pytest" or (ROOT / s.script).is_file())]
            specs = packages.wheel_specs(n for s in present for n in s.needs)
        except LookupError as exc:
            raise SystemExit(f"Error: {exc}") from None
        print("\n".join(specs))
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
