"""The models `fastfold predict` runs: built from their weights' source, and called on features.

Every model is built and loaded before any output is written, so corrupt or mismatched
parameters fail in one line up front.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np

from ferryman.apps.fastfold.data.transforms import InputConfig
from ferryman.apps.fastfold.params import ModelSource
from ferryman.core.errors import UserError


@dataclass(kw_only=True)
class LoadedModel:
    name: str
    model: object  # ferryman.apps.fastfold.model.AlphaFold (imported lazily)
    inputs: InputConfig  # a MultimerInputConfig for multimer models
    num_recycle: int | None = None  # None: the model config's (AF2: 3); a trained run: its max_recycle
    weights: str = ""  # what was loaded, for run_info.json


# Fields that AlphaFoldConfig held before they moved to RunOptions: checkpoints written then
# still carry them in their config metadata; the run options of this call decide instead.
_FORMER_RUN_FIELDS = ("chunk_size", "auto_chunk", "kernels", "inplace", "precision")


def run_options(opts):
    """The ``RunOptions`` that ``fastfold predict``'s options ask for."""
    from ferryman.apps.fastfold.model import RunOptions

    chunk = opts.chunk_size
    return RunOptions(chunk_size=chunk if isinstance(chunk, int) else None, auto_chunk=chunk == "auto",
                      kernels=opts.kernels, precision=opts.precision)  # fmt: skip


def _model_config(name: str, opts):
    from ferryman.apps.fastfold import presets

    if opts.random_weights:  # the smallest network with every module; the outputs say it is random
        cfg = presets.tiny(heads=presets.HeadsConfig(plddt_channels=8, ptm=name.endswith("_ptm")))
    elif opts.preset is not None:  # small networks in the official layout (tests, demos)
        cfg = presets.get_preset(opts.preset)
        if name in presets.MODEL_NAMES:
            cfg = dataclasses.replace(cfg, heads=dataclasses.replace(cfg.heads, ptm=name.endswith("_ptm")))
    else:
        return presets.alphafold(name)
    if presets.is_multimer(name):  # a small network as the multimer (AF2's early stop included)
        cfg = presets.as_multimer(cfg, recycle_early_stop_tolerance=0.5)
    return cfg


def _input_config(name: str, cfg, opts) -> InputConfig:
    from ferryman.apps.fastfold import presets

    if cfg.multimer:
        from ferryman.apps.fastfold.data.multimer_transforms import MultimerInputConfig

        settings = presets.data_settings(name) if name in presets.MULTIMER_NAMES else {}
        base = MultimerInputConfig(**{k: settings[k] for k in ("max_msa_clusters", "max_extra_msa") if k in settings})
        names = {f.name for f in dataclasses.fields(MultimerInputConfig)}
        return dataclasses.replace(base, **{k: v for k, v in opts.inputs.items() if k in names})
    base = InputConfig()
    if name in presets.MODEL_NAMES:
        settings = presets.data_settings(name)
        clusters = settings["max_msa_clusters"]
        if settings["reduce_msa_clusters_by_max_templates"] and cfg.template.enabled:
            clusters -= settings["max_templates"]  # the template torsion rows take their place
        base = InputConfig(
            max_msa_clusters=clusters, max_extra_msa=settings["max_extra_msa"], max_templates=settings["max_templates"]
        )
    return dataclasses.replace(base, **opts.inputs)


def _trained_model(source: ModelSource, opts) -> LoadedModel:
    """A `fastfold train` checkpoint: the network, input settings and recycling of its run."""
    from ferryman.apps.fastfold import presets
    from ferryman.apps.fastfold.model import apply_run_options, build_model
    from ferryman.apps.fastfold.train.config import FastfoldTrainConfig
    from ferryman.apps.fastfold.weights import load_training_checkpoint
    from ferryman.core.config import load_config

    run = load_config(FastfoldTrainConfig, source.run_config)
    model = build_model(presets.get_preset(source.network))
    which = load_training_checkpoint(model, source.path)
    inputs = dataclasses.replace(run.preset.input_config(), **opts.inputs)  # what the model was trained on
    return LoadedModel(name=source.name, model=apply_run_options(model, run_options(opts)), inputs=inputs,
                       num_recycle=run.preset.max_recycle, weights=f"{source.path} ({which} weights)")  # fmt: skip


