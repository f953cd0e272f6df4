"""`fastfold predict`: FASTA -> alignments -> features -> every model -> ranked, relaxed structures.

`predict()` is what the CLI calls. All inputs (FASTA, params, databases, binaries, output folder)
are checked before anything is written, so a bad input ends with one UserError line and no
outputs. Each output file is written under a temporary name and renamed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ferryman.apps.fastfold.data.fasta import FastaTarget, read_fastas
from ferryman.apps.fastfold.data.pipeline import DataConfig, run_pipeline
from ferryman.apps.fastfold.data.transforms import InputConfig, make_model_inputs
from ferryman.apps.fastfold.output import confidence, plots, protein
from ferryman.apps.fastfold.output.writer import (
    ModelResult,
    rank,
    write_features,
    write_model_files,
    write_ranking,
    write_relaxed_files,
)
from ferryman.core.config import coerce, to_dict
from ferryman.core.errors import UserError
from ferryman.core.io import write_text
from ferryman.core.parallel import ParallelDims


@dataclass(kw_only=True)
class PredictOptions:
    """Everything `fastfold predict` can be told; defaults follow AlphaFold2's monomer run."""

    params: Path | None = None  # an AF2 .npz file or a folder of params_model_*.npz
    models: list[str] | None = None  # e.g. ["model_1", "model_3_ptm"]; None = every params file found
    random_weights: bool = False  # a small random model (pipeline check; outputs say so)
    preset: str | None = None  # network size: None = official sizes; 'tiny'/'debug' for small npz files
    data: DataConfig = field(default_factory=DataConfig)
    inputs: dict = field(default_factory=dict)  # InputConfig overrides on each model's AF2 data settings
    chunk_size: int | str | None = None  # int, "auto" or None (no chunking)
    precision: str = "fp32"  # fp32 | bf16
    num_recycles: int | None = None  # None = the model's own (AF2: 3)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    relax: bool = True
    relax_platform: str = "auto"  # auto | CPU | CUDA
    models_to_relax: str = "all"  # all | best (AF2 2.3's --models_to_relax)
    # AF2: 3 violation-check rounds, minimise until converged. None = that, except with random
    # weights (no physical structure to relax: 1 round of 500 steps shows the step works).
    relax_max_outer_iterations: int | None = None
    relax_max_iterations: int | None = None
    kernels: str = "auto"  # auto | triton | torch (fused kernels or the PyTorch reference)
    plots: bool = True
    progress: bool = True
    dims: ParallelDims | None = None  # DAP: from core.parallel.init_parallel(dap=N) under torchrun

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise UserError(f"--precision must be bf16 or fp32, got {self.precision!r}")
        if isinstance(self.chunk_size, str) and self.chunk_size != "auto":
            try:
                self.chunk_size = int(self.chunk_size)
            except ValueError:
                raise UserError(f"--chunk-size must be a positive integer or 'auto', got {self.chunk_size!r}") from None
        if isinstance(self.chunk_size, int) and self.chunk_size < 1:
            raise UserError(f"--chunk-size must be a positive integer or 'auto', got {self.chunk_size}")
        if self.models_to_relax not in ("all", "best"):
            raise UserError(f"--models-to-relax must be all or best, got {self.models_to_relax!r}")
        unknown = set(self.inputs) - {f.name for f in dataclasses.fields(InputConfig)}
        if unknown:
            raise UserError(f"unknown input setting(s): {', '.join(sorted(unknown))}")
        types = typing.get_type_hints(InputConfig)  # values from --set arrive as strings
        self.inputs = {k: coerce(v, types[k], f"inputs.{k}") for k, v in self.inputs.items()}
        if self.num_recycles is not None and self.num_recycles < 0:
            raise UserError(f"--num-recycles must be >= 0, got {self.num_recycles}")


