"""Rigid transforms and quaternions: round trips and the AF2 conventions."""

from __future__ import annotations

import math

import torch

from ferryman.apps.fastfold.common.rigid import (
    Rigid,
    quat_multiply,
    quat_pre_compose,
    quat_to_rot,
    rot_to_quat,
    rot_x,
)


def _random_quat(n: int) -> torch.Tensor:
    q = torch.randn(n, 4, dtype=torch.float64)
    return q / q.norm(dim=-1, keepdim=True)


def test_quaternion_rotation_round_trip():
    q = _random_quat(64)
    q = q * torch.where(q[:, :1] < 0, -1.0, 1.0)
    rot = quat_to_rot(q)
    eye = torch.eye(3, dtype=torch.float64).expand(64, 3, 3)
    torch.testing.assert_close(rot @ rot.transpose(-1, -2), eye)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(64, dtype=torch.float64))
    torch.testing.assert_close(rot_to_quat(rot), q)
    # Near 180 degrees the trace formula breaks down; the eigenvector method must not.
    flip = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.6, 0.8, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(quat_to_rot(rot_to_quat(quat_to_rot(flip))), quat_to_rot(flip))


def test_quaternion_product_composes_rotations():
    a, b = _random_quat(16), _random_quat(16)
    torch.testing.assert_close(quat_to_rot(quat_multiply(a, b)), quat_to_rot(a) @ quat_to_rot(b))


def test_known_rotation_about_z():
    half = math.pi / 4  # 90 degrees about z
    q = torch.tensor([[math.cos(half), 0.0, 0.0, math.sin(half)]], dtype=torch.float64)
    x = Rigid(quat_to_rot(q), torch.zeros(1, 3, dtype=torch.float64)).apply(torch.tensor([[1.0, 0, 0]], dtype=torch.float64))
    torch.testing.assert_close(x, torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64))


def test_rigid_compose_invert_apply():
    t1 = Rigid(quat_to_rot(_random_quat(8)), torch.randn(8, 3, dtype=torch.float64))
    t2 = Rigid(quat_to_rot(_random_quat(8)), torch.randn(8, 3, dtype=torch.float64))
    x = torch.randn(8, 3, dtype=torch.float64)
    torch.testing.assert_close(t1.compose(t2).apply(x), t1.apply(t2.apply(x)))
    torch.testing.assert_close(t1.invert_apply(t1.apply(x)), x)
    torch.testing.assert_close(t1.invert().apply(x), t1.invert_apply(x))
    torch.testing.assert_close(Rigid.from_tensor_4x4(t1.to_tensor_4x4()).apply(x), t1.apply(x))


def test_from_3_points_frame():
    """AF2 Suppl. Alg. 21: origin at the middle point, x away from the first, third in the xy-plane."""
    neg_x, origin, xy = torch.randn(3, 5, 3, dtype=torch.float64).unbind(0)
    frame = Rigid.from_3_points(neg_x, origin, xy)
    local_neg_x = frame.invert_apply(neg_x)
    local_xy = frame.invert_apply(xy)
    torch.testing.assert_close(frame.invert_apply(origin), torch.zeros(5, 3, dtype=torch.float64))
    assert (local_neg_x[:, 0] < 0).all()
    torch.testing.assert_close(local_neg_x[:, 1:], torch.zeros(5, 2, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (local_xy[:, 1] > 0).all()
    torch.testing.assert_close(local_xy[:, 2], torch.zeros(5, dtype=torch.float64), atol=1e-6, rtol=0)


def test_backbone_update_matches_composition():
    """AF2 Suppl. Alg. 23: the update (b, c, d, t) composes the rotation of the normalised
    quaternion (1, b, c, d) and the translation t on the right of the current frame."""
    q = _random_quat(6)
    trans = torch.randn(6, 3, dtype=torch.float64)
    update = torch.randn(6, 6, dtype=torch.float64)
    new_q, new_t = quat_pre_compose(q, trans, update)
    step_q = torch.cat([torch.ones(6, 1, dtype=torch.float64), update[:, :3]], dim=-1)
    step = Rigid(quat_to_rot(step_q / step_q.norm(dim=-1, keepdim=True)), update[:, 3:])
    expected = Rigid(quat_to_rot(q), trans).compose(step)
    torch.testing.assert_close(quat_to_rot(new_q), expected.rot)
    torch.testing.assert_close(new_t, expected.trans)


def test_rot_x():
    angle = torch.tensor([0.3, -1.2], dtype=torch.float64)
    rot = rot_x(angle.sin(), angle.cos())
    y = rot @ torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(y, torch.stack([torch.zeros(2, dtype=torch.float64), angle.cos(), angle.sin()], -1))
