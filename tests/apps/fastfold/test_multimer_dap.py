"""DAP on 2 gloo ranks equals one process for AlphaFold-Multimer: its Evoformer and extra-MSA
blocks (outer product mean first) and its template pair stack (products before attention),
forward and backward (the tagged gradient shares summed as the engines sum them), and the whole
model forward with ipTM; and predict() under DAP."""

from __future__ import annotations

import pytest
import torch

from ferryman.apps.fastfold.model import random_weights_model
from ferryman.apps.fastfold.parallelize import parallelize
from ferryman.apps.fastfold.presets import as_multimer, tiny
from ferryman.core.parallel import reduce_partial_grads, run_distributed

from ._model_inputs import ref_run
from .test_multimer_model import complex_batch

N_RES, N_SEQ = 11, 5  # odd: each rank's shard is padded


def _stacks(model) -> dict:
    g = torch.Generator().manual_seed(1)
    m = torch.randn(N_SEQ, N_RES, model.cfg.c_m, generator=g)
    z = torch.randn(N_RES, N_RES, model.cfg.c_z, generator=g)
    msa_mask = torch.ones(N_SEQ, N_RES)
    msa_mask[-1, -3:] = 0.0
    pair_mask = torch.ones(N_RES, N_RES)
    out = {}
    for name in ("evoformer", "extra", "template"):
        z_in = z.clone().requires_grad_(True)
        if name == "template":
            m_in = m[..., :1].clone().requires_grad_(True)
            m_out, z_out = m_in * 1.0, model.template_embedder.template_pair_stack(z_in, pair_mask, chunk_size=4)
        else:
            stack = model.evoformer if name == "evoformer" else model.extra_msa_stack
            m_in = (m if name == "evoformer" else m[..., : model.cfg.c_e]).clone().requires_grad_(True)
            m_out, z_out = stack(m_in, z_in, msa_mask, pair_mask, chunk_size=4)
        loss = (m_out * torch.linspace(-1, 1, m_out.numel()).view_as(m_out)).sum() + (z_out**2).sum()
        loss.backward()
        out[name] = {"m": m_out.detach(), "z": z_out.detach(), "dm": m_in.grad, "dz": z_in.grad}
    return out


def _run(rank: int, world: int) -> dict:
    model = random_weights_model(as_multimer(tiny()), seed=3, run=ref_run())
    group = torch.distributed.group.WORLD if world > 1 else None
    parallelize(model, group)  # tags the sharded blocks' gradients as partial sums over the group
    results = _stacks(model)
    reduce_partial_grads(model.parameters())  # what an engine does before it steps
    results["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        results["model"] = model(complex_batch(lengths=(6, 5), n_seq=N_SEQ, n_extra=3, seed=2), num_recycle=1)
    return results


@pytest.mark.distributed
def test_multimer_dap_two_ranks_match_one():
    single = _run(0, 1)
    for result in run_distributed(_run, 2):
        for stack in ("evoformer", "extra", "template"):
            for key in ("m", "z", "dm", "dz"):
                torch.testing.assert_close(result[stack][key], single[stack][key], rtol=1e-4, atol=1e-4,
                                           msg=f"{stack} {key}")  # fmt: skip
        assert result["grads"].keys() == single["grads"].keys()
        for name, grad in single["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-3, atol=1e-4, msg=name)
        for key in ("final_atom_positions", "plddt", "predicted_aligned_error", "ptm", "iptm"):
            torch.testing.assert_close(result["model"][key], single["model"][key], rtol=1e-4, atol=1e-4, msg=key)


def _predict_on_rank(rank: int, world: int, fasta: str, out: str) -> dict:
    from ferryman.apps.fastfold.predict import predict
    from ferryman.core.parallel import init_parallel

    return predict([fasta], out, dims=init_parallel(dap=world), **PREDICT)


PREDICT = dict(model_preset="multimer", random_weights=True, msa_mode="single-sequence", relax=False, plots=False,
               kernels="torch", num_recycles=1, max_extra_msa=4, progress=False, seed=3,
               num_multimer_predictions_per_model=1)  # fmt: skip


@pytest.mark.distributed
def test_multimer_prediction_under_dap_matches_one_process(tmp_path):
    """predict() on 2 gloo ranks: rank 0 alone writes, the complex's atoms equal one process's."""
    from Bio.PDB import PDBParser

    from ferryman.apps.fastfold.predict import predict

    fasta = tmp_path / "ab.fasta"
    fasta.write_text(">ab\nLSDEDFKAVFGMTRSAFA:NLPLWKQQHLKKEKGLF\n")
    predict([fasta], tmp_path / "single", **PREDICT)
    results = run_distributed(_predict_on_rank, 2, str(fasta), str(tmp_path / "dap"))
    assert "order" in results[0]["ab"] and "order" not in results[1]["ab"]

    def atoms(folder):
        structure = PDBParser(QUIET=True).get_structure("x", folder / "ab" / "ranked_0.pdb")
        return [(c.id, len(c), a.coord) for c in structure[0] for r in c for a in r]

    single, dap = atoms(tmp_path / "single"), atoms(tmp_path / "dap")
    assert [(c, n) for c, n, _ in single] == [(c, n) for c, n, _ in dap]
    assert max(abs(x - y).max() for (_, _, x), (_, _, y) in zip(single, dap)) < 1e-2  # PDB's 3 decimals
