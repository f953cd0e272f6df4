"""fastfold train: one AlphaFold2 training step at AF2's initial-training sizes, default path vs eager.

    python benchmarks/fastfold_train.py                                   # CUDA: crops 256 and 384, full depth
    python benchmarks/fastfold_train.py --device cpu --threads 1 --blocks 1 --extra-blocks 1 --n-seq 32 --n-extra 128 \\
        --warmup 0 --steps 1                                              # CPU: reduced depth, full widths

The model is the ``initial`` training preset's (``model_1_ptm``: c_m 256, c_z 128, 48 Evoformer
blocks, 4 extra-MSA blocks, the pTM head; the template embedder is built but idle, because the
training pipeline gives no templates, as the preset says) with AF2's seeded initialisation. The
example is the villin headpiece OpenMM ships, tiled end to end to the crop size, with a synthetic
MSA (the query plus random 30%-mutated rows) that the real training pipeline samples into N_seq
clusters and N_extra extra rows, BERT masking included (AF2 Suppl. Table 4: 128 and 1024).

One step = forward with a fixed recycling count (``--num-recycle``, default 0: one pass, the
pass that carries gradients in AF2's training), the AF2 loss of ``fastfold train`` (FAPE,
torsions, distogram, masked MSA, pLDDT, pTM), backward, gradient clipping, AdamW and the weight
EMA: exactly what the training loop runs per update. Paths, both with activation checkpointing
per Evoformer/extra-MSA block (without it the eager path would not fit at 48 blocks) and the same
precision (bf16 autocast on CUDA, fp32 on CPU):

- default: ``kernels=auto`` (the fused Triton kernels on CUDA; the PyTorch reference on CPU);
- eager: ``kernels=torch``, no chunking.

``fastfold train`` does not chunk in training, so on CPU the two paths run the same math.

Each (crop, path) point runs in a fresh subprocess: ``--warmup`` steps, then ``--steps`` timed
steps (median reported, with the forward+loss / backward / optimizer split). Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` over the timed steps (weights, gradients and optimizer state
included); on CPU the process's peak resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss``),
also including the Python interpreter and libraries, with the resident set before the first step.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

PATHS = ("default", "eager")


def villin_chain():
    """The villin headpiece (35 residues) from the structure file OpenMM ships."""
    try:
        import openmm.app
    except ImportError as exc:
        raise SystemExit("error: this benchmark reads the villin headpiece shipped with openmm (pip install openmm)") from exc
    from ferryman.apps.fastfold.train.structure import read_structure

    return read_structure(Path(openmm.app.__file__).parent / "data" / "test.pdb")


def tiled_chain(n_res: int):
    """``n_res`` residues of villin copies laid 40 Å apart along x, numbered 0..n_res-1."""
    from ferryman.apps.fastfold.train.structure import Chain

    base = villin_chain()
    copies = -(-n_res // len(base))
    shift = np.zeros((1, 1, 3), np.float32)
    positions = []
    for i in range(copies):
        shift[..., 0] = 40.0 * i
        positions.append(base.atom_positions + shift * base.atom_mask[..., None])
    return Chain(name=f"villin_x{copies}", aatype=np.tile(base.aatype, copies)[:n_res],
                 atom_positions=np.concatenate(positions)[:n_res], atom_mask=np.tile(base.atom_mask, (copies, 1))[:n_res],
                 residue_index=np.arange(n_res), resolution=2.0)  # fmt: skip


def synthetic_msa(sequence: str, num_rows: int, seed: int = 0):
    """The query and ``num_rows - 1`` copies with 30% of positions replaced by random residues."""
    from ferryman.apps.fastfold.common import residue_constants as rc
    from ferryman.apps.fastfold.data.msa import Msa

    rng = np.random.default_rng(seed)
    query = np.array(list(sequence))
    alphabet = np.array(list(rc.restypes))
    rows = [sequence]
    for _ in range(num_rows - 1):
        row = query.copy()
        hit = rng.random(len(row)) < 0.3
        row[hit] = rng.choice(alphabet, int(hit.sum()))
        rows.append("".join(row))
    return Msa(sequences=rows, deletions=[[0] * len(sequence) for _ in rows])


def training_example(crop: int, n_seq: int, n_extra: int, num_recycle: int) -> dict[str, torch.Tensor]:
    """Model inputs and ground truth of one crop, through the training pipeline's own features."""
    from ferryman.apps.fastfold.data.transforms import InputConfig
    from ferryman.apps.fastfold.train.features import training_example as make_example

    chain = tiled_chain(crop)
    msa = synthetic_msa(chain.sequence, n_seq + n_extra)
    inputs = InputConfig(max_msa_clusters=n_seq, max_extra_msa=n_extra, max_templates=0)
    example = make_example(chain, msa, inputs, seed=0)
    example["num_recycle"] = torch.tensor(num_recycle)
    example["use_clamped_fape"] = torch.tensor(1.0)
    return example


