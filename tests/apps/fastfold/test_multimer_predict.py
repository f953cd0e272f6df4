"""End to end: `fastfold predict --model-preset multimer` on a two-chain FASTA with a tiny random
model saved in the official multimer v3 layout: chains read back by Biopython from every PDB and
mmCIF with their names and lengths, ranking by 0.8 ipTM + 0.2 pTM, PAE per model, an Amber-relaxed
complex, ColabFold's A:B notation, and bad complexes ending in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ferryman.apps.fastfold.cli import main
from ferryman.apps.fastfold.predict import predict

DATA = Path(__file__).parents[3] / "data" / "fastfold"
VILLIN = "LSDEDFKAVFGMTRSAFANLPLWKQQHLKKEKGLF"
# The two halves of villin with two substitutions each: homologues of the template, not copies
# (AF2 drops a hit identical to its query).
CHAIN_A, CHAIN_B = VILLIN[:18].replace("FKAV", "FRAI"), VILLIN[18:].replace("KEKG", "KDKG")
QUICK = dict(preset="tiny", max_msa_clusters=8, max_extra_msa=8, num_recycles=1, seed=0, kernels="torch",
             progress=False, num_multimer_predictions_per_model=2)  # fmt: skip


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    from ferryman.apps.fastfold import multimer_weights
    from ferryman.apps.fastfold.model import random_weights_model
    from ferryman.apps.fastfold.presets import as_multimer, tiny

    folder = tmp_path_factory.mktemp("params")
    for index in (1, 2):
        model = random_weights_model(as_multimer(tiny()), seed=index)
        multimer_weights.save_official_params(model, folder / f"params_model_{index}_multimer_v3.npz")
    return folder


@pytest.fixture(scope="module")
def run(params, tmp_path_factory):
    if shutil.which("jackhmmer") is None:
        pytest.skip("needs jackhmmer (apt-get install hmmer)")
    from ferryman.apps.fastfold.output.protein import write_mmcif
    from tests.apps.fastfold._structures import villin_protein

    tmp = tmp_path_factory.mktemp("run")
    write_mmcif(villin_protein(), tmp / "mmcif" / "1vii.cif", name="1vii")
    fasta = tmp / "villin_halves.fasta"
    fasta.write_text(f">head villin residues 1-18\n{CHAIN_A}\n>tail villin residues 19-35\n{CHAIN_B}\n")
    summary = predict([fasta], tmp / "out", params=params, model_preset="multimer", uniprot_db=DATA / "seqdb" / "globins45.fa",
                      msa_mode="single-sequence", template_mmcif_dir=tmp / "mmcif", relax=True, relax_platform="CPU",
                      models_to_relax="best", relax_max_outer_iterations=1, relax_max_iterations=100, **QUICK)  # fmt: skip
    return tmp / "out" / "villin_halves", summary


def _chains(path: Path) -> dict[str, int]:
    from Bio.PDB import MMCIFParser, PDBParser

    parser = PDBParser(QUIET=True) if path.suffix == ".pdb" else MMCIFParser(QUIET=True)
    structure = parser.get_structure(path.stem, str(path))
    return {chain.id: len(list(chain)) for chain in structure[0]}


def test_every_structure_file_has_both_chains(run):
    folder, _ = run
    files = sorted(folder.glob("*.pdb")) + sorted(folder.glob("*.cif"))
    names = [f"model_{m}_multimer_v3_pred_{k}" for m in (1, 2) for k in (0, 1)]
    assert {f.stem for f in files} >= {f"unrelaxed_{n}" for n in names} | {f"ranked_{i}" for i in range(4)}
    for path in files:
        assert _chains(path) == {"A": len(CHAIN_A), "B": len(CHAIN_B)}, path.name


def test_ranking_by_iptm_and_ptm_with_pae_per_model(run):
    folder, summary = run
    ranking = json.loads((folder / "ranking_debug.json").read_text())
    scores = ranking["iptm+ptm"]
    assert len(scores) == 4 and ranking["order"] == sorted(scores, key=lambda n: -scores[n])
    for name in scores:
        assert scores[name] == pytest.approx(0.8 * ranking["iptm"][name] + 0.2 * ranking["ptm"][name], abs=2e-6)
        pae = json.loads((folder / f"pae_{name}.json").read_text())[0]["predicted_aligned_error"]
        assert np.array(pae).shape == (len(VILLIN), len(VILLIN))
    assert summary["villin_halves"]["order"] == ranking["order"]
    assert json.loads((folder / "msas" / "chain_id_map.json").read_text())["B"]["sequence"] == CHAIN_B
    assert (folder / "msas" / "A" / "uniprot_hits.sto").is_file()  # searched for pairing


def test_templates_are_searched_per_chain(run):
    """Each chain finds villin in the template folder; its slot covers that chain's residues only."""
    folder, summary = run
    assert [summary["villin_halves"]["chains"][c]["num_templates"] for c in "AB"] == [1, 1]
    with np.load(folder / "features.npz") as feats:
        ca = feats["template_all_atom_mask"][:, :, 1]  # [4 slots, N]
        asym = feats["asym_id"]
    assert ca.shape == (4, len(VILLIN)) and not ca[1:].any()  # one template per chain, padded to 4 slots
    assert ca[0, asym == 1].sum() >= 14 and ca[0, asym == 2].sum() >= 14


