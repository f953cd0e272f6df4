"""`fastfold predict`: FASTA -> alignments -> features -> every model -> ranked, relaxed structures.

`predict()` is what the CLI calls. All inputs (FASTA, params, databases, binaries, output folder)
are checked before anything is written, so a bad input ends with one UserError line and no
outputs. Each output file is written under a temporary name and renamed, and each target is
assembled in `<out>/.tmp-<target>` and renamed into place when complete: a failed run leaves
no half-written target folder (and no output folder it created itself). `msa_only` (the
`fastfold msa` command) stops after the alignments and features, for a CPU node; a later
`--use-precomputed-msas` run on a GPU node reads them from the same output folder. With
`--model-preset multimer` a target is a complex (a FASTA file, or a record with ':'-separated
chains), each model runs `num_multimer_predictions_per_model` times with different MSA samples,
and the outputs are ranked by 0.8 ipTM + 0.2 pTM (AF2 v2.3).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ferryman.apps.fastfold.data.fasta import ComplexTarget, FastaTarget, read_complexes, read_fastas
from ferryman.apps.fastfold.data.multimer_pipeline import check_complex_sources, run_multimer_pipeline
from ferryman.apps.fastfold.data.multimer_transforms import make_multimer_inputs
from ferryman.apps.fastfold.data.pipeline import DataConfig, check_target_sources, run_pipeline
from ferryman.apps.fastfold.data.transforms import InputConfig, make_model_inputs
from ferryman.apps.fastfold.inference import LoadedModel, load_models, run_model
from ferryman.apps.fastfold.output import confidence, plots, protein
from ferryman.apps.fastfold.output.writer import (
    ModelResult,
    rank,
    write_features,
    write_model_files,
    write_ranking,
    write_relaxed_files,
)
from ferryman.apps.fastfold.params import MODEL_PRESETS, NO_WEIGHTS, ModelSource, resolve_sources
from ferryman.core.config import coerce, to_dict
from ferryman.core.errors import UserError
from ferryman.core.files import check_writable
from ferryman.core.io import write_text
from ferryman.core.parallel import ParallelDims

CASP14_NOTE = ("monomer_casp14 ran the monomer models without AF2's 8-fold ensembling (not implemented; "
               "AF2 reports it adds about 0.1 GDT at 8x the cost)")
PAIRING_NOTE = ("no --uniprot-db: the chains of a heteromer are paired only where precomputed alignments hold "
                "uniprot_hits (AF2 pairs UniProt hits by species)")  # fmt: skip
__all__ = ["NO_WEIGHTS", "PredictOptions", "predict", "run", "validate"]


@dataclass(kw_only=True)
class PredictOptions:
    """Everything `fastfold predict` can be told; defaults follow AlphaFold2's monomer run."""

    params: Path | None = None  # an AF2 .npz, a folder of params_model_*.npz, or a fastfold train run
    model_preset: str = "monomer"  # AF2's --model_preset: which files of a params folder run
    models: list[str] | None = None  # e.g. ["model_1", "model_3_ptm"]: exactly these files instead
    msa_only: bool = False  # alignments and features only (`fastfold msa`); no weights needed
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
    num_multimer_predictions_per_model: int = 5  # AF2's flag: MSA samples (seeds) per multimer model
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
        if self.model_preset not in MODEL_PRESETS:
            raise UserError(f"--model-preset {self.model_preset!r}: choose one of {', '.join(MODEL_PRESETS)}")
        if self.num_multimer_predictions_per_model < 1:
            raise UserError(f"--num-multimer-predictions-per-model must be at least 1, got "
                            f"{self.num_multimer_predictions_per_model}")  # fmt: skip


