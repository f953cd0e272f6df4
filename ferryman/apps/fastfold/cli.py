"""The ``fastfold`` command: AlphaFold2-style structure prediction and training."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ferryman.core.cli import FerrymanGroup, config_options, resolve_config, train_flags, train_options
from ferryman.core.errors import UserError

_PATH = click.Path(path_type=Path)
# DataConfig fields given as flags (file and folder paths unless the third item says otherwise).
_DATA_FLAGS = (
    ("msa_mode", "jackhmmer (AF2's tools on the databases below), mmseqs2 (ColabFold's search on --mmseqs-db-dir) "
     "or single-sequence (no MSA; must be asked for).", str),
    ("msa_dir", "Folder of precomputed alignments (a3m/Stockholm), one subfolder per target or files named after it; "
     "an earlier run's --out works.", None),
    ("mmseqs_db_dir", "Folder of ColabFold's MMseqs2 databases (uniref30_2302_db, colabfold_envdb_202108_db).", None),
    ("mmseqs_uniref_db", "UniRef30 database name in --mmseqs-db-dir (default uniref30_2302_db).", str),
    ("mmseqs_env_db", "Environmental database name in --mmseqs-db-dir ('' to skip; default colabfold_envdb_202108_db).", str),
    ("uniref90_db", "UniRef90 FASTA for jackhmmer.", None),
    ("mgnify_db", "MGnify FASTA for jackhmmer.", None),
    ("uniprot_db", "UniProt FASTA: multimer chains are searched in it (jackhmmer) to pair their MSAs by species.", None),
    ("bfd_db", "BFD database prefix for hhblits.", None),
    ("uniref30_db", "UniRef30 (UniClust30) database prefix for hhblits.", None),
    ("pdb70_db", "PDB70 database prefix for hhsearch template search.", None),
    ("template_mmcif_dir", "Folder of template mmCIF files (indexed once; see `fastfold index-templates`).", None),
    ("max_template_date", "YYYY-MM-DD: templates released after it are not used (AF2's --max_template_date).", str),
    ("obsolete_pdbs_path", "wwPDB obsolete.dat: obsolete template entries map to their replacements.", None),
    ("mmseqs_binary", "mmseqs to use (default: the one on PATH).", None),
    ("jackhmmer_binary", "jackhmmer to use (default: the one on PATH).", None),
    ("hhblits_binary", "hhblits to use (default: the one on PATH).", None),
    ("hhsearch_binary", "hhsearch to use (default: the one on PATH).", None),
    ("hmmsearch_binary", "hmmsearch to use (default: the one on PATH).", None),
    ("hmmbuild_binary", "hmmbuild to use (default: the one on PATH).", None),
    ("kalign_binary", "kalign to use (default: the one on PATH).", None),
)


@click.group(cls=FerrymanGroup)
@click.version_option(package_name="ferryman")
def main() -> None:
    """AlphaFold2-style protein structure prediction on the hardware you have.

    Long sequences are chunked and can be split over GPUs with dynamic axial parallelism.
    """


def _data_options(func):
    func = click.option("--use-precomputed-msas", "use_precomputed_msas", is_flag=True, default=None,
                        help="Reuse <out>/<target>/msas/ that an earlier run or `fastfold msa` wrote.")(func)  # fmt: skip
    for name, text, kind in reversed(_DATA_FLAGS):
        func = click.option(f"--{name.replace('_', '-')}", name, type=kind or _PATH, default=None, help=text)(func)
    return func


def _options(flags: dict) -> dict:
    """Command keyword arguments -> dotted PredictOptions keys (data flags live under data.)."""
    data_keys = {name for name, _, _ in _DATA_FLAGS} | {"use_precomputed_msas"}
    mapped = {(f"data.{k}" if k in data_keys else k): v for k, v in flags.items()}
    if mapped.get("models"):
        mapped["models"] = [m.strip() for m in mapped["models"].split(",") if m.strip()]
    return mapped


@main.command()
@click.argument("fasta", nargs=-1, required=True, type=_PATH)
@click.option("--out", "out_dir", required=True, type=_PATH, help="Output folder; one subfolder per target.")
@click.option("--params", type=_PATH, default=None,
              help="AF2's params folder (or one params_model_*.npz), or a `fastfold train` run folder or checkpoint.")
@click.option("--model-preset", "model_preset", default=None,
              help="monomer (default), monomer_ptm, monomer_casp14, or multimer (complexes: each FASTA file, or each "
                   "record with ':'-separated chains, is one): which files of the params folder run.")
@click.option("--num-multimer-predictions-per-model", "num_multimer_predictions_per_model", type=int, default=None,
              help="Multimer: predictions (MSA samples) per model, named <model>_pred_<k> (AF2's default 5).")
@click.option("--models", default=None, help="Comma-separated, e.g. model_1,model_3_ptm: exactly these files instead.")
@click.option("--random-weights", is_flag=True, default=None, help="A small random model to try the pipeline (outputs say so).")
@_data_options
@click.option("--chunk-size", default=None, metavar="N|auto", help="Chunk N_res x N_res work; 'auto' sizes it from free memory.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None, help="Inference precision (default fp32).")
@click.option("--relax/--no-relax", default=None, help="Amber-relax with OpenMM (default on).")
@click.option("--models-to-relax", type=click.Choice(["all", "best"]), default=None, help="Relax every model or the best one.")
@click.option("--num-recycles", type=int, default=None, help="Recycling iterations (default: the model's, 3).")
@click.option("--seed", type=int, default=None, help="Random seed for MSA sampling and random weights.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N.")
@click.option("--kernels", type=click.Choice(["auto", "triton", "torch"]), default=None, help="Fused kernels or the PyTorch reference.")
@click.option("--gpus", type=int, default=1, show_default=True, help="Split each model over N processes with DAP (started with torchrun).")
@click.option("--plots/--no-plots", default=None, help="Write pLDDT, PAE and MSA-coverage PNGs (default on).")
@click.option("--msa-only", "msa_only", is_flag=True, default=None, help="Write alignments and features only (as `fastfold msa`).")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar (default on).")
@config_options
def predict(fasta, out_dir, gpus, config_file, overrides, **flags) -> None:
    """Predict structures for every record of the FASTA files.

    Writes per target, as AlphaFold2 v2.3 does: ranked_*.pdb|.cif (best mean pLDDT first; for
    multimer complexes chains A, B, ... in FASTA order, ranked by 0.8 ipTM + 0.2 pTM),
    unrelaxed_/relaxed_<model>.pdb|.cif (pLDDT in the B-factors; the mmCIF also as ModelCIF
    ma_qa_metric), ranking_debug.json, confidence_<model>.json, pae_<model>.json (_ptm models),
    timings.json, msas/ and features.npz (numpy, not pickle), plus PNG plots.

    \b
    Examples:
      fastfold predict target.fasta --params alphafold_params/ --model-preset monomer_ptm \\
          --msa-mode mmseqs2 --mmseqs-db-dir colabfold_dbs/ --out out/
      fastfold predict target.fasta --params alphafold_params/ --uniref90-db uniref90.fasta --mgnify-db mgy.fa \\
          --template-mmcif-dir pdb_mmcif/ --max-template-date 2022-01-01 --out out/
      fastfold msa target.fasta --msa-mode mmseqs2 --mmseqs-db-dir colabfold_dbs/ --out out/   # CPU node
      fastfold predict target.fasta --params alphafold_params/ --use-precomputed-msas --out out/   # GPU node
      fastfold predict long.fasta --params params/ --msa-dir out/ --chunk-size auto --precision bf16 --gpus 4 --out out2/
      fastfold predict data/fastfold/sample.fasta --random-weights --msa-mode single-sequence --no-relax --out try/
      fastfold predict complex.fasta --params alphafold_params/ --model-preset multimer \\
          --uniref90-db uniref90.fasta --uniprot-db uniprot.fasta --out out/   # one complex, a chain per record
      fastfold predict data/fastfold/dimer.fasta --model-preset multimer --random-weights --msa-mode single-sequence \\
          --num-multimer-predictions-per-model 1 --no-relax --out try/
    """
    from ferryman.apps.fastfold.predict import PredictOptions, run, validate

    if gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}")
    opts = resolve_config(PredictOptions(), config_file=config_file, flags=_options(flags), overrides=overrides)
    if gpus > 1 and "WORLD_SIZE" not in os.environ:
        validate(list(fasta), out_dir, opts)  # bad input fails here, in one line, not once per rank
        _relaunch_under_torchrun(gpus)
    if gpus > 1:
        from ferryman.core.parallel import init_parallel

        opts.dims = init_parallel(dap=gpus)
    summary = run(list(fasta), out_dir, opts)
    if opts.dims is None or opts.dims.is_main:
        for name, result in summary.items():
            click.echo(f"{name}: {out_dir / name}" + (f" (best {result['order'][0]})" if result.get("order") else ""))


@main.command()
@click.argument("fasta", nargs=-1, required=True, type=_PATH)
@click.option("--out", "out_dir", required=True, type=_PATH, help="Output folder; <out>/<target>/msas/ per target.")
@click.option("--model-preset", "model_preset", default=None,
              help="multimer: each FASTA file (or A:B record) is a complex, alignments per chain under msas/<chain>/.")
@_data_options
@click.option("--plots/--no-plots", default=None, help="Write the MSA-coverage PNG (default on).")
@config_options
def msa(fasta, out_dir, config_file, overrides, **flags) -> None:
    """Compute alignments (and features.npz) only, e.g. on a CPU node; predict later with
    `fastfold predict ... --use-precomputed-msas --out <the same folder>`.

    \b
    Examples:
      fastfold msa targets.fasta --msa-mode mmseqs2 --mmseqs-db-dir colabfold_dbs/ --out out/
      fastfold msa targets.fasta --uniref90-db uniref90.fasta --mgnify-db mgy_clusters.fa --out out/
      fastfold msa complex.fasta --model-preset multimer --uniref90-db uniref90.fasta --uniprot-db uniprot.fasta --out out/
    """
    from ferryman.apps.fastfold.predict import PredictOptions, run

    mapped = {**_options(flags), "msa_only": True, "relax": False}
    opts = resolve_config(PredictOptions(), config_file=config_file, flags=mapped, overrides=overrides)
    for name, report in run(list(fasta), out_dir, opts).items():
        depth = report.get("msa_depth_deduplicated", report.get("msa_depth_merged"))
        click.echo(f"{name}: {out_dir / name / 'msas'} ({report['msa_mode']}, {depth} sequences)")


@main.command("index-templates")
@click.argument("mmcif_dir", type=_PATH)
def index_templates(mmcif_dir) -> None:
    """Index a template mmCIF folder once (release dates, chain sequences), cached in it as
    fastfold_template_index.json; later runs re-read only new or changed files.

    \b
    Example:
      fastfold index-templates pdb_mmcif/mmcif_files/
    """
    from ferryman.apps.fastfold.data.template_index import INDEX_NAME, load_index
    from ferryman.core.files import check_writable

    if not Path(mmcif_dir).is_dir():
        raise UserError(f"{mmcif_dir}: not a folder of mmCIF files")
    check_writable(Path(mmcif_dir) / INDEX_NAME, "template index", is_dir=False)
    index = load_index(Path(mmcif_dir), progress=True)
    dated = sum(1 for entry in index.files.values() if entry["release_date"])
    click.echo(f"{len(index.files)} files, {len(index.chains())} chains, {dated} with a release date: "
               f"{Path(mmcif_dir) / INDEX_NAME}")  # fmt: skip


def _relaunch_under_torchrun(gpus: int) -> None:
    """Start this same command in ``gpus`` processes with torchrun and exit with its status."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
           "-m", "ferryman.apps.fastfold.cli", *sys.argv[1:]]  # fmt: skip
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // gpus)))
    code = subprocess.call(cmd, env=env)
    if code:
        raise UserError(f"a DAP process failed (exit status {code}); its own message is printed above")
    sys.exit(0)


