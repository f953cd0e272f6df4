"""Writes docs/benchmarks.md from the benchmark JSON: the page is generated, never edited by hand.

    python benchmarks/report.py           # regenerate docs/benchmarks.md (make bench-report)
    python benchmarks/report.py --check   # exit 1 if the page is not what the JSON and notes give

Inputs: every ``benchmarks/results/*.json`` (one benchmark run each: the script's tables, device,
date and command), ``benchmarks/notes/<benchmark>.md`` (what a benchmark measures and how; the
script's docstring when there is none), ``benchmarks/results/<run>.md`` (remarks on one run, such
as the machine's load) and ``benchmarks/notes/intro.md`` / ``gpu_check.md``. GPU and CPU runs get
separate sections; each issue target stands beside its GPU number with hold/miss, or "not measured
yet" while no GPU run exists.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report_tables as tables
from gpu_steps import BUDGET_S, STEPS

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
RESULTS = BENCH_DIR / "results"
NOTES = BENCH_DIR / "notes"
PAGE = ROOT / "docs" / "benchmarks.md"

STATUS = {True: "**hold**", False: "**miss**", None: "not decided"}


def env_of(payload: dict) -> dict:
    """The run's environment record (msa_search names it 'environment')."""
    env = payload.get("env")
    if env is None:
        env = payload.setdefault("environment", {}) if "environment" in payload else payload.setdefault("env", {})
    return env


def bench_key(payload: dict, path: Path) -> str:
    """Which benchmark wrote a JSON: the GPU check's step, else the script in its command."""
    check = payload.get("gpu_check", {})
    key = check.get("benchmark") or check.get("step") or payload.get("benchmark")
    if key:
        return key
    command = env_of(payload).get("command", "")
    return command.split()[0].removesuffix(".py") if command else path.stem.split("-")[0]


def is_gpu(payload: dict) -> bool:
    """A run on a GPU machine: on its GPU, or on its CPU as a step of the GPU check (host_adam)."""
    return str(env_of(payload).get("device", "")).startswith("cuda") or payload.get("gpu_check", {}).get("mode") == "gpu"


def load_results(folder: Path) -> dict[str, list[tuple[Path, dict]]]:
    out: dict[str, list[tuple[Path, dict]]] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"Error: {path}: not a readable JSON result ({exc})") from None
        out.setdefault(bench_key(payload, path), []).append((path, payload))
    return out


# ------------------------------------------------------------------------------------ markdown
def cell(value) -> str:
    return tables.fmt(value).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def blocks_md(blocks) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, str):
            parts.append(block)
        elif block[1]:
            caption, rows, columns = block
            parts.append(f"{caption}:\n\n{table(rows, columns)}")
    return "\n\n".join(parts)


def note(path: Path) -> str:
    return path.read_text().strip() if path.is_file() else ""


def description(bench: tables.Bench) -> str:
    text = note(NOTES / f"{bench.key}.md")
    if text:
        return text
    script = BENCH_DIR / f"{bench.key}.py"
    if not script.is_file():
        return f"`benchmarks/{bench.key}.py` is not in the tree yet."
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    return f"From `benchmarks/{bench.key}.py`:\n\n{doc}".strip()


def run_header(path: Path, payload: dict) -> str:
    env = env_of(payload)
    facts = [str(env.get("device", "device not recorded")), str(env.get("date", "date not recorded"))]
    facts += [f"{name} {env[name]}" for name in ("torch", "python") if env.get(name)]
    load = env.get("loadavg") or env.get("loadavg_at_end")
    if load and not is_gpu(payload):
        facts.append(f"load average {tables.fmt(load[0])} on {env.get('cpu_count', '?')} cores")
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    lines = [f"#### `{shown}`", "", "; ".join(facts) + "."]
    check = payload.get("gpu_check")
    if check:
        lines.append(f"\nCommand: `{check['command']}` (step `{check['step']}` of the GPU check, {check['mode']}: "
                     f"{check['wall_s']} s of its {check['cap_s']} s cap).")  # fmt: skip
    elif env.get("command"):
        lines.append(f"\nCommand: `python benchmarks/{env['command']}`.")
    remark = note(path.with_suffix(".md"))
    return "\n".join(lines) + (f"\n\n{remark}" if remark else "")


def run_md(bench: tables.Bench, path: Path, payload: dict) -> str:
    try:
        body = blocks_md((bench.render or tables.records)(payload))
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as exc:  # a JSON from a newer script
        body = f"(renderer failed: {exc!r}; every record shown)\n\n{blocks_md(tables.records(payload))}"
    return f"{run_header(path, payload)}\n\n{body}"


def target_rows(bench: tables.Bench, runs: list[tuple[Path, dict]]) -> list[dict]:
    """One row per target: what the GPU runs measured (a benchmark's steps may split its targets
    between runs), 'not measured yet' without a GPU run."""
    gpu = [payload for _, payload in runs if is_gpu(payload)]
    rows = []
    for target in bench.targets:
        found = []
        for payload in gpu:
            measured, holds = target.measure(payload)
            if measured != "not in this run":
                device = env_of(payload).get("device", "-").removeprefix("cuda: ")
                found.append({"measured on GPU": measured, "status": STATUS[holds], "device": device})
        if not found:
            found = [{"measured on GPU": "-", "status": "not measured" if gpu else "not measured yet", "device": "-"}]
        rows += [{"benchmark": bench.title, "target": target.text, **row} for row in found]
    return rows


