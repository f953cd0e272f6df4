"""The mutation job (`make mutation`, docs/testing.md): mutmut once per module group.

Each group of ``[tool.mutmut.groups]`` in pyproject.toml names the files it mutates and the tests
that may kill them. A group runs in its own folder, ``.mutation/<group>/``: links to ferryman/,
tests/ and data/, a pyproject.toml holding the shared ``[tool.mutmut]`` keys plus the group's, and
mutmut's own ``mutants/`` state, so groups never invalidate each other's results and an
interrupted run goes on where it stopped. mutmut maps every mutated function to the tests that
call it (a stats run of the group's tests), then runs only those tests against each mutant.

Afterwards the per-module table (killed, survived, justified, score) is printed and written to
``.mutation/report.md``; ``--update-docs`` also puts it into docs/testing.md. A survivor counts as
justified when docs/testing.md lists it with a fragment of its mutated line (the fragment is
checked, so a renumbered mutant is reported instead of silently excused).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".mutation"
DOCS = ROOT / "docs" / "testing.md"
TABLE_START, TABLE_END = "<!-- mutation-table -->", "<!-- /mutation-table -->"
LINKED = ("ferryman", "tests", "data")
# A justified survivor in docs/testing.md: | `mutant name` | `fragment of the mutated line` | why |
JUSTIFIED_ROW = re.compile(r"^\|\s*`(ferryman\.[^`]+__mutmut_\d+)`\s*\|\s*`([^`]+)`\s*\|")
KILLED, SURVIVED, NO_TESTS, TIMEOUT, NOT_RUN = "killed", "survived", "no tests", "timeout", "not checked"
# The test process died by a signal other than mutmut's timeout (SIGSEGV, SIGABRT: e.g. the Triton
# interpreter reading out of bounds of a grid the mutant sized wrong): the suite fails, so the
# mutant is caught.
CRASHED = "segfault"


def load_settings() -> tuple[dict, dict[str, dict], dict]:
    """The shared mutmut keys, the groups, and pytest's own settings, from pyproject.toml."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    shared = dict(tool["mutmut"])
    groups = shared.pop("groups")
    return shared, groups, tool["pytest"]


def slug(group: str) -> str:
    return group.replace("/", "-")


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def toml_table(name: str, table: dict) -> str:
    return "\n".join([f"[{name}]", *(f"{key} = {toml_value(v)}" for key, v in table.items())]) + "\n"


def prepare(group: str, spec: dict, shared: dict, pytest_settings: dict) -> Path:
    """The group's folder with its links and generated pyproject.toml; returns it."""
    folder = WORK / slug(group)
    (folder / "mutants").mkdir(parents=True, exist_ok=True)  # before Python caches it as missing
    for name in LINKED:
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(Path("..", "..", name))
    config = {**shared, "only_mutate": spec["only_mutate"],
              "pytest_add_cli_args_test_selection": spec["tests"]}
    text = toml_table("tool.pytest.ini_options", pytest_settings["ini_options"]) + "\n"
    text += toml_table("tool.mutmut", config)
    pyproject = folder / "pyproject.toml"
    if not pyproject.exists() or pyproject.read_text() != text:
        pyproject.write_text(text)
    return folder


def run_group(folder: Path, mutants: list[str]) -> int:
    env = dict(os.environ, PYTHONPATH=str(folder / "mutants"))  # subprocesses of tests import mutants too
    mutmut = Path(sys.executable).with_name("mutmut")
    return subprocess.run([str(mutmut), "run", "--max-children", "1", *mutants], cwd=folder, env=env).returncode


def exit_status(code: int | None) -> str:
    from mutmut.stats import status_by_exit_code

    status = status_by_exit_code[code]
    if code is not None and code < 0 and status != TIMEOUT:  # killed by a signal: SIGSEGV, SIGABRT, ...
        return CRASHED
    return status


