"""Imports point one way: ferryman.kernels <- ferryman.core <- ferryman.apps.<app>; apps are independent."""

import ast
import subprocess
import sys
from pathlib import Path

import ferryman

ROOT = Path(ferryman.__file__).parent
HEAVY = {"diffusers", "transformers", "av", "decord", "Bio", "openmm", "pdbfixer", "matplotlib", "peft"}
# The core training loop draws loss curves, so core may import matplotlib, but only lazily.
CORE_MAY_IMPORT_LAZILY = {"matplotlib"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, imported at module level) for every import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # imports guarded by try/if at module level still run at import time
        if isinstance(node, ast.Try | ast.If):
            top_level.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((name, id(node) in top_level))
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "ferryman" or len(parts) == 1:
        return "root"
    if parts[1] == "apps" and len(parts) > 2:
        return f"apps.{parts[2]}"
    return parts[1]


def _violations() -> list[str]:
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        here = _layer(_module_name(path))
        for target, _ in _imports(path):
            if not target.startswith("ferryman."):
                continue
            there = _layer(target)
            if here == "kernels" and there not in ("kernels",):
                bad.append(f"{path}: kernels imports {target}")
            elif here == "core" and there.startswith("apps"):
                bad.append(f"{path}: core imports {target}")
            elif here.startswith("apps.") and there.startswith("apps.") and there != here:
                bad.append(f"{path}: {here} imports {target}")
    return bad


def test_imports_point_one_way():
    assert _violations() == []


def test_core_and_kernels_never_import_heavy_app_dependencies():
    bad = [
        f"{path}: {target}"
        for layer in ("core", "kernels")
        for path in sorted((ROOT / layer).rglob("*.py"))
        for target, top_level in _imports(path)
        if target.split(".")[0] in HEAVY and (top_level or target.split(".")[0] not in CORE_MAY_IMPORT_LAZILY)
    ]
    assert bad == []


def test_apps_import_heavy_dependencies_lazily():
    bad = [
        f"{path}: {target}"
        for path in sorted(ROOT.rglob("*.py"))
        for target, top_level in _imports(path)
        if top_level and target.split(".")[0] in HEAVY
    ]
    assert bad == [], "import these inside the function that needs them"


def test_importing_the_package_and_clis_loads_no_heavy_dependency():
    code = (
        "import sys, ferryman.cli, ferryman.core.parallel, ferryman.core.config, ferryman.core.chunking\n"
        "import ferryman.apps.fastfold.cli, ferryman.apps.opensora.cli\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(HEAVY)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_checker_catches_a_bad_import(tmp_path, monkeypatch):
    fake = tmp_path / "ferryman"
    (fake / "core").mkdir(parents=True)
    (fake / "apps" / "a").mkdir(parents=True)
    (fake / "core" / "x.py").write_text("from ferryman.apps.a import thing\n")
    (fake / "apps" / "a" / "y.py").write_text("def f():\n    from ..b import z\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    found = _violations()
    assert any("core imports ferryman.apps.a" in v for v in found)
    assert any("apps.a imports ferryman.apps.b" in v for v in found)


def _model_collectives(root: Path) -> list[str]:
    """Imports of collectives from any app's model/ package: models are math (DESIGN.md)."""
    return [
        f"{path}: {target}"
        for path in sorted(root.glob("apps/*/model/**/*.py"))
        for target, _ in _imports(path)
        if target.startswith(("ferryman.core.parallel", "torch.distributed"))
    ]


def test_models_import_no_collectives():
    assert _model_collectives(ROOT) == [], "apply parallelism from outside: the app's parallelize(model, dims)"


def test_the_model_checker_catches_a_collective(tmp_path, monkeypatch):
    fake = tmp_path / "ferryman"
    (fake / "apps" / "a" / "model").mkdir(parents=True)
    (fake / "apps" / "a" / "model" / "block.py").write_text("import torch.distributed as dist\n")
    (fake / "apps" / "a" / "model" / "attn.py").write_text("def f():\n    from ferryman.core.parallel import gather\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    assert len(_model_collectives(fake)) == 2
def test_gemini_never_imports_the_training_loop():
    """core/training builds Gemini engines, so core/gemini importing it back (even lazily) would make
    a cycle: the Engine protocol is structural for exactly this reason."""
    bad = [
        f"{path}: {target}"
        for path in sorted((ROOT / "core" / "gemini").rglob("*.py"))
        for target, _ in _imports(path)
        if target == "ferryman.core.training" or target.startswith("ferryman.core.training.")
    ]
    assert bad == []


def test_core_packages_import_cleanly_in_either_order():
    for first, second in (("ferryman.core.gemini", "ferryman.core.training"), ("ferryman.core.training", "ferryman.core.gemini")):
        code = f"import {first}, {second}, sys; print('ferryman.core.training' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
    alone = "import ferryman.core.gemini, sys; print('ferryman.core.training' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", alone], capture_output=True, text=True, check=True).stdout.strip() == "False"


def _runtime_targets(path: Path) -> list[str]:
    """Modules a file imports when it is imported (module level, try/if included), with
    ``from pkg import mod`` read as ``pkg.mod`` and ``from pkg import name`` as ``pkg``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    nodes = [n for top in tree.body for n in (ast.walk(top) if isinstance(top, ast.Try | ast.If) else [top])]
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, node.module] if node.module else parts)
            found += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return found


def _cycles(root: Path) -> list[list[str]]:
    """Cycles among ferryman modules through imports that run at import time."""
    names = {_module_name(p) for p in sorted(root.rglob("*.py"))}
    paths = {_module_name(p): p for p in sorted(root.rglob("*.py"))}
    graph = {name: sorted({t for t in _runtime_targets(paths[name]) if t in names and t != name}) for name in names}
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    return [c for c in found if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]


def test_no_import_cycles():
    assert _cycles(ROOT) == []


def test_the_cycle_checker_catches_a_cycle(tmp_path, monkeypatch):
    fake = tmp_path / "ferryman"
    (fake / "apps" / "a").mkdir(parents=True)
    (fake / "apps" / "a" / "config.py").write_text("from ferryman.apps.a.presets import X\n")
    (fake / "apps" / "a" / "presets.py").write_text("from ferryman.apps.a import config\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    assert _cycles(fake) == [["ferryman.apps.a.config", "ferryman.apps.a.presets", "ferryman.apps.a.config"]]
