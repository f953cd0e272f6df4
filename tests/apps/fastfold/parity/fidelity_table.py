"""The whole-model tables of docs/fidelity.md: Ferryman against AlphaFold2's own code, feature by
feature, with each row's noise floor, and the bf16 comparison.

    PYTHONPATH=. python -m tests.apps.fastfold.parity.fidelity_table [--full-size] [--no-fma] [--bf16]

``--full-size`` uses model_1_ptm's sizes (48 blocks; minutes per row on a CPU) instead of the
suite's small config; ``--no-fma`` keeps XLA from fusing multiply-adds (x86 only), under which
AF2's value for a torsion without a frame is the exact-arithmetic one; ``--bf16`` adds the bf16
table. Weights as in the suite: 0.15 / sqrt(fan_in) in the trunk, 1 / sqrt(fan_in) in the
structure module and heads.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--no-fma", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    return parser.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if ARGS is not None and ARGS.no_fma:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=SSE4_2"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ferryman.apps.fastfold.presets import alphafold  # noqa: E402

from ._af2 import (  # noqa: E402
    af2_config,
    ferryman_model,
    haiku_params,
    perturbed,
    random_official_params,
    run_whole_model,
    whole_model,
)
from ._inputs import (  # noqa: E402
    OUTPUT_SCALES,
    PARITY_RUN,
    WHOLE_MODEL_SCALE,
    parity_config,
    to_af2,
    to_torch,
    villin_features,
    villin_template,
)


def _configs(full_size: bool):
    base = alphafold("model_1_ptm", num_recycle=1) if full_size else parity_config()
    off = replace(base.template, enabled=False, embed_torsion_angles=False)
    unit = replace(base.template, use_unit_vector=True)
    return base, replace(base, template=off), replace(base, template=unit)


def _rows(full_size: bool) -> dict:
    """name -> (config, features, num_recycle)."""
    base, no_templates, unit = _configs(full_size)
    raw, hidden = villin_template(hide_undefined=False), villin_template()
    gap = villin_template(slice(14, 17))
    return {
        "single sequence, no recycling": (no_templates, villin_features(), 0),
        "24-row MSA with deletions (clusters + extra-MSA stack)": (no_templates, villin_features(msa_rows=24), 0),
        "one recycling iteration": (no_templates, villin_features(), 1),
        "one real template (villin, torsion rows on)": (base, villin_features(templates=(raw,)), 0),
        "the same, no-frame torsion positions masked": (base, villin_features(templates=(hidden,)), 0),
        "the same, template unit vectors on": (unit, villin_features(templates=(hidden,)), 0),
        "everything together (real template)": (base, villin_features(msa_rows=24, templates=(raw,)), 1),
        "everything together (2 templates, masked)": (base, villin_features(msa_rows=24, templates=(hidden, gap)), 1),
    }


def _af2_run(cfg, feats, num_recycle, params, *, bf16=False):
    apply = whole_model(af2_config(cfg, bf16=bf16))
    batch = to_af2(feats, templates=cfg.template.enabled)
    return apply, batch, run_whole_model(apply, haiku_params(params), batch, cfg, num_recycle)


def _ferryman_run(cfg, feats, num_recycle, params, *, bf16=False):
    model = ferryman_model(cfg, params, replace(PARITY_RUN, precision="bf16") if bf16 else PARITY_RUN)
    with torch.no_grad():
        out = model(to_torch(feats), num_recycle=num_recycle)
    return {k: out[k].float().numpy() for k in ("final_atom_positions", "plddt", "distogram_logits")}


def _deviation(a: dict, b: dict, feats) -> tuple[float, float, float]:
    """(atoms in Angstrom, pLDDT, distogram logits), max abs, from Ferryman-keyed or AF2 outputs."""

    def keyed(out):
        if "structure_module" in out:
            return out["structure_module"]["final_atom_positions"], out["plddt"], out["distogram"]["logits"]
        return out["final_atom_positions"], out["plddt"], out["distogram_logits"]

    exists = feats["atom37_atom_exists"][..., None]
    (pa, la, da), (pb, lb, db) = keyed(a), keyed(b)
    return float(np.abs((pa - pb) * exists).max()), float(np.abs(la - lb).max()), float(np.abs(da - db).max())


def fp32_table(full_size: bool, only: list[str]) -> None:
    print("| features exercised | max atom deviation | pLDDT | distogram logits | noise floor (atoms) |")
    print("|---|---|---|---|---|")
    for name, (cfg, feats, num_recycle) in _rows(full_size).items():
        if only and not any(o in name for o in only):
            continue
        start = time.time()
        params = random_official_params(cfg, scale=WHOLE_MODEL_SCALE, scales=OUTPUT_SCALES, seed=1)
        apply, batch, ref = _af2_run(cfg, feats, num_recycle, params)
        noisy = run_whole_model(apply, haiku_params(perturbed(params, 1e-6)), batch, cfg, num_recycle)
        ours = _ferryman_run(cfg, feats, num_recycle, params)
        atoms, plddt, dgram = _deviation(ours, ref, feats)
        floor = _deviation(noisy, ref, feats)[0]
        print(f"| {name} | {atoms:.1e} Å | {plddt:.1e} | {dgram:.1e} | {floor:.1e} Å |  <!-- {time.time() - start:.0f} s -->",
              flush=True)  # fmt: skip


def bf16_table(full_size: bool) -> None:
    """Ferryman's bf16 trunk and AF2's default bf16, each against AF2 in fp32, on the same inputs."""
    cfg, feats, num_recycle = _rows(full_size)["everything together (2 templates, masked)"]
    params = random_official_params(cfg, scale=WHOLE_MODEL_SCALE, scales=OUTPUT_SCALES, seed=1)
    _, _, fp32 = _af2_run(cfg, feats, num_recycle, params)
    _, _, af2_bf16 = _af2_run(cfg, feats, num_recycle, params, bf16=True)
    ours_fp32 = _ferryman_run(cfg, feats, num_recycle, params)
    ours_bf16 = _ferryman_run(cfg, feats, num_recycle, params, bf16=True)
    print("| run, against AF2 fp32 | max atom deviation | pLDDT | distogram logits |")
    print("|---|---|---|---|")
    for name, out in (("AF2 bf16 (its default)", af2_bf16), ("Ferryman bf16 trunk", ours_bf16),
                      ("Ferryman fp32", ours_fp32)):  # fmt: skip
        atoms, plddt, dgram = _deviation(out, fp32, feats)
        print(f"| {name} | {atoms:.2g} Å | {plddt:.2g} | {dgram:.2g} |", flush=True)
    atoms, plddt, dgram = _deviation(ours_bf16, af2_bf16, feats)
    print(f"| Ferryman bf16 against AF2 bf16 | {atoms:.2g} Å | {plddt:.2g} | {dgram:.2g} |")


def main() -> None:
    torch.set_num_threads(1)
    only = [r.strip() for r in ARGS.rows.split(",") if r.strip()]
    fp32_table(ARGS.full_size, only)
    if ARGS.bf16:
        bf16_table(ARGS.full_size)


if __name__ == "__main__":
    sys.exit(main())
