"""Typed configuration of the AlphaFold2 monomer model (sizes from AF2 ``config.py`` / Suppl. 1.5-1.8).

Head counts and per-head widths are given explicitly (AF2 gives total key widths; per head they
are c_m/8 = 32 for MSA attention, c_z/4 = 32 for triangle attention, 64/4 = 16 in the template
stack and template pointwise attention, c_e/8 = 8 in the extra-MSA stack).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ferryman.core.errors import ConfigError


@dataclass(kw_only=True, frozen=True)
class TemplateConfig:
    """Template embedder (AF2 Suppl. Alg. 16-17 and 1.7.1)."""

    enabled: bool = False
    embed_torsion_angles: bool = False
    c_t: int = 64
    num_blocks: int = 2
    num_heads: int = 4  # triangle attention in the template pair stack
    c_hidden_att: int = 16
    c_hidden_mul: int = 64
    transition_factor: int = 2
    pointwise_heads: int = 4
    c_hidden_pointwise: int = 16
    dgram_min_bin: float = 3.25
    dgram_max_bin: float = 50.75
    dgram_num_bins: int = 39
    use_unit_vector: bool = False  # AF2 monomer models zero the unit-vector features


@dataclass(kw_only=True, frozen=True)
class StructureConfig:
    """Structure module (AF2 Suppl. Alg. 20-24)."""

    num_layers: int = 8
    num_heads: int = 12
    c_hidden_scalar: int = 16  # num_scalar_qk = num_scalar_v
    num_qk_points: int = 4
    num_v_points: int = 8
    num_transition_layers: int = 3
    position_scale: float = 10.0
    c_resnet: int = 128
    num_resnet_blocks: int = 2


@dataclass(kw_only=True, frozen=True)
class HeadsConfig:
    """Output heads (AF2 Suppl. 1.9.6-1.9.10)."""

    plddt_bins: int = 50
    plddt_channels: int = 128
    distogram_bins: int = 64
    distogram_first_break: float = 2.3125
    distogram_last_break: float = 21.6875
    masked_msa_classes: int = 23
    pae_bins: int = 64
    pae_max_error_bin: float = 31.0
    ptm: bool = False  # the predicted-aligned-error / pTM head of the *_ptm models


@dataclass(kw_only=True, frozen=True)
class AlphaFoldConfig:
    """The AlphaFold2 monomer network: every size that decides its parameters, nothing about how
    it runs (that is ``options.RunOptions``, applied to a built model from outside).

    Defaults are the published model (AF2 Suppl. Table 5 / ``config.py``). Frozen: a variant is
    made with ``dataclasses.replace``.
    """

    c_m: int = 256
    c_z: int = 128
    c_s: int = 384
    c_e: int = 64
    msa_heads: int = 8
    c_hidden_msa: int = 32
    pair_heads: int = 4
    c_hidden_pair: int = 32
    c_hidden_mul: int = 128
    c_hidden_opm: int = 32
    transition_factor: int = 4
    num_evoformer_blocks: int = 48
    num_extra_msa_blocks: int = 4
    extra_msa_heads: int = 8
    c_hidden_extra: int = 8
    max_relative_feature: int = 32
    prev_pos_min_bin: float = 3.25
    prev_pos_max_bin: float = 20.75
    prev_pos_num_bins: int = 15
    num_recycle: int = 3
    # AlphaFold-Multimer (Evans et al. 2021; AF2 modules_multimer): chain-relative encoding, the
    # multimer template embedding and structure module, the outer product mean first in each
    # Evoformer block; its recycling stops early once CA distances move less than the tolerance.
    multimer: bool = False
    max_relative_chain: int = 2
    recycle_early_stop_tolerance: float = 0.0
    template: TemplateConfig = field(default_factory=TemplateConfig)
    structure: StructureConfig = field(default_factory=StructureConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)

    def __post_init__(self) -> None:
        for name in ("c_m", "c_z", "c_s", "c_e", "msa_heads", "pair_heads", "num_evoformer_blocks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_recycle < 0:
            raise ConfigError(f"num_recycle must be >= 0, got {self.num_recycle}")
        if self.max_relative_chain < 0 or self.recycle_early_stop_tolerance < 0:
            raise ConfigError("max_relative_chain and recycle_early_stop_tolerance must be >= 0, got "
                              f"{self.max_relative_chain} and {self.recycle_early_stop_tolerance}")  # fmt: skip
