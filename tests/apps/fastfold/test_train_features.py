"""fastfold train data: structures from PDB/mmCIF, AF2 ground-truth features, crops, the loader."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.common.rigid import Rigid, rot_to_quat
from ferryman.apps.fastfold.data.msa import Msa
from ferryman.apps.fastfold.loss import LossWeights
from ferryman.apps.fastfold.metrics import lddt
from ferryman.apps.fastfold.train.config import TrainPresetConfig
from ferryman.apps.fastfold.train.crop import contiguous_crop, crop_msa, spatial_crop
from ferryman.apps.fastfold.train.dataset import StructureDataset
from ferryman.apps.fastfold.train.features import ground_truth, training_example
from ferryman.apps.fastfold.train.step import alphafold_loss
from ferryman.apps.fastfold.train.structure import load_structures, read_structure

pytest.importorskip("openmm")
pytest.importorskip("Bio")

from tests.apps.fastfold._structures import VILLIN_SEQUENCE, openmm_villin_pdb, villin_protein


@pytest.fixture(scope="module")
def villin_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("structures")
    (folder / "villin.pdb").write_text(openmm_villin_pdb())
    return folder


@pytest.fixture(scope="module")
def villin(villin_dir):
    return read_structure(villin_dir / "villin.pdb")


def test_pdb_and_mmcif_give_the_same_chain(villin, tmp_path):
    from ferryman.apps.fastfold.output.protein import to_mmcif

    assert villin.sequence == VILLIN_SEQUENCE
    prot = villin_protein()  # the repo's own PDB reader, independent of Biopython
    np.testing.assert_allclose(villin.atom_positions * villin.atom_mask[..., None], prot.atom_positions * prot.atom_mask[..., None], atol=1e-3)
    np.testing.assert_array_equal(villin.atom_mask, prot.atom_mask)
    (tmp_path / "villin.cif").write_text(to_mmcif(prot, name="villin"))
    cif = read_structure(tmp_path / "villin.cif")
    assert cif.sequence == VILLIN_SEQUENCE
    np.testing.assert_allclose(cif.atom_positions, villin.atom_positions, atol=1e-3)
    np.testing.assert_array_equal(cif.residue_index, villin.residue_index)


def test_raw_openmm_file_reads_like_the_cleaned_one(villin):
    """OpenMM's own file: CHARMM residue names, hydrogens, water and OT1/OT2 terminal oxygens."""
    import openmm.app

    raw = read_structure(Path(openmm.app.__file__).parent / "data" / "test.pdb")
    assert raw.sequence == VILLIN_SEQUENCE
    np.testing.assert_array_equal(raw.atom_mask, villin.atom_mask)
    assert raw.atom_mask[-1, rc.atom_order["O"]] == 1 and raw.atom_mask[-1, rc.atom_order["OXT"]] == 1
    np.testing.assert_allclose(raw.atom_positions, villin.atom_positions, atol=1e-3)


def test_unreadable_files_are_skipped_and_counted(villin_dir, tmp_path):
    (tmp_path / "villin.pdb").write_text((villin_dir / "villin.pdb").read_text())
    (tmp_path / "broken.cif").write_text("data_x\nloop_\n_atom_site.id\n1\n")
    (tmp_path / "empty.pdb").write_text("")
    (tmp_path / "notes.txt").write_text("not a structure")
    chains, skipped = load_structures(tmp_path)
    assert [c.sequence for c in chains] == [VILLIN_SEQUENCE]
    assert sorted(p.name for p, _ in skipped) == ["broken.cif", "empty.pdb"]
    assert all(p.name in reason for p, reason in skipped)
    dataset = StructureDataset.from_folder(tmp_path, TrainPresetConfig())
    assert len(dataset) == 1 and dataset.skipped == 2


def test_ground_truth_frames_rebuild_the_atoms(villin):
    gt = ground_truth(villin)
    n = len(villin)
    assert gt["backbone_rigid_mask"].sum() == n
    bb = Rigid.from_tensor_4x4(gt["backbone_rigid_tensor"])
    torch.testing.assert_close(bb.trans, gt["all_atom_positions"][:, rc.atom_order["CA"]])
    groups = Rigid.from_tensor_4x4(gt["rigidgroups_gt_frames"])
    torch.testing.assert_close(groups.to_tensor_4x4()[:, 0], gt["backbone_rigid_tensor"], atol=1e-5, rtol=0)
    # The rigid-group frames rebuild the atoms from AF2's ideal geometry: the backbone within
    # 0.25 Å, side chains within the spread a simulated structure has around ideal bond angles.
    from ferryman.apps.fastfold.common.all_atom import frames_to_atom14_positions

    rebuilt = frames_to_atom14_positions(torch.as_tensor(villin.aatype), groups)
    err = (rebuilt - gt["atom14_gt_positions"]).norm(dim=-1)
    exists = gt["atom14_gt_exists"].bool()
    assert err[:, :4].max() < 0.25  # N, CA, C, O
    assert err[exists].median() < 0.15 and err[exists].max() < 1.5
    # Alternative names differ exactly at the ambiguous atoms (e.g. ASP OD1/OD2).
    differs = (gt["atom14_alt_gt_positions"] - gt["atom14_gt_positions"]).norm(dim=-1) > 1e-3
    assert torch.equal(differs, gt["atom14_atom_is_ambiguous"].bool() & gt["atom14_gt_exists"].bool())
    assert gt["rigidgroups_gt_exists"][:, [1, 2]].sum() == 0
    assert gt["pseudo_beta_mask"].sum() == n


