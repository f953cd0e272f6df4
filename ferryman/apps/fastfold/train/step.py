"""The AlphaFold2 training loss (AF2 Suppl. 1.9, eq. 7): one forward with the step's recycling
count, every loss term on the ground truth of ``train/features.py``, weighted by ``LossWeights``.

``make_loss_fn`` gives the ``loss_fn(engine, batch)`` the core training loop calls; it returns
the loss and the logged metrics (``lddt_ca`` of the final structure, ``fape`` and every term).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.common.rigid import Rigid
from ferryman.apps.fastfold.loss import (
    LossWeights,
    backbone_fape_loss,
    distogram_loss,
    experimentally_resolved_loss,
    find_structural_violations,
    masked_msa_loss,
    plddt_loss,
    rename_symmetric_atoms,
    sidechain_fape_loss,
    supervised_chi_loss,
    tm_loss,
    violation_loss,
)
from ferryman.apps.fastfold.metrics import lddt

STEP_KEYS = ("num_recycle", "use_clamped_fape")  # per-step draws the dataset adds; not model inputs

_CA = rc.atom_order["CA"]


def _fape_terms(out: dict, batch: dict, use_clamped: Tensor | float) -> dict[str, Tensor]:
    true_bb = Rigid.from_tensor_4x4(batch["backbone_rigid_tensor"])
    traj = out["traj"]  # [L, N, 7]
    pred_bb = Rigid.from_quat(traj[..., :4], traj[..., 4:])
    backbone = backbone_fape_loss(pred_bb, true_bb, batch["backbone_rigid_mask"], use_clamped=use_clamped)
    renamed, renamed_mask, alt_better = rename_symmetric_atoms(
        batch["aatype"], out["final_atom14_positions"], batch["atom14_gt_positions"], batch["atom14_gt_exists"]
    )
    sidechain = sidechain_fape_loss(
        Rigid.from_tensor_4x4(out["sidechain_frames"][-1]), out["final_atom14_positions"],
        Rigid.from_tensor_4x4(batch["rigidgroups_gt_frames"]), Rigid.from_tensor_4x4(batch["rigidgroups_alt_gt_frames"]),
        batch["rigidgroups_gt_exists"], renamed, renamed_mask, alt_better,
    )  # fmt: skip
    return {"backbone_fape": backbone, "sidechain_fape": sidechain}


def _confidence_terms(out: dict, batch: dict, weights: LossWeights) -> dict[str, Tensor]:
    pred_ca = out["final_atom_positions"][..., _CA, :]
    true_ca, ca_mask = batch["all_atom_positions"][..., _CA, :], batch["all_atom_mask"][..., _CA]
    terms = {"plddt": plddt_loss(out["plddt_logits"], pred_ca.detach(), true_ca, ca_mask, resolution=batch["resolution"])}
    if weights.experimentally_resolved > 0:
        terms["experimentally_resolved"] = experimentally_resolved_loss(
            out["experimentally_resolved_logits"], batch["all_atom_mask"], batch["atom37_atom_exists"],
            resolution=batch["resolution"],
        )  # fmt: skip
    if weights.tm > 0 and "pae_logits" in out:
        traj = out["traj"][-1].detach()
        terms["tm"] = tm_loss(
            out["pae_logits"], Rigid.from_quat(traj[..., :4], traj[..., 4:]),
            Rigid.from_tensor_4x4(batch["backbone_rigid_tensor"]), batch["backbone_rigid_mask"],
            resolution=batch["resolution"],
        )  # fmt: skip
    return terms


def alphafold_loss(out: dict, batch: dict, weights: LossWeights, *, use_clamped_fape: Tensor | float = 0.9):
    """The weighted sum of AF2's loss terms and each term (a dict of scalars)."""
    terms = _fape_terms(out, batch, use_clamped_fape)
    chi = supervised_chi_loss(out["unnormalized_angles_sin_cos"], batch["torsion_angles_sin_cos"],
                              batch["alt_torsion_angles_sin_cos"], batch["torsion_angles_mask"])  # fmt: skip
    terms["supervised_chi"] = chi.mean()  # averaged over the structure-module layers
    terms["distogram"] = distogram_loss(out["distogram_logits"], batch["pseudo_beta"], batch["pseudo_beta_mask"])
    terms["masked_msa"] = masked_msa_loss(out["masked_msa_logits"], batch["true_msa"], batch["bert_mask"])
    terms.update(_confidence_terms(out, batch, weights))
    if weights.violation > 0:
        found = find_structural_violations(out["final_atom14_positions"], batch["atom14_atom_exists"],
                                           batch["residue_index"], batch["aatype"])  # fmt: skip
        terms["violation"] = violation_loss(found, batch["atom14_atom_exists"])
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return total, terms


def structure_metrics(out: dict, batch: dict) -> dict[str, float]:
    """lDDT-Cα of the final structure against the truth."""
    pred_ca = out["final_atom_positions"][..., _CA, :].detach().float()
    true_ca, ca_mask = batch["all_atom_positions"][..., _CA, :], batch["all_atom_mask"][..., _CA]
    return {"lddt_ca": float(lddt(pred_ca, true_ca, ca_mask))}


def make_loss_fn(weights: LossWeights) -> Callable:
    """``loss_fn(engine, batch) -> (loss, metrics)`` for ``ferryman.core.training.train``."""

    def loss_fn(engine, batch: dict) -> tuple[Tensor, dict[str, float]]:
        inputs = {k: v for k, v in batch.items() if k not in STEP_KEYS}
        num_recycle = int(batch.get("num_recycle", 0))
        out = engine(inputs, num_recycle=num_recycle)
        use_clamped = batch.get("use_clamped_fape", 0.9)
        loss, terms = alphafold_loss(out, inputs, weights, use_clamped_fape=use_clamped)
        logs = {name: float(value.detach()) for name, value in terms.items()}
        logs["fape"] = logs["backbone_fape"] + logs["sidechain_fape"]
        logs.update(structure_metrics(out, inputs))
        logs["num_recycle"] = float(num_recycle)
        return loss, logs

    return loss_fn


@torch.no_grad()
def evaluate(model: torch.nn.Module, batch: dict, *, num_recycle: int | None = None) -> dict[str, float]:
    """Structure metrics of the model (in eval mode) on one example."""
    was_training = model.training
    model.eval()
    out = model({k: v for k, v in batch.items() if k not in STEP_KEYS}, num_recycle=num_recycle)
    model.train(was_training)
    return structure_metrics(out, batch)