@main.command()
@click.option("--data", "data", required=True, type=_PATH, help="Folder of PDB/mmCIF structures (unreadable files are skipped and counted).")
@click.option("--out", "out_dir", required=True, type=_PATH, help="Run folder: checkpoints, metrics.jsonl, loss.png, lddt.png, configs.")
@click.option("--preset", default="debug", show_default=True, type=click.Choice(["debug", "initial", "finetune"]),
              help="Training sizes: debug, or AF2's initial training / fine-tuning (Suppl. Table 4).")
@click.option("--model", "preset__model", default=None, help="Model preset (tiny, debug, model_1_ptm, ...); default: the training preset's.")
@click.option("--msa-dir", "msa_dir", type=_PATH, default=None, help="Alignments named <structure>.a3m/.sto (default: single sequence).")
@click.option("--crop-size", "preset__crop_size", type=int, default=None, help="Residues per training crop.")
@click.option("--crop-mode", "preset__crop_mode", type=click.Choice(["contiguous", "spatial"]), default=None, help="How crops are chosen.")
@click.option("--max-recycle", "preset__max_recycle", type=int, default=None, help="Recycling iterations are drawn from 0..N per step.")
@click.option("--device", "train__device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Where to train.")
@click.option("--ema-decay", "train__ema_decay", type=float, default=None, help="Weight EMA decay (0 disables).")
@click.option("--grad-clip", "train__optim__max_grad_norm", type=float, default=None, help="Clip the global gradient norm (0 disables).")
@click.option("--activation-checkpointing/--no-activation-checkpointing", "activation_checkpointing", default=None,
              help="Recompute each Evoformer block in the backward pass.")
