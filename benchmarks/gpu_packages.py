"""Python packages of the GPU check: what the device image holds, what a step must carry as wheels.

The GPU machine has no network: a package missing from its image travels with the working tree as
a wheel for its Python (3.12). ``wheel_specs`` lists the wheels to fetch (``make gpu-wheels``): a
step's ``needs`` and their requirements, down to what the image already has, at the versions
installed here (the tested lock). The dry run's import audit (``audit``) names every distribution
a step imported that is neither on the image nor declared, so a missing need shows up here, on a
CPU, instead of as a failed step on the device.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
from collections.abc import Iterable

# KINDS.md, 'Python packages already there', as read on a machine of the device image on 2026-11-17.
DEVICE_IMAGE = frozenset({
    "absl-py", "accelerate", "aiofiles", "aiohappyeyeballs", "aiohttp", "aiosignal", "annotated-doc", "anyio",
    "attrs", "botorch", "build", "certifi", "charset-normalizer", "chex", "click", "cloudpickle", "cmake",
    "colorama", "contourpy", "coverage", "cuda-bindings", "cuda-core", "cuda-pathfinder", "cuda-toolkit",
    "cupy-cuda13x", "cycler", "cython", "diffrax", "e3nn", "einops", "equinox", "etils", "execnet",
    "filelock", "flatbuffers", "flax", "fonttools", "formulaic", "frozenlist", "fsspec", "gpytorch", "grpcio",
    "h11", "h5py", "hf-xet", "httpcore", "httpx", "huggingface-hub", "humanize", "hypothesis", "idna",
    "imageio", "iniconfig", "interface-meta", "jax", "jax-cuda13-pjrt", "jax-cuda13-plugin", "jaxlib",
    "jaxtyping", "jinja2", "joblib", "kiwisolver", "lazy-loader", "lightning", "lightning-utilities",
    "linear-operator", "lineax", "llvmlite", "lxml", "markdown", "markdown-it-py", "markupsafe", "matplotlib",
    "mdurl", "meson", "ml-dtypes", "mpi4py", "mpmath", "msgpack", "multidict", "multipledispatch",
    "mypy-extensions", "nanobind", "narwhals", "networkx", "ninja", "numba", "numba-cuda", "numpy", "numpyro",
    "nvidia-cublas", "nvidia-cuda-cupti", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime", "nvidia-cudnn-cu13",
    "nvidia-cufft", "nvidia-cufile", "nvidia-curand", "nvidia-cusolver", "nvidia-cusparse",
    "nvidia-cusparselt-cu13", "nvidia-ml-py", "nvidia-nccl-cu13", "nvidia-nvjitlink", "nvidia-nvshmem-cu13",
    "nvidia-nvtx", "onnx", "onnx-ir", "onnxruntime", "onnxscript", "opencv-python-headless", "optax",
    "opt-einsum", "opt-einsum-fx", "optimistix", "orbax-checkpoint", "packaging", "pandas", "pathspec",
    "patsy", "peft", "pillow", "pip", "pluggy", "portalocker", "prometheus-client", "propcache", "protobuf",
    "psutil", "pyarrow", "pybind11", "py-cpuinfo", "pygments", "pyparsing", "pyproject-hooks",
    "pyre-extensions", "pytest", "pytest-benchmark", "pytest-cov", "pytest-mock", "pytest-timeout",
    "pytest-xdist", "python-dateutil", "pytorch-lightning", "pyyaml", "regex", "requests", "rich",
    "sacrebleu", "safetensors", "scikit-build-core", "scikit-image", "scikit-learn", "scipy", "seaborn",
    "sentencepiece", "sentence-transformers", "setuptools", "shellingham", "simplejson", "six",
    "sortedcontainers", "statsmodels", "sympy", "tabulate", "tensorboard", "tensorboard-data-server",
    "tensorstore", "threadpoolctl", "tifffile", "tiktoken", "timm", "tokenizers", "toolz", "torch",
    "torchaudio", "torchdiffeq", "torch-geometric", "torchmetrics", "torchvision", "tqdm", "transformers",
    "treescope", "triton", "typer", "typing-extensions", "typing-inspect", "urllib3", "uvloop",
    "wadler-lindig", "werkzeug", "wheel", "wrapt", "xarray", "xxhash", "yarl", "zipp"
})  # fmt: skip

# Distributions a step imports when they are installed and runs without: name -> why. The import
# audit would otherwise ask for them to be carried.
OPTIONAL = {
    "deepspeed": "host_adam compares against DeepSpeed's CPUAdam only when it is installed",
    "platformdirs": "loaded by a pytest plugin of the development venv, not by the tests",
}

DEVICE_PYTHON = "3.12"
# Our own code travels as the working tree (PYTHONPATH), never as a wheel.
OWN = frozenset({"ferryman"})


def canonical(name: str) -> str:
    """A distribution name as package indexes compare them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def on_device(name: str) -> bool:
    return canonical(name) in DEVICE_IMAGE


