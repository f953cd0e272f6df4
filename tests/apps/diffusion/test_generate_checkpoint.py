"""sd-generate from checkpoint-N samples as the run trained it: a run that trained v_prediction on
an epsilon base model renders from its checkpoint what its final pipeline renders."""

import json

import numpy as np
from PIL import Image

from ferryman.apps.diffusion.loss import LossConfig

from .conftest import tiny_config


def _render(model, out, scheduler=""):
    from ferryman.apps.diffusion.config import GenerateConfig
    from ferryman.apps.diffusion.generate import generate

    cfg = GenerateConfig(model=str(model), out=str(out), prompts=["a red circle"], steps=2, height=32, width=32,
                         precision="fp32", device="cpu", scheduler=scheduler)
    (path,) = generate(cfg, progress=False)
    with Image.open(path) as image:
        return np.asarray(image), json.loads((out / "generate.json").read_text())["scheduler"]


def test_checkpoint_samples_with_the_trained_prediction_type(tmp_path, tiny_model):
    from diffusers import DDPMScheduler

    from ferryman.apps.diffusion.generate import load_pipeline, set_scheduler
    from ferryman.apps.diffusion.train import finetune

    assert DDPMScheduler.load_config(str(tiny_model), subfolder="scheduler").get("prediction_type") == "epsilon"
    run = tmp_path / "run"
    finetune(tiny_config(tiny_model, run, max_steps=1, ckpt_every=1, loss=LossConfig(prediction_type="v_prediction")),
             progress=False)
    checkpoint = run / "checkpoint-1"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["prediction_type"] == "v_prediction"

    pipe = load_pipeline(checkpoint)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    set_scheduler(pipe, "euler")  # --scheduler keeps the trained target
    assert pipe.scheduler.config.prediction_type == "v_prediction"

    # the final pipeline holds the same (last-step) weights, so the two render the same image
    final, kind = _render(run, tmp_path / "final")
    from_checkpoint, kind_ckpt = _render(checkpoint, tmp_path / "ckpt")
    assert kind == kind_ckpt
    np.testing.assert_array_equal(from_checkpoint, final)


def test_checkpoint_without_a_recorded_prediction_type_keeps_the_base_one(tmp_path, tiny_model):
    """Checkpoints written before the field existed sample as they did: with the base model's type."""
    from ferryman.apps.diffusion.generate import load_pipeline
    from ferryman.apps.diffusion.train import finetune

    run = tmp_path / "run"
    finetune(tiny_config(tiny_model, run, max_steps=1, ckpt_every=1), progress=False)
    state_file = run / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("prediction_type") == "epsilon"
    state_file.write_text(json.dumps(state))
    assert load_pipeline(run / "checkpoint-1").scheduler.config.prediction_type == "epsilon"
