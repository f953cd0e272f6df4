"""Data parallel x sequence parallel training (dp=2, sp=2 on 4 gloo ranks) against one process.

The one-process reference sees the same global batch: the sampler gives data-parallel rank r of
R the batches r, R + r, 2R + r, ... of the one shared shuffled order, so a single process with
gradient accumulation over R micro-batches steps on exactly the clips (and noise seeds) of the
R ranks, and its mean loss is what averaging gradients over the dp group computes.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ferryman.apps.opensora.config import Bucket
from ferryman.apps.opensora.train import build_loader, build_model, run_train
from ferryman.core.gemini import GeminiConfig

from .conftest import CLIPS
from .test_train import _cfg

STEPS = 2


def _batch_ids(cfg, dims) -> list[list[str]]:
    """The captions of the first two batches this rank's loader yields (epoch seeded as the loop does)."""
    loader = build_loader(cfg, dims)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return [batch["text"] for _, batch in zip(range(2), loader)]


def _grad_norms(cfg) -> list[float]:
    log = Path(cfg.train.out_dir) / "metrics.jsonl"
    return [json.loads(line)["grad_norm"] for line in log.read_text().splitlines()]


def _dp_sp_worker(rank, world_size, plain_cfg, gemini_cfg):
    from ferryman.core.parallel import init_parallel

    dims = init_parallel(sp=plain_cfg.sp)
    layout = {"dp_rank": dims.dp_rank, "sp_rank": torch.distributed.get_rank(dims.sp_group),
              "batches": _batch_ids(plain_cfg, dims)}
    runs = {}
    for name, cfg in (("plain", plain_cfg), ("gemini", gemini_cfg)):
        result = run_train(cfg, quiet=True)
        runs[name] = (result.losses, result.engine.state_dict())
    return layout, runs


def _four_rank_cfgs(tmp_path, tiny_models):
    kw = dict(steps=STEPS, buckets=[Bucket(resolution=32, num_frames=8, batch_size=1)])
    plain = _cfg(tmp_path / "plain", tiny_models, **kw)
    gcfg = GeminiConfig(placement="static", param_host_fraction=0.5, optim_host_fraction=0.5, min_num_chunks=4)
    gemini = _cfg(tmp_path / "gemini", tiny_models, engine="gemini", gemini=gcfg, **kw)
    return replace(plain, sp=2), replace(gemini, sp=2, runtime=replace(gemini.runtime, grad_checkpointing=True))


@pytest.mark.distributed
def test_data_and_sequence_parallel_training_matches_one_process_over_the_global_batch(tmp_path, tiny_models):
    """dp=2 x sp=2: sequence ranks share a batch, dp ranks split the global batch; after two steps
    the losses and every weight equal one process accumulating the same two micro-batches, on the
    plain engine (DDP over the dp group) and on Gemini (chunk gradients reduced over the dp group)."""
    from ferryman.core.parallel import run_distributed

    plain_cfg, gemini_cfg = _four_rank_cfgs(tmp_path, tiny_models)
    one = _cfg(tmp_path / "one", tiny_models, steps=STEPS, grad_accum=2,
               buckets=[Bucket(resolution=32, num_frames=8, batch_size=1)])
    reference = run_train(one, quiet=True)
    ref_state = reference.engine.state_dict()
    ref_batches = _batch_ids(one, None)
    initial = build_model(one).state_dict()

    results = run_distributed(_dp_sp_worker, 4, plain_cfg, gemini_cfg, timeout_s=240)
    layouts = [layout for layout, _ in results]
    assert [(lo["dp_rank"], lo["sp_rank"]) for lo in layouts] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert layouts[0]["batches"] == layouts[1]["batches"] and layouts[2]["batches"] == layouts[3]["batches"]
    assert layouts[0]["batches"] != layouts[2]["batches"]
    # rank r of 2 takes batches r and 2 + r of the order one process reads
    assert [layouts[0]["batches"][0], layouts[2]["batches"][0]] == ref_batches[:2]

    # the gradient norm before the update (rank 0 logs it): a gradient summed instead of averaged
    # over dp, or a sequence shard's partial gradient, would show here even though AdamW hides scale
    ref_norms = _grad_norms(one)
    for cfg in (plain_cfg, gemini_cfg):
        assert _grad_norms(cfg) == pytest.approx(ref_norms, rel=1e-5), cfg.train.engine
    moved = False
    for rank, (_, runs) in enumerate(results):
        for engine, (losses, state) in runs.items():
            assert losses == pytest.approx(reference.losses, rel=1e-5), (rank, engine)
            for name, value in ref_state.items():
                assert torch.allclose(state[name], value, rtol=1e-5, atol=1e-6), (rank, engine, name)
                moved |= not torch.allclose(value, initial[name], atol=1e-4)
    assert moved  # the two steps changed the weights by far more than the tolerance