def predict(fasta_paths: list[str | Path], out_dir: str | Path, **options) -> dict:
    """Predict every record of every FASTA with every model; returns a summary per target.

    Keyword options are the fields of `PredictOptions`, plus DataConfig fields (msa_dir,
    uniref90_db, mgnify_db, bfd_db, uniref30_db, uniprot_db, template_mmcif_dir, *_binary) and InputConfig
    fields (max_msa_clusters, max_extra_msa, max_templates) given flat.
    """
    data_keys = {f.name for f in dataclasses.fields(DataConfig)}
    input_keys = {f.name for f in dataclasses.fields(InputConfig)}
    inputs = {k: options[k] for k in list(options) if k in input_keys}
    data = {k: options.pop(k) for k in list(options) if k in data_keys}
    for key in inputs:
        options.pop(key, None)
    names = ("mmseqs_uniref_db", "mmseqs_env_db")  # database names inside --mmseqs-db-dir, not paths
    data = {k: Path(v) if isinstance(v, str) and k.endswith(("_db", "_dir", "_binary", "_path")) and k not in names
            else v for k, v in data.items()}  # fmt: skip
    opts = PredictOptions(**options, data=DataConfig(**data), inputs=inputs)
    return run(fasta_paths, Path(out_dir), opts)


def run(fasta_paths: list[str | Path], out_dir: Path, opts: PredictOptions) -> dict:
    """Validate everything, then predict; with DAP every rank runs this and rank 0 writes."""
    from tqdm import tqdm

    targets, sources = validate(fasta_paths, out_dir, opts)
    created = not out_dir.exists()
    models = [] if opts.msa_only else load_models(sources, opts)
    template_index = _template_index(opts) if _is_main(opts) else None
    summary = {}
    show = opts.progress and _is_main(opts)
    per_target = len(models) * (opts.num_multimer_predictions_per_model if opts.model_preset == "multimer" else 1)
    bar = tqdm(total=len(targets) * max(per_target, 1), disable=not show, unit="model", desc="fastfold predict")
    try:
        if _is_main(opts):
            _write_run_config(out_dir, fasta_paths, opts, models)
        for target in targets:
            summary[target.name] = _target_in_place(target, models, out_dir, opts, bar, template_index)
    except BaseException:
        if _is_main(opts):
            _clean_failed_run(out_dir, created, finished=list(summary))
        raise
    finally:
        bar.close()
    return summary


def _template_index(opts: PredictOptions):
    if opts.data.template_mmcif_dir is None:
        return None
    from ferryman.apps.fastfold.data.template_index import load_index

    return load_index(Path(opts.data.template_mmcif_dir), progress=opts.progress)


def _target_in_place(target: FastaTarget, models, out_dir: Path, opts: PredictOptions, bar, template_index) -> dict:
    """Predict into <out>/.tmp-<target>, then swap it in for <out>/<target> (rank 0 writes)."""
    final = out_dir / target.name
    if not _is_main(opts):
        return predict_target(target, models, final, opts, bar, template_index=template_index)
    work = out_dir / f".tmp-{target.name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        result = predict_target(target, models, work, opts, bar, previous=final / "msas", template_index=template_index)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    old = out_dir / f".old-{target.name}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(work, final)
    shutil.rmtree(old, ignore_errors=True)
    return result


def _clean_failed_run(out_dir: Path, created: bool, finished: list[str]) -> None:
    """A run that fails before any target finished leaves no output folder it made itself."""
    if created and not finished and out_dir.is_dir():
        for name in ("run_config.json", "run_info.json"):
            (out_dir / name).unlink(missing_ok=True)
        if not any(out_dir.iterdir()):
            out_dir.rmdir()


def validate(fasta_paths: list[str | Path], out_dir: Path, opts: PredictOptions) -> tuple[list[FastaTarget], list[ModelSource]]:
    """The cheap checks of every input (FASTA, databases, binaries, params paths, output folder),
    so bad input fails in one line before models load or processes start."""
    check_writable(out_dir, "--out folder")
    multimer = opts.model_preset == "multimer"
    targets = (read_complexes if multimer else read_fastas)([Path(p) for p in fasta_paths])
    sources = [] if opts.msa_only else resolve_sources(opts.params, opts.models, opts.model_preset, opts.random_weights)
    opts.data.check()
    for target in targets:
        check = check_complex_sources if multimer else check_target_sources
        check(target, opts.data, out_dir / target.name / "msas")
    return targets, sources


def _is_main(opts: PredictOptions) -> bool:
    return opts.dims is None or opts.dims.is_main


