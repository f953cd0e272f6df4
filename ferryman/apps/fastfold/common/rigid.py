"""Rigid-body transforms and unit quaternions for the structure module (AF2 Suppl. 1.1, Alg. 21-25).

A ``Rigid`` maps local coordinates to global ones: ``x_global = rot @ x_local + trans``, with
``rot`` ``[*, 3, 3]`` and ``trans`` ``[*, 3]``. Quaternions are ``[*, 4]`` as ``(w, x, y, z)``
with the Hamilton product, the convention of AF2's QuatAffine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def quat_to_rot(quat: Tensor) -> Tensor:
    """Rotation matrices ``[*, 3, 3]`` of unit quaternions ``[*, 4]``."""
    w, x, y, z = quat.unbind(-1)
    rows = [
        w * w + x * x - y * y - z * z, 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), w * w - x * x + y * y - z * z, 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), w * w - x * x - y * y + z * z,
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product ``a * b`` of quaternions ``[*, 4]``."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def quat_multiply_by_vec(quat: Tensor, vec: Tensor) -> Tensor:
    """``quat * (0, vec)`` for a pure-vector quaternion ``vec`` ``[*, 3]``."""
    return quat_multiply(quat, torch.cat([torch.zeros_like(vec[..., :1]), vec], dim=-1))


def rot_to_quat(rot: Tensor) -> Tensor:
    """Unit quaternion ``[*, 4]`` (w >= 0) of rotation matrices ``[*, 3, 3]``.

    Uses the eigenvector of the symmetric 4x4 matrix of Bar-Itzhack (2000), which is robust for
    every rotation angle (the trace formula loses precision near 180 degrees).
    """
    r = rot.to(torch.float64) if rot.dtype != torch.float64 else rot
    xx, xy, xz = r[..., 0, 0], r[..., 0, 1], r[..., 0, 2]
    yx, yy, yz = r[..., 1, 0], r[..., 1, 1], r[..., 1, 2]
    zx, zy, zz = r[..., 2, 0], r[..., 2, 1], r[..., 2, 2]
    k = torch.stack(
        [
            xx + yy + zz, zy - yz, xz - zx, yx - xy,
            zy - yz, xx - yy - zz, xy + yx, xz + zx,
            xz - zx, xy + yx, yy - xx - zz, yz + zy,
            yx - xy, xz + zx, yz + zy, zz - xx - yy,
        ],
        dim=-1,
    ).unflatten(-1, (4, 4)) / 3.0  # fmt: skip
    _, vectors = torch.linalg.eigh(k)
    quat = vectors[..., -1]  # eigenvector of the largest eigenvalue
    quat = quat * torch.where(quat[..., :1] < 0, -1.0, 1.0)
    return quat.to(rot.dtype)


def normalize_quat(quat: Tensor) -> Tensor:
    return quat / torch.linalg.vector_norm(quat, dim=-1, keepdim=True)


@dataclass
class Rigid:
    """A batch of rigid transforms ``x -> rot @ x + trans``."""

    rot: Tensor  # [*, 3, 3]
    trans: Tensor  # [*, 3]

    @property
    def shape(self) -> torch.Size:
        return self.trans.shape[:-1]

    @classmethod
    def identity(cls, shape, *, dtype=torch.float32, device=None) -> Rigid:
        rot = torch.eye(3, dtype=dtype, device=device).expand(*shape, 3, 3).clone()
        return cls(rot, torch.zeros(*shape, 3, dtype=dtype, device=device))

    @classmethod
    def from_quat(cls, quat: Tensor, trans: Tensor, *, normalize: bool = True) -> Rigid:
        return cls(quat_to_rot(normalize_quat(quat) if normalize else quat), trans)

    @classmethod
    def from_tensor_4x4(cls, m: Tensor) -> Rigid:
        return cls(m[..., :3, :3], m[..., :3, 3])

    def to_tensor_4x4(self) -> Tensor:
        m = self.trans.new_zeros(*self.shape, 4, 4)
        m[..., :3, :3] = self.rot
        m[..., :3, 3] = self.trans
        m[..., 3, 3] = 1.0
        return m

    @classmethod
    def from_3_points(cls, neg_x: Tensor, origin: Tensor, xy: Tensor, eps: float = 1e-8) -> Rigid:
        """Frame with origin ``origin``, x-axis pointing away from ``neg_x`` and ``xy`` in the
        xy-plane with y > 0, by Gram-Schmidt (AF2 Suppl. Alg. 21)."""
        e0 = origin - neg_x
        e1 = xy - origin
        e0 = e0 / torch.sqrt((e0 * e0).sum(-1, keepdim=True) + eps)
        e1 = e1 - e0 * (e0 * e1).sum(-1, keepdim=True)
        e1 = e1 / torch.sqrt((e1 * e1).sum(-1, keepdim=True) + eps)
        e2 = torch.cross(e0, e1, dim=-1)
        return cls(torch.stack([e0, e1, e2], dim=-1), origin)

    def apply(self, points: Tensor) -> Tensor:
        """Local -> global for points ``[*, 3]`` broadcast against the transform's shape."""
        return torch.einsum("...ij,...j->...i", self.rot, points) + self.trans

    def invert_apply(self, points: Tensor) -> Tensor:
        """Global -> local."""
        return torch.einsum("...ji,...j->...i", self.rot, points - self.trans)

    def invert(self) -> Rigid:
        rot_t = self.rot.transpose(-1, -2)
        return Rigid(rot_t, -torch.einsum("...ij,...j->...i", rot_t, self.trans))

    def compose(self, other: Rigid) -> Rigid:
        """``self o other``: apply ``other`` first."""
        return Rigid(self.rot @ other.rot, self.apply(other.trans))

    def compose_rot(self, rot: Tensor) -> Rigid:
        return Rigid(self.rot @ rot, self.trans)

    def unsqueeze(self, dim: int) -> Rigid:
        dim = dim if dim >= 0 else len(self.shape) + 1 + dim
        return Rigid(self.rot.unsqueeze(dim), self.trans.unsqueeze(dim))

    def scale_translation(self, factor: float) -> Rigid:
        return Rigid(self.rot, self.trans * factor)

    def detach_rot(self) -> Rigid:
        return Rigid(self.rot.detach(), self.trans)

    def to(self, dtype: torch.dtype) -> Rigid:
        return Rigid(self.rot.to(dtype), self.trans.to(dtype))

    def __getitem__(self, index) -> Rigid:
        index = index if isinstance(index, tuple) else (index,)
        return Rigid(self.rot[(*index, slice(None), slice(None))], self.trans[(*index, slice(None))])


def rot_x(sin: Tensor, cos: Tensor) -> Tensor:
    """Rotations about the x-axis ``[*, 3, 3]`` from sines and cosines (AF2 Suppl. Alg. 25)."""
    zeros, ones = torch.zeros_like(sin), torch.ones_like(sin)
    rows = [ones, zeros, zeros, zeros, cos, -sin, zeros, sin, cos]
    return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))


def quat_pre_compose(quat: Tensor, trans: Tensor, update: Tensor) -> tuple[Tensor, Tensor]:
    """Backbone update (AF2 Suppl. Alg. 23): apply ``update`` ``[*, 6]`` = (b, c, d, t) in the
    local frame. The quaternion becomes ``q + q * (0, b, c, d)`` renormalised, i.e. ``q`` composed
    with the unnormalised rotation ``(1, b, c, d)``; the translation moves by ``R(q) t``."""
    vec, t = update[..., :3], update[..., 3:]
    new_quat = normalize_quat(quat + quat_multiply_by_vec(quat, vec))
    new_trans = trans + torch.einsum("...ij,...j->...i", quat_to_rot(quat), t)
    return new_quat, new_trans
