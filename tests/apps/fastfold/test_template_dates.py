"""Template release-date filtering (AF2's --max_template_date), obsolete entries, and the template
library's index: built once, re-read only for files that changed."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import pytest

from ferryman.apps.fastfold.data import template_index, tools
from ferryman.apps.fastfold.data.msa import single_sequence_msa
from ferryman.apps.fastfold.data.template_index import HitFilter, load_index, read_obsolete, release_date
from ferryman.apps.fastfold.data.templates import search_templates
from ferryman.apps.fastfold.output.protein import to_mmcif

from ._structures import VILLIN_SEQUENCE, villin_protein

needs_hmmer = pytest.mark.skipif(shutil.which("hmmsearch") is None, reason="needs HMMER")
QUERY = VILLIN_SEQUENCE.replace("FKAV", "FRAI").replace("KEKG", "KDKG")  # a homologue, not a copy
# Entry -> revision dates as the PDB lists them (not in order: the release is the earliest).
RELEASES = {"1vii": ["2008-03-24", "1997-01-13"], "7new": ["2024-02-07", "2023-06-01"]}


def _with_dates(code: str, dates: list[str]) -> str:
    rows = "\n".join(f"{i} 'Structure model' 1 {i - 1} {d}" for i, d in enumerate(dates, start=1))
    return to_mmcif(villin_protein(), code) + (
        "loop_\n_pdbx_audit_revision_history.ordinal\n_pdbx_audit_revision_history.data_content_type\n"
        "_pdbx_audit_revision_history.major_revision\n_pdbx_audit_revision_history.minor_revision\n"
        f"_pdbx_audit_revision_history.revision_date\n{rows}\n"
    )


@pytest.fixture()
def mirror(tmp_path):
    folder = tmp_path / "mmcif"
    folder.mkdir()
    for code, dates in RELEASES.items():
        (folder / f"{code}.cif").write_text(_with_dates(code, dates))
    (folder / "5und.cif").write_text(to_mmcif(villin_protein(), "5und"))  # says nothing of its release
    return folder


def test_release_date_is_the_earliest_revision(mirror):
    assert release_date(mirror / "1vii.cif") == "1997-01-13"
    assert release_date(mirror / "7new.cif") == "2023-06-01"
    assert release_date(mirror / "5und.cif") is None


def test_hit_filter_cuts_at_the_date_and_maps_obsolete_entries(mirror, tmp_path):
    index = load_index(mirror)
    obsolete = tmp_path / "obsolete.dat"
    obsolete.write_text(" LIST OF OBSOLETE COORDINATE ENTRIES AND SUCCESSORS\n"
                        "OBSLTE    31-JUL-99 2OLD     7NEW\nOBSLTE    02-FEB-01 3GON\n")  # fmt: skip
    hit_filter = HitFilter(max_date=dt.date(2000, 1, 1), obsolete=read_obsolete(obsolete))
    assert hit_filter.resolve("1vii_A", index) == "1vii_A"  # 1997 <= 2000
    assert hit_filter.resolve("7new_A", index) is None  # 2023 > 2000
    assert hit_filter.resolve("5und_A", index) == "5und_A"  # no date known: kept
    assert hit_filter.resolve("3gon_A", index) is None  # withdrawn without a successor
    assert hit_filter.resolve("2old_A", index) is None  # its successor 7new is too recent
    assert HitFilter(obsolete=read_obsolete(obsolete)).resolve("2old_B", index) == "7new_B"
    assert HitFilter(max_date=dt.date(2023, 6, 1)).resolve("7new_A", index) == "7new_A"  # on the day: kept


@needs_hmmer
@pytest.mark.parametrize(
    ("max_date", "expected"),
    [(None, {"1vii_A", "5und_A", "7new_A"}), ("2000-01-01", {"1vii_A", "5und_A"}), ("2024-01-01", {"1vii_A", "5und_A", "7new_A"})],
)
def test_search_uses_only_templates_released_by_the_date(mirror, max_date, expected):
    from ferryman.apps.fastfold.data.pipeline import DataConfig

    searcher = tools.Hmmsearch(binary=tools.find_binary("hmmsearch"), hmmbuild_binary=tools.find_binary("hmmbuild"))
    hit_filter = DataConfig(max_template_date=max_date).hit_filter()
    feats = search_templates(QUERY, single_sequence_msa(QUERY), folder=mirror, searcher=searcher, hit_filter=hit_filter)
    assert {n.decode() for n in feats["template_domain_names"]} == expected


@needs_hmmer
def test_predict_flag_reaches_the_template_search(mirror, tmp_path):
    from ferryman.apps.fastfold.predict import predict

    fasta = tmp_path / "q.fasta"
    fasta.write_text(f">villin_homologue\n{QUERY}\n")
    (mirror / "5und.cif").unlink()
    summary = predict(
        [fasta], tmp_path / "out", random_weights=True, models=["model_1"], msa_mode="single-sequence", relax=False,
        plots=False, template_mmcif_dir=mirror, max_template_date="1999-12-31", max_msa_clusters=4, max_extra_msa=4,
        num_recycles=0, kernels="torch", progress=False,
    )  # fmt: skip
    assert summary["villin_homologue"]["template_names"] == ["1vii_A"]


def test_index_is_built_once_and_refreshed_per_changed_file(mirror, monkeypatch):
    parsed = []
    real = template_index._entry
    monkeypatch.setattr(template_index, "_entry", lambda path: parsed.append(path.name) or real(path))
    first = load_index(mirror)
    assert sorted(parsed) == ["1vii.cif", "5und.cif", "7new.cif"]
    assert (mirror / template_index.INDEX_NAME).is_file()
    assert first.files["1vii.cif"]["release_date"] == "1997-01-13" and first.chains()["7new_A"] == VILLIN_SEQUENCE

    parsed.clear()
    assert load_index(mirror).files == first.files and parsed == []  # the cached index: nothing parsed
    path = mirror / "7new.cif"
    path.write_text(_with_dates("7new", ["2021-05-05"]))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    (mirror / "5und.cif").unlink()
    again = load_index(mirror)
    assert parsed == ["7new.cif"] and again.files["7new.cif"]["release_date"] == "2021-05-05"
    assert set(again.files) == {"1vii.cif", "7new.cif"}


def test_read_only_mirror_still_works(mirror, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("ferryman.core.io.write_text", refuse)
    index = load_index(Path(mirror))
    assert len(index.files) == 3 and not (mirror / template_index.INDEX_NAME).exists()