def mutated(source: str, only: list[str], never: list[str]) -> bool:
    return any(fnmatch(source, p) for p in only) and not any(fnmatch(source, p) for p in never)


def results(folder: Path, only: list[str], never: list[str]) -> dict[str, dict[str, str]]:
    """{source file: {mutant: status}} from the group's mutmut state (files mutated now only:
    a file taken out of the group keeps its old state in mutants/)."""
    out: dict[str, dict[str, str]] = {}
    for meta in sorted((folder / "mutants").rglob("*.py.meta")):
        source = meta.relative_to(folder / "mutants").as_posix().removesuffix(".meta")
        if not mutated(source, only, never):
            continue
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if codes:
            out[source] = {name: exit_status(code) for name, code in codes.items()}
    return out


def justified() -> dict[str, str]:
    """{mutant: fragment of its mutated line} from docs/testing.md."""
    if not DOCS.exists():
        return {}
    rows = (JUSTIFIED_ROW.match(line) for line in DOCS.read_text().splitlines())
    return {row[1]: row[2].replace("\\|", "|") for row in rows if row}  # a | in a table cell is written \|


def mutated_line(folder: Path, source: str, mutant: str) -> str:
    """The added lines of the mutant's diff (what ``mutmut show`` prints), to check that a
    justification still fits; read in this process (a ``mutmut show`` per mutant costs seconds)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    with contextlib.chdir(folder):  # mutmut reads mutants/ relative to the working directory
        shown = get_diff_for_mutant(mutant, path=source)
    return "\n".join(line[1:] for line in shown.splitlines() if line.startswith("+") and not line.startswith("+++"))


@dataclass
class ModuleScore:
    source: str
    measured: str = ""  # when mutmut last recorded a result for this file (UTC)
    counts: dict[str, int] = field(default_factory=dict)
    open_survivors: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    unneeded: list[str] = field(default_factory=list)
    names: set[str] = field(default_factory=set)  # every mutant of the module that mutmut knows

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def ran(self) -> int:
        return self.total - self.counts.get(NOT_RUN, 0)

    @property
    def score(self) -> float:
        """Killed, timed out, crashed or justified, of the mutants that ran (the rest are counted apart)."""
        done = sum(self.counts.get(k, 0) for k in (KILLED, TIMEOUT, CRASHED, "justified"))
        return 100.0 * done / max(self.ran, 1)


def score_group(folder: Path, only: list[str], never: list[str], excused: dict[str, str]) -> list[ModuleScore]:
    scores = []
    for source, statuses in results(folder, only, never).items():
        meta = folder / "mutants" / (source + ".meta")
        stamp = datetime.datetime.fromtimestamp(meta.stat().st_mtime, datetime.UTC)
        module = ModuleScore(source, measured=stamp.strftime("%Y-%m-%d %H:%M"))
        module.names = set(statuses)
        for mutant, status in statuses.items():
            if mutant in excused and status in (KILLED, CRASHED):
                module.unneeded.append(mutant)  # killed now (or renumbered): the row is out of date
            if status in (SURVIVED, NO_TESTS) and mutant in excused:
                if excused[mutant] in mutated_line(folder, source, mutant):
                    status = "justified"
                else:
                    module.stale.append(mutant)
            if status in (SURVIVED, NO_TESTS):
                module.open_survivors.append(mutant)
            module.counts[status] = module.counts.get(status, 0) + 1
        scores.append(module)
    return scores


COUNTED = (KILLED, TIMEOUT, CRASHED, "justified", SURVIVED, NO_TESTS, NOT_RUN)


def report(scores: dict[str, list[ModuleScore]], groups: dict[str, dict]) -> str:
    """The per-module table; a configured group without results is listed as not run."""
    lines = ["| group | module | measured (UTC) | mutants | killed | timeout | crashed | justified | survived | no tests "
             "| not run | other | score |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    grand = ModuleScore("all")
    for group, spec in groups.items():
        if not scores.get(group):
            lines.append(f"| {group} | {', '.join(spec['only_mutate'])} | not run yet | | | | | | | | | | |")
            continue
        for m in scores[group]:
            c = m.counts
            other = m.total - sum(c.get(k, 0) for k in COUNTED)
            lines.append(f"| {group} | {m.source.removeprefix('ferryman/')} | {m.measured} | {m.total} | "
                         + " | ".join(str(c.get(k, 0)) for k in COUNTED) + f" | {other} | {m.score:.1f}% |")
            for key, n in c.items():
                grand.counts[key] = grand.counts.get(key, 0) + n
    c = grand.counts
    lines.append(f"| **all run** | | | {grand.total} | " + " | ".join(str(c.get(k, 0)) for k in COUNTED)
                 + f" | | **{grand.score:.1f}%** |")
    return "\n".join(lines) + "\n"


def update_docs(table: str) -> None:
    text = DOCS.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    DOCS.write_text(text[:start] + "\n" + table + text[end:])


@click.command()
@click.argument("groups", nargs=-1)
@click.option("--retest", is_flag=True, help="Run the survivors (except the justified) and the timeouts again.")
@click.option("--report-only", is_flag=True, help="Run nothing; score what earlier runs left in .mutation/.")
@click.option("--update-docs", "write_docs", is_flag=True, help="Write the table into docs/testing.md.")
def main(groups: tuple[str, ...], retest: bool, report_only: bool, write_docs: bool) -> None:
    """Run mutmut per module group (all groups when none is named), then print the score table.

    \b
    Examples:
      python tests/mutation.py core/training
      python tests/mutation.py fastfold/loss --retest
      python tests/mutation.py --report-only --update-docs
    """
    shared, known, pytest_settings = load_settings()
    unknown = [g for g in groups if g not in known]
    if unknown:
        raise click.UsageError(f"unknown group(s) {', '.join(unknown)}; known: {', '.join(known)}")
    never = shared.get("do_not_mutate", [])
    failed = []
    for group in groups or tuple(known):
        folder = prepare(group, known[group], shared, pytest_settings)
        if report_only:
            continue
        click.echo(f"== {group}: mutmut in {folder.relative_to(ROOT)}", err=True)
        code = run_group(folder, [])  # new mutants, and those of functions changed since the last run
        if retest and code == 0:  # survivors (the justified ones would only survive again) and timeouts
            statuses = results(folder, known[group]["only_mutate"], never).values()
            excused = justified()
            survivors = [m for s in statuses for m, st in s.items()
                         if (st in (SURVIVED, NO_TESTS) and m not in excused) or st == TIMEOUT]
            code = run_group(folder, survivors) if survivors else 0
        if code != 0:
            failed.append(group)
    excused = justified()
    scores = {g: score_group(WORK / slug(g), spec["only_mutate"], never, excused)
              for g, spec in known.items() if (WORK / slug(g) / "mutants").exists()}
    table = report(scores, known)
    (WORK / "report.md").write_text(table)
    click.echo(table)
    for group, modules in scores.items():
        for m in modules:
            for mutant in m.stale:
                click.echo(f"stale justification (the mutant's line changed): {mutant}", err=True)
            for mutant in m.unneeded:
                click.echo(f"justification of a mutant that does not survive (remove the row): {mutant}", err=True)
            for mutant in m.open_survivors:
                click.echo(f"open ({group}): {mutant}")
            prefix = m.source.removesuffix(".py").replace("/", ".") + ".x"
            for mutant in sorted(k for k in excused if k.startswith(prefix) and k not in m.names):
                click.echo(f"justification of a mutant that no longer exists (remove the row): {mutant}", err=True)
    if write_docs:
        update_docs(table)
    if failed:
        raise click.ClickException(f"mutmut failed for {', '.join(failed)}")


if __name__ == "__main__":
    main()
