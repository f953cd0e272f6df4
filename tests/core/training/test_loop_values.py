"""The loop's numbers against what they must be for known inputs, not against another run of the
same loop (which shares any bias): the logged loss and metrics of an update, the data position
after an epoch boundary, the EMA of tied weights, and the loss averaged over data-parallel ranks."""

import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ferryman.core.errors import UserError
from ferryman.core.parallel import init_parallel
from ferryman.core.training import train
from tests.core.training.test_loop import Net, _cfg, _loss
from tests.threaded import run_threaded

X = torch.randn(12, 6, generator=torch.Generator().manual_seed(3))


Y = torch.arange(12) % 3


def _ordered_loader():
    return DataLoader(TensorDataset(X, Y), batch_size=4)  # 3 batches an epoch, in order


class Plain(Net):
    """Net without dropout, so a loss can be recomputed outside the loop."""

    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Identity()


def test_an_update_logs_the_mean_of_its_micro_batches(tmp_path):
    cfg = _cfg(tmp_path, "plain", max_steps=1, grad_accum=2, plot=False, ema_decay=0.0, ckpt_at_end=False)
    result = train(cfg, Plain, _ordered_loader, _loss)
    torch.manual_seed(cfg.seed)  # the loop seeds like this before it builds the model
    model = Plain()
    with torch.no_grad():
        parts = [_loss(model, (X[i:i + 4], Y[i:i + 4])) for i in (0, 4)]
    expected = sum(p[0].item() for p in parts) / 2
    mean = sum(_loss(model, (X[i:i + 4], Y[i:i + 4]))[0] for i in (0, 4)) / 2
    mean.backward()
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    [record] = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.losses == [record["loss"]]
    assert abs(record["loss"] - expected) < 1e-6 * expected
    assert record["acc"] == sum(p[1]["acc"].item() for p in parts) / 2
    assert record["lr"] == 0.5 * 1e-2  # the first of two warm-up steps
    assert abs(record["grad_norm"] - grad_norm) < 1e-5 * grad_norm  # of the mean loss, before clipping


