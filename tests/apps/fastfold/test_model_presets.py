"""--model-preset over a folder laid out as AlphaFold2's parameter release: every kind of file
(monomer, _ptm, _multimer_v3) side by side, the monomer presets choose theirs, multimer files
are never opened."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ferryman.apps.fastfold.cli import main
from ferryman.apps.fastfold.params import resolve_sources
from ferryman.core.errors import UserError

DATA = Path(__file__).parents[3] / "data" / "fastfold"
QUICK = ["--set", "preset=tiny", "--msa-mode", "single-sequence", "--no-relax", "--no-plots", "--kernels", "torch",
         "--num-recycles", "0", "--no-progress", "--set", "inputs.max_msa_clusters=1", "--set", "inputs.max_extra_msa=1"]  # fmt: skip


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """params_model_{1..5}.npz and _ptm.npz as tiny networks in the official layout; the multimer
    files are junk, so opening one fails the test."""
    from ferryman.apps.fastfold.model import random_weights_model
    from ferryman.apps.fastfold.presets import HeadsConfig, tiny
    from ferryman.apps.fastfold.weights import save_official_params

    folder = tmp_path_factory.mktemp("alphafold_params")
    for i in range(1, 6):
        for suffix in ("", "_ptm"):
            model = random_weights_model(tiny(heads=HeadsConfig(plddt_channels=8, ptm=bool(suffix))), seed=10 * i + len(suffix))
            save_official_params(model, folder / f"params_model_{i}{suffix}.npz")
        (folder / f"params_model_{i}_multimer_v3.npz").write_bytes(b"not for monomer presets")
    (folder / "LICENSE").write_text("CC BY 4.0\n")
    return folder


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("monomer", [f"model_{i}" for i in range(1, 6)]),
        ("monomer_casp14", [f"model_{i}" for i in range(1, 6)]),
        ("monomer_ptm", [f"model_{i}_ptm" for i in range(1, 6)]),
    ],
)
def test_each_preset_picks_its_files(release, preset, expected):
    sources = resolve_sources(release, None, preset, random_weights=False)
    assert [s.name for s in sources] == expected
    assert [s.path.name for s in sources] == [f"params_{n}.npz" for n in expected]


def test_explicit_models_and_multimer_files(release):
    assert [s.name for s in resolve_sources(release, ["model_2_ptm", "model_4"], "monomer", False)] == ["model_2_ptm", "model_4"]
    multimer = [f"model_{i}_multimer_v3" for i in range(1, 6)]
    assert [s.name for s in resolve_sources(release, None, "multimer", False)] == multimer
    with pytest.raises(UserError, match="is a multimer model; run it with --model-preset multimer"):
        resolve_sources(release, ["model_1_multimer_v3"], "monomer", False)
    with pytest.raises(UserError, match="is a monomer model; run it with a monomer --model-preset"):
        resolve_sources(release, ["model_1_ptm"], "multimer", False)


def _predict(release: Path, out: Path, *args: str) -> tuple[dict, dict]:
    result = CliRunner().invoke(main, ["predict", str(DATA / "villin.fasta"), "--params", str(release),
                                       "--out", str(out), *QUICK, *args], catch_exceptions=False)  # fmt: skip
    assert result.exit_code == 0, result.output
    folder = out / "villin_n68h"
    return json.loads((out / "run_info.json").read_text()), json.loads((folder / "ranking_debug.json").read_text())


def test_default_and_monomer_ptm_runs_use_the_right_files(release, tmp_path):
    info, ranking = _predict(release, tmp_path / "default")
    monomer = [f"model_{i}" for i in range(1, 6)]
    assert info["model_names"] == monomer and set(ranking["order"]) == set(monomer)
    assert all(info["weights"][n].endswith(f"params_{n}.npz") for n in monomer)
    assert not list((tmp_path / "default" / "villin_n68h").glob("pae_*.json"))  # no PAE head in monomer models

    info, ranking = _predict(release, tmp_path / "ptm", "--model-preset", "monomer_ptm")
    ptm = [f"model_{i}_ptm" for i in range(1, 6)]
    assert info["model_names"] == ptm and set(ranking["order"]) == set(ptm) == set(ranking["ptms"])
    assert sorted(p.name for p in (tmp_path / "ptm" / "villin_n68h").glob("pae_*.json")) == sorted(f"pae_{n}.json" for n in ptm)
    # Ranked by mean pLDDT (AF2 and ColabFold for monomers, _ptm included), not by pTM.
    assert [ranking["plddts"][n] for n in ranking["order"]] == sorted(ranking["plddts"].values(), reverse=True)