def build(args, path: str, device: torch.device):
    """Model, engine and loss function as ``fastfold train --preset initial`` builds them
    (``run.build_training_model``), at the depth the flags give."""
    from ferryman.apps.fastfold.model import RunOptions, build_model
    from ferryman.apps.fastfold.model.evoformer import EvoformerStack
    from ferryman.apps.fastfold.train.config import train_preset
    from ferryman.apps.fastfold.train.step import make_loss_fn
    from ferryman.core.training import build_engine
    from ferryman.core.training.config import TrainConfig

    cfg = train_preset("initial")
    torch.manual_seed(0)
    run = RunOptions(kernels="auto" if path == "default" else "torch")
    model = build_model(cfg.preset.model, run=run, num_evoformer_blocks=args.blocks, num_extra_msa_blocks=args.extra_blocks)
    for module in model.modules():
        if isinstance(module, EvoformerStack):
            module.activation_checkpointing = True
    precision = "bf16" if device.type == "cuda" else "fp32"
    tcfg = TrainConfig(precision=precision, device=device.type, optim=cfg.train.optim, ema_decay=cfg.train.ema_decay,
                       progress=False, plot=False)  # fmt: skip
    engine = build_engine(model, tcfg)
    return model, engine, make_loss_fn(cfg.preset.weights), precision


def _clock(device: torch.device) -> float:
    common.synchronize(device)
    return time.perf_counter()