def test_a_non_finite_loss_stops_the_run_in_one_line_but_fp16_skips_the_step(tmp_path):
    def blowing_up(engine, batch):
        blowing_up.calls = getattr(blowing_up, "calls", 0) + 1
        loss, logs = _loss(engine, batch)
        return (loss * float("nan") if blowing_up.calls == 2 else loss), logs

    cfg = _cfg(tmp_path / "fp32", "plain", max_steps=3, grad_accum=1, plot=False, ema_decay=0.0)
    with pytest.raises(UserError, match=r"^loss became nan at epoch 0, batch 2; lower optim\.lr$"):
        train(cfg, Net, _ordered_loader, blowing_up)
    blowing_up.calls = 0
    cfg = _cfg(tmp_path / "fp16", "plain", max_steps=3, grad_accum=1, plot=False, ema_decay=0.0, precision="fp16")
    result = train(cfg, Net, _ordered_loader, blowing_up)
    records = [json.loads(line) for line in (tmp_path / "fp16" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [0.0, 1.0, 0.0] and len(result.losses) == 3


def test_the_progress_bar_counts_updates_from_where_a_resume_starts(tmp_path, capsys):
    kw = dict(max_steps=3, grad_accum=1, plot=False, ema_decay=0.0)
    train(_cfg(tmp_path, "plain", **kw, stop_after=2), Net, _ordered_loader, _loss)
    assert capsys.readouterr().err == ""  # progress=False
    resumed = train(_cfg(tmp_path, "plain", **kw, resume="latest", progress=True), Net, _ordered_loader, _loss)
    bar = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line]
    assert bar[0].startswith("train:") and " 2/3 " in bar[0]  # started at the resumed step
    assert " 3/3 " in bar[-1] and "step/s" in bar[-1] and "lr=1.00e-02" in bar[-1]
    assert f"loss={resumed.losses[-1]:.4g}," in bar[-1]  # the last update's loss, to 4 significant digits


def _shuffled_loader():
    return DataLoader(TensorDataset(X, Y), batch_size=4, shuffle=True)  # each epoch's order from the loop's seed


def test_a_run_stopped_after_an_epoch_boundary_records_where_it_was(tmp_path):
    kw = dict(max_steps=5, grad_accum=1, plot=False, ema_decay=0.0)
    straight = train(_cfg(tmp_path / "a", "plain", **kw), Net, _shuffled_loader, _loss)
    first = train(_cfg(tmp_path / "b", "plain", **kw, stop_after=4), Net, _shuffled_loader, _loss)
    trainer = json.loads((tmp_path / "b" / "checkpoints" / "step-00000004" / "trainer.json").read_text())
    assert (trainer["epoch"], trainer["batch_in_epoch"]) == (1, 1)  # 4 batches of a 3-batch epoch
    resumed = train(_cfg(tmp_path / "b", "plain", **kw, resume="latest"), Net, _shuffled_loader, _loss)
    assert first.losses + resumed.losses == straight.losses
    assert (resumed.step, resumed.out_dir) == (5, tmp_path / "b")


class Tied(Net):
    """An output layer that shares its weight with the input layer (as language models tie embeddings)."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(6, 6)
        self.out = torch.nn.Linear(6, 6)
        self.out.weight = self.inp.weight


@pytest.mark.parametrize("engine", ["plain", "gemini"])
def test_the_ema_of_a_model_with_tied_weights_names_both(tmp_path, engine):
    """The EMA loads into the model like its state_dict, which names a tied weight under both names."""
    cfg = _cfg(tmp_path, engine, max_steps=2, grad_accum=1, plot=False, ckpt_at_end=False)
    result = train(cfg, Tied, _ordered_loader, lambda engine, batch: engine(batch[0]).square().mean())
    ema = result.ema_state_dict
    assert set(ema) == {"inp.weight", "inp.bias", "out.weight", "out.bias"}
    assert torch.equal(ema["inp.weight"], ema["out.weight"])


def _both_ranks_loader():
    order = [0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11]  # step k: rank 0's batch k, then rank 1's
    return DataLoader(TensorDataset(X[order], Y[order]), batch_size=6)


def _rank_loader():
    rank = torch.distributed.get_rank()
    return DataLoader(TensorDataset(X[rank * 6:(rank + 1) * 6], Y[rank * 6:(rank + 1) * 6]), batch_size=3)


def _seeded_state():
    torch.manual_seed(0)
    return Plain().state_dict()


# Drawn before any rank starts: the threaded ranks share the global RNG, which the loop seeds
# while another rank may be building its model.
INITIAL = _seeded_state()


def _build_plain():
    model = Plain()
    model.load_state_dict(INITIAL)
    return model


def _data_parallel_losses(rank, world, out):
    dims = init_parallel(backend="threaded")
    cfg = _cfg(out / str(rank), "plain", max_steps=2, grad_accum=1, plot=True, ema_decay=0.0, ckpt_at_end=False,
               progress=True)  # only rank 0 draws a bar, writes metrics and plots
    ranks_seen = []
    result = train(cfg, _build_plain, _rank_loader, _loss, dims=dims, on_step=lambda info: ranks_seen.append(info.rank))
    return result.losses, result.engine.state_dict(), ranks_seen


def test_data_parallel_ranks_log_the_mean_loss_over_ranks(tmp_path, capsys):
    (losses0, state0, seen0), (losses1, state1, seen1) = run_threaded(_data_parallel_losses, 2, tmp_path)
    assert capsys.readouterr().err.count(" 0/2 ") == 1  # one bar: rank 0's
    assert (seen0, seen1) == ([0, 0], [1, 1])
    assert (tmp_path / "0" / "metrics.jsonl").is_file() and (tmp_path / "0" / "loss.png").is_file()
    assert not (tmp_path / "1" / "metrics.jsonl").exists() and not (tmp_path / "1" / "loss.png").exists()
    torch.manual_seed(0)
    model = Plain()
    with torch.no_grad():
        own = [_loss(model, (X[i:i + 3], Y[i:i + 3]))[0].item() for i in (0, 6)]  # each rank's first batch
    assert own[0] != own[1]
    assert losses0 == losses1
    assert abs(losses0[0] - sum(own) / 2) < 1e-6
    # one process on both ranks' batches together: the same updates (DDP averages the gradients)
    both = train(_cfg(tmp_path / "one", "plain", max_steps=2, grad_accum=1, plot=False, ema_decay=0.0, ckpt_at_end=False),
                 _build_plain, lambda: _both_ranks_loader(), _loss)
    assert abs(both.losses[1] - losses0[1]) < 1e-6
    for key, value in both.engine.state_dict().items():
        assert torch.equal(state0[key], state1[key]), key
        assert (state0[key] - value).abs().max() < 1e-6, key


def test_metrics_every_log_every_steps_and_at_the_end_with_their_timing(tmp_path):
    import time

    started = time.perf_counter()
    result = train(_cfg(tmp_path, "plain", max_steps=5, grad_accum=1, log_every=2, plot=False, ema_decay=0.0,
                        schedule="constant", ckpt_at_end=False), Net, _ordered_loader, _loss)
    elapsed = time.perf_counter() - started
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]
    assert all(0 < r["step_s"] < elapsed for r in records)  # one update's wall time
    assert [r["lr"] for r in records] == [1e-2, 1e-2, 1e-2]  # constant after the two warm-up steps
    assert result.ema_state_dict is None and result.step == 5  # ema_decay=0: no EMA
    assert not (tmp_path / "loss.png").exists()  # plot=False


def _dap_pairs_losses(rank, world, out):
    dims = init_parallel(dap=2, backend="threaded")  # 4 ranks: 2 data-parallel groups of a DAP pair each
    shard = dims.dp_rank
    cfg = _cfg(out / str(rank), "plain", max_steps=1, grad_accum=1, plot=False, ema_decay=0.0, ckpt_at_end=False)
    loader = lambda: DataLoader(TensorDataset(X[shard * 6:(shard + 1) * 6], Y[shard * 6:(shard + 1) * 6]), batch_size=3)  # noqa: E731
    return train(cfg, _build_plain, loader, _loss, dims=dims).losses


def test_the_logged_loss_is_the_mean_over_data_parallel_ranks_only_not_over_dap_ranks(tmp_path):
    """A DAP pair computes one sample together: its ranks' losses are one loss, not two to average."""
    losses = run_threaded(_dap_pairs_losses, 4, tmp_path)
    torch.manual_seed(0)
    model = Plain()
    with torch.no_grad():
        own = [_loss(model, (X[i:i + 3], Y[i:i + 3]))[0].item() for i in (0, 6)]  # each data-parallel group's batch
    assert all(len(rank_losses) == 1 and abs(rank_losses[0] - sum(own) / 2) < 1e-6 for rank_losses in losses), losses
