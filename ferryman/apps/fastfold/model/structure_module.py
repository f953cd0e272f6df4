"""Structure module: invariant point attention, backbone update, angle ResNet and all-atom
coordinates (AF2 Suppl. Alg. 20-24).

As in AF2, backbone translations inside the module are in units of ``position_scale`` Angstrom
(nanometres); they are scaled to Angstrom for the side chains and every output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ferryman.apps.fastfold.common.all_atom import frames_to_atom14_positions, torsion_angles_to_frames
from ferryman.apps.fastfold.common.protein import atom14_masks, atom14_to_atom37
from ferryman.apps.fastfold.common.rigid import Rigid, quat_pre_compose
from ferryman.apps.fastfold.model.config import AlphaFoldConfig, StructureConfig
from ferryman.apps.fastfold.model.primitives import Linear, layer_norm
from ferryman.core.chunking import chunk_layer
from ferryman.kernels import softmax as fused_softmax


class InvariantPointAttention(nn.Module):
    """AF2 Suppl. Alg. 22; parameter names and feature order follow AF2 so official weights load."""

    def __init__(self, c_s: int, c_z: int, cfg: StructureConfig, backend: str = "auto", eps: float = 1e-8):
        super().__init__()
        h, c, pq, pv = cfg.num_heads, cfg.c_hidden_scalar, cfg.num_qk_points, cfg.num_v_points
        self.h, self.c, self.pq, self.pv, self.backend, self.eps = h, c, pq, pv, backend, eps
        self.q_scalar = Linear(c_s, h * c)
        self.kv_scalar = Linear(c_s, h * 2 * c)
        self.q_point_local = Linear(c_s, h * 3 * pq)
        self.kv_point_local = Linear(c_s, h * 3 * (pq + pv))
        self.trainable_point_weights = nn.Parameter(torch.full((h,), math.log(math.e - 1.0)))
        self.attention_2d = Linear(c_z, h)
        self.output_projection = Linear(h * (c + pv * 4 + c_z), c_s, init="final")

    def _points(self, linear: nn.Linear, s: Tensor, rigid: Rigid, per_head: int) -> Tensor:
        # AF2 splits the projection into x, y, z blocks, each [N, H * P].
        local = torch.stack(linear(s).to(rigid.trans.dtype).chunk(3, dim=-1), dim=-1)  # [N, H * P, 3]
        return rigid.unsqueeze(-1).apply(local).unflatten(-2, (self.h, per_head))  # [N, H, P, 3]

    def forward(self, s: Tensor, z: Tensor, rigid: Rigid, mask: Tensor, chunk_size: int | None = None,
                z_norm: nn.Module | None = None) -> Tensor:  # fmt: skip
        """s ``[N, c_s]``, z ``[N, N, c_z]``, rigid ``[N]`` (fp32), mask ``[N]`` -> update ``[N, c_s]``.

        ``z_norm``, if given, is the pair LayerNorm still to apply, one row block at a time."""
        q = self.q_scalar(s).unflatten(-1, (self.h, self.c)) * (1.0 / (3 * self.c)) ** 0.5  # [N, H, C]
        k, v = self.kv_scalar(s).unflatten(-1, (self.h, 2 * self.c)).split(self.c, dim=-1)
        q_pts = self._points(self.q_point_local, s, rigid, self.pq)
        k_pts, v_pts = self._points(self.kv_point_local, s, rigid, self.pq + self.pv).split(
            [self.pq, self.pv], dim=-2
        )
        geo = rigid.trans.dtype  # fp32 (or wider) for the geometry whatever the trunk dtype
        point_w = F.softplus(self.trainable_point_weights.to(geo)) * (1.0 / (3 * self.pq * 4.5)) ** 0.5  # [H]

        def run(q: Tensor, q_pts: Tensor, z: Tensor, rot: Tensor, trans: Tensor, mask_q: Tensor) -> Tensor:
            z = z if z_norm is None else z_norm(z)
            logits = torch.einsum("ihc,jhc->hij", q, k).to(geo)
            d2 = ((q_pts[:, None] - k_pts[None]) ** 2).sum(-1).sum(-1)  # [i, j, H]
            bias = F.linear(z, self.attention_2d.weight.to(z.dtype), self.attention_2d.bias.to(z.dtype)).to(geo) * 3**-0.5 - 0.5 * point_w * d2  # [i, j, H]
            pair_mask = (mask_q[:, None] * mask[None, :]).bool()  # [i, j]
            attn = fused_softmax(logits, pair_mask[None], bias.permute(2, 0, 1), backend=self.backend)  # [H, i, j]
            o_scalar = torch.einsum("hij,jhc->ihc", attn.to(v.dtype), v).flatten(-2)
            o_pt = torch.einsum("hij,jhpx->ihpx", attn, v_pts)  # [i, H, Pv, 3] global
            o_pt = Rigid(rot, trans).unsqueeze(-1).unsqueeze(-1).invert_apply(o_pt).flatten(1, 2)  # [i, H * Pv, 3]
            o_dist = torch.sqrt(self.eps + (o_pt**2).sum(-1))
            o_pair = torch.einsum("hij,ijc->ihc", attn.to(z.dtype), z).flatten(-2)
            feats = [o_scalar.to(geo), *o_pt.unbind(-1), o_dist, o_pair.to(geo)]
            return self.output_projection(torch.cat(feats, dim=-1).to(s.dtype))

        inputs = {"q": q, "q_pts": q_pts, "z": z, "rot": rigid.rot, "trans": rigid.trans, "mask_q": mask}
        return chunk_layer(run, inputs, chunk_size=chunk_size, num_batch_dims=1)


class AngleResnet(nn.Module):
    """AF2 Suppl. Alg. 20 lines 11-14: torsion angles (sin, cos) from the single representation."""

    def __init__(self, c_s: int, cfg: StructureConfig):
        super().__init__()
        c = cfg.c_resnet
        self.num_blocks = cfg.num_resnet_blocks
        self.input_projection = Linear(c_s, c)
        self.input_projection_1 = Linear(c_s, c)
        for i in range(self.num_blocks):
            suffix = "" if i == 0 else f"_{i}"  # Haiku's names for repeated modules
            self.add_module(f"resblock1{suffix}", Linear(c, c, init="relu"))
            self.add_module(f"resblock2{suffix}", Linear(c, c, init="final"))
        self.unnormalized_angles = Linear(c, 14)

    def forward(self, s: Tensor, s_initial: Tensor) -> tuple[Tensor, Tensor]:
        a = self.input_projection(torch.relu(s)) + self.input_projection_1(torch.relu(s_initial))
        for i in range(self.num_blocks):
            suffix = "" if i == 0 else f"_{i}"
            r1, r2 = getattr(self, f"resblock1{suffix}"), getattr(self, f"resblock2{suffix}")
            a = a + r2(torch.relu(r1(torch.relu(a))))
        raw = self.unnormalized_angles(torch.relu(a)).unflatten(-1, (7, 2)).float()  # [N, 7, 2]
        norm = torch.sqrt(torch.clamp((raw**2).sum(-1, keepdim=True), min=1e-12))
        return raw / norm, raw


class FoldIteration(nn.Module):
    """One shared-weight layer of the structure module (AF2 Suppl. Alg. 20 lines 6-10, 23)."""

    def __init__(self, c_s: int, c_z: int, cfg: StructureConfig, backend: str = "auto"):
        super().__init__()
        self.invariant_point_attention = InvariantPointAttention(c_s, c_z, cfg, backend)
        self.attention_layer_norm = layer_norm(c_s, backend)
        for i in range(cfg.num_transition_layers):
            last = i == cfg.num_transition_layers - 1
            self.add_module("transition" + (f"_{i}" if i else ""), Linear(c_s, c_s, init="final" if last else "relu"))
        self.num_transition_layers = cfg.num_transition_layers
        self.transition_layer_norm = layer_norm(c_s, backend)
        self.affine_update = Linear(c_s, 6, init="final")
        self.rigid_sidechain = AngleResnet(c_s, cfg)

    def run_transition(self, s: Tensor) -> Tensor:
        x = s
        for i in range(self.num_transition_layers):
            x = getattr(self, "transition" + (f"_{i}" if i else ""))(x)
            if i < self.num_transition_layers - 1:
                x = torch.relu(x)
        return self.transition_layer_norm(x + s)


class StructureModule(nn.Module):
    """AF2 Suppl. Alg. 20: eight shared-weight iterations from the single and pair representations
    to backbone frames, torsion angles and all-atom coordinates."""

    def __init__(self, cfg: AlphaFoldConfig):
        super().__init__()
        self.cfg = cfg.structure
        self.single_layer_norm = layer_norm(cfg.c_s)
        self.initial_projection = Linear(cfg.c_s, cfg.c_s)
        self.pair_layer_norm = layer_norm(cfg.c_z)
        self.fold_iteration = FoldIteration(cfg.c_s, cfg.c_z, cfg.structure)

    def forward(self, single: Tensor, pair: Tensor, aatype: Tensor, seq_mask: Tensor,
                chunk_size: int | None = None) -> dict[str, Tensor]:  # fmt: skip
        it, scale = self.fold_iteration, self.cfg.position_scale
        s_initial = self.single_layer_norm(single)
        s = self.initial_projection(s_initial)
        # Chunked inference normalises the pair inside each IPA row block instead of holding a
        # normalised copy of the whole pair for all eight layers.
        lean_pair = chunk_size is not None and not torch.is_grad_enabled()
        z, z_norm = (pair, self.pair_layer_norm) if lean_pair else (self.pair_layer_norm(pair), None)
        n = s.shape[0]
        quat = s.new_zeros(n, 4, dtype=torch.float32)
        quat[:, 0] = 1.0
        trans = s.new_zeros(n, 3, dtype=torch.float32)
        traj, angles, raw_angles, frames, positions = [], [], [], [], []
        for _ in range(self.cfg.num_layers):
            rigid = Rigid.from_quat(quat, trans)
            s = s + it.invariant_point_attention(s, z, rigid, seq_mask, chunk_size, z_norm)
            s = it.run_transition(it.attention_layer_norm(s))
            quat, trans = quat_pre_compose(quat, trans, it.affine_update(s).float())
            ang, raw = it.rigid_sidechain(s, s_initial)
            backbone = Rigid.from_quat(quat, trans * scale)
            group_frames = torsion_angles_to_frames(aatype, backbone, ang)
            traj.append(torch.cat([quat, trans * scale], dim=-1))
            angles.append(ang)
            raw_angles.append(raw)
            frames.append(group_frames.to_tensor_4x4())
            positions.append(frames_to_atom14_positions(aatype, group_frames))
            quat = quat.detach()  # AF2 stops rotation gradients between iterations
        masks = atom14_masks(aatype)
        atom14 = positions[-1]
        return {
            "single": s,
            "traj": torch.stack(traj),  # [L, N, 7] quaternion + translation (Angstrom)
            "angles_sin_cos": torch.stack(angles),  # [L, N, 7, 2]
            "unnormalized_angles_sin_cos": torch.stack(raw_angles),
            "sidechain_frames": torch.stack(frames),  # [L, N, 8, 4, 4]
            "positions": torch.stack(positions),  # [L, N, 14, 3]
            "final_atom14_positions": atom14,
            "final_atom14_mask": masks["atom14_atom_exists"],
            "final_atom_positions": atom14_to_atom37(atom14, aatype),  # [N, 37, 3]
            "final_atom_mask": masks["atom37_atom_exists"],
            "final_affine_tensor": traj[-1],
        }
