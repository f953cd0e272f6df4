"""Training examples: AF2 model inputs (MSA clustering, BERT masking) plus the ground truth the
losses need (AF2 Suppl. 1.2.9 and 1.9; feature names as AF2/OpenFold use them).

Ground truth per residue: backbone frames from N, CA, C (Alg. 21), the 8 rigid-group frames and
their pi-flipped alternatives built from the true torsion angles (Alg. 24), the seven torsion
angles and their mask (Suppl. 1.9.1), pseudo-beta, and atom14 positions with the symmetric
renaming alternative (Suppl. 1.9.3).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.common.all_atom import atom37_to_torsion_angles, torsion_angles_to_frames
from ferryman.apps.fastfold.common.protein import atom14_masks, atom37_to_atom14, pseudo_beta
from ferryman.apps.fastfold.common.rigid import Rigid
from ferryman.apps.fastfold.data.features import make_features
from ferryman.apps.fastfold.data.msa import Msa
from ferryman.apps.fastfold.data.transforms import InputConfig, make_model_inputs
from ferryman.apps.fastfold.loss.fape import atom14_swap_tables
from ferryman.apps.fastfold.train.structure import Chain

GROUND_TRUTH_KEYS = (
    "all_atom_positions", "all_atom_mask", "atom14_gt_positions", "atom14_gt_exists", "atom14_alt_gt_positions",
    "atom14_alt_gt_exists", "atom14_atom_is_ambiguous", "backbone_rigid_tensor", "backbone_rigid_mask",
    "rigidgroups_gt_frames", "rigidgroups_alt_gt_frames", "rigidgroups_gt_exists", "torsion_angles_sin_cos",
    "alt_torsion_angles_sin_cos", "torsion_angles_mask", "pseudo_beta", "pseudo_beta_mask", "resolution",
)  # fmt: skip


def backbone_frames(pos37: Tensor, mask37: Tensor) -> tuple[Rigid, Tensor]:
    """Frames ``[*, N]`` in the literature convention of the residue constants (CA at the origin,
    C on +x, N in the xy-plane at y > 0), and their mask.

    AF2 builds the frame with C on -x and turns it half a turn about y (``atom37_to_frames``),
    which puts C on +x as the ideal coordinates the structure module builds from have it.
    """
    n, ca, c = (rc.atom_order[a] for a in ("N", "CA", "C"))
    frames = Rigid.from_3_points(pos37[..., c, :], pos37[..., ca, :], pos37[..., n, :])
    flip = torch.diag(torch.tensor([-1.0, 1.0, -1.0], dtype=pos37.dtype, device=pos37.device))
    return frames.compose_rot(flip), mask37[..., n] * mask37[..., ca] * mask37[..., c]


def _group_exists(aatype: Tensor, torsion_mask: Tensor, bb_mask: Tensor) -> Tensor:
    """Rigid groups with atoms to define them ``[*, N, 8]``: backbone, psi (through O) and the chi
    groups the residue type has; pre-omega and phi groups carry no atoms and are never scored."""
    table = torch.zeros(21, 8, dtype=torch.float32)
    table[:, [0, 3]] = 1.0
    table[:20, 4:] = torch.as_tensor(rc.chi_angles_mask, dtype=torch.float32)[:20]
    exists = table.to(aatype.device)[aatype]
    observed = torch.cat([bb_mask[..., None].expand(*bb_mask.shape, 2), torsion_mask[..., 2:3] * bb_mask[..., None],
                          torsion_mask[..., 3:]], dim=-1)  # fmt: skip
    return exists * torch.cat([bb_mask[..., None], observed], dim=-1)


def _atom14_alternatives(aatype: Tensor, gt14: Tensor, exists14: Tensor) -> dict[str, Tensor]:
    perm_table, amb_table = atom14_swap_tables(aatype.device)
    perm = perm_table[aatype]  # [N, 14]
    return {
        "atom14_alt_gt_positions": torch.gather(gt14, -2, perm[..., None].expand(*perm.shape, 3)),
        "atom14_alt_gt_exists": torch.gather(exists14, -1, perm),
        "atom14_atom_is_ambiguous": amb_table[aatype],
    }


def ground_truth(chain: Chain) -> dict[str, Tensor]:
    """Every target the AF2 losses read, from one chain's atom37 coordinates (float32 tensors)."""
    aatype = torch.as_tensor(chain.aatype).long().clamp(max=rc.unk_restype_index)
    pos = torch.as_tensor(chain.atom_positions, dtype=torch.float32)
    mask = torch.as_tensor(chain.atom_mask, dtype=torch.float32) * atom14_masks(aatype)["atom37_atom_exists"]
    tors = atom37_to_torsion_angles(aatype, pos, mask, placeholder_for_undefined=True)
    bb, bb_mask = backbone_frames(pos, mask)
    # Residues without a backbone get identity frames so no NaN reaches a masked-out term.
    bb = Rigid(torch.where(bb_mask[:, None, None] > 0, bb.rot, torch.eye(3)), bb.trans * bb_mask[:, None])
    groups = torsion_angles_to_frames(aatype, bb, tors["torsion_angles_sin_cos"])
    alt_groups = torsion_angles_to_frames(aatype, bb, tors["alt_torsion_angles_sin_cos"])
    gt14, exists14 = atom37_to_atom14(pos, aatype), atom37_to_atom14(mask, aatype)
    cb, cb_mask = pseudo_beta(aatype, pos, mask)
    return {
        "all_atom_positions": pos, "all_atom_mask": mask,
        "atom14_gt_positions": gt14, "atom14_gt_exists": exists14, **_atom14_alternatives(aatype, gt14, exists14),
        "backbone_rigid_tensor": bb.to_tensor_4x4(), "backbone_rigid_mask": bb_mask,
        "rigidgroups_gt_frames": groups.to_tensor_4x4(), "rigidgroups_alt_gt_frames": alt_groups.to_tensor_4x4(),
        "rigidgroups_gt_exists": _group_exists(aatype, tors["torsion_angles_mask"], bb_mask),
        **tors, "pseudo_beta": cb, "pseudo_beta_mask": cb_mask,
        "resolution": torch.tensor(chain.resolution, dtype=torch.float32),
    }  # fmt: skip