def _perfect_output(gt: dict, aatype: torch.Tensor, layers: int = 2) -> dict:
    bb = Rigid.from_tensor_4x4(gt["backbone_rigid_tensor"])
    traj = torch.cat([rot_to_quat(bb.rot), bb.trans], dim=-1)
    return {
        "traj": traj.expand(layers, *traj.shape),
        "sidechain_frames": gt["rigidgroups_gt_frames"][None],
        "final_atom14_positions": gt["atom14_gt_positions"],
    }


def test_fape_is_zero_for_the_true_frames(villin):
    from ferryman.apps.fastfold.train.step import _fape_terms

    gt = ground_truth(villin)
    batch = {**gt, "aatype": torch.as_tensor(villin.aatype)}
    terms = _fape_terms(_perfect_output(gt, batch["aatype"]), batch, 1.0)
    floor = math.sqrt(1e-4) / 10.0  # every pair contributes sqrt(eps) / length_scale
    assert terms["backbone_fape"].item() == pytest.approx(floor, abs=2e-4)
    assert terms["sidechain_fape"].item() == pytest.approx(floor, abs=2e-4)
    ca = gt["all_atom_positions"][:, rc.atom_order["CA"]]
    assert lddt(ca, ca).item() == pytest.approx(1.0)


def test_crops():
    rng = np.random.default_rng(0)
    window = contiguous_crop(100, 30, rng)
    assert len(window) == 30 and np.all(np.diff(window) == 1)
    assert np.array_equal(contiguous_crop(20, 30, rng), np.arange(20))
    ca = np.zeros((50, 3), np.float32)
    ca[:, 0] = np.arange(50) * 3.8  # a straight line: the nearest residues are a run
    mask = np.ones(50, np.float32)
    mask[10] = 0.0
    picked = spatial_crop(ca, mask, 8, np.random.default_rng(1))
    assert len(picked) == 8 and 10 not in picked and picked.max() - picked.min() <= 9
    msa = Msa(sequences=["ACDEF", "A-DQF"], deletions=[[0] * 5, [0, 0, 2, 0, 1]])
    cropped = crop_msa(msa, np.array([2, 3, 4]))
    assert cropped.sequences == ["DEF", "DQF"] and cropped.deletions == [[0, 0, 0], [2, 0, 1]]


def test_loader_is_seeded_and_draws_recycling(villin_dir):
    preset = TrainPresetConfig(crop_size=20, crop_mode="spatial", max_msa_clusters=4, max_extra_msa=4, max_recycle=3)
    dataset = StructureDataset.from_folder(villin_dir, preset)
    a, b = dataset.example(0, seed=5), dataset.example(0, seed=5)
    assert a["aatype"].shape == (20,) and a["all_atom_positions"].shape == (20, 37, 3)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    draws = {int(dataset.example(0, seed=s)["num_recycle"]) for s in range(40)}
    assert draws == {0, 1, 2, 3}
    torch.manual_seed(3)
    first = next(iter(dataset))
    torch.manual_seed(3)
    again = next(iter(dataset))
    torch.testing.assert_close(first["residue_index"], again["residue_index"])


def test_loss_is_finite_and_gradients_reach_every_module(villin):
    from ferryman.apps.fastfold.model import build_model
    from ferryman.apps.fastfold.train.config import TrainPresetConfig

    torch.manual_seed(0)
    model = build_model("tiny")
    example = training_example(villin, None, TrainPresetConfig(max_msa_clusters=1, max_extra_msa=1).input_config(), seed=0)
    out = model(example, num_recycle=1)
    loss, terms = alphafold_loss(out, example, LossWeights(tm=0.1, violation=1.0, experimentally_resolved=0.01))
    assert torch.isfinite(loss) and set(terms) >= {"backbone_fape", "sidechain_fape", "distogram", "masked_msa", "violation", "tm"}
    loss.backward()
    # A single sequence leaves the extra MSA empty (fully masked): its stack gets no gradient.
    for name in ("evoformer", "structure_module", "distogram_head", "masked_msa_head", "input_embedder"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0, name
        assert all(torch.isfinite(g).all() for g in grads), name
