"""What a resume reads: the folder named by --resume PATH or by the ``latest`` pointer, every file
checked first (the engine's own JSON too), RNG files whose JSON parses but holds no state, runs
without EMA, engine state that does not fit, and trainable-only checkpoints that cannot serve a
full run."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ferryman.core.errors import UserError
from ferryman.core.training import CheckpointStore, train
from tests.core.training.test_loop import Net, _cfg, _loader, _loss


@pytest.fixture
def run(tmp_path):
    """A plain run stopped after 4 updates, checkpoints at 2 and 4, no EMA."""
    cfg = _cfg(tmp_path / "run", "plain", stop_after=4, ckpt_every=2, keep_last=0, plot=False, ema_decay=0.0)
    first = train(cfg, Net, _loader, _loss)
    assert first.ema_state_dict is None and not (tmp_path / "run" / "checkpoints" / "step-00000004" / "ema.safetensors").exists()
    return tmp_path / "run", first


def _resume(out, resume, **kw):
    return train(_cfg(out, "plain", resume=resume, plot=False, ema_decay=0.0, **kw), Net, _loader, _loss)


def test_resume_from_a_named_folder_and_refusal_of_one_that_is_not_a_checkpoint(run, tmp_path):
    out, first = run
    straight = train(_cfg(tmp_path / "straight", "plain", plot=False, ema_decay=0.0), Net, _loader, _loss)
    resumed = _resume(out, str(out / "checkpoints" / "step-00000002"))  # not the newest: the one named
    assert first.losses[:2] + resumed.losses == straight.losses
    with pytest.raises(UserError) as err:
        _resume(out, str(tmp_path))
    assert str(err.value) == f"resume={tmp_path}: {tmp_path} is not a complete checkpoint (no trainer.json)"


def test_the_latest_pointer_wins_when_it_names_a_complete_folder(run):
    out, _ = run
    (out / "checkpoints" / "latest").write_text("step-00000002\n")
    resumed = _resume(out, "latest", max_steps=5)
    assert len(resumed.losses) == 3  # steps 3, 4 and 5: resumed at step 2, as the pointer says
    assert CheckpointStore(out / "checkpoints").newest().name == "step-00000005"


def test_a_damaged_engine_json_is_named_before_anything_loads(run):
    out, _ = run
    optimizer_json = out / "checkpoints" / "step-00000004" / "optimizer.json"
    optimizer_json.write_text(optimizer_json.read_text()[:10])
    with pytest.raises(UserError, match=r"step-00000004/optimizer\.json: cannot read this checkpoint file"):
        _resume(out, "latest")


@pytest.mark.parametrize("meta", [{}, {"python": [3, [1, 2], None], "numpy": ["MT19937", 0, 0, 0.0]}])
def test_an_rng_file_that_parses_but_holds_no_rng_state_is_named(run, meta):
    out, _ = run
    (out / "checkpoints" / "step-00000004" / "rng-rank00000.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"step-00000004/rng-rank00000\.json: cannot read this checkpoint file"):
        _resume(out, "latest")


def test_a_trainable_only_checkpoint_cannot_resume_a_full_run(tmp_path):
    cfg = _cfg(tmp_path, "plain", stop_after=2, plot=False, ema_decay=0.0)
    train(cfg, Net, _loader, _loss, checkpoints=CheckpointStore(tmp_path / "checkpoints", trainable_only=True))
    folder = tmp_path / "checkpoints" / "step-00000002"
    with pytest.raises(UserError, match=rf"^{folder}: no model\.safetensors; not a checkpoint of the plain engine$"):
        _resume(tmp_path, "latest")


def test_engine_state_that_does_not_fit_is_refused_in_one_line(run):
    out, _ = run
    folder = out / "checkpoints" / "step-00000004"
    tensors = load_file(folder / "optimizer.safetensors")
    del tensors["0.exp_avg"]  # a readable file that lacks what this model needs
    save_file(tensors, folder / "optimizer.safetensors")
    with pytest.raises(UserError) as err:
        _resume(out, "latest")
    assert str(err.value) == f"checkpoint {folder} cannot be loaded into this run: '0.exp_avg'"


class AppStore(CheckpointStore):
    """An app's layout: engine files two folders down, a file of its own, a field of its own."""

    def __init__(self, root):
        super().__init__(root, keep_last=0)
        self.exported = []

    def engine_folder(self, folder):
        return folder / "engine" / "state"

    def export(self, folder, engine, ema_named, *, rank):
        self.exported.append((folder.name, engine, rank))
        (folder / "app.txt").write_text(f"rank {rank}")

    def extra_state(self):
        return {"app_field": 7}


def test_an_app_store_gets_its_layout_files_and_fields_back(tmp_path):
    store = AppStore(tmp_path / "checkpoints")
    first = train(_cfg(tmp_path, "plain", stop_after=2, plot=False, ema_decay=0.0), Net, _loader, _loss, checkpoints=store)
    folder = tmp_path / "checkpoints" / "step-00000002"
    assert store.exported == [(".tmp-step-00000002", first.engine, 0)]
    assert (folder / "app.txt").read_text() == "rank 0"
    assert (folder / "engine" / "state" / "model.safetensors").is_file()
    trainer, ema = store.load(folder, first.engine, rank=0)
    assert trainer["app_field"] == 7 and trainer["step"] == 2 and ema is None


def test_a_step_saved_again_replaces_the_old_folder_and_leftovers_that_resist_removal_do_not_stop_it(run):
    out, _ = run
    ckpts = out / "checkpoints"
    (ckpts / ".tmp-step-00000009").write_text("a file, not a folder: rmtree cannot remove it")
    (ckpts / "step-00000004" / "from-the-first-run").write_text("")
    (ckpts / "latest").write_text("step-00000002\n")
    _resume(out, "latest", max_steps=4)  # redoes steps 3 and 4, saving step 4 again
    assert not (ckpts / "step-00000004" / "from-the-first-run").exists()
    assert json.loads((ckpts / "step-00000004" / "trainer.json").read_text())["step"] == 4
    assert sorted(p.name for p in ckpts.iterdir()) == [".tmp-step-00000009", "latest", "step-00000002", "step-00000004"]


def _noisy_loss(engine, batch):
    """Augmentation drawn from Python's and numpy's global RNGs, which a resume must also restore."""
    import random

    import numpy as np

    x, y = batch
    x = x * (1 + 0.1 * random.random()) + torch.from_numpy(np.random.standard_normal(x.shape).astype("float32")) * 0.1
    return _loss(engine, (x, y))


def test_resume_restores_the_python_and_numpy_random_streams(tmp_path):
    kw = dict(max_steps=4, grad_accum=1, plot=False, ema_decay=0.0)
    straight = train(_cfg(tmp_path / "a", "plain", **kw), Net, _loader, _noisy_loss)
    first = train(_cfg(tmp_path / "b", "plain", **kw, stop_after=2), Net, _loader, _noisy_loss)
    resumed = train(_cfg(tmp_path / "b", "plain", **kw, resume="latest"), Net, _loader, _noisy_loss)
    assert first.losses + resumed.losses == straight.losses
