"""AlphaFold2 training losses (AF2 Suppl. 1.9), one file per loss, plain functions on tensors.

``LossWeights`` holds the weights of AF2's total loss (Suppl. 1.9, eq. 7; AF2 model config); the
training step combines the terms with them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ferryman.apps.fastfold.loss.distogram import distogram_loss
from ferryman.apps.fastfold.loss.experimentally_resolved import experimentally_resolved_loss
from ferryman.apps.fastfold.loss.fape import (
    backbone_fape_loss,
    fape,
    rename_symmetric_atoms,
    sidechain_fape_loss,
)
from ferryman.apps.fastfold.loss.masked_msa import masked_msa_loss
from ferryman.apps.fastfold.loss.plddt import plddt_loss
from ferryman.apps.fastfold.loss.tm import tm_loss
from ferryman.apps.fastfold.loss.torsion import supervised_chi_loss, torsion_angle_loss
from ferryman.apps.fastfold.loss.violations import find_structural_violations, violation_loss


@dataclass(kw_only=True)
class LossWeights:
    """AF2's loss weights. Initial training uses the first six; fine-tuning switches on
    ``experimentally_resolved`` and ``violation`` (and ``tm`` for the pTM models)."""

    backbone_fape: float = 0.5  # FAPE weight 1.0, split evenly between backbone and side chains
    sidechain_fape: float = 0.5
    supervised_chi: float = 1.0
    distogram: float = 0.3
    masked_msa: float = 2.0
    plddt: float = 0.01
    experimentally_resolved: float = 0.0  # 0.01 when fine-tuning
    violation: float = 0.0  # 1.0 when fine-tuning
    tm: float = 0.0  # 0.1 for pTM fine-tuning

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {value}")


__all__ = [
    "LossWeights",
    "backbone_fape_loss",
    "distogram_loss",
    "experimentally_resolved_loss",
    "fape",
    "find_structural_violations",
    "masked_msa_loss",
    "plddt_loss",
    "rename_symmetric_atoms",
    "sidechain_fape_loss",
    "supervised_chi_loss",
    "tm_loss",
    "torsion_angle_loss",
    "violation_loss",
]