@click.option("--kernels", "kernels", type=click.Choice(["auto", "triton", "torch"]), default=None,
              help="Fused Triton kernels or the PyTorch reference.")
@click.option("--dap", "dap", type=int, default=None,
              help="Split each example's Evoformer over N processes (started with torchrun); under torchrun, "
                   "groups of N train data-parallel.")
@click.option("--seed", "train__seed", type=int, default=None, help="Seed of weights, crops, MSA sampling and recycling draws.")
@click.option("--progress/--no-progress", "train__progress", default=None, help="Show a progress bar.")
@train_options(precisions=("fp32", "bf16"))
def train(data, out_dir, preset, config_file, overrides, **flags) -> None:
    """Train AlphaFold2 on a folder of experimental structures.

    Each step crops one structure, samples its MSA (or uses the sequence alone), draws the
    recycling count and optimises AF2's loss (FAPE, torsions, distogram, masked MSA, pLDDT; the
    fine-tuning preset adds violations and experimentally-resolved atoms).

    \b
    Examples:
      fastfold train --data structures/ --out runs/debug --preset debug --max-steps 50
      fastfold train --data structures/ --out runs/debug --resume latest --max-steps 100
      fastfold train --data pdb_mmcif/ --msa-dir alignments/ --out runs/af2 --preset initial --precision bf16
      fastfold train --data pdb_mmcif/ --out runs/af2 --preset initial --dap 2 --memory gemini-auto
      torchrun --nproc-per-node 4 -m ferryman.apps.fastfold.cli train --data pdb_mmcif/ --out runs/af2 --dap 2  # 2 data-parallel x 2 DAP
      fastfold predict villin.fasta --params runs/debug --msa-mode single-sequence --out pred/   # the trained model
    """
    from ferryman.apps.fastfold.train.config import train_preset
    from ferryman.apps.fastfold.train.run import run as run_training

    shared = train_flags(flags, prefix="train.")
    # Flag names spell dotted config keys with "__" (click names must be identifiers).
    flags = {k.replace("__", "."): (str(v) if isinstance(v, Path) else v) for k, v in flags.items()}
    flags.update(shared)
    flags.update({"data": str(data), "train.out_dir": str(out_dir)})
    cfg = resolve_config(train_preset(preset), config_file=config_file, flags=flags, overrides=overrides)
    if cfg.dap > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch_under_torchrun(cfg.dap)
    from ferryman.core.parallel import init_parallel

    # Under torchrun the processes are data-parallel (in groups of --dap); without it, one process.
    dims = init_parallel(dap=cfg.dap)
    result, dataset = run_training(cfg, dims)
    if not dims.is_main:
        return
    skipped = f"; {dataset.skipped} unreadable file(s) skipped" if dataset.skipped else ""
    click.echo(f"trained {result.step} steps on {len(dataset)} structure(s){skipped}: {out_dir}")


if __name__ == "__main__":
    main()
