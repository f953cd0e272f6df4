"""Model presets: the five AlphaFold2 monomer models and their pTM variants at published sizes
(Jumper et al. 2021, Suppl. Table 5; AF2 ``model/config.py`` CONFIG_DIFFS), the five
AlphaFold-Multimer v3 models (``model_{1..5}_multimer_v3``, AF2 CONFIG_MULTIMER; ``as_multimer``
turns any network size into its multimer form), plus ``tiny()`` and ``debug()`` for tests.

All ten real presets share the network sizes; models 1-2 embed templates (pair stack and torsion
angles), 3-5 do not, and ``_ptm`` adds the predicted-aligned-error head. The data settings that
differ between them (extra MSA depth, template use) are in ``data_settings``.
"""

from __future__ import annotations

from dataclasses import replace

from ferryman.apps.fastfold.model.config import AlphaFoldConfig, HeadsConfig, StructureConfig, TemplateConfig
from ferryman.apps.fastfold.model.options import RunOptions
from ferryman.core.errors import ConfigError

MODEL_NAMES = tuple(f"model_{i}{s}" for s in ("", "_ptm") for i in range(1, 6))
# AlphaFold-Multimer v3 (AF2 v2.3, params_model_{1..5}_multimer_v3.npz): one architecture, models
# 4-5 read fewer extra MSA rows (AF2 config.py CONFIG_MULTIMER and CONFIG_DIFFS).
MULTIMER_NAMES = tuple(f"model_{i}_multimer_v3" for i in range(1, 6))


def _check(name: str) -> tuple[int, bool]:
    if name not in MODEL_NAMES + MULTIMER_NAMES:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(MODEL_NAMES + MULTIMER_NAMES)}, "
                          "tiny, debug")  # fmt: skip
    return int(name.split("_")[1]), name.endswith("_ptm")


def is_multimer(name: str) -> bool:
    return "_multimer" in name


def as_multimer(cfg: AlphaFoldConfig, **overrides) -> AlphaFoldConfig:
    """``cfg``'s network sizes with AlphaFold-Multimer's differences (AF2 CONFIG_MULTIMER):
    templates always embedded (pair with unit vectors, chi-angle rows), translations in units of
    20 Angstrom, a 22-class masked-MSA head and the PAE head."""
    cfg = replace(
        cfg,
        multimer=True,
        template=replace(cfg.template, enabled=True, embed_torsion_angles=True, use_unit_vector=True),
        structure=replace(cfg.structure, position_scale=20.0),
        heads=replace(cfg.heads, ptm=True, masked_msa_classes=22),
        **overrides,
    )
    return cfg


def alphafold(name: str, **overrides) -> AlphaFoldConfig:
    """Full-size config of the official model ``name`` (e.g. 'model_1', 'model_3_ptm',
    'model_1_multimer_v3')."""
    index, ptm = _check(name)
    if is_multimer(name):  # AF2 v2.3 multimer: 20 recycles at most, stopping below 0.5 A of change
        return as_multimer(AlphaFoldConfig(), num_recycle=20, recycle_early_stop_tolerance=0.5, **overrides)
    templates = index in (1, 2)
    cfg = AlphaFoldConfig(
        template=TemplateConfig(enabled=templates, embed_torsion_angles=templates),
        heads=HeadsConfig(ptm=ptm),
        **overrides,
    )
    return cfg


def data_settings(name: str) -> dict:
    """Feature-pipeline settings of an official model (AF2 config.py ``data.common``/``eval``;
    for the multimer, ``num_msa`` and ``num_extra_msa`` of its embeddings config)."""
    index, _ = _check(name)
    if is_multimer(name):
        return {"max_extra_msa": 2048 if index <= 3 else 1152, "max_msa_clusters": 508, "max_templates": 4,
                "use_templates": True, "reduce_msa_clusters_by_max_templates": False, "num_recycle": 20}  # fmt: skip
    return {
        "max_extra_msa": 5120 if index in (1, 3, 4) else 1024,
        "max_msa_clusters": 512,
        "max_templates": 4,
        "use_templates": index in (1, 2),
        "reduce_msa_clusters_by_max_templates": index in (1, 2),
        "num_recycle": 3,
    }


def tiny(**overrides) -> AlphaFoldConfig:
    """A few thousand parameters with every module present (templates, torsions, pTM head)."""
    base = dict(
        c_m=16, c_z=8, c_s=16, c_e=8, msa_heads=2, c_hidden_msa=4, pair_heads=2, c_hidden_pair=4,
        c_hidden_mul=8, c_hidden_opm=4, transition_factor=2, num_evoformer_blocks=2,
        num_extra_msa_blocks=1, extra_msa_heads=2, c_hidden_extra=4, num_recycle=1,
        template=TemplateConfig(
            enabled=True, embed_torsion_angles=True, c_t=8, num_blocks=1, num_heads=2, c_hidden_att=4,
            c_hidden_mul=8, pointwise_heads=2, c_hidden_pointwise=4,
        ),
        structure=StructureConfig(
            num_layers=2, num_heads=2, c_hidden_scalar=4, num_qk_points=2, num_v_points=3, c_resnet=8,
        ),
        heads=HeadsConfig(plddt_channels=8, ptm=True),
    )  # fmt: skip
    base.update(overrides)
    return AlphaFoldConfig(**base)


def debug(**overrides) -> AlphaFoldConfig:
    """Small but not trivial: for quick end-to-end runs of the predict and train commands."""
    base = dict(
        c_m=32, c_z=16, c_s=32, c_e=16, msa_heads=4, c_hidden_msa=8, pair_heads=2, c_hidden_pair=8,
        c_hidden_mul=16, c_hidden_opm=8, num_evoformer_blocks=2, num_extra_msa_blocks=1,
        extra_msa_heads=2, c_hidden_extra=8, num_recycle=1,
        template=TemplateConfig(
            enabled=True, embed_torsion_angles=True, c_t=16, num_blocks=1, num_heads=2, c_hidden_att=8,
            c_hidden_mul=16, pointwise_heads=2, c_hidden_pointwise=8,
        ),
        structure=StructureConfig(num_layers=4, num_heads=4, c_hidden_scalar=8, c_resnet=16),
        heads=HeadsConfig(plddt_channels=16, ptm=True),
    )  # fmt: skip
    base.update(overrides)
    return AlphaFoldConfig(**base)


def run_options(name: str) -> RunOptions:
    """How a preset's model runs unless told otherwise: ``tiny`` (a test network) on the PyTorch
    reference ops, since the Triton interpreter that CPU test runs switch on would take minutes;
    every other preset as ``RunOptions()`` says."""
    return RunOptions(kernels="torch") if name == "tiny" else RunOptions()


def get_preset(name: str, **overrides) -> AlphaFoldConfig:
    """Config by name: an official model name, 'tiny' or 'debug'."""
    if name == "tiny":
        return tiny(**overrides)
    if name == "debug":
        return debug(**overrides)
    return alphafold(name, **overrides)
