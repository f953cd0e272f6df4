"""AlphaFold-Multimer structure module (AF2 ``folding_multimer``; Evans et al. 2021, Suppl. 2.5).

The math is the monomer's (AF2 Suppl. Alg. 20-24): invariant point attention, transition,
backbone update, angle ResNet, all-atom coordinates. What differs is the parameter layout (queries,
keys and values projected separately, points per head as x|y|z blocks), frames kept as rotation
matrices and updated by composing with a rotation made from (1, b, c, d), translations in units
of ``position_scale`` = 20 Angstrom, and atoms masked by the sequence mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ferryman.apps.fastfold.common.all_atom import frames_to_atom14_positions, torsion_angles_to_frames
from ferryman.apps.fastfold.common.protein import atom14_masks, atom14_to_atom37
from ferryman.apps.fastfold.common.rigid import Rigid, rot_to_quat
from ferryman.apps.fastfold.model.config import AlphaFoldConfig, StructureConfig
from ferryman.apps.fastfold.model.primitives import Linear, layer_norm
from ferryman.apps.fastfold.model.structure_module import AngleResnet
from ferryman.core.chunking import chunk_layer


class PointProjection(nn.Module):
    """AF2-Multimer ``PointProjection``: ``num_points`` points per head in the local frame
    (a linear to ``[H, 3 * P]`` read as x | y | z blocks per head), moved to the global frame."""

    def __init__(self, c_s: int, num_heads: int, num_points: int):
        super().__init__()
        self.num_heads, self.num_points = num_heads, num_points
        self.point_projection = Linear(c_s, num_heads * 3 * num_points)

    def forward(self, s: Tensor, rigid: Rigid) -> Tensor:
        local = self.point_projection(s).unflatten(-1, (self.num_heads, 3, self.num_points))  # [N, H, 3, P]
        local = local.transpose(-1, -2).to(rigid.trans.dtype)  # [N, H, P, 3]
        return rigid.unsqueeze(-1).unsqueeze(-1).apply(local)  # [N, H, P, 3] global


class MultimerInvariantPointAttention(nn.Module):
    """AF2 Suppl. Alg. 22 in AF2-Multimer's layout (``folding_multimer.InvariantPointAttention``)."""

    def __init__(self, c_s: int, c_z: int, cfg: StructureConfig, eps: float = 1e-8):
        super().__init__()
        h, c, pq, pv = cfg.num_heads, cfg.c_hidden_scalar, cfg.num_qk_points, cfg.num_v_points
        self.h, self.c, self.pq, self.pv, self.eps = h, c, pq, pv, eps
        self.q_scalar_projection = Linear(c_s, h * c, bias=False)
        self.k_scalar_projection = Linear(c_s, h * c, bias=False)
        self.v_scalar_projection = Linear(c_s, h * c, bias=False)
        self.q_point_projection = PointProjection(c_s, h, pq)
        self.k_point_projection = PointProjection(c_s, h, pq)
        self.v_point_projection = PointProjection(c_s, h, pv)
        self.trainable_point_weights = nn.Parameter(torch.full((h,), math.log(math.e - 1.0)))
        self.attention_2d = Linear(c_z, h)
        self.output_projection = Linear(h * (c + 4 * pv + c_z), c_s, init="final")

    def forward(self, s: Tensor, z: Tensor, rigid: Rigid, mask: Tensor, chunk_size: int | None = None,
                z_norm: nn.Module | None = None) -> Tensor:  # fmt: skip
        """s ``[N, c_s]``, z ``[N, N, c_z]``, rigid ``[N]``, mask ``[N]`` -> update ``[N, c_s]``;
        ``z_norm``, if given, is the pair LayerNorm still to apply, one row block at a time."""
        geo = rigid.trans.dtype
        q = self.q_scalar_projection(s).unflatten(-1, (self.h, self.c)).to(geo) * self.c**-0.5  # [N, H, C]
        k = self.k_scalar_projection(s).unflatten(-1, (self.h, self.c)).to(geo)
        v = self.v_scalar_projection(s).unflatten(-1, (self.h, self.c)).to(geo)
        q_pts = self.q_point_projection(s, rigid)  # [N, H, Pq, 3]
        k_pts = self.k_point_projection(s, rigid)
        v_pts = self.v_point_projection(s, rigid)  # [N, H, Pv, 3]
        # Each (q, k) point pair contributes variance 9/2; the softplus weights are learned per head.
        point_w = F.softplus(self.trainable_point_weights.to(geo)) * (1.0 / (self.pq * 4.5)) ** 0.5  # [H]

        def run(q: Tensor, q_pts: Tensor, z: Tensor, rot: Tensor, trans: Tensor, mask_q: Tensor) -> Tensor:
            z = z if z_norm is None else z_norm(z)
            d2 = ((q_pts[:, None] - k_pts[None]) ** 2).sum(-1)  # [i, j, H, Pq]
            logits = -0.5 * (point_w[:, None] * d2).sum(-1)  # [i, j, H]
            logits = logits + torch.einsum("ihc,jhc->ijh", q, k)
            # The pair stays in the trunk's dtype (bf16 or fp32); the bias goes to fp32 after the linear.
            w, b = self.attention_2d.weight, self.attention_2d.bias
            logits = logits + F.linear(z, w.to(z.dtype), b.to(z.dtype)).to(geo)
            logits = logits - 1e5 * (1.0 - mask_q[:, None, None] * mask[None, :, None])
            attn = torch.softmax(logits * 3**-0.5, dim=1)  # [i, j, H]
            o_scalar = torch.einsum("ijh,jhc->ihc", attn, v).flatten(-2)  # [i, H * C]
            o_pt = torch.einsum("ijh,jhpx->ihpx", attn, v_pts)  # [i, H, Pv, 3] global
            o_pt = Rigid(rot, trans).unsqueeze(-1).unsqueeze(-1).invert_apply(o_pt).flatten(1, 2)  # [i, H * Pv, 3]
            o_norm = torch.sqrt(torch.clamp((o_pt**2).sum(-1), min=self.eps**2))
            o_pair = torch.einsum("ijh,ijc->ihc", attn.to(z.dtype), z).flatten(-2).to(geo)  # [i, H * c_z]
            feats = torch.cat([o_scalar, *o_pt.unbind(-1), o_norm, o_pair], dim=-1)
            return self.output_projection(feats.to(s.dtype))

        inputs = {"q": q, "q_pts": q_pts, "z": z, "rot": rigid.rot, "trans": rigid.trans, "mask_q": mask.to(geo)}
        return chunk_layer(run, inputs, chunk_size=chunk_size, num_batch_dims=1)