def _zero_step_worker(rank, world_size, cfgs):
    runs = {}
    for cfg in cfgs:
        result = run_train(cfg, quiet=True)
        runs[Path(cfg.train.out_dir).name] = (result.losses, result.num_skipped, result.engine.state_dict())
    return runs


def _table_with_an_unreadable_bucket(folder: Path) -> Path:
    """A readable clip for the 8-frame bucket and a truncated one, the only clip of the 4-frame
    bucket (its sizes are given, so only decoding finds it broken): with batches of 1 on 2
    data-parallel ranks, every step one rank reads the good clip and the other reads nothing."""
    folder.mkdir()
    (folder / "good.mp4").write_bytes((CLIPS / "circle_diag.mp4").read_bytes())
    (folder / "broken.mp4").write_bytes((CLIPS / "square_diag.mp4").read_bytes()[:300])
    rows = ["path,text,num_frames,height,width,fps", "good.mp4,a white circle,24,64,64,8", "broken.mp4,a red square,6,64,64,8"]
    (folder / "clips.csv").write_text("\n".join(rows) + "\n")
    return folder / "clips.csv"


@pytest.mark.distributed
def test_a_rank_with_only_unreadable_clips_keeps_step_with_a_training_rank(tmp_path, tiny_models):
    """The zero step of a rank whose batch has no readable clip runs the STDiT as a real step does
    (fps, size and caption-dropout conditioning), so DDP's and Gemini's gradient reductions, which
    wait for every trainable parameter, complete next to a rank that trains on a real batch; also
    with caption dropout off, where the null caption is still in every step's graph."""
    from ferryman.core.parallel import run_distributed

    buckets = [Bucket(resolution=32, num_frames=8, batch_size=1), Bucket(resolution=32, num_frames=4, batch_size=1)]
    kw = dict(csv=_table_with_an_unreadable_bucket(tmp_path / "clips"), steps=STEPS, buckets=buckets)
    plain = _cfg(tmp_path / "plain", tiny_models, **kw)
    no_dropout = _cfg(tmp_path / "no_dropout", tiny_models, **kw)
    no_dropout = replace(no_dropout, diffusion=replace(no_dropout.diffusion, caption_dropout=0.0))
    gcfg = GeminiConfig(placement="static", param_host_fraction=0.5, optim_host_fraction=0.5, min_num_chunks=4)
    gemini = _cfg(tmp_path / "gemini", tiny_models, engine="gemini", gemini=gcfg, **kw)
    initial = build_model(plain).state_dict()

    results = run_distributed(_zero_step_worker, 2, [plain, no_dropout, gemini], timeout_s=240)
    for run in ("plain", "no_dropout", "gemini"):
        (losses, skipped, state), (other_losses, other_skipped, other_state) = (r[run] for r in results)
        assert skipped + other_skipped == STEPS  # one rank per step had nothing readable
        assert losses == other_losses and all(loss > 0 for loss in losses)  # the mean over both ranks
        for name, value in state.items():
            assert torch.equal(value, other_state[name]), (run, name)
        assert any(not torch.allclose(state[n], initial[n], atol=1e-4) for n in initial), run  # it trained
