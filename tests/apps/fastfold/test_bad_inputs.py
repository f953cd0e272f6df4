"""Damaged files, wrong flags and unwritable outputs through the real `fastfold` CLI: each ends
with a non-zero exit, exactly one line naming the file or flag, no traceback, and no output
folder left behind (Issue #15, fastfold parts).

Each case builds its inputs in a fresh folder and returns the command line; the table says what
the one line must contain.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ferryman.apps.fastfold.cli import main

DATA = Path(__file__).parents[3] / "data" / "fastfold"
VILLIN = DATA / "villin.fasta"
QUICK = ["--no-relax", "--no-plots", "--kernels", "torch", "--num-recycles", "0", "--no-progress"]
SINGLE = ["--msa-mode", "single-sequence"]


def _params_file(folder: Path, name: str = "model_1") -> Path:
    """A real (tiny) official-layout npz: damage must be what makes it fail, not its shape."""
    from ferryman.apps.fastfold.model import random_weights_model
    from ferryman.apps.fastfold.presets import HeadsConfig, tiny
    from ferryman.apps.fastfold.weights import save_official_params

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"params_{name}.npz"
    save_official_params(random_weights_model(tiny(heads=HeadsConfig(plddt_channels=8, ptm=False))), path)
    return path


def _predict(t: Path, *args: str) -> list[str]:
    return ["predict", str(VILLIN), "--out", str(t / "out"), *QUICK, *args]


def truncated_npz(t):
    path = _params_file(t / "params")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return _predict(t, "--params", str(path), "--set", "preset=tiny", *SINGLE), "params_model_1.npz"


def bit_flipped_npz(t):
    path = _params_file(t / "params")
    with zipfile.ZipFile(path) as archive:  # flip one bit inside the first member's stored data
        info = archive.infolist()[0]
    data = bytearray(path.read_bytes())
    offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    return _predict(t, "--params", str(path), "--set", "preset=tiny", *SINGLE), "params_model_1.npz"


def pickle_renamed_npz(t):
    import pickle

    (t / "params").mkdir()
    path = t / "params" / "params_model_1.npz"
    path.write_bytes(pickle.dumps({"alphafold/alphafold_iteration/x//weights": np.zeros(3)}))
    return _predict(t, "--params", str(path), *SINGLE), "a Python pickle"


def no_monomer_files(t):
    _params_file(t / "params", "model_1_ptm").rename(t / "params" / "params_model_1_ptm.npz")
    (t / "params" / "params_model_1_multimer_v3.npz").write_bytes(b"never opened")
    return _predict(t, "--params", str(t / "params"), *SINGLE), "no files of model preset monomer"


def unknown_model_preset(t):
    return _predict(t, "--random-weights", "--model-preset", "monomer_big", *SINGLE), "--model-preset 'monomer_big'"


def multimer_model_with_monomer_preset(t):
    args = _predict(t, "--random-weights", "--models", "model_1_multimer_v3", *SINGLE)
    return args, "is a multimer model; run it with --model-preset multimer"


def malformed_msa(t):
    folder = t / "msas" / "villin_n68h"
    folder.mkdir(parents=True)
    (folder / "bfd_uniref_hits.a3m").write_text(">q\nLSDEDFKAVFGMTRSAFANLPLWKQQHLKKEKGLF\n>hit\nLSDEDF\n")
    return _predict(t, "--random-weights", "--msa-dir", str(t / "msas")), str(folder / "bfd_uniref_hits.a3m")


def _fasta(t: Path, text: str) -> Path:
    path = t / "in.fasta"
    path.write_text(text)
    return path


def empty_record(t):
    path = _fasta(t, ">first\nLSDEDFKAVF\n>empty\n\n")
    return ["predict", str(path), "--out", str(t / "out"), "--random-weights", *SINGLE], "'empty'"


def dna_record(t):
    path = _fasta(t, ">gene\nATGGCTAGCTAGGATCCGATCGATCGTAGCTAG\n")
    return ["predict", str(path), "--out", str(t / "out"), "--random-weights", *SINGLE], "DNA/RNA"


def unknown_letters(t):
    path = _fasta(t, ">odd\nLSDEDF1AVFGMTRS\n")
    return ["predict", str(path), "--out", str(t / "out"), "--random-weights", *SINGLE], "'1' at position 7"


def unwritable_out(t):
    from ferryman.core.files import check_writable

    try:  # sysfs is read-only even to root; elsewhere this case cannot be built
        check_writable("/sys/fastfold-out", "probe")
        pytest.skip("/sys is writable here")
    except Exception:
        pass
    return ["predict", str(VILLIN), "--out", "/sys/fastfold-out", "--random-weights", *SINGLE], "/sys/fastfold-out"


def file_as_out(t):
    (t / "out").write_text("a file")
    return _predict(t, "--random-weights", *SINGLE), "is an existing file, not a folder"


def missing_database(t):
    return _predict(t, "--random-weights", "--uniref90-db", str(t / "uniref90.fasta")), "--uniref90-db"


def missing_mmseqs(t):
    for part in ("", "_seq", "_aln"):  # a database that passes the layout check
        (t / "dbs").mkdir(exist_ok=True)
        (t / "dbs" / f"uniref30_2302_db{part}.dbtype").write_bytes(b"\0\0\0\0")
    args = ["--msa-mode", "mmseqs2", "--mmseqs-db-dir", str(t / "dbs"), "--mmseqs-env-db", "",
            "--mmseqs-binary", str(t / "bin" / "mmseqs")]  # fmt: skip
    return _predict(t, "--random-weights", *args), "--mmseqs-binary"


def missing_mmseqs_db(t):
    (t / "dbs").mkdir()
    return _predict(t, "--random-weights", "--msa-mode", "mmseqs2", "--mmseqs-db-dir", str(t / "dbs")), "uniref30_2302_db"


def bad_template_date(t):
    (t / "mmcif").mkdir()
    args = ["--template-mmcif-dir", str(t / "mmcif"), "--max-template-date", "2022/01/01"]
    return _predict(t, "--random-weights", *SINGLE, *args), "--max-template-date '2022/01/01'"


def bad_msa_mode(t):
    return _predict(t, "--random-weights", "--msa-mode", "hhblits"), "--msa-mode 'hhblits'"


def no_msa_source(t):
    return _predict(t, "--random-weights"), "--msa-mode single-sequence"


def train_no_structures(t):
    (t / "data").mkdir()
    (t / "data" / "broken.pdb").write_text("ATOM  garbage\n")
    return ["train", "--data", str(t / "data"), "--out", str(t / "out")], "no readable structure files"


def _villin_folder(t: Path) -> Path:
    from tests.apps.fastfold._structures import openmm_villin_pdb

    (t / "data").mkdir(exist_ok=True)
    (t / "data" / "villin.pdb").write_text(openmm_villin_pdb())
    return t / "data"


def train_garbage_resume(t):
    (t / "junk").mkdir()
    return ["train", "--data", str(_villin_folder(t)), "--out", str(t / "out"), "--resume", str(t / "junk")], "--resume"


CASES = [
    truncated_npz, bit_flipped_npz, pickle_renamed_npz, no_monomer_files, unknown_model_preset, multimer_model_with_monomer_preset,
    malformed_msa, empty_record, dna_record, unknown_letters, unwritable_out, file_as_out, missing_database,
    missing_mmseqs, missing_mmseqs_db, bad_template_date, bad_msa_mode, no_msa_source, train_no_structures,
    train_garbage_resume,
]


def _check_one_line(t: Path, args: list[str], expected: str, existed: set[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    left = {p.name for p in t.iterdir()} - existed
    assert left == set(), f"left behind: {left}"  # nothing half-written, no new output folder


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_ends_in_one_line(tmp_path, case):
    args, expected = case(tmp_path)
    existed = {p.name for p in tmp_path.iterdir()}
    _check_one_line(tmp_path, args, expected, existed)


# --- fastfold train --resume on damaged core checkpoint files ------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One 2-step run of the tiny model with a checkpoint per step, copied per case."""
    t = tmp_path_factory.mktemp("run")
    args = ["train", "--data", str(_villin_folder(t)), "--out", str(t / "run"), "--model", "tiny", "--crop-size", "16",
            "--max-recycle", "0", "--max-steps", "2", "--checkpoint-every", "1", "--no-progress",
            "--set", "preset.max_msa_clusters=1", "--set", "preset.max_extra_msa=1"]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return t


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(8, path.stat().st_size // 3)])


def damaged_model_weights(run: Path) -> None:
    _truncate(run / "checkpoints" / "step-00000002" / "model.safetensors")


def damaged_optimizer(run: Path) -> None:
    _truncate(run / "checkpoints" / "step-00000002" / "optimizer.safetensors")


def damaged_rng(run: Path) -> None:
    _truncate(next((run / "checkpoints" / "step-00000002").glob("rng-rank*.safetensors")))


def garbage_latest_pointer(run: Path) -> None:
    (run / "checkpoints" / "latest").write_bytes(b"\x00\xffnot-a-step\n")


def stale_tmp_folder(run: Path) -> None:
    shutil.copytree(run / "checkpoints" / "step-00000002", run / "checkpoints" / ".tmp-step-00000003")
    _truncate(run / "checkpoints" / ".tmp-step-00000003" / "model.safetensors")


CHECKPOINT_CASES = [
    pytest.param(damaged_model_weights, "model.safetensors"),
    pytest.param(damaged_optimizer, "optimizer.safetensors"),
    pytest.param(damaged_rng, "rng-rank"),
    pytest.param(garbage_latest_pointer, ""),  # the folders are the truth: resume from the newest complete one
    pytest.param(stale_tmp_folder, ""),  # not a checkpoint: ignored, and removed by the next save
]


@pytest.mark.parametrize(("damage", "expected"), CHECKPOINT_CASES)
def test_resume_from_damaged_checkpoint_ends_in_one_line(trained_run, tmp_path, damage, expected):
    run = tmp_path / "run"
    shutil.copytree(trained_run / "run", run)
    damage(run)
    args = ["train", "--data", str(trained_run / "data"), "--out", str(run), "--model", "tiny", "--crop-size", "16",
            "--max-recycle", "0", "--max-steps", "3", "--resume", "latest", "--no-progress",
            "--set", "preset.max_msa_clusters=1", "--set", "preset.max_extra_msa=1"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    if not expected:  # resume from step 2 and go on
        assert result.exit_code == 0, result.output
        assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000003"
        assert not list((run / "checkpoints").glob(".tmp-*"))
        return
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.output


# --- fastfold predict --params <a training run> ----------------------------------------------------


def test_predict_finds_the_weights_of_a_run_and_of_one_checkpoint(trained_run):
    from ferryman.apps.fastfold.params import resolve_sources

    run = trained_run / "run"
    (source,) = resolve_sources(run, None, "monomer", random_weights=False)
    assert (source.name, source.kind, source.path.name) == ("tiny", "checkpoint", "step-00000002")
    (source,) = resolve_sources(run / "checkpoints" / "step-00000001", None, "monomer", random_weights=False)
    assert (source.network, source.path.name, source.run_config) == ("tiny", "step-00000001", run / "fastfold_train.yaml")


def test_predict_with_a_damaged_trained_checkpoint_ends_in_one_line(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run / "run", run)
    _truncate(run / "checkpoints" / "step-00000002" / "model.safetensors")
    args = _predict(tmp_path, "--params", str(run), *SINGLE)
    _check_one_line(tmp_path, args, "model.safetensors", {"run"})