def test_the_best_complex_is_relaxed_as_one_system(run):
    folder, _ = run
    best = json.loads((folder / "ranking_debug.json").read_text())["order"][0]
    assert _chains(folder / f"relaxed_{best}.pdb") == {"A": len(CHAIN_A), "B": len(CHAIN_B)}
    metrics = json.loads((folder / "relax_metrics.json").read_text())[best]
    # Minimised under restraints: atoms moved, but not far (a random structure's energy before the
    # minimiser enforces its H-bond constraints is no fair start, so energies are not compared).
    assert "error" not in metrics and 0 < metrics["ca_rmsd"] < 2.0, metrics
    ranked = (folder / "ranked_0.pdb").read_text()
    assert ranked == (folder / f"relaxed_{best}.pdb").read_text()


def test_colabfold_notation_and_random_weights_through_the_cli(tmp_path):
    fasta = tmp_path / "jobs.fasta"
    fasta.write_text(f">dimer\n{CHAIN_A}:{CHAIN_B}\n")
    args = ["predict", str(fasta), "--out", str(tmp_path / "out"), "--model-preset", "multimer", "--random-weights",
            "--msa-mode", "single-sequence", "--num-multimer-predictions-per-model", "1", "--no-relax", "--no-plots",
            "--kernels", "torch", "--num-recycles", "0", "--no-progress", "--set", "inputs.max_extra_msa=4"]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "out" / "dimer"
    assert _chains(folder / "ranked_0.cif") == {"A": len(CHAIN_A), "B": len(CHAIN_B)}
    assert "iptm+ptm" in json.loads((folder / "ranking_debug.json").read_text())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f">a\n{CHAIN_A}\n>empty\n\n", "record 2 ('empty'): the sequence is empty"),
        ("".join(f">c{i}\nACDEFGHIK\n" for i in range(63)), "has 63 chains; at most 62 can be named"),
        (f">protein\n{CHAIN_A}\n>dna\n{'ACGTTGCA' * 4}\n", "record 2 ('dna'): this looks like a DNA/RNA sequence"),
    ],
    ids=["one_chain_empty", "63_chains", "mixed_dna"],
)
def test_bad_complexes_end_in_one_line(tmp_path, text, expected):
    fasta = tmp_path / "bad.fasta"
    fasta.write_text(text)
    args = ["predict", str(fasta), "--out", str(tmp_path / "out"), "--model-preset", "multimer", "--random-weights",
            "--msa-mode", "single-sequence"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert expected in lines[0] and str(fasta) in lines[0]
    assert not (tmp_path / "out").exists()


def test_no_peptide_bond_across_a_chain_break():
    """Two chains of two residues, numbered 1-4 on: the C-N gap of 20 A between them is a broken
    peptide bond when read as one chain, and no bond at all as two."""
    from ferryman.apps.fastfold.common import residue_constants as rc
    from ferryman.apps.fastfold.relax.violations import find_violations

    positions = np.zeros((4, 37, 3), np.float32)
    mask = np.zeros((4, 37), np.float32)
    for i in range(4):  # N, CA, C along x with C(i)-N(i+1) = 1.33 A within a chain; chain B 20 A away
        for name, dx in (("N", 0.0), ("CA", 1.46), ("C", 2.98)):
            positions[i, rc.atom_order[name]] = [4.31 * (i % 2) + dx, 0.0, 20.0 * (i // 2)]
            mask[i, rc.atom_order[name]] = 1.0
    aatype, residue_index = np.full(4, rc.restype_order["G"]), np.arange(1, 5)
    one_chain = find_violations(positions, mask, aatype, residue_index)
    two_chains = find_violations(positions, mask, aatype, residue_index, np.array([0, 0, 1, 1]))
    assert one_chain["num_peptide_bond_violations"] == 2  # residues 2 and 3
    assert two_chains["num_peptide_bond_violations"] == 0