def run_point(args, crop: int, path: str) -> dict:
    """Warm-up and timed steps of one (crop, path) in this process."""
    from torch.utils._pytree import tree_map

    from ferryman.core.training.schedule import EMA

    device = torch.device(args.device)
    started = time.perf_counter()
    example = training_example(crop, args.n_seq, args.n_extra, args.num_recycle)
    model, engine, loss_fn, precision = build(args, path, device)
    batch = tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, example)
    ema = EMA(engine.master_tensors(), args.ema_decay)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"  crop {crop} {path}: features and model built in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)

    def step() -> dict:
        t0 = _clock(device)
        loss, _ = loss_fn(engine, batch)
        t1 = _clock(device)
        print(f"  crop {crop} {path}: forward + loss {t1 - t0:.1f} s", file=sys.stderr, flush=True)
        engine.backward(loss)
        t2 = _clock(device)
        engine.step()
        engine.zero_grad()
        ema.update(engine.master_tensors())
        t3 = _clock(device)
        loss = float(loss.detach())
        print(f"  crop {crop} {path}: step {t3 - t0:.1f} s (backward {t2 - t1:.1f} s), loss {loss:.3f}", file=sys.stderr, flush=True)
        return {"fwd_ms": 1e3 * (t1 - t0), "bwd_ms": 1e3 * (t2 - t1), "opt_ms": 1e3 * (t3 - t2), "step_ms": 1e3 * (t3 - t0),
                "loss": loss}  # fmt: skip

    try:
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        samples = [step() for _ in range(args.steps)]
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not common.is_oom(exc):
            raise
        return {"crop": crop, "path": path, "error": "OOM"}
    row = {"crop": crop, "path": path, "precision": precision, "n_msa_rows": int(batch["msa_feat"].shape[0]),
           "n_extra_rows": int(batch["extra_msa"].shape[0]), "parameters": sum(p.numel() for p in model.parameters())}  # fmt: skip
    for key in ("fwd_ms", "bwd_ms", "opt_ms", "step_ms"):
        row[key] = statistics.median(s[key] for s in samples)
    row["loss"] = samples[-1]["loss"]
    if device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated(device) / common.MIB
    else:
        row["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row["rss_before_mib"] = rss_before
    return row


def run_in_subprocess(args, argv: list[str], crop: int, path: str) -> dict:
    """One point in a fresh interpreter, so its peak memory is its own."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--point", str(crop), path]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.timeout or None)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"crop": crop, "path": path, "error": f"exit status {proc.returncode}"}
    return json.loads(lines[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--crops", type=int, nargs="+", default=[256, 384], help="crop sizes (residues)")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--blocks", type=int, default=48, help="Evoformer blocks (AF2: 48)")
    parser.add_argument("--extra-blocks", type=int, default=4, help="extra-MSA blocks (AF2: 4)")
    parser.add_argument("--n-seq", type=int, default=128, help="MSA clusters N_seq (initial training: 128)")
    parser.add_argument("--n-extra", type=int, default=1024, help="extra MSA rows N_extra (initial training: 1024)")
    parser.add_argument("--num-recycle", type=int, default=0, help="recycling iterations per step (0: one pass)")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="weight EMA, as the initial preset")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per point (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (AdamW state, allocator)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--timeout", type=float, default=0, help="seconds per point before it is abandoned (0: none)")
    parser.add_argument("--json", type=Path, help="default benchmarks/results/fastfold_train-<device>.json")
    parser.add_argument("--reprint", action="store_true", help="rebuild and print the table of the --json results; run nothing")
    parser.add_argument("--point", nargs=2, metavar=("CROP", "PATH"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device; use --device cpu with --blocks/--extra-blocks")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.point:
        print(json.dumps(run_point(args, int(args.point[0]), args.point[1])))
        return {}
    result = {"env": common.environment(args.device), "settings": {k: v for k, v in vars(args).items() if k != "point"},
              "rows": []}  # fmt: skip
    path = args.json or Path("benchmarks/results") / f"fastfold_train-{args.device}.json"
    if args.reprint:
        result = json.loads(path.read_text())
    for crop in [] if args.reprint else args.crops:
        for name in args.paths:
            try:
                r = run_in_subprocess(args, argv, crop, name)
            except subprocess.TimeoutExpired:
                r = {"crop": crop, "path": name, "error": f"over {args.timeout:g} s"}
            result["rows"].append(r)
            print(f"  {r}", file=sys.stderr)
    result["table"] = print_summary(result)
    print(f"\nwrote {common.write_json(path, result)}")
    return result


def summarize(rows: list[dict]) -> list[dict]:
    """One table row per crop: seconds and GiB per path, and eager/default ratios."""
    table = {}
    for r in rows:
        row = table.setdefault(r["crop"], {"crop": r["crop"]})
        name = r["path"]
        if "error" in r:
            row[f"{name} step s"] = r["error"]
            continue
        for key in ("step", "fwd", "bwd"):
            row[f"{name} {key} s"] = r[f"{key}_ms"] / 1e3
        row[f"{name} peak GiB"] = r["peak_mib"] / 1024
    for row in table.values():
        if all(isinstance(row.get(f"{p} step s"), float) for p in PATHS):
            row["eager/default time"] = row["eager step s"] / row["default step s"]
            row["eager/default memory"] = row["eager peak GiB"] / row["default peak GiB"]
    return list(table.values())


def print_summary(result: dict) -> list[dict]:
    s = result["settings"]
    peak = "peak allocated (CUDA)" if s["device"] == "cuda" else "peak RSS of the point's process (CPU)"
    print(f"\ndevice: {result['env']['device']}; {s['blocks']} Evoformer + {s['extra_blocks']} extra-MSA blocks, "
          f"N_seq {s['n_seq']}, N_extra {s['n_extra']}, num_recycle {s['num_recycle']}, median of {s['steps']} step(s) "
          f"after {s['warmup']} warm-up; memory = {peak}\n")  # fmt: skip
    table = summarize(result["rows"])
    columns = ["crop"] + [f"{p} {k}" for p in s["paths"] for k in ("step s", "fwd s", "bwd s", "peak GiB")]
    common.print_table(table, columns + (["eager/default time", "eager/default memory"] if len(s["paths"]) == 2 else []))
    return table

if __name__ == "__main__":
    main()