class QuatRigid(nn.Module):
    """AF2-Multimer ``QuatRigid`` (full_quat=False): a linear to (b, c, d, t) -> the rigid update
    with rotation from the quaternion (1, b, c, d) normalised and translation t."""

    def __init__(self, c_s: int):
        super().__init__()
        self.rigid = Linear(c_s, 6, init="final")

    def forward(self, s: Tensor) -> Rigid:
        update = self.rigid(s).float()
        x, y, z = update[..., :3].unbind(-1)
        inv_norm = torch.rsqrt(torch.clamp(1.0 + x * x + y * y + z * z, min=1e-6))
        w, x, y, z = inv_norm, x * inv_norm, y * inv_norm, z * inv_norm
        # AF2 ``Rot3Array.from_quaternion``'s form of the rotation (1 - 2(y^2 + z^2) on the diagonal).
        rows = [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ]  # fmt: skip
        return Rigid(torch.stack(rows, dim=-1).unflatten(-1, (3, 3)), update[..., 3:])


class MultimerFoldIteration(nn.Module):
    """One shared-weight layer (AF2-Multimer ``FoldIteration``); AF2's module names."""

    def __init__(self, c_s: int, c_z: int, cfg: StructureConfig):
        super().__init__()
        self.invariant_point_attention = MultimerInvariantPointAttention(c_s, c_z, cfg)
        self.attention_layer_norm = layer_norm(c_s)
        for i in range(cfg.num_transition_layers):
            last = i == cfg.num_transition_layers - 1
            self.add_module("transition" + (f"_{i}" if i else ""), Linear(c_s, c_s, init="final" if last else "relu"))
        self.num_transition_layers = cfg.num_transition_layers
        self.transition_layer_norm = layer_norm(c_s)
        self.quat_rigid = QuatRigid(c_s)
        self.rigid_sidechain = AngleResnet(c_s, cfg)

    def run_transition(self, s: Tensor) -> Tensor:
        x = s
        for i in range(self.num_transition_layers):
            x = getattr(self, "transition" + (f"_{i}" if i else ""))(x)
            if i < self.num_transition_layers - 1:
                x = torch.relu(x)
        return self.transition_layer_norm(x + s)


