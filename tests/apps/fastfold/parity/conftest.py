"""Shared oracle state of the parity suite: one random parameter set in the official layout per
scale, loaded into Ferryman's model and into AlphaFold2's Haiku parameters, and the villin inputs.

Everything is session-scoped: building the references is cheap next to XLA compiling them, and
every test of a module reuses the same parameters. Each test module starts with
``pytest.importorskip`` of the oracle, so the suite is skipped without the ``parity`` extra (jax,
dm-haiku, alphafold-colabfold, colabfold-kernels); ``make test`` installs it.
"""

from __future__ import annotations

import os

import pytest

# Before jax is imported: the CPU backend only (no accelerator probing), and XLA's matmuls on one
# thread like torch's in this suite, since CI has two cores and the models here are tiny.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()


@pytest.fixture(scope="session")
def cfg():
    from ._inputs import parity_config

    return parity_config()


@pytest.fixture(scope="session")
def af2_cfg(cfg):
    from ._af2 import af2_config

    return af2_config(cfg)


@pytest.fixture(scope="session")
def module_params(cfg):
    """Official-layout arrays at the module scale (order-1 activations)."""
    from ._af2 import random_official_params
    from ._inputs import MODULE_SCALE

    return random_official_params(cfg, scale=MODULE_SCALE, seed=0)


@pytest.fixture(scope="session")
def hparams(module_params):
    from ._af2 import haiku_params

    return haiku_params(module_params)


@pytest.fixture(scope="session")
def model(cfg, module_params):
    from ._af2 import ferryman_model
    from ._inputs import PARITY_RUN

    return ferryman_model(cfg, module_params, PARITY_RUN)


@pytest.fixture(scope="session")
def feats():
    """Villin with a 24-row MSA (8 cluster centres, 16 extra rows) and two templates from its own
    structure, one whole and one missing residues 14-16 (see ``villin_template``)."""
    from ._inputs import villin_features, villin_template

    templates = (villin_template(), villin_template(slice(14, 17)))
    return villin_features(msa_rows=24, templates=templates)


def pytest_terminal_summary(terminalreporter):
    """Every comparison's deviation from AlphaFold2 next to its bound (the suite's measured table)."""
    import sys

    recorded = getattr(sys.modules.get(__package__ + "._af2"), "DEVIATIONS", None)
    if not recorded or terminalreporter.config.getoption("verbose") < 1:  # `make parity` and -v show it
        return
    terminalreporter.section("deviation from AlphaFold2 (max abs, bound, max |AF2|)")
    for what, (err, bound, scale) in sorted(recorded.items()):
        terminalreporter.write_line(f"{err:9.1e} {bound:7.0e} {scale:8.2f}  {what}")
