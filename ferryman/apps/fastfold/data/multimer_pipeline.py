"""The multimer data pipeline (AF2 ``pipeline_multimer.DataPipeline``): per-chain alignments and
templates, a UniProt alignment per chain for pairing, then pairing and merging (``pairing.py``).

Each distinct sequence runs the monomer pipeline once (copies share it), its files under
``<target out>/msas/<chain id>/`` as AF2 lays them out. For a heteromer each chain also needs an
alignment whose rows carry species (``uniprot_hits.sto``): taken from precomputed alignments
first, else searched with jackhmmer in ``--uniprot-db`` (AF2's protocol), else with
``--msa-mode mmseqs2`` the chain's ``uniref.a3m`` (species read from UniProt-style names), else
the query alone (no rows pair). ``chain_id_map.json`` in ``msas/`` maps chain ids to the FASTA.

Chain order: AF2 numbers chains (``asym_id``) entity by entity, so copies of a sequence are
adjacent in the model's input; ``asym_chain_ids`` in the features gives the FASTA chain id of each
``asym_id``, and the outputs name and order chains by the FASTA.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
from pathlib import Path

import numpy as np

from ferryman.apps.fastfold.common import residue_constants as rc
from ferryman.apps.fastfold.data import tools
from ferryman.apps.fastfold.data.fasta import ComplexTarget, FastaChain, FastaTarget
from ferryman.apps.fastfold.data.features import FeatureDict, make_features, make_msa_features
from ferryman.apps.fastfold.data.msa import Msa, merge_and_deduplicate, read_msa, single_sequence_msa
from ferryman.apps.fastfold.data.pairing import MSA_FEATURES, pad_msa, pair_and_merge
from ferryman.apps.fastfold.data.pipeline import DataConfig, check_target_sources, gather_alignments
from ferryman.core.io import write_text

PAIRING_NAME = "uniprot_hits"
MIN_MSA_ROWS = 512  # AF2 pads the merged MSA so that sampling 508 centres leaves extra rows


def convert_chain_features(monomer: FeatureDict, chain_id: str) -> FeatureDict:
    """Monomer features -> a multimer chain's (AF2 ``convert_monomer_features``): integer aatype
    in Ferryman's order, scalars unwrapped, template aatype in Ferryman's order."""
    out: FeatureDict = {"auth_chain_id": np.asarray(chain_id, dtype=object)}
    for name, value in monomer.items():
        if name in ("sequence", "domain_name", "num_alignments", "seq_length"):
            value = np.asarray(value[0], dtype=value.dtype)
        elif name == "aatype":
            value = np.argmax(value, axis=-1).astype(np.int32)
        elif name == "template_aatype":
            value = np.take(rc.MAP_HHBLITS_AATYPE_TO_OUR_AATYPE, np.argmax(value, axis=-1).astype(np.int32), axis=0)
        elif name == "template_all_atom_masks":
            name = "template_all_atom_mask"
        out[name] = value
    return out


def int_id_to_str_id(num: int) -> str:
    """1 -> A, 26 -> Z, 27 -> AA, 28 -> BA (AF2's reverse spreadsheet naming of entities)."""
    if num <= 0:
        raise ValueError(f"only positive integers, got {num}")
    out, num = [], num - 1
    while num >= 0:
        out.append(chr(num % 26 + ord("A")))
        num = num // 26 - 1
    return "".join(out)


def add_assembly_features(chains: dict[str, FeatureDict]) -> dict[str, FeatureDict]:
    """asym_id (1.. per chain), entity_id (1.. per distinct sequence), sym_id (1.. per copy),
    keyed ``<entity>_<copy>`` in AF2's order: entity by entity, copies in FASTA order."""
    entity_of: dict[str, int] = {}
    grouped: dict[int, list[FeatureDict]] = collections.defaultdict(list)
    for features in chains.values():
        sequence = str(features["sequence"])
        entity_of.setdefault(sequence, len(entity_of) + 1)
        grouped[entity_of[sequence]].append(features)
    out, asym_id = {}, 1
    for entity_id, group in grouped.items():
        for sym_id, features in enumerate(group, start=1):
            out[f"{int_id_to_str_id(entity_id)}_{sym_id}"] = features
            length = features["seq_length"]
            features["asym_id"] = asym_id * np.ones(length)
            features["sym_id"] = sym_id * np.ones(length)
            features["entity_id"] = entity_id * np.ones(length)
            asym_id += 1
    return out


def all_seq_features(msa: Msa) -> FeatureDict:
    """The ``*_all_seq`` features of a chain's pairing alignment (AF2 ``_all_seq_msa_features``)."""
    feats = make_msa_features([msa])
    keep = (*MSA_FEATURES, "msa_species_identifiers")
    return {f"{k}_all_seq": v for k, v in feats.items() if k in keep}


def _complex_msa_dir(cfg: DataConfig, target: ComplexTarget) -> Path | None:
    """``--msa-dir`` for the chains: ``<msa_dir>/<complex>/msas/`` or ``<msa_dir>/<complex>/``."""
    if cfg.msa_dir is None:
        return None
    folder = Path(cfg.msa_dir) / target.name
    return folder / "msas" if (folder / "msas").is_dir() else folder


def _chain_setup(target: ComplexTarget, chain: FastaChain, cfg: DataConfig, previous: Path | None):
    """The chain as a monomer target, its DataConfig and its earlier-run folder."""
    chain_target = FastaTarget(name=chain.chain_id, record_id=chain.description or chain.chain_id,
                               description=chain.description, sequence=chain.sequence, source=target.source)  # fmt: skip
    chain_cfg = dataclasses.replace(cfg, msa_dir=_complex_msa_dir(cfg, target))
    return chain_target, chain_cfg, (previous / chain.chain_id if previous is not None else None)


def check_complex_sources(target: ComplexTarget, cfg: DataConfig, previous: Path | None) -> None:
    """Every distinct chain has alignments on disk or a search to run (before any work)."""
    seen = set()
    for chain in target.chains:
        if chain.sequence in seen:
            continue
        seen.add(chain.sequence)
        chain_target, chain_cfg, chain_previous = _chain_setup(target, chain, cfg, previous)
        check_target_sources(chain_target, chain_cfg, chain_previous)


def _pairing_file(chain_target: FastaTarget, cfg: DataConfig, previous: Path | None, msas_out: Path) -> Path | None:
    """The chain's species-bearing alignment: precomputed, searched, or ColabFold's UniRef hits."""
    places = [previous] if cfg.use_precomputed_msas and previous is not None else []
    if cfg.msa_dir is not None:
        places += [Path(cfg.msa_dir) / chain_target.name / "msas", Path(cfg.msa_dir) / chain_target.name]
    for folder in places:
        for suffix in (".sto", ".a3m"):
            found = folder / f"{PAIRING_NAME}{suffix}"
            if found.is_file():
                copy_to = msas_out / found.name
                if found.resolve() != copy_to.resolve():
                    write_text(copy_to, found.read_text(encoding="utf-8", errors="replace"))
                return found
    if cfg.uniprot_db is not None:
        binary = tools.find_binary("jackhmmer", cfg.jackhmmer_binary)
        runner = tools.Jackhmmer(binary=binary, database=Path(cfg.uniprot_db), n_iter=cfg.jackhmmer_n_iter, cpus=cfg.cpus)
        return runner.search(chain_target.sequence, msas_out / f"{PAIRING_NAME}.sto")
    uniref = msas_out / "uniref.a3m"
    return uniref if cfg.search_mode() == "mmseqs2" and uniref.is_file() else None


def chain_features(target: ComplexTarget, chain: FastaChain, cfg: DataConfig, target_out: Path, *,
                   previous: Path | None, template_index, pair: bool) -> tuple[FeatureDict, dict]:  # fmt: skip
    """Monomer features of one chain (plus ``*_all_seq`` for a heteromer) and a report."""
    chain_target, chain_cfg, chain_previous = _chain_setup(target, chain, cfg, previous)
    msas_out = target_out / "msas" / chain.chain_id
    msas, files, mode = gather_alignments(chain_target, chain_cfg, msas_out, chain_previous)
    templates = None
    if cfg.template_mmcif_dir is not None:
        from ferryman.apps.fastfold.data.pipeline import _kalign, _template_searcher
        from ferryman.apps.fastfold.data.templates import search_templates

        templates = search_templates(
            chain.sequence, merge_and_deduplicate(msas), folder=Path(cfg.template_mmcif_dir),
            searcher=_template_searcher(cfg), max_hits=cfg.max_templates, kalign=_kalign(cfg),
            hits_out=msas_out / ("pdb_hits.hhr" if cfg.pdb70_db else "pdb_hits.sto"), index=template_index,
            hit_filter=cfg.hit_filter(),
        )  # fmt: skip
    features = make_features(chain.sequence, chain.description, msas, templates)
    report = {"msa_mode": mode, "alignment_files": [p.name for p in files], "msa_depth": int(features["msa"].shape[0]),
              "num_templates": int(features["template_aatype"].shape[0])}  # fmt: skip
    if pair:
        source = _pairing_file(chain_target, chain_cfg, chain_previous, msas_out)
        pairing = read_msa(source, max_seqs=cfg.uniprot_max_hits) if source is not None else None
        if pairing is not None and pairing.sequences[0].replace("-", "") != chain.sequence:
            pairing = None  # an alignment of another sequence cannot pair this chain
        features.update(all_seq_features(pairing or single_sequence_msa(chain.sequence)))
        report["pairing_alignment"] = source.name if source is not None and pairing is not None else None
        report["pairing_depth"] = int(features["msa_all_seq"].shape[0])
    return convert_chain_features(features, chain.chain_id), report


def run_multimer_pipeline(target: ComplexTarget, cfg: DataConfig, target_out: Path, *, previous_msas: Path | None = None,
                          template_index=None) -> tuple[FeatureDict, dict]:  # fmt: skip
    """Merged AF2-Multimer features of one complex and a report per chain."""
    (target_out / "msas").mkdir(parents=True, exist_ok=True)
    chain_map = {c.chain_id: {"sequence": c.sequence, "description": c.description} for c in target.chains}
    write_text(target_out / "msas" / "chain_id_map.json", json.dumps(chain_map, indent=4, sort_keys=True) + "\n")
    pair = len({c.sequence for c in target.chains}) > 1
    by_sequence: dict[str, FeatureDict] = {}
    chains, reports = {}, {}
    for chain in target.chains:
        if chain.sequence in by_sequence:
            chains[chain.chain_id] = copy.deepcopy(by_sequence[chain.sequence])
            chains[chain.chain_id]["auth_chain_id"] = np.asarray(chain.chain_id, dtype=object)
            reports[chain.chain_id] = {"same_as": next(k for k, c in chain_map.items() if c["sequence"] == chain.sequence)}
            continue
        features, reports[chain.chain_id] = chain_features(
            target, chain, cfg, target_out, previous=previous_msas, template_index=template_index, pair=pair
        )
        chains[chain.chain_id] = by_sequence[chain.sequence] = features
    assembly = add_assembly_features(chains)
    # The FASTA chain id of each asym_id (AF2's order groups copies of a sequence together).
    asym_chain_ids = [str(f["auth_chain_id"]) for f in assembly.values()]
    merged = pad_msa(pair_and_merge([dict(f) for f in assembly.values()]), MIN_MSA_ROWS)
    merged["asym_chain_ids"] = np.array([c.encode() for c in asym_chain_ids], dtype=object)
    report = {
        "msa_mode": next((r["msa_mode"] for r in reports.values() if "msa_mode" in r), None),
        "chains": reports,
        "msa_depth_merged": int(merged["num_alignments"]),
        "num_templates": int(merged["template_aatype"].shape[0]),
    }
    return merged, report