def gpu_command(key: str) -> str:
    steps = [s for s in STEPS if s.benchmark == key and s.gpu is not None]
    if not steps:
        why = "; ".join(s.skip_gpu for s in STEPS if s.benchmark == key) or "no step for it in benchmarks/gpu_steps.py"
        return f"The GPU check does not run it ({why})."
    runs = "; ".join(f"step `{s.name}`: `{step_command(s)}`" for s in steps)
    return f"Not measured yet. `make gpu-check` measures it ({runs})."


def step_command(step) -> str:
    if step.script == "pytest":
        return "python3 -m pytest -m gpu <test files with gpu tests>"
    return " ".join(["python3", step.script, *step.gpu])


def section(bench: tables.Bench, runs: list[tuple[Path, dict]]) -> str:
    parts = [f"## {bench.title}", description(bench)]
    if bench.targets:
        parts.append(table(target_rows(bench, runs), ["target", "measured on GPU", "status", "device"]))
    gpu = [run_md(bench, p, r) for p, r in runs if is_gpu(r)]
    cpu = [run_md(bench, p, r) for p, r in runs if not is_gpu(r)]
    parts += ["### GPU", *(gpu or [gpu_command(bench.key)])]
    parts += ["### CPU", *(cpu or ["No CPU run recorded."])]
    return "\n\n".join(parts)


def steps_table() -> str:
    rows = [{"step": s.name, "cap s": s.cap_s if s.gpu is not None else "-",
             "on the GPU": f"`{step_command(s)}`" if s.gpu is not None else f"skipped: {s.skip_gpu}",
             "what it checks": s.claim} for s in STEPS]  # fmt: skip
    total = sum(s.cap_s for s in STEPS if s.gpu is not None)
    return f"{table(rows, list(rows[0]))}\n\nCaps add up to {total} s of the {BUDGET_S} s budget."


def page(results: Path = RESULTS) -> str:
    found = load_results(results)
    known = {b.key for b in tables.BENCHES}
    benches = list(tables.BENCHES) + [tables.Bench(key=k, title=k) for k in sorted(found) if k not in known]
    glance = [row for b in benches for row in target_rows(b, found.get(b.key, []))]
    parts = ["# Benchmarks",
             "<!-- Generated by benchmarks/report.py from benchmarks/results/*.json and benchmarks/notes/*.md "
             "(make bench-report); edit those, not this page. -->",
             note(NOTES / "intro.md"),
             "## Targets at a glance", table(glance, ["benchmark", "target", "measured on GPU", "status", "device"]),
             "## The GPU check", note(NOTES / "gpu_check.md"), steps_table()]  # fmt: skip
    parts += [section(b, found.get(b.key, [])) for b in benches]
    return "\n\n".join(p for p in parts if p).rstrip() + "\n"


# ------------------------------------------------------------------------------ GPU check summary
def check_summary(bundle: dict) -> str:
    """The markdown summary of one GPU check (or dry run): device, steps, targets."""
    info = bundle["device"]
    facts = [info.get("date", ""), f"torch {info.get('torch')}", f"CUDA {info.get('cuda')}", f"Python {info.get('python')}"]
    if info.get("driver"):
        facts.append(f"driver {info['driver']}")
    lines = [f"# GPU check: {info.get('device')}", "",
             "; ".join(facts) + f"; {bundle['mode']}: {bundle.get('wall_s', 0)} s of a {bundle['budget_s']:.0f} s "
             f"budget (plan: at most {bundle['planned_s']} s of GPU time)", ""]  # fmt: skip
    rows = [{"step": r["step"], "status": r["status"], "wall s": r["wall_s"], "cap s": r["cap_s"],
             "JSON or reason": r.get("json") or r.get("reason")} for r in bundle["steps"]]  # fmt: skip
    lines.append(table(rows, ["step", "status", "wall s", "cap s", "JSON or reason"]))
    failed = [r for r in bundle["steps"] if r["status"] in ("failed", "timeout") and r.get("reason")]
    lines += [f"- {r['step']}: {r['reason']}" for r in failed]
    if bundle["mode"] == "gpu":
        by_key = {b.key: b for b in tables.BENCHES}
        runs: dict[str, list] = {}
        for key, payload in bundle["results"].items():
            runs.setdefault(bench_key(payload, Path(key)), []).append((Path(key), payload))
        rows = [row for key, found in runs.items() if key in by_key for row in target_rows(by_key[key], found)]
        lines += ["", "## Targets", "", table(rows, ["benchmark", "target", "measured on GPU", "status"])]
    else:
        audit = [{"step": r["step"], "imported, not on the device image": ", ".join(r["imports_off_device"]) or "-",
                  "undeclared": ", ".join(r["undeclared_imports"]) or "-"}
                 for r in bundle["steps"] if "imports_off_device" in r]  # fmt: skip
        lines += ["", "Dry run on CPU at toy sizes: the numbers say nothing about a GPU; targets are not evaluated.",
                  "", "## Import audit", "", table(audit, list(audit[0])) if audit else "(no step ran)"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs from what it would be")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--page", type=Path, default=PAGE)
    args = parser.parse_args(argv)
    text = page(args.results)
    if args.check:
        if not args.page.is_file() or args.page.read_text() != text:
            print(f"Error: {args.page} is not what benchmarks/report.py writes from {args.results}: run make bench-report")
            return 1
        return 0
    sys.path.insert(0, str(ROOT))
    from ferryman.core.io import write_text

    write_text(args.page, text)
    print(f"wrote {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
