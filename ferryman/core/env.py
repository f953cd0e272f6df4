"""``ferryman env``: what a user needs to paste into a problem report."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from typing import Any

APP_DEPENDENCIES = {
    "kernels": ["triton"],
    "fastfold": ["biopython", "openmm", "pdbfixer", "matplotlib"],
    "opensora": ["av", "decord", "diffusers", "transformers"],
    "diffusion": ["diffusers", "transformers", "peft", "pillow"],
    "lm": ["transformers", "peft", "tokenizers", "pyarrow"],
}
# tool -> (version flag, words that mark the version line)
EXTERNAL_TOOLS = {
    "jackhmmer": ("-h", "HMMER"),
    "hmmsearch": ("-h", "HMMER"),
    "hhblits": ("-h", "HHblits"),
    "hhsearch": ("-h", "HHsearch"),
    "kalign": ("--version", "kalign"),
}


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def tool_version(name: str) -> tuple[str | None, str | None]:
    """(path, version line) of an external program, (None, None) when it is not on PATH."""
    path = shutil.which(name)
    if path is None:
        return None, None
    flag, marker = EXTERNAL_TOOLS.get(name, ("--version", name))
    try:
        proc = subprocess.run([path, flag], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return path, "unknown version"
    pattern = re.compile(rf"{re.escape(marker)}\s+v?\d[\w.]*", re.IGNORECASE)
    for line in (proc.stdout + proc.stderr).splitlines():
        found = pattern.search(line)
        if found:
            return path, found.group(0)
    return path, "unknown version"


def gpu_report() -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        props = torch.cuda.get_device_properties(index)
        gpus.append(
            {
                "index": index,
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_total_gib": round(total / 2**30, 2),
                "memory_free_gib": round(free / 2**30, 2),
            }
        )
    return gpus


def collect() -> dict[str, Any]:
    import psutil
    import torch

    from ferryman import __version__

    memory = psutil.virtual_memory()
    return {
        "ferryman": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "triton": package_version("triton"),
        "gpus": gpu_report(),
        "cpu_count": os.cpu_count(),
        "host_memory_total_gib": round(memory.total / 2**30, 2),
        "host_memory_available_gib": round(memory.available / 2**30, 2),
        "apps": {app: {dep: package_version(dep) for dep in deps} for app, deps in APP_DEPENDENCIES.items()},
        "tools": {name: dict(zip(("path", "version"), tool_version(name))) for name in EXTERNAL_TOOLS},
        "env": {key: os.environ.get(key) for key in ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET") if key in os.environ},
    }


def format_report(info: dict[str, Any]) -> str:
    lines = [
        f"ferryman   {info['ferryman']}",
        f"python     {info['python']} on {info['platform']}",
        f"torch      {info['torch']} (CUDA build: {info['torch_cuda'] or 'none, CPU only'})",
        f"triton     {info['triton'] or 'not installed (kernels run the PyTorch reference)'}",
        f"host       {info['cpu_count']} CPUs, {info['host_memory_available_gib']} of "
        f"{info['host_memory_total_gib']} GiB memory available",
    ]
    if info["gpus"]:
        for gpu in info["gpus"]:
            lines.append(
                f"gpu {gpu['index']}      {gpu['name']} (sm {gpu['capability']}), "
                f"{gpu['memory_free_gib']} of {gpu['memory_total_gib']} GiB free"
            )
    else:
        lines.append("gpu        none visible")
    lines.append("apps (optional dependencies):")
    for app, deps in info["apps"].items():
        missing = [d for d, v in deps.items() if v is None]
        found = ", ".join(f"{d} {v}" for d, v in deps.items() if v is not None)
        state = "ready" if not missing else f"missing {', '.join(missing)} (pip install 'ferryman[{_extra(app)}]')"
        lines.append(f"  {app:<10} {state}" + (f"; {found}" if found else ""))
    lines.append("external tools:")
    for name, tool in info["tools"].items():
        where = f"{tool['path']} ({tool['version']})" if tool["path"] else "not found (apt-get install hmmer hhsuite kalign)"
        lines.append(f"  {name:<10} {where}")
    for key, value in info["env"].items():
        lines.append(f"env        {key}={value}")
    return "\n".join(lines)


def _extra(app: str) -> str:
    return {"fastfold": "fold", "opensora": "video"}.get(app, app)
