"""Template search with real hmmbuild/hmmsearch against an mmCIF folder (villin headpiece)."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.data import tools
from ferryman.apps.fastfold.data.msa import single_sequence_msa
from ferryman.apps.fastfold.data.templates import (
    load_template_folder,
    parse_hhr,
    parse_hmmsearch_sto,
    search_templates,
)
from ferryman.apps.fastfold.output.protein import write_mmcif
from ferryman.core.errors import UserError

from ._structures import VILLIN_SEQUENCE, villin_protein

needs_hmmer = pytest.mark.skipif(shutil.which("hmmsearch") is None, reason="needs HMMER")


@pytest.fixture()
def template_dir(tmp_path):
    folder = tmp_path / "mmcif"
    write_mmcif(villin_protein(), folder / "1vii.cif", name="1vii")
    return folder


def _searcher():
    return tools.Hmmsearch(binary=tools.find_binary("hmmsearch"), hmmbuild_binary=tools.find_binary("hmmbuild"))


def test_mmcif_folder_is_read_into_chains(template_dir):
    chains = load_template_folder(template_dir)
    assert list(chains) == ["1vii_A"]
    assert chains["1vii_A"].sequence == VILLIN_SEQUENCE
    assert chains["1vii_A"].positions.shape == (35, 37, 3)


@needs_hmmer
def test_homologous_query_finds_villin_template(template_dir):
    # Three substitutions: a homologue, not the same sequence (exact copies are filtered, as in AF2).
    query = "LSDEDFKAVFGMTRSAFANLPLWKQQHLKKEKGLF".replace("FKAV", "FRAI").replace("KEKG", "KDKG")
    feats = search_templates(query, single_sequence_msa(query), folder=template_dir, searcher=_searcher())
    assert feats["template_aatype"].shape == (1, 35, 22)
    assert feats["template_all_atom_positions"].shape == (1, 35, 37, 3)
    assert feats["template_domain_names"].tolist() == [b"1vii_A"]
    assert feats["template_sequence"][0].decode() == VILLIN_SEQUENCE
    native = villin_protein()
    ca = rc.atom_order["CA"]
    aligned = feats["template_all_atom_masks"][0, :, ca] > 0
    assert aligned.sum() >= 30
    assert np.allclose(feats["template_all_atom_positions"][0, aligned, ca], native.atom_positions[aligned, ca], atol=1e-3)


@needs_hmmer
def test_identical_query_is_excluded_and_gives_empty_features(template_dir):
    feats = search_templates(
        VILLIN_SEQUENCE, single_sequence_msa(VILLIN_SEQUENCE), folder=template_dir, searcher=_searcher()
    )
    assert feats["template_aatype"].shape == (0, 35, 22)


def test_hmmsearch_stockholm_mapping_through_match_states():
    # Query length 6 (match states 'x'); the hit starts at residue 3; 'k' sits in an insert column.
    text = "# STOCKHOLM 1.0\nx_A/3-8 ACkD-EF\n#=GC RF xx.xxxx\n//\n"
    (hit,) = parse_hmmsearch_sto(text, 6)
    assert hit.query_to_hit == {0: 2, 1: 3, 2: 5, 4: 6, 5: 7}


def test_missing_template_folder(tmp_path):
    with pytest.raises(UserError, match="template mmCIF folder not found"):
        load_template_folder(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no \.cif or \.cif\.gz files"):
        load_template_folder(tmp_path / "empty")


def _cstranslate() -> Path | None:
    """Debian's `cstranslate` wrapper is broken; call the SIMD build the CPU supports."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    for simd in ("avx2", "sse4.1", "plain"):
        path = Path(f"/usr/libexec/hhsuite/cstranslate-{simd}")
        if path.exists() and (simd == "plain" or simd in flags):
            return path
    return None


@pytest.mark.skipif(
    shutil.which("hhsearch") is None or shutil.which("hhmake") is None or _cstranslate() is None,
    reason="needs HH-suite (hhsearch, hhmake, cstranslate)",
)
def test_hhsearch_hits_are_realigned_to_the_structure(template_dir, tmp_path):
    """A PDB70-style database whose SEQRES has two residues the structure lacks: kalign fixes the offset."""
    import subprocess

    context = Path("/usr/share/hhsuite/data")
    for sub in ("a3m", "hhm"):
        (tmp_path / sub).mkdir()
    (tmp_path / "a3m" / "1vii_A.a3m").write_text(f">1vii_A villin\nMG{VILLIN_SEQUENCE}\n")
    prefix = tmp_path / "pdb70"
    run = dict(check=True, capture_output=True)
    subprocess.run(["hhmake", "-i", tmp_path / "a3m" / "1vii_A.a3m", "-o", tmp_path / "hhm" / "1vii_A.hhm", "-v", "0"], **run)
    for sub in ("a3m", "hhm"):
        subprocess.run(["ffindex_build", "-s", f"{prefix}_{sub}.ffdata", f"{prefix}_{sub}.ffindex", tmp_path / sub], **run)
    subprocess.run(
        [_cstranslate(), "-f", "-x", "0.3", "-c", "4", "-I", "a3m", "-i", f"{prefix}_a3m", "-o", f"{prefix}_cs219",
         "-A", context / "cs219.lib", "-D", context / "context_data.lib"], **run,
    )  # fmt: skip
    query = VILLIN_SEQUENCE.replace("FKAV", "FRAI").replace("KEKG", "KDKG")
    searcher = tools.HHSearch(binary=tools.find_binary("hhsearch"), databases=[prefix])
    kalign = tools.Kalign(binary=tools.find_binary("kalign")) if shutil.which("kalign") else None
    feats = search_templates(
        query, single_sequence_msa(query), folder=template_dir, searcher=searcher, kalign=kalign,
        hits_out=tmp_path / "pdb_hits.hhr",
    )  # fmt: skip
    assert "1vii_A" in (tmp_path / "pdb_hits.hhr").read_text()
    if kalign is None:
        assert feats["template_aatype"].shape[0] == 0  # offset hits are skipped, not misplaced
        return
    assert feats["template_domain_names"].tolist() == [b"1vii_A"]
    assert feats["template_sum_probs"][0, 0] > 10
    ca = rc.atom_order["CA"]
    aligned = feats["template_all_atom_masks"][0, :, ca] > 0
    assert aligned.sum() >= 30
    native = villin_protein()
    assert np.allclose(feats["template_all_atom_positions"][0, aligned, ca], native.atom_positions[aligned, ca], atol=1e-3)


def test_parse_hhr_block():
    text = """Query         q
No 1
>1abc_B some protein
Probab=99.9  E-value=1e-30  Score=100  Aligned_cols=6  Identities=80%  Similarity=1.0  Sum_probs=5.5

Q q                 2 ACD-EF    6 (10)
Q Consensus         2 acd-ef    6 (10)
T Consensus         4 acdgef    9 (20)
T 1abc_B            4 ACDGEF    9 (20)
"""
    (hit,) = parse_hhr(text)
    assert hit.name == "1abc_B" and hit.sum_probs == 5.5
    assert hit.query_to_hit == {1: 3, 2: 4, 3: 5, 4: 7, 5: 8}
    assert hit.hit_residues == {3: "A", 4: "C", 5: "D", 7: "E", 8: "F"}  # G faces a query gap