class MultimerStructureModule(nn.Module):
    """AF2 Suppl. Alg. 20 as AF2-Multimer runs it: ``num_layers`` shared-weight iterations from
    the single and pair representations to frames, torsion angles and atoms (Angstrom)."""

    def __init__(self, cfg: AlphaFoldConfig):
        super().__init__()
        self.cfg = cfg.structure
        self.single_layer_norm = layer_norm(cfg.c_s)
        self.initial_projection = Linear(cfg.c_s, cfg.c_s)
        self.pair_layer_norm = layer_norm(cfg.c_z)
        self.fold_iteration = MultimerFoldIteration(cfg.c_s, cfg.c_z, cfg.structure)

    def forward(self, single: Tensor, pair: Tensor, aatype: Tensor, seq_mask: Tensor,
                chunk_size: int | None = None) -> dict[str, Tensor]:  # fmt: skip
        it, scale = self.fold_iteration, self.cfg.position_scale
        s_initial = self.single_layer_norm(single)
        s = self.initial_projection(s_initial)
        lean_pair = chunk_size is not None and not torch.is_grad_enabled()
        z, z_norm = (pair, self.pair_layer_norm) if lean_pair else (self.pair_layer_norm(pair), None)
        rigid = Rigid.identity(s.shape[:1], device=s.device)
        frames, angles, raw_angles, group_frames, positions = [], [], [], [], []
        for _ in range(self.cfg.num_layers):
            s = s + it.invariant_point_attention(s, z, rigid, seq_mask, chunk_size, z_norm)
            s = it.run_transition(it.attention_layer_norm(s))
            rigid = rigid.compose(it.quat_rigid(s))
            ang, raw = it.rigid_sidechain(s, s_initial)
            groups = torsion_angles_to_frames(aatype, rigid.scale_translation(scale), ang)
            frames.append(rigid.scale_translation(scale).to_tensor_4x4())
            angles.append(ang)
            raw_angles.append(raw)
            group_frames.append(groups.to_tensor_4x4())
            positions.append(frames_to_atom14_positions(aatype, groups))
            rigid = rigid.detach_rot()  # AF2 stops rotation gradients between iterations
        return self._outputs(s, frames, angles, raw_angles, group_frames, positions, aatype, seq_mask)

    @staticmethod
    def _outputs(s, frames, angles, raw_angles, group_frames, positions, aatype, seq_mask) -> dict[str, Tensor]:
        masks = atom14_masks(aatype)
        atom37_mask = masks["atom37_atom_exists"] * seq_mask[:, None]
        atom14 = positions[-1]
        backbone = torch.stack(frames)  # [L, N, 4, 4], Angstrom
        quat = rot_to_quat(backbone[..., :3, :3])
        return {
            "single": s,
            "frames": backbone,
            "traj": torch.cat([quat, backbone[..., :3, 3]], dim=-1),  # [L, N, 7] as the monomer's
            "angles_sin_cos": torch.stack(angles),  # [L, N, 7, 2]
            "unnormalized_angles_sin_cos": torch.stack(raw_angles),
            "sidechain_frames": torch.stack(group_frames),  # [L, N, 8, 4, 4]
            "positions": torch.stack(positions),  # [L, N, 14, 3]
            "final_atom14_positions": atom14,
            "final_atom14_mask": masks["atom14_atom_exists"] * seq_mask[:, None],
            "final_atom_positions": atom14_to_atom37(atom14, aatype) * atom37_mask[..., None],  # [N, 37, 3]
            "final_atom_mask": atom37_mask,
            "final_affine_tensor": torch.cat([quat[-1], backbone[-1, :, :3, 3]], dim=-1),
        }