def _write_run_config(out_dir: Path, fasta_paths, opts: PredictOptions, models: list[LoadedModel]) -> None:
    """run_config.json holds exactly the options (it can be passed back with --config);
    run_info.json says what was run on what."""
    config = to_dict(opts)
    config.pop("dims")  # process groups are a property of the launch, not of the run's settings
    write_text(out_dir / "run_config.json", json.dumps(config, indent=1) + "\n")
    info = {
        "fasta_paths": [str(p) for p in fasta_paths],
        "model_names": [m.name for m in models],
        "weights": {m.name: m.weights for m in models},
        "dap": opts.dims.dap if opts.dims is not None else 1,
    }
    if opts.random_weights:
        info["warning"] = confidence.RANDOM_WEIGHTS_NOTE
    if opts.model_preset == "monomer_casp14" and not opts.models:
        info["note"] = CASP14_NOTE
    if opts.model_preset == "multimer" and opts.data.uniprot_db is None and opts.data.search_mode() != "mmseqs2":
        info["note"] = PAIRING_NOTE
    write_text(out_dir / "run_info.json", json.dumps(info, indent=1) + "\n")


def _features(target: FastaTarget, folder: Path, opts: PredictOptions, previous: Path | None,
              template_index) -> tuple[dict, dict]:  # fmt: skip
    """Rank 0 searches and writes; under DAP the other ranks receive the same features from it."""
    payload: tuple = ()
    if _is_main(opts):
        try:
            pipeline = run_multimer_pipeline if isinstance(target, ComplexTarget) else run_pipeline
            raw, report = pipeline(target, opts.data, folder, previous_msas=previous, template_index=template_index)
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


def predict_target(target: FastaTarget, models: list[LoadedModel], folder: Path, opts: PredictOptions, bar, *,
                   previous: Path | None = None, template_index=None) -> dict:  # fmt: skip
    """One target into ``folder``; ``previous`` is the msas/ folder an earlier run left."""
    main = _is_main(opts)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    bar.set_postfix_str(f"{target.name}: features")
    raw, data_report = _features(target, folder, opts, previous, template_index)
    timings["features"] = time.perf_counter() - start
    if opts.plots and main:
        rows = raw["msa"] if "msa_mask" not in raw else raw["msa"][raw["msa_mask"].any(-1)]  # not the padding
        plots.plot_msa_coverage(rows, folder / "msa_coverage.png", gap_index=21, title=target.name)
    if opts.msa_only:
        if main:
            confidence.write_json(folder / "timings.json", {k: round(v, 3) for k, v in timings.items()})
        bar.update(1)
        return data_report
    remarks = [confidence.RANDOM_WEIGHTS_NOTE] if opts.random_weights else []
    results = []
    for index, (loaded, name) in enumerate(_runs(models, target, opts)):
        bar.set_postfix_str(f"{target.name}: {name}")
        t0 = time.perf_counter()
        make_inputs = make_multimer_inputs if isinstance(target, ComplexTarget) else make_model_inputs
        feats = make_inputs(raw, loaded.inputs, seed=opts.seed + index)
        timings[f"process_features_{name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = run_model(loaded, feats, opts)
        timings[f"predict_and_compile_{name}"] = time.perf_counter() - t0
        result = _to_result(name, feats, out, remarks, target)
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


def _runs(models: list[LoadedModel], target, opts: PredictOptions) -> list[tuple[LoadedModel, str]]:
    """(model, output name) per prediction: AF2 runs each multimer model several times
    (``<model>_pred_<k>``), each with its own MSA sample."""
    if not isinstance(target, ComplexTarget):
        return [(loaded, loaded.name) for loaded in models]
    count = opts.num_multimer_predictions_per_model
    return [(loaded, f"{loaded.name}_pred_{k}") for loaded in models for k in range(count)]


def _to_result(name: str, feats: dict, out: dict, remarks: list[str], target=None) -> ModelResult:
    if isinstance(target, ComplexTarget):
        from ferryman.apps.fastfold.output.complex import complex_result

        return complex_result(name, feats, out, target, remarks)
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


