"""Random AF2 feature dicts and tiny model configs for the fastfold model tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.model.options import RunOptions


def ref_run(**options) -> RunOptions:
    """Run options on the PyTorch reference ops (the Triton interpreter that CPU test runs switch on
    would take minutes at these sizes), with ``options`` laid over."""
    return RunOptions(**{"kernels": "torch", **options})


def random_features(n_res: int = 11, n_seq: int = 5, n_extra: int = 7, n_templ: int = 2, seed: int = 0) -> dict:
    """A feature dict with the shapes and value ranges the model documents (no padding)."""
    g = torch.Generator().manual_seed(seed)
    aatype = torch.randint(0, 20, (n_res,), generator=g)
    templ_aatype = torch.randint(0, 20, (n_templ, n_res), generator=g)
    atom_mask = torch.from_numpy(rc.STANDARD_ATOM_MASK).float()[templ_aatype]
    msa_onehot = F.one_hot(torch.randint(0, 23, (n_seq, n_res), generator=g), 23).float()
    msa_feat = torch.cat(
        [msa_onehot, torch.rand(n_seq, n_res, 2, generator=g), torch.rand(n_seq, n_res, 24, generator=g)], dim=-1
    )
    return {
        "aatype": aatype,
        "residue_index": torch.arange(n_res) + 3,
        "seq_mask": torch.ones(n_res),
        "target_feat": F.one_hot(aatype + 1, 22).float(),
        "msa_feat": msa_feat,
        "msa_mask": torch.ones(n_seq, n_res),
        "extra_msa": torch.randint(0, 23, (n_extra, n_res), generator=g),
        "extra_msa_mask": torch.ones(n_extra, n_res),
        "extra_has_deletion": (torch.rand(n_extra, n_res, generator=g) > 0.8).float(),
        "extra_deletion_value": torch.rand(n_extra, n_res, generator=g),
        "template_aatype": templ_aatype,
        "template_all_atom_positions": torch.randn(n_templ, n_res, 37, 3, generator=g) * 3 * atom_mask[..., None],
        "template_all_atom_masks": atom_mask,
        "template_mask": torch.ones(n_templ),
    }