def model_inputs(chain: Chain, msa: Msa | None, cfg: InputConfig, seed: int) -> dict[str, Tensor]:
    """Model inputs for the chain's sequence: its alignment (or the sequence alone), one seeded
    sample of MSA clustering and masking; templates are not used in training here."""
    msas = [msa] if msa is not None else []
    raw = make_features(chain.sequence, chain.name, msas)
    feats = make_model_inputs(raw, cfg, seed=seed)
    batch = {}
    for key, value in feats.items():
        if key.startswith("template_") or not isinstance(value, np.ndarray) or value.dtype == object:
            continue
        batch[key] = torch.from_numpy(np.ascontiguousarray(value))
    batch["residue_index"] = torch.as_tensor(chain.residue_index).long()
    if batch["extra_msa"].shape[0] == 0:  # one masked row stands for an empty extra MSA
        for key in ("extra_msa", "extra_msa_mask", "extra_has_deletion", "extra_deletion_value"):
            batch[key] = torch.zeros((1, *batch[key].shape[1:]), dtype=batch[key].dtype)
    return batch


def training_example(chain: Chain, msa: Msa | None, cfg: InputConfig, seed: int) -> dict[str, Tensor]:
    """Model inputs and ground truth of one (already cropped) chain."""
    if msa is not None and len(msa.sequences[0]) != len(chain):
        raise ValueError(f"{chain.name}: the alignment has {len(msa.sequences[0])} columns, the chain {len(chain)} residues")
    return {**model_inputs(chain, msa, cfg, seed), **ground_truth(chain)}