def name_of(need: str) -> str:
    """The distribution of a need written as a requirement ('diffusers', 'transformers>=5.23')."""
    from packaging.requirements import Requirement

    return Requirement(need).name


def missing(needs: Iterable[str]) -> list[str]:
    """The needs this interpreter does not meet: 'name' when absent, 'spec (found version)' when too old."""
    from packaging.requirements import Requirement

    out = []
    for need in needs:
        req = Requirement(need)
        try:
            found = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            out.append(need)
            continue
        if not req.specifier.contains(found, prereleases=True):
            out.append(f"{need} (found {found})")
    return out


def _requirements(name: str) -> list[str]:
    """Names of what ``name`` (installed here) requires on the device's Python, extras left out."""
    from packaging.requirements import Requirement

    env = {"python_version": DEVICE_PYTHON, "python_full_version": DEVICE_PYTHON + ".3", "extra": ""}
    out = []
    for line in metadata.requires(name) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            out.append(req.name)
    return out


def wheel_specs(needs: Iterable[str]) -> list[str]:
    """``name==version`` for ``needs`` and everything they require that the device image lacks, at
    the versions installed here (the lock's). A need with a version bound travels even when the
    image has the package: the image's version is the one the bound is there to replace. Raises
    LookupError naming a need that is not installed here."""
    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    todo = [(Requirement(n).name, True) for n in needs if not on_device(name_of(n)) or Requirement(n).specifier]
    while todo:
        name, forced = todo.pop()
        key = canonical(name)
        if key in seen or key in OWN or (key in DEVICE_IMAGE and not forced):
            continue
        try:
            seen[key] = f"{metadata.metadata(name)['Name']}=={metadata.version(name)}"
        except metadata.PackageNotFoundError:
            raise LookupError(f"{name} is needed on the device but not installed here, so its version is unknown") from None
        todo.extend((r, False) for r in _requirements(name))
    return sorted(seen.values(), key=str.lower)


def distributions_of(modules: Iterable[str]) -> set[str]:
    """Canonical names of the installed distributions that provide these top-level modules (modules
    no installed distribution provides, such as the standard library's, are left out)."""
    providers = metadata.packages_distributions()
    return {canonical(d) for m in modules for d in providers.get(m, ())}


def _closure(names: Iterable[str]) -> set[str]:
    """Canonical names of ``names`` (those installed here) and everything they require, at any depth."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        key = canonical(name)
        if key in seen:
            continue
        try:
            todo.extend(_requirements(name))
        except metadata.PackageNotFoundError:
            continue
        seen.add(key)
    return seen


def audit(modules: Iterable[str], needs: Iterable[str]) -> dict[str, list[str]]:
    """Of the distributions behind ``modules``: those not on the device image, and of these the ones
    a step must declare: neither in ``needs`` (or required by them), nor optional, nor pulled in by a
    package of the image (whose version there brings its own requirements)."""
    off = sorted(d for d in distributions_of(modules) if d not in DEVICE_IMAGE and d not in OWN)
    covered = _closure(DEVICE_IMAGE) | _closure(map(name_of, needs)) | _closure(OPTIONAL)
    return {"off_device": off, "undeclared": [d for d in off if d not in covered]}


def top_level_imports(lines: Iterable[str]) -> set[str]:
    """Top-level module names from ``-X importtime`` lines ('import time: self | cumulative | name')."""
    names = set()
    for line in lines:
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":
                names.add(name.split(".", 1)[0])
    return names