def check_output_dir(out_dir: Path) -> None:
    """The folder must be creatable and writable; checked by writing (and removing) a probe file."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"--out {out_dir}: cannot write there ({exc.strerror or exc})") from None


def predict(fasta_paths: list[str | Path], out_dir: str | Path, **options) -> dict:
    """Predict every record of every FASTA with every model; returns a summary per target.

    Keyword options are the fields of `PredictOptions`, plus DataConfig fields (msa_dir,
    uniref90_db, mgnify_db, bfd_db, uniref30_db, template_mmcif_dir, *_binary) and InputConfig
    fields (max_msa_clusters, max_extra_msa, max_templates) given flat.
    """
    data_keys = {f.name for f in dataclasses.fields(DataConfig)}
    input_keys = {f.name for f in dataclasses.fields(InputConfig)}
    inputs = {k: options[k] for k in list(options) if k in input_keys}
    data = {k: options.pop(k) for k in list(options) if k in data_keys}
    for key in inputs:
        options.pop(key, None)
    data = {k: Path(v) if isinstance(v, str) and (k.endswith(("_db", "_dir", "_binary"))) else v for k, v in data.items()}
    opts = PredictOptions(**options, data=DataConfig(**data), inputs=inputs)
    return run(fasta_paths, Path(out_dir), opts)


def run(fasta_paths: list[str | Path], out_dir: Path, opts: PredictOptions) -> dict:
    """Validate everything, then predict; with DAP every rank runs this and rank 0 writes."""
    from tqdm import tqdm

    targets = validate(fasta_paths, out_dir, opts)
    models = load_models(opts)
    if _is_main(opts):
        _write_run_config(out_dir, fasta_paths, opts, [m.name for m in models])
    summary = {}
    show = opts.progress and _is_main(opts)
    bar = tqdm(total=len(targets) * len(models), disable=not show, unit="model", desc="fastfold predict")
    try:
        for target in targets:
            summary[target.name] = predict_target(target, models, out_dir / target.name, opts, bar)
    finally:
        bar.close()
    return summary


def validate(fasta_paths: list[str | Path], out_dir: Path, opts: PredictOptions) -> list[FastaTarget]:
    """The cheap checks of every input (FASTA, databases, binaries, params paths, output folder),
    so bad input fails in one line before models load or processes start."""
    targets = read_fastas([Path(p) for p in fasta_paths])
    opts.data.check()
    resolve_params(opts)
    check_output_dir(out_dir)
    return targets


def _is_main(opts: PredictOptions) -> bool:
    return opts.dims is None or opts.dims.is_main


def _write_run_config(out_dir: Path, fasta_paths, opts: PredictOptions, model_names: list[str]) -> None:
    """run_config.json holds exactly the options (it can be passed back with --config);
    run_info.json says what was run on what."""
    config = to_dict(opts)
    config.pop("dims")  # process groups are a property of the launch, not of the run's settings
    write_text(out_dir / "run_config.json", json.dumps(config, indent=1) + "\n")
    info = {
        "fasta_paths": [str(p) for p in fasta_paths],
        "model_names": model_names,
        "dap": opts.dims.dap if opts.dims is not None else 1,
    }
    if opts.random_weights:
        info["warning"] = confidence.RANDOM_WEIGHTS_NOTE
    write_text(out_dir / "run_info.json", json.dumps(info, indent=1) + "\n")


def _features(target: FastaTarget, folder: Path, opts: PredictOptions) -> tuple[dict, dict]:
    """Rank 0 searches and writes; under DAP the other ranks receive the same features from it."""
    payload: tuple = ()
    if _is_main(opts):
        try:
            raw, report = run_pipeline(target, opts.data, folder)
            write_features(raw, folder / "features.npz")
            payload = ("ok", raw, report)
        except UserError as exc:
            payload = ("error", str(exc), None)
            if opts.dims is None or opts.dims.world_size == 1:
                raise
    if opts.dims is not None and opts.dims.world_size > 1:
        import torch.distributed as dist

        box = [payload]
        dist.broadcast_object_list(box, src=0)  # our own objects between our ranks, never user files
        payload = box[0]
    if payload[0] == "error":
        raise UserError(payload[1])
    return payload[1], payload[2]


def predict_target(target: FastaTarget, models: list[LoadedModel], folder: Path, opts: PredictOptions, bar) -> dict:
    main = _is_main(opts)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    bar.set_postfix_str(f"{target.name}: features")
    raw, data_report = _features(target, folder, opts)
    timings["features"] = time.perf_counter() - start
    if opts.plots and main:
        plots.plot_msa_coverage(raw["msa"], folder / "msa_coverage.png", gap_index=21, title=target.name)
    remarks = [confidence.RANDOM_WEIGHTS_NOTE] if opts.random_weights else []
    results = []
    for index, loaded in enumerate(models):
        bar.set_postfix_str(f"{target.name}: {loaded.name}")
        t0 = time.perf_counter()
        feats = make_model_inputs(raw, loaded.inputs, seed=opts.seed + index)
        timings[f"process_features_{loaded.name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = run_model(loaded, feats, opts)
        timings[f"predict_and_compile_{loaded.name}"] = time.perf_counter() - t0
        result = _to_result(loaded.name, feats, out, remarks)
        if main:
            write_model_files(result, folder, target=target.name, random_weights=opts.random_weights, plot=opts.plots)
        results.append(result)
        bar.update(1)
    if not main:
        return {"mean_plddt": {r.name: r.mean_plddt for r in results}, **data_report}
    if opts.relax:
        chosen = rank(results)[:1] if opts.models_to_relax == "best" else [r.name for r in results]
        for result in (r for r in results if r.name in chosen):
            bar.set_postfix_str(f"{target.name}: relax {result.name}")
            t0 = time.perf_counter()
            _relax(result, opts, bar)
            write_relaxed_files(result, folder, target=target.name)
            timings[f"relax_{result.name}"] = time.perf_counter() - t0
    order = write_ranking(results, folder, target=target.name, random_weights=opts.random_weights, plot=opts.plots)
    confidence.write_json(folder / "timings.json", {k: round(v, 3) for k, v in timings.items()})
    return {"order": order, "mean_plddt": {r.name: r.mean_plddt for r in results}, **data_report}


def _to_result(name: str, feats: dict, out: dict, remarks: list[str]) -> ModelResult:
    plddt = np.asarray(out["plddt"], np.float32)
    prot = protein.from_prediction(
        aatype=feats["aatype"], residue_index=feats["residue_index"], atom_positions=out["final_atom_positions"],
        atom_mask=out["final_atom_mask"], plddt=plddt, remarks=[*remarks, f"model {name}"],
    )  # fmt: skip
    return ModelResult(
        name=name, unrelaxed=prot, plddt=plddt, pae=out.get("predicted_aligned_error"),
        max_pae=out.get("max_predicted_aligned_error"), ptm=out.get("ptm"),
    )  # fmt: skip


def _relax(result: ModelResult, opts: PredictOptions, bar) -> None:
    """Relax one model; a minimisation that cannot be made finite keeps the unrelaxed structure."""
    from ferryman.apps.fastfold.relax.amber import RelaxConfig, relax

    outer, steps = (1, 500) if opts.random_weights else (3, 0)
    cfg = RelaxConfig(
        platform=opts.relax_platform,
        max_outer_iterations=outer if opts.relax_max_outer_iterations is None else opts.relax_max_outer_iterations,
        max_iterations=steps if opts.relax_max_iterations is None else opts.relax_max_iterations,
    )
    try:
        relaxed = relax(result.unrelaxed, cfg)
    except RuntimeError as exc:
        bar.write(f"warning: relaxation of {result.name} failed ({exc}); ranked files use the unrelaxed model")
        result.relax_metrics = {"error": str(exc)}
        return
    result.relaxed = relaxed.protein
    result.relax_metrics = relaxed.summary()


# --- models ---------------------------------------------------------------------------------------

NO_WEIGHTS = (
    "no weights given: pass --params with AlphaFold2 parameters (a params_model_*.npz file or the "
    "folder holding them, from https://storage.googleapis.com/alphafold/alphafold_params_2022-12-06.tar), "
    "or --random-weights to try the pipeline with a small random model"
)


@dataclass(kw_only=True)
class LoadedModel:
    name: str
    model: object  # ferryman.apps.fastfold.model.AlphaFold (imported lazily)
    inputs: InputConfig


def _official_name(path: Path) -> str:
    stem = path.name.removesuffix(".npz")
    return stem.removeprefix("params_")


def resolve_params(opts: PredictOptions) -> list[tuple[str, Path | None]]:
    """(model name, params file) pairs; params None means random weights."""
    if opts.random_weights:
        if opts.params is not None:
            raise UserError("give either --params or --random-weights, not both")
        return [(name, None) for name in (opts.models or ["model_1_ptm"])]
    if opts.params is None:
        raise UserError(NO_WEIGHTS)
    params = Path(opts.params)
    if params.is_file():
        if opts.models and len(opts.models) != 1:
            raise UserError(f"--params {params} is one model; name at most one with --models")
        return [((opts.models or [_official_name(params)])[0], params)]
    if not params.is_dir():
        raise UserError(f"--params {params}: no such file or folder")
    found = {_official_name(p): p for p in sorted(params.glob("params_*.npz"))}
    if not found:
        raise UserError(f"--params {params}: no params_*.npz files in this folder")
    names = opts.models or list(found)
    missing = [n for n in names if n not in found]
    if missing:
        raise UserError(f"--models {', '.join(missing)}: no params_<name>.npz in {params} (have: {', '.join(found)})")
    return [(n, found[n]) for n in names]


def _model_config(name: str, opts: PredictOptions):
    from ferryman.apps.fastfold import presets

    if opts.random_weights:  # the smallest network with every module; the outputs say it is random
        cfg = presets.tiny(heads=presets.HeadsConfig(plddt_channels=8, ptm=name.endswith("_ptm")))
    elif opts.preset is not None:
        cfg = presets.get_preset(opts.preset)
    else:
        cfg = presets.alphafold(name)
    cfg.precision = opts.precision
    cfg.kernels = opts.kernels
    cfg.chunk_size = opts.chunk_size if isinstance(opts.chunk_size, int) else None
    cfg.auto_chunk = opts.chunk_size == "auto"
    cfg.__post_init__()
    return cfg


def _input_config(name: str, cfg, opts: PredictOptions) -> InputConfig:
    from ferryman.apps.fastfold import presets

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


def load_models(opts: PredictOptions) -> list[LoadedModel]:
    """Build and load every model up front, so corrupt params fail before any output is written."""
    from ferryman.apps.fastfold.model import random_weights_model
    from ferryman.apps.fastfold.weights import model_from_official_params

    loaded = []
    for index, (name, path) in enumerate(resolve_params(opts)):
        cfg = _model_config(name, opts)
        if path is None:
            model = random_weights_model(cfg, seed=opts.seed + index)
        else:
            model = model_from_official_params(cfg, path)
        if opts.dims is not None:
            from ferryman.apps.fastfold.parallelize import parallelize

            model = parallelize(model, opts.dims)
        loaded.append(LoadedModel(name=name, model=model.eval(), inputs=_input_config(name, cfg, opts)))
    return loaded


def _device(opts: PredictOptions):
    import torch

    if opts.dims is not None and opts.dims.world_size > 1:
        return opts.dims.device
    if opts.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(opts.device)
    except RuntimeError:
        raise UserError(f"--device {opts.device!r} is not a device name (cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {opts.device}: no CUDA device is available")
    return device


def _to_batch(feats: dict, use_templates: bool, device) -> dict:
    import torch

    batch = {}
    for key, value in feats.items():
        if key.startswith("template_") and (not use_templates or feats["template_aatype"].shape[0] == 0):
            continue  # no templates: the model skips the embedder instead of attending over nothing
        if isinstance(value, np.ndarray) and value.dtype != object:
            batch[key] = torch.from_numpy(np.ascontiguousarray(value)).to(device)
    if batch["extra_msa"].shape[0] == 0:  # AF2 pads to a fixed size; one masked row is enough
        for key in ("extra_msa", "extra_msa_mask", "extra_has_deletion", "extra_deletion_value"):
            batch[key] = torch.zeros((1, *batch[key].shape[1:]), dtype=batch[key].dtype, device=device)
    return batch


def run_model(loaded: LoadedModel, feats: dict, opts: PredictOptions) -> dict:
    """Features -> numpy outputs: final atoms, pLDDT, and PAE/pTM for _ptm models."""
    import torch

    device = _device(opts)
    model = loaded.model.to(device)
    use_templates = getattr(model, "template_embedder", None) is not None
    batch = _to_batch(feats, use_templates, device)
    with torch.inference_mode():
        out = model(batch, num_recycle=opts.num_recycles, pair_logits=False)  # no [N, N, 64] logits
    keys = ("final_atom_positions", "final_atom_mask", "plddt", "predicted_aligned_error")
    result = {k: out[k].float().cpu().numpy() for k in keys if k in out}
    for key in ("max_predicted_aligned_error", "ptm"):
        if key in out:
            result[key] = float(out[key])
    loaded.model.to("cpu")
    return result
