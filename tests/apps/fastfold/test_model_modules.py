"""Per-module shapes, masks and geometric properties of the AlphaFold2 modules."""

from __future__ import annotations

import torch

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.common.all_atom import (
    atom37_to_torsion_angles,
    frames_to_atom14_positions,
    torsion_angles_to_frames,
)
from ferryman.apps.fastfold.common.protein import atom14_to_atom37, atom37_to_atom14
from ferryman.apps.fastfold.common.rigid import Rigid, quat_to_rot
from ferryman.apps.fastfold.model import randomize_
from ferryman.apps.fastfold.model.config import StructureConfig
from ferryman.apps.fastfold.model.msa import (
    MSAColumnAttention,
    MSAColumnGlobalAttention,
    MSARowAttentionWithPairBias,
    OuterProductMean,
)
from ferryman.apps.fastfold.model.pair import TriangleAttention, TriangleMultiplication
from ferryman.apps.fastfold.model.structure_module import InvariantPointAttention

S, N, CM, CZ = 5, 9, 16, 8



def _rand(*shape):
    return torch.randn(*shape)


def _mask_keys(n_masked: int = 2) -> torch.Tensor:
    mask = torch.ones(S, N)
    mask[:, -n_masked:] = 0.0
    return mask


def test_msa_row_attention_shape_and_key_mask():
    mod = randomize_(MSARowAttentionWithPairBias(CM, CZ, 4, 2, backend="torch"))
    m, z, mask = _rand(S, N, CM), _rand(N, N, CZ), _mask_keys()
    out = mod(m, z, mask)
    assert out.shape == (S, N, CM)
    m2 = m.clone()
    m2[:, -2:] += 5.0  # only masked residues change
    torch.testing.assert_close(mod(m2, z, mask)[:, :-2], out[:, :-2])


def test_msa_column_attention_masks_sequences():
    mod = randomize_(MSAColumnAttention(CM, 4, 2, backend="torch"))
    m = _rand(S, N, CM)
    mask = torch.ones(S, N)
    mask[-1] = 0.0
    out = mod(m, mask)
    assert out.shape == (S, N, CM)
    m2 = m.clone()
    m2[-1] = 7.0
    torch.testing.assert_close(mod(m2, mask)[:-1], out[:-1])


def test_global_column_attention_masks_sequences():
    mod = randomize_(MSAColumnGlobalAttention(CM, 4, 2, backend="torch"))
    m = _rand(S, N, CM)
    mask = torch.ones(S, N)
    mask[-2:] = 0.0
    out = mod(m, mask)
    m2 = m.clone()
    m2[-2:] = -3.0
    torch.testing.assert_close(mod(m2, mask)[:-2], out[:-2])


def test_outer_product_mean_ignores_masked_sequences():
    mod = randomize_(OuterProductMean(CM, CZ, 4, backend="torch"))
    m = _rand(S, N, CM)
    mask = torch.ones(S, N)
    mask[0] = 0.0
    out = mod(m, mask)
    assert out.shape == (N, N, CZ)
    # Without the masked row the mean is over the others only.
    torch.testing.assert_close(mod(m[1:], mask[1:]), out, rtol=1e-5, atol=1e-5)


def test_triangle_multiplication_definitions():
    """Outgoing: z_ij = sum_k a_ik b_jk; incoming: z_ij = sum_k a_kj b_ki (AF2 einsum strings)."""
    for outgoing, equation in ((True, "ikc,jkc->ijc"), (False, "kjc,kic->ijc")):
        mod = randomize_(TriangleMultiplication(CZ, 6, outgoing=outgoing, backend="torch"))
        a, b = _rand(N, N, 6), _rand(N, N, 6)
        torch.testing.assert_close(mod.product(a, b), torch.einsum(equation, a, b), rtol=1e-5, atol=1e-5)
        z, mask = _rand(N, N, CZ), torch.ones(N, N)
        assert mod(z, mask).shape == (N, N, CZ)


def test_triangle_attention_ending_is_starting_on_transpose():
    start = randomize_(TriangleAttention(CZ, 4, 2, starting=True, backend="torch"))
    end = TriangleAttention(CZ, 4, 2, starting=False, backend="torch")
    end.load_state_dict(start.state_dict())
    z, mask = _rand(N, N, CZ), torch.ones(N, N)
    mask[:, 3] = 0.0
    torch.testing.assert_close(end(z, mask), start(z.transpose(0, 1), mask.T).transpose(0, 1))


