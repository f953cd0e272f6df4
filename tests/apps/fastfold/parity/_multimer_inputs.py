"""Inputs of the multimer parity tests: villin's real structure cut into two chains (residues
1-18 and 19-35, each numbered from 0), with per-chain MSAs whose rows carry species (some shared,
so the pairing has work to do) and per-chain templates from the structure, made into merged and
sampled features by Ferryman's pipeline and handed to both models as they are."""

from __future__ import annotations

import numpy as np

from ferryman.apps.fastfold.data.features import make_features
from ferryman.apps.fastfold.data.msa import Msa
from ferryman.apps.fastfold.data.multimer_pipeline import (
    add_assembly_features,
    all_seq_features,
    convert_chain_features,
)
from ferryman.apps.fastfold.data.multimer_transforms import MultimerInputConfig, make_multimer_inputs
from ferryman.apps.fastfold.data.pairing import pad_msa, pair_and_merge
from ferryman.apps.fastfold.presets import as_multimer
from tests.apps.fastfold._structures import VILLIN_SEQUENCE

from ._inputs import parity_config, synthetic_msa, villin_template

CUT = 18
CHAINS = {"A": slice(0, CUT), "B": slice(CUT, None)}
SPECIES = ("HUMAN", "MOUSE", "YEAST", "ECOLI", "BOVIN", "CHICK")


def multimer_parity_config(**overrides):
    return as_multimer(parity_config(), **overrides)


def _with_species(msa: Msa, seed: int, prefix: str) -> Msa:
    """UniProt-style names (``tr|ACC|ACC_SPECIES``) on every row but the query."""
    rng = np.random.default_rng(seed)
    names = ["query"] + [f"tr|{prefix}{i:05d}|{prefix}{i:05d}_{rng.choice(SPECIES)}" for i in range(1, len(msa))]
    return Msa(sequences=msa.sequences, deletions=msa.deletions, descriptions=names)


def _chain_template(chain: slice, gap: slice | None = None) -> dict[str, np.ndarray]:
    whole = villin_template(gap)
    return {k: (v[:, chain] if v.ndim >= 3 else v) for k, v in whole.items()}


def chain_features(*, msa_rows: int = 12, pairing_rows: int = 10, seed: int = 0) -> dict[str, dict]:
    """Per-chain multimer features (converted, ``*_all_seq`` included), keyed A and B."""
    out = {}
    for index, (chain_id, cut) in enumerate(CHAINS.items()):
        sequence = VILLIN_SEQUENCE[cut]
        msa = synthetic_msa(sequence, msa_rows, seed + index)
        templates = [_chain_template(cut)] + ([_chain_template(cut, slice(4, 7))] if chain_id == "A" else [])
        raw_templates = {k: np.concatenate([t[k] for t in templates]) for k in templates[0]}
        feats = make_features(sequence, f"chain_{chain_id}", [msa], raw_templates)
        pairing = _with_species(synthetic_msa(sequence, pairing_rows, seed + 10 + index), seed + 20 + index, chain_id)
        feats.update(all_seq_features(pairing))
        out[chain_id] = convert_chain_features(feats, chain_id)
    return out


def merged_features(**kwargs) -> dict[str, np.ndarray]:
    chains = add_assembly_features(chain_features(**kwargs))
    return pad_msa(pair_and_merge(list(chains.values())), 32)


def complex_features(*, clusters: int = 12, extra: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Sampled model inputs of the two-chain villin complex."""
    cfg = MultimerInputConfig(max_msa_clusters=clusters, max_extra_msa=extra)
    return make_multimer_inputs(merged_features(seed=seed), cfg, seed)