def _safetensors_model(source: ModelSource, opts) -> LoadedModel:
    from ferryman.apps.fastfold.model import AlphaFoldConfig, apply_run_options, build_model
    from ferryman.apps.fastfold.weights import load_checkpoint
    from ferryman.core.config import from_dict
    from ferryman.core.files import check_safetensors

    meta = check_safetensors(source.path, "fastfold checkpoint").get("__metadata__") or {}
    if "config" not in meta:
        raise UserError(f"--params {source.path}: a safetensors file without a fastfold model config in its "
                        "metadata (write it with ferryman.apps.fastfold.weights.save_checkpoint)")  # fmt: skip
    sizes = json.loads(meta["config"])
    if isinstance(sizes, dict):
        sizes = {k: v for k, v in sizes.items() if k not in _FORMER_RUN_FIELDS}
    model = build_model(from_dict(AlphaFoldConfig, sizes, where=str(source.path)))
    load_checkpoint(model, source.path)
    return LoadedModel(name=source.name, model=apply_run_options(model, run_options(opts)), inputs=InputConfig(**opts.inputs),
                       weights=str(source.path))  # fmt: skip


def load_models(sources: list[ModelSource], opts) -> list[LoadedModel]:
    """Build and load every model up front, so corrupt params fail before any output is written."""
    from ferryman.apps.fastfold import multimer_weights
    from ferryman.apps.fastfold.model import random_weights_model
    from ferryman.apps.fastfold.weights import model_from_official_params

    loaded = []
    for index, source in enumerate(sources):
        if source.kind == "checkpoint":
            item = _trained_model(source, opts)
        elif source.kind == "safetensors":
            item = _safetensors_model(source, opts)
        else:
            cfg, run = _model_config(source.name, opts), run_options(opts)
            if source.path is None:
                model = random_weights_model(cfg, seed=opts.seed + index, run=run)
            elif cfg.multimer:
                model = multimer_weights.model_from_official_params(cfg, source.path, run=run)
            else:
                model = model_from_official_params(cfg, source.path, run=run)
            item = LoadedModel(name=source.name, model=model, inputs=_input_config(source.name, cfg, opts),
                               weights=str(source.path or "random"))  # fmt: skip
        if opts.dims is not None:
            from ferryman.apps.fastfold.parallelize import parallelize

            item.model = parallelize(item.model, opts.dims)
        item.model = item.model.eval()
        loaded.append(item)
    return loaded


def _device(opts):
    from ferryman.core.runtime import pick_device

    return pick_device(opts.device, opts.dims, flag="--device")


def _to_batch(feats: dict, use_templates: bool, device) -> dict:
    import torch

    batch = {}
    for key, value in feats.items():
        # No templates: the monomer skips the embedder instead of attending over nothing. (The
        # multimer always has its template slots: empty ones count in its mean.)
        if key.startswith("template_") and (not use_templates or feats["template_aatype"].shape[0] == 0):
            continue
        if isinstance(value, np.ndarray) and value.dtype != object:
            batch[key] = torch.from_numpy(np.ascontiguousarray(value)).to(device)
    if batch["extra_msa"].shape[0] == 0:  # AF2 pads to a fixed size; one masked row is enough
        for key in ("extra_msa", "extra_msa_mask", "extra_has_deletion", "extra_deletion_value"):
            batch[key] = torch.zeros((1, *batch[key].shape[1:]), dtype=batch[key].dtype, device=device)
    return batch


def run_model(loaded: LoadedModel, feats: dict, opts) -> dict:
    """Features -> numpy outputs: final atoms, pLDDT, and PAE/pTM for _ptm models."""
    import torch

    device = _device(opts)
    model = loaded.model.to(device)
    use_templates = getattr(model, "template_embedder", None) is not None
    batch = _to_batch(feats, use_templates, device)
    num_recycle = opts.num_recycles if opts.num_recycles is not None else loaded.num_recycle
    with torch.inference_mode():
        out = model(batch, num_recycle=num_recycle, pair_logits=False)  # no [N, N, 64] logits
    keys = ("final_atom_positions", "final_atom_mask", "plddt", "predicted_aligned_error")
    result = {k: out[k].float().cpu().numpy() for k in keys if k in out}
    for key in ("max_predicted_aligned_error", "ptm", "iptm", "ranking_confidence"):
        if key in out:
            result[key] = float(out[key])
    if "num_recycles" in out:
        result["num_recycles"] = int(out["num_recycles"])
    loaded.model.to("cpu")
    return result