def _random_rigid(n: int) -> Rigid:
    q = torch.randn(n, 4)
    return Rigid(quat_to_rot(q / q.norm(dim=-1, keepdim=True)), torch.randn(n, 3) * 3)


def test_ipa_invariant_to_global_rigid_motion():
    """AF2 Suppl. 1.8.2: IPA's output is invariant under a global rotation and translation of all
    backbone frames."""
    torch.manual_seed(1)
    cfg = StructureConfig(num_heads=3, c_hidden_scalar=4, num_qk_points=2, num_v_points=3)
    ipa = randomize_(InvariantPointAttention(16, CZ, cfg, backend="torch")).double()
    s, z = torch.randn(N, 16, dtype=torch.float64), torch.randn(N, N, CZ, dtype=torch.float64)
    mask = torch.ones(N, dtype=torch.float64)
    mask[-1] = 0
    frames = _random_rigid(N)
    frames = Rigid(frames.rot.double(), frames.trans.double())
    q = torch.tensor([[0.3, -0.5, 0.2, 0.7]], dtype=torch.float64)
    motion = Rigid(quat_to_rot(q / q.norm()).expand(N, 3, 3), torch.tensor([[4.0, -2.0, 1.0]], dtype=torch.float64).expand(N, 3))
    out = ipa(s, z, frames, mask)
    # Rows of masked residues attend to nothing and are not used; every real row is invariant.
    torch.testing.assert_close(ipa(s, z, motion.compose(frames), mask)[:-1], out[:-1])
    assert not torch.allclose(ipa(s, z, _random_rigid(N).to(torch.float64), mask), out)


def test_atom14_atom37_round_trip():
    aatype = torch.arange(21)
    pos37 = torch.randn(21, 37, 3) * torch.from_numpy(rc.STANDARD_ATOM_MASK).float()[..., None]
    pos14 = atom37_to_atom14(pos37, aatype)
    assert pos14.shape == (21, 14, 3)
    torch.testing.assert_close(atom14_to_atom37(pos14, aatype), pos37)
    trp = rc.restype_order["W"]
    ch2 = rc.restype_name_to_atom14_names["TRP"].index("CH2")
    torch.testing.assert_close(pos14[trp, ch2], pos37[trp, rc.atom_order["CH2"]])


def test_torsion_angles_round_trip_through_frames():
    """Atoms built from torsion angles give back the same torsion angles (AF2 Suppl. 1.9.1)."""
    g = torch.Generator().manual_seed(0)
    aatype = torch.randint(0, 20, (12,), generator=g)
    angles = torch.rand(12, 7, generator=g) * 6 - 3
    sin_cos = torch.stack([angles.sin(), angles.cos()], -1).double()
    frames = torsion_angles_to_frames(aatype, Rigid.identity((12,), dtype=torch.float64), sin_cos)
    pos37 = atom14_to_atom37(frames_to_atom14_positions(aatype, frames), aatype)
    mask37 = torch.from_numpy(rc.STANDARD_ATOM_MASK)[aatype].double()
    result = atom37_to_torsion_angles(aatype[None], pos37[None], mask37[None])
    got, got_mask = result["torsion_angles_sin_cos"][0], result["torsion_angles_mask"][0]
    chi_mask = got_mask[:, 3:].bool()
    torch.testing.assert_close(got[:, 3:][chi_mask], sin_cos[:, 3:][chi_mask], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[:, 2], sin_cos[:, 2], atol=1e-6, rtol=1e-6)  # psi via O
    assert got_mask[0, :2].sum() == 0  # no previous residue for omega and phi


def test_side_chains_are_equivariant():
    """Moving the backbone frames moves every atom rigidly with them."""
    aatype = torch.arange(20)
    sin_cos = torch.nn.functional.normalize(torch.randn(20, 7, 2), dim=-1)
    frames = _random_rigid(20)
    global_motion = _random_rigid(1)
    moved = Rigid(global_motion.rot.expand(20, 3, 3), global_motion.trans.expand(20, 3)).compose(frames)
    pos = frames_to_atom14_positions(aatype, torsion_angles_to_frames(aatype, frames, sin_cos))
    pos_moved = frames_to_atom14_positions(aatype, torsion_angles_to_frames(aatype, moved, sin_cos))
    mask = torch.from_numpy(rc.restype_atom14_mask)[aatype].bool()
    expected = global_motion.unsqueeze(-1).apply(pos)
    torch.testing.assert_close(pos_moved[mask], expected[mask], atol=1e-4, rtol=1e-4)
