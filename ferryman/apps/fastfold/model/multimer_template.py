"""AlphaFold-Multimer template embedding (Evans et al. 2021, Suppl. 2.3; AF2
``modules_multimer.TemplateEmbedding`` and ``template_embedding_1d``).

It differs from the monomer embedder (``template.py``) in four ways: each pair feature has a
linear of its own (``template_pair_embedding_0..8``) and the query pair representation is one of
them; distance and backbone features are kept within a chain (templates are searched per chain);
the templates are averaged, not attended over, so empty template slots count too; and the
template rows appended to the MSA carry chi angles only, masked by chi1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.common.protein import pseudo_beta
from ferryman.apps.fastfold.model.config import AlphaFoldConfig
from ferryman.apps.fastfold.model.evoformer import TemplatePairStack
from ferryman.apps.fastfold.model.primitives import Linear, add_, chunk_add_, layer_norm, lean
from ferryman.core.chunking import chunk_layer

TEMPLATE_SINGLE_FEAT_DIM = 34  # aatype 22 + sin chi 4 + cos chi 4 + chi mask 4


def _normalized(v: Tensor, eps: float = 1e-6) -> Tensor:
    """AF2 ``Vec3Array.normalized``: the norm is clipped below at ``eps``, so zero stays zero."""
    return v / torch.sqrt(torch.clamp((v * v).sum(-1, keepdim=True), min=eps * eps))


def backbone_frames(positions: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """AF2-Multimer ``make_backbone_affine``: rotation ``[N, 3, 3]`` with C on +x and N in the
    xy-plane (y > 0), origin CA ``[N, 3]``, and the N*CA*C mask ``[N]``."""
    n, ca, c = (positions[..., rc.atom_order[a], :] for a in ("N", "CA", "C"))
    e0 = _normalized(c - ca)
    e1 = n - ca
    e1 = _normalized(e1 - (e1 * e0).sum(-1, keepdim=True) * e0)
    e2 = torch.cross(e0, e1, dim=-1)
    bb_mask = mask[..., rc.atom_order["N"]] * mask[..., rc.atom_order["CA"]] * mask[..., rc.atom_order["C"]]
    return torch.stack([e0, e1, e2], dim=-1), ca, bb_mask


def _chi_atom_table(device) -> Tensor:
    table = torch.zeros(21, 4, 4, dtype=torch.long)
    table[:20] = torch.as_tensor(rc.chi_angles_atom_indices)
    return table.to(device)


def chi_angles(aatype: Tensor, positions: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """AF2-Multimer ``compute_chi_angles``: chi1..4 in radians ``[*, N, 4]`` (AF2's dihedral
    formula, atan2 of the plane normals) and their mask (the residue has the chi and all four
    atoms are present). Gap and unknown residues (aatype >= 20) have none."""
    aatype = aatype.long().clamp(max=20)
    index = _chi_atom_table(aatype.device)[aatype].flatten(-2)  # [*, N, 16]
    atoms = torch.gather(positions, -2, index[..., None].expand(*index.shape, 3)).unflatten(-2, (4, 4))
    a, b, c, d = atoms.unbind(-2)  # each [*, N, 4, 3]
    v1, v2, v3 = a - b, b - c, d - c
    c1, c2 = torch.cross(v1, v2, dim=-1), torch.cross(v3, v2, dim=-1)
    c3 = torch.cross(c2, c1, dim=-1)
    v2_norm = torch.sqrt(torch.clamp((v2 * v2).sum(-1), min=1e-12))
    angles = torch.atan2((c3 * v2).sum(-1), v2_norm * (c1 * c2).sum(-1))
    has_chi = torch.as_tensor([*rc.chi_angles_mask, [0.0] * 4], device=aatype.device, dtype=positions.dtype)
    atom_mask = torch.gather(mask, -1, index).unflatten(-1, (4, 4)).prod(-1)
    return angles, has_chi[aatype] * atom_mask


class MultimerTemplateEmbedder(nn.Module):
    """Per template: 9 embedded pair features, the template pair stack (products before
    attention, as in the Evoformer) and a LayerNorm; then the mean over template slots, ReLU and
    a projection to c_z. ``single_embedding`` gives the chi-angle rows for the MSA."""

    PAIR_FEATURE_DIMS = ("dgram", 1, 22, 22, 1, 1, 1, 1, "c_z")  # AF2's order, see _pair_features

    def __init__(self, cfg: AlphaFoldConfig):
        super().__init__()
        t = cfg.template
        self.cfg = t
        dims = {"dgram": t.dgram_num_bins, "c_z": cfg.c_z}
        for i, dim in enumerate(self.PAIR_FEATURE_DIMS):
            self.add_module(f"template_pair_embedding_{i}", Linear(dims.get(dim, dim), t.c_t, init="relu"))
        self.query_embedding_norm = layer_norm(cfg.c_z)
        self.template_pair_stack = TemplatePairStack(t, attention_first=False)
        self.output_linear = Linear(t.c_t, cfg.c_z, init="relu")
        self.template_single_embedding = Linear(TEMPLATE_SINGLE_FEAT_DIM, cfg.c_m, init="relu")
        self.template_projection = Linear(cfg.c_m, cfg.c_m, init="relu")

    def _residue_inputs(self, batch: dict[str, Tensor], index: int) -> dict[str, Tensor]:
        aatype = batch["template_aatype"][index].long()
        pos = batch["template_all_atom_positions"][index].float()
        mask = batch["template_all_atom_mask"][index].float()
        cb, cb_mask = pseudo_beta(aatype, pos, mask)
        rot, ca, bb_mask = backbone_frames(pos, mask)
        onehot = F.one_hot(aatype.clamp(max=21), 22).float()
        return {"cb": cb, "cb_mask": cb_mask, "rot": rot, "ca": ca, "bb_mask": bb_mask, "onehot": onehot,
                "asym_id": batch["asym_id"]}  # fmt: skip

    def _pair_features(self, rows: dict[str, Tensor], full: dict[str, Tensor]) -> list[Tensor]:
        """The 9 inputs of ``template_pair_embedding_i`` between residues ``rows`` and all."""
        same_chain = (rows["asym_id"][:, None] == full["asym_id"][None, :]).float()  # [rows, N]
        cb_mask_2d = rows["cb_mask"][:, None] * full["cb_mask"][None, :] * same_chain
        d2 = ((rows["cb"][:, None] - full["cb"][None]) ** 2).sum(-1, keepdim=True)
        lower = torch.linspace(self.cfg.dgram_min_bin, self.cfg.dgram_max_bin, self.cfg.dgram_num_bins,
                               device=d2.device) ** 2  # fmt: skip
        upper = torch.cat([lower[1:], lower.new_tensor([1e8])])
        dgram = ((d2 > lower) & (d2 < upper)).float() * cb_mask_2d[..., None]
        n_rows, n = cb_mask_2d.shape
        # CA_j in the backbone frame of residue i, as a unit vector.
        local = torch.einsum("iba,ijb->ija", rows["rot"], full["ca"][None] - rows["ca"][:, None])
        bb_mask_2d = rows["bb_mask"][:, None] * full["bb_mask"][None, :] * same_chain
        unit = _normalized(local) * bb_mask_2d[..., None]
        return [
            dgram,
            cb_mask_2d[..., None],
            full["onehot"][None].expand(n_rows, n, 22),
            rows["onehot"][:, None].expand(n_rows, n, 22),
            *(unit[..., k : k + 1] for k in range(3)),
            bb_mask_2d[..., None],
        ]

    def embed_template(self, z: Tensor, batch: dict[str, Tensor], index: int, pair_mask: Tensor,
                       chunk_size: int | None, inplace: bool) -> Tensor:  # fmt: skip
        """One template slot through its features and the pair stack: ``[N, N, c_t]``."""
        full = self._residue_inputs(batch, index)
        linears = [getattr(self, f"template_pair_embedding_{i}") for i in range(len(self.PAIR_FEATURE_DIMS))]

        def embed(z: Tensor, **rows: Tensor) -> Tensor:
            feats = [*self._pair_features(rows, full), self.query_embedding_norm(z)]
            act = linears[0](feats[0].to(z.dtype))
            for linear, x in zip(linears[1:], feats[1:]):
                act = act + linear(x.to(z.dtype))
            return act

        t_act = chunk_layer(embed, {"z": z, **full}, chunk_size=chunk_size, num_batch_dims=1)  # [N, N, c_t]
        return self.template_pair_stack(t_act, pair_mask, chunk_size, inplace)

    def _slots(self, batch: dict[str, Tensor]) -> list[tuple[int, int]]:
        """(template index, how many slots hold the same template): empty padding slots, all
        alike, are embedded once (their embedding is not zero: it carries the query pair)."""
        keys = ("template_aatype", "template_all_atom_positions", "template_all_atom_mask")
        unique: list[list[int]] = []
        for t in range(batch["template_aatype"].shape[0]):
            same = next((u for u in unique if all(torch.equal(batch[k][u[0]], batch[k][t]) for k in keys)), None)
            if same is None:
                unique.append([t, 1])
            else:
                same[1] += 1
        return [(t, count) for t, count in unique]

    def add_pair_embedding(self, z: Tensor, batch: dict[str, Tensor], pair_mask: Tensor,
                           chunk_size: int | None, inplace: bool) -> Tensor:  # fmt: skip
        """z plus the template embedding (in place when allowed); every template slot reads the
        same z, so the mean is complete before anything is added."""
        num_slots = batch["template_aatype"].shape[0]
        total = None
        for index, count in self._slots(batch):
            t_act = self.embed_template(z, batch, index, pair_mask, chunk_size, inplace)
            t_act = t_act * count if count > 1 else t_act
            total = t_act if total is None else add_(total, t_act, inplace)
            del t_act

        def finish(total: Tensor) -> Tensor:
            return self.output_linear(torch.relu(total / num_slots))

        if lean(chunk_size, inplace):
            return chunk_add_(z, finish, {"total": total}, chunk_size)
        return add_(z, chunk_layer(finish, {"total": total}, chunk_size=chunk_size, num_batch_dims=1), inplace)

    def single_embedding(self, batch: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Chi-angle template rows ``[T, N, c_m]`` and their mask ``[T, N]`` (the chi1 mask)."""
        aatype = batch["template_aatype"].long()
        angles, mask = chi_angles(aatype, batch["template_all_atom_positions"].float(),
                                  batch["template_all_atom_mask"].float())  # fmt: skip
        feats = torch.cat(
            [F.one_hot(aatype.clamp(max=21), 22).float(), torch.sin(angles) * mask, torch.cos(angles) * mask, mask],
            dim=-1,
        ).to(self.template_single_embedding.weight.dtype)  # [T, N, 34]
        rows = self.template_projection(torch.relu(self.template_single_embedding(feats)))
        return rows.to(dtype), mask[..., 0].to(dtype)
