"""Template embedder: pair features per template, the template pair stack, pointwise attention
into the pair representation, and torsion-angle features as extra MSA rows
(AF2 Suppl. Alg. 2 lines 9-13, Alg. 16-17, 1.7.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.common.all_atom import atom37_to_torsion_angles
from ferryman.apps.fastfold.common.protein import pseudo_beta
from ferryman.apps.fastfold.common.rigid import Rigid
from ferryman.apps.fastfold.model.config import AlphaFoldConfig
from ferryman.apps.fastfold.model.embedders import dgram_from_positions
from ferryman.apps.fastfold.model.evoformer import TemplatePairStack
from ferryman.apps.fastfold.model.primitives import Attention, Linear, chunk_add_, row_slices
from ferryman.core.chunking import chunk_layer

TEMPLATE_PAIR_FEAT_DIM = 88  # dgram 39 + mask 1 + aatype 2 x 22 + unit vector 3 + backbone mask 1
TEMPLATE_SINGLE_FEAT_DIM = 57  # aatype 22 + torsions 14 + alt torsions 14 + torsion mask 7


def template_atom_mask(batch: dict[str, Tensor]) -> Tensor:
    """``[T, N, 37]``; AF2 calls it template_all_atom_masks, OpenFold template_all_atom_mask."""
    if "template_all_atom_masks" in batch:
        return batch["template_all_atom_masks"]
    return batch["template_all_atom_mask"]


def template_residue_inputs(batch: dict[str, Tensor], index: int) -> dict[str, Tensor]:
    """Per-residue quantities of template ``index`` from which its pair features are built."""
    aatype = batch["template_aatype"][index].long()
    pos = batch["template_all_atom_positions"][index].float()
    atom_mask = template_atom_mask(batch)[index].float()
    if "template_pseudo_beta" in batch:
        cb, cb_mask = batch["template_pseudo_beta"][index].float(), batch["template_pseudo_beta_mask"][index].float()
    else:
        cb, cb_mask = pseudo_beta(aatype, pos, atom_mask)
    ia, ica, ic = (rc.atom_order[a] for a in ("N", "CA", "C"))
    # AF2 measures template unit vectors in the frame of quat_affine.make_transform_from_reference:
    # CA at the origin, C on +x, N in the xy-plane (y > 0); not the backbone frame of the structure
    # module (N on -x). The point 2 CA - C lies on -x of that frame.
    frames = Rigid.from_3_points(2 * pos[:, ica] - pos[:, ic], pos[:, ica], pos[:, ia])
    return {
        "cb": cb,
        "cb_mask": cb_mask,
        "onehot": F.one_hot(aatype.clamp(max=21), 22).float(),
        "rot": frames.rot,
        "trans": frames.trans,
        "ca": pos[:, ica],
        "bb_mask": atom_mask[:, ia] * atom_mask[:, ica] * atom_mask[:, ic],
    }


def template_pair_features(rows: dict[str, Tensor], full: dict[str, Tensor], cfg) -> Tensor:
    """The 88 pair features ``[rows, N, 88]`` between residues ``rows`` and all residues
    (AF2 SingleTemplateEmbedding): dgram, pseudo-beta mask, both aatypes, unit vector, backbone mask."""
    n_rows, n = rows["cb"].shape[0], full["cb"].shape[0]
    dgram = dgram_from_positions(rows["cb"], full["cb"], cfg.dgram_num_bins, cfg.dgram_min_bin, cfg.dgram_max_bin)
    bb_mask_2d = rows["bb_mask"][:, None] * full["bb_mask"][None]
    local = Rigid(rows["rot"], rows["trans"]).unsqueeze(1).invert_apply(full["ca"][None])  # CA_j in frame i
    unit = local * torch.rsqrt(1e-6 + (local**2).sum(-1, keepdim=True)) * bb_mask_2d[..., None]
    if not cfg.use_unit_vector:
        unit = torch.zeros_like(unit)
    feats = torch.cat(
        [
            dgram,
            (rows["cb_mask"][:, None] * full["cb_mask"][None])[..., None],
            full["onehot"][None, :, :].expand(n_rows, n, 22),
            rows["onehot"][:, None, :].expand(n_rows, n, 22),
            unit,
            bb_mask_2d[..., None],
        ],
        dim=-1,
    )
    return feats * bb_mask_2d[..., None]


class TemplateEmbedder(nn.Module):
    """Embeds up to T templates into a pair update and (optionally) extra MSA rows."""

    def __init__(self, cfg: AlphaFoldConfig):
        super().__init__()
        tcfg = cfg.template
        self.cfg = tcfg
        self.embedding2d = Linear(TEMPLATE_PAIR_FEAT_DIM, tcfg.c_t, init="relu")
        self.template_pair_stack = TemplatePairStack(tcfg)
        self.attention = Attention(cfg.c_z, tcfg.c_t, tcfg.c_hidden_pointwise, tcfg.pointwise_heads, gating=False)
        if tcfg.embed_torsion_angles:
            self.template_single_embedding = Linear(TEMPLATE_SINGLE_FEAT_DIM, cfg.c_m, init="relu")
            self.template_projection = Linear(cfg.c_m, cfg.c_m, init="relu")

    def embed_template(self, batch: dict[str, Tensor], index: int, pair_mask: Tensor, chunk_size: int | None,
                       inplace: bool, dtype: torch.dtype) -> Tensor:  # fmt: skip
        """Template ``index`` through its pair features and the template pair stack: ``[N, N, c_t]``."""
        full = template_residue_inputs(batch, index)

        def embed(**rows: Tensor) -> Tensor:
            return self.embedding2d(template_pair_features(rows, full, self.cfg).to(dtype))

        t_act = chunk_layer(embed, full, chunk_size=chunk_size, num_batch_dims=1)  # [N, N, c_t]
        return self.template_pair_stack(t_act, pair_mask, chunk_size, inplace)

    def pair_embedding(self, z: Tensor, batch: dict[str, Tensor], pair_mask: Tensor,
                       chunk_size: int | None, inplace: bool) -> Tensor:  # fmt: skip
        """AF2 Suppl. Alg. 17: pointwise attention of z over the T embedded templates."""
        dtype = z.dtype
        templates = [
            self.embed_template(batch, t, pair_mask, chunk_size, inplace, dtype)
            for t in range(batch["template_aatype"].shape[0])
        ]
        stacked = torch.stack(templates, dim=2)  # [N, N, T, c_t]
        template_mask = batch["template_mask"].to(dtype)

        def run(z: Tensor, t: Tensor) -> Tensor:
            return self.attention(z[..., None, :], t, (), template_mask[None, None, None, :]).squeeze(-2)

        out = chunk_layer(run, {"z": z, "t": stacked}, chunk_size=chunk_size, num_batch_dims=1)
        return out * (template_mask.sum() > 0).to(dtype)

    def add_pair_embedding_(self, z: Tensor, batch: dict[str, Tensor], pair_mask: Tensor, chunk_size: int) -> Tensor:
        """``z += pair_embedding(z)`` with one template alive at a time (the lean path).

        The pointwise attention is an online softmax over templates: each template, once through
        its pair stack, is folded into a running weighted sum of values ``[N, N, H * D]`` (in z's
        dtype) with a running max and normaliser ``[N, N, H]`` (fp32), then dropped. Masked
        templates get zero weight in AF2, so they are skipped without being embedded.
        """
        dtype, n, att = z.dtype, z.shape[0], self.attention
        real = [t for t, keep in enumerate(batch["template_mask"].tolist()) if keep > 0]
        if not real:
            return z  # AF2 multiplies the update by zero when no template is real
        acc = z.new_zeros(n, n, att.num_heads * att.c_hidden)
        run_max = torch.full((n, n, att.num_heads), float("-inf"), device=z.device)
        denom = torch.zeros(n, n, att.num_heads, device=z.device)
        for index in real:
            t_act = self.embed_template(batch, index, pair_mask, chunk_size, True, dtype)
            for rows in row_slices(n, chunk_size):
                self._fold_template(z[rows], t_act[rows], acc[rows], run_max[rows], denom[rows])
            del t_act

        def finish(acc: Tensor, denom: Tensor) -> Tensor:
            o = acc.float().unflatten(-1, (att.num_heads, att.c_hidden)) / denom[..., None]
            return att.output(o.flatten(-2).to(dtype))

        return chunk_add_(z, finish, {"acc": acc, "denom": denom}, chunk_size)

    def _fold_template(self, z: Tensor, t: Tensor, acc: Tensor, run_max: Tensor, denom: Tensor) -> None:
        """One template's logits and values for a row block, merged into the running state in place."""
        att = self.attention
        q = att.query_w(z).unflatten(-1, (att.num_heads, att.c_hidden))  # [rows, N, H, D]
        k = att.key_w(t).unflatten(-1, (att.num_heads, att.c_hidden))
        v = att.value_w(t).unflatten(-1, (att.num_heads, att.c_hidden)).float()
        logits = (q.float() * k.float()).sum(-1) * att.c_hidden**-0.5  # [rows, N, H]
        new_max = torch.maximum(run_max, logits)
        keep, weight = torch.exp(run_max - new_max), torch.exp(logits - new_max)
        denom.mul_(keep).add_(weight)
        merged = acc.float().unflatten(-1, (att.num_heads, att.c_hidden)) * keep[..., None] + weight[..., None] * v
        acc.copy_(merged.flatten(-2))
        run_max.copy_(new_max)

    def single_embedding(self, batch: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Torsion-angle features -> extra MSA rows ``[T, N, c_m]`` and their mask ``[T, N]``."""
        aatype = batch["template_aatype"].long()
        angles = atom37_to_torsion_angles(
            aatype, batch["template_all_atom_positions"].float(), template_atom_mask(batch).float()
        )
        t, n = aatype.shape
        feats = torch.cat(
            [
                F.one_hot(aatype.clamp(max=21), 22).float(),
                angles["torsion_angles_sin_cos"].reshape(t, n, 14),
                angles["alt_torsion_angles_sin_cos"].reshape(t, n, 14),
                angles["torsion_angles_mask"],
            ],
            dim=-1,
        ).to(dtype)
        rows = self.template_projection(torch.relu(self.template_single_embedding(feats)))
        return rows, angles["torsion_angles_mask"][..., 2].to(dtype)
