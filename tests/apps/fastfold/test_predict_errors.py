"""Bad inputs to predict(): one UserError line naming the problem, and nothing written."""

from pathlib import Path

import pytest

from ferryman.apps.fastfold.predict import predict
from ferryman.core.errors import UserError

DATA = Path(__file__).parents[3] / "data" / "fastfold"

FAST = dict(random_weights=True, msa_mode="single-sequence", relax=False, kernels="torch", num_recycles=0, progress=False)


def _refused(out: Path, fastas, match: str, **options) -> str:
    with pytest.raises(UserError, match=match) as info:
        predict(fastas, out, **options)
    message = str(info.value)
    assert "\n" not in message
    assert not out.exists() or not any(out.rglob("*"))  # nothing half-written
    return message


def test_malformed_fasta(tmp_path):
    bad = tmp_path / "bad.fasta"
    bad.write_text(">ok\nACDEF\n>broken\nAC?EF\n")
    message = _refused(tmp_path / "out", [bad], r"'\?' at position 3 is not an amino-acid letter", **FAST)
    assert str(bad) in message and "record 2 ('broken')" in message


def test_no_weights_is_refused_with_a_hint(tmp_path):
    opts = {k: v for k, v in FAST.items() if k != "random_weights"}
    message = _refused(tmp_path / "out", [DATA / "villin.fasta"], "no weights given", **opts)
    assert "--random-weights" in message and "--params" in message


def test_missing_and_corrupt_params(tmp_path):
    opts = {k: v for k, v in FAST.items() if k != "random_weights"}
    _refused(tmp_path / "out", [DATA / "villin.fasta"], "no such file or folder", params=tmp_path / "none", **opts)
    folder = tmp_path / "params"
    folder.mkdir()
    (folder / "params_model_1.npz").write_bytes(b"this is not a zip file")
    message = _refused(tmp_path / "out", [DATA / "villin.fasta"], "params_model_1.npz", params=folder, **opts)
    assert "cannot read this AlphaFold parameter file" in message
    _refused(
        tmp_path / "out", [DATA / "villin.fasta"], r"--models model_2: no params_<name>\.npz",
        params=folder, models=["model_2"], **opts,
    )  # fmt: skip


def test_missing_binary_is_named(tmp_path, monkeypatch):
    db = DATA / "seqdb" / "globins45.fa"
    JACKHMMER = {**FAST, "msa_mode": "jackhmmer"}
    message = _refused(
        tmp_path / "out", [DATA / "villin.fasta"], "jackhmmer", uniref90_db=db,
        jackhmmer_binary=tmp_path / "bin" / "jackhmmer", **JACKHMMER,
    )  # fmt: skip
    assert "apt-get install hmmer hhsuite kalign" in message
    monkeypatch.setenv("PATH", str(tmp_path))
    _refused(tmp_path / "out", [DATA / "villin.fasta"], "jackhmmer not found on PATH", uniref90_db=db, **JACKHMMER)
    _refused(tmp_path / "out", [DATA / "villin.fasta"], "--uniref90-db: .* not found", uniref90_db=tmp_path / "x.fa", **JACKHMMER)


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _refused(blocker / "out", [DATA / "villin.fasta"], "cannot create the --out folder", **FAST)
    assert blocker.read_text() == "not a folder"


def test_msa_dir_without_the_targets_alignment(tmp_path):
    (tmp_path / "msas").mkdir()
    opts = {**FAST, "msa_mode": None}
    _refused(tmp_path / "out", [DATA / "villin.fasta"], "no alignment for 'villin_n68h'", msa_dir=tmp_path / "msas", **opts)


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"precision": "fp16"}, "--precision must be bf16 or fp32"),
        ({"chunk_size": "big"}, "--chunk-size must be a positive integer or 'auto'"),
        ({"chunk_size": 0}, "--chunk-size must be a positive integer"),
        ({"num_recycles": -1}, "--num-recycles must be >= 0"),
        ({"models_to_relax": "some"}, "--models-to-relax must be all or best"),
    ],
)
def test_bad_options(tmp_path, option, match):
    _refused(tmp_path / "out", [DATA / "villin.fasta"], match, **{**FAST, **option})
