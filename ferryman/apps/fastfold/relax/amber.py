"""Amber relaxation: restrained energy minimisation of a predicted structure (AF2 Suppl. 1.8.6).

As AlphaFold2's AmberRelaxation: pdbfixer adds missing atoms and hydrogens, amber99sb in vacuum
(no cutoff, H-bond constraints) is minimised with harmonic restraints of 10 kcal/mol/Å² on the
heavy atoms to their predicted positions, tolerance 2.39 kcal/mol (= 10 kJ/mol, read as a force
tolerance per nm by OpenMM ≥ 7.7); then violations are checked and residues that still violate
are released from their restraints and minimised again, up to `max_outer_iterations` rounds.
Minimisation failures (NaN energies) are retried up to `max_attempts` times. A complex relaxes as
one system: each chain is its own molecule (TER records between chains; no bond, no peptide-bond
violation across a chain break).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

import numpy as np

from ferryman.apps.fastfold.output.protein import Protein, from_pdb_string, to_pdb
from ferryman.apps.fastfold.relax.violations import find_violations
from ferryman.core.errors import UserError


@dataclass(kw_only=True)
class RelaxConfig:
    """AF2's relax settings (run_alphafold.py RELAX_* constants)."""

    stiffness: float = 10.0  # kcal/mol/Å²
    tolerance: float = 2.39  # kcal/mol (per nm in OpenMM 8's force units)
    max_iterations: int = 0  # 0 = until converged
    max_outer_iterations: int = 3
    max_attempts: int = 100
    exclude_residues: list[int] = field(default_factory=list)  # 0-based residue positions
    platform: str = "auto"  # auto | CPU | CUDA | Reference | OpenCL

    def __post_init__(self) -> None:
        if self.stiffness < 0 or self.tolerance <= 0:
            raise ValueError("stiffness must be >= 0 and tolerance > 0")
        if self.max_outer_iterations < 1 or self.max_attempts < 1:
            raise ValueError("max_outer_iterations and max_attempts must be >= 1")


@dataclass(kw_only=True)
class RelaxResult:
    protein: Protein  # heavy atoms, B-factors copied from the input
    pdb_with_hydrogens: str
    initial_energy: float  # kcal/mol
    final_energy: float
    ca_rmsd: float  # Å, relaxed vs input, no superposition (restraints keep the frame)
    attempts: int
    outer_iterations: int
    violations_before: int
    violations_after: int
    excluded_residues: list[int]
    seconds: float

    def summary(self) -> dict:
        return {k: v for k, v in vars(self).items() if k not in ("protein", "pdb_with_hydrogens")}


def select_platform(name: str):
    import openmm

    names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    if name == "auto":
        name = "CUDA" if "CUDA" in names else "CPU"
    if name not in names:
        raise UserError(f"OpenMM platform {name!r} is not available here (have: {', '.join(names)})")
    return openmm.Platform.getPlatformByName(name)


def clean_structure(pdb_text: str):
    """pdbfixer: standard residues, no heterogens, missing heavy atoms and hydrogens added."""
    import pdbfixer

    fixer = pdbfixer.PDBFixer(pdbfile=io.StringIO(pdb_text))
    fixer.findNonstandardResidues()
    fixer.replaceNonstandardResidues()
    fixer.removeHeterogens(keepWater=False)
    fixer.findMissingResidues()
    fixer.missingResidues = {}  # a prediction has every residue; never build loops
    fixer.findMissingAtoms()
    fixer.addMissingAtoms(seed=0)
    fixer.addMissingHydrogens(7.0)
    return fixer.topology, fixer.positions


def _separate_overlaps(positions_nm: np.ndarray, attempt: int) -> np.ndarray:
    """Nudge atoms that share a 0.5 Å cell (no real pair is that close) so no distance is ~0.

    Coincident atoms give an infinite Lennard-Jones energy and NaN forces; poor predictions (and
    random weights) produce them. Retries nudge harder and also jitter every atom a little.
    """
    rng = np.random.default_rng(attempt)
    cells = np.floor(positions_nm / 0.05).astype(np.int64)
    _, inverse, counts = np.unique(cells, axis=0, return_inverse=True, return_counts=True)
    crowded = counts[inverse.reshape(-1)] > 1
    sigma_all = 0.002 * (attempt - 1)
    noise = rng.normal(size=positions_nm.shape)
    return positions_nm + noise * (0.02 * attempt * crowded[:, None] + sigma_all)


def _minimize(
    topology, positions, cfg: RelaxConfig, excluded: set[int], platform, attempt: int = 1
) -> tuple[np.ndarray, float, float]:
    """One restrained minimisation; returns (positions in Å, initial and final energy in kcal/mol).

    Restraints pull towards the given positions; the start is nudged apart where atoms overlap.
    """
    import openmm
    from openmm import app, unit

    forcefield = app.ForceField("amber99sb.xml")
    system = forcefield.createSystem(topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    restraint = openmm.CustomExternalForce("0.5 * k * ((x - x0)^2 + (y - y0)^2 + (z - z0)^2)")
    restraint.addGlobalParameter("k", cfg.stiffness * unit.kilocalories_per_mole / unit.angstroms**2)
    for name in ("x0", "y0", "z0"):
        restraint.addPerParticleParameter(name)
    for residue_pos, residue in enumerate(topology.residues()):
        if residue_pos in excluded:
            continue
        for atom in residue.atoms():
            if atom.element is not None and atom.element.symbol != "H":
                restraint.addParticle(atom.index, positions[atom.index].value_in_unit(unit.nanometers))
    system.addForce(restraint)
    integrator = openmm.LangevinIntegrator(0, 0.01, 0.0)
    simulation = app.Simulation(topology, system, integrator, platform)
    start = _separate_overlaps(np.array(positions.value_in_unit(unit.nanometers)), attempt)
    simulation.context.setPositions(start * unit.nanometers)
    kcal = unit.kilocalories_per_mole
    e0 = simulation.context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(kcal)
    simulation.minimizeEnergy(
        tolerance=cfg.tolerance * kcal / unit.nanometer, maxIterations=cfg.max_iterations
    )
    state = simulation.context.getState(getEnergy=True, getPositions=True)
    e1 = state.getPotentialEnergy().value_in_unit(kcal)
    if not np.isfinite(e1):
        raise ValueError("minimisation produced a non-finite energy")
    return np.array(state.getPositions(asNumpy=True).value_in_unit(unit.angstroms)), e0, e1


def _to_pdb_text(topology, positions_angstrom: np.ndarray) -> str:
    from openmm import app, unit

    buf = io.StringIO()
    app.PDBFile.writeFile(topology, positions_angstrom * unit.angstroms, buf, keepIds=True)
    return buf.getvalue()


def _violations(prot: Protein) -> dict:
    return find_violations(prot.atom_positions, prot.atom_mask, prot.aatype, prot.residue_index, prot.chain_index)


def relax(prot: Protein, cfg: RelaxConfig | None = None) -> RelaxResult:
    """Relax `prot`; the result keeps its residue numbering and per-residue B-factors (pLDDT)."""
    cfg = cfg or RelaxConfig()
    start = time.perf_counter()
    platform = select_platform(cfg.platform)
    bare = Protein(**{**vars(prot), "remarks": []})
    topology, positions = clean_structure(to_pdb(bare))
    violations_before = _violations(prot)["num_residue_violations"]
    excluded = set(cfg.exclude_residues)
    attempts, initial_energy, final_energy = 0, None, None
    relaxed, text, outer_iterations = prot, "", 0
    while outer_iterations < cfg.max_outer_iterations:
        outer_iterations += 1
        for _ in range(cfg.max_attempts):
            attempts += 1
            try:
                xyz, e0, e1 = _minimize(topology, positions, cfg, excluded, platform, attempt=attempts)
                break
            except Exception as exc:  # OpenMMException and NaN energies alike: AF2 retries both
                last_error = exc
        else:
            raise RuntimeError(f"Amber minimisation failed after {cfg.max_attempts} attempts: {last_error}")
        initial_energy = e0 if initial_energy is None else initial_energy
        final_energy = e1
        text = _to_pdb_text(topology, xyz)
        relaxed = _heavy_atoms_like(text, prot)
        report = _violations(relaxed)
        if report["num_residue_violations"] == 0:
            break
        excluded |= {int(i) for i in np.nonzero(report["per_residue"])[0]}
    ca = 1
    rmsd = float(np.sqrt(np.mean(np.sum((relaxed.atom_positions[:, ca] - prot.atom_positions[:, ca]) ** 2, -1))))
    return RelaxResult(
        protein=relaxed, pdb_with_hydrogens=text, initial_energy=float(initial_energy),
        final_energy=float(final_energy), ca_rmsd=rmsd, attempts=attempts, outer_iterations=outer_iterations,
        violations_before=violations_before, violations_after=_violations(relaxed)["num_residue_violations"],
        excluded_residues=sorted(excluded), seconds=time.perf_counter() - start,
    )  # fmt: skip


def _heavy_atoms_like(pdb_text: str, reference: Protein) -> Protein:
    """Relaxed heavy atoms with the reference's residue numbers and B-factors (AF2 keeps pLDDT)."""
    relaxed = from_pdb_string(pdb_text)
    if relaxed.aatype.shape != reference.aatype.shape or not np.array_equal(relaxed.aatype, reference.aatype):
        raise RuntimeError("relaxation changed the residue sequence; this is a bug")
    per_residue_b = reference.b_factors.max(axis=1, keepdims=True)
    return Protein(
        atom_positions=relaxed.atom_positions, aatype=reference.aatype, atom_mask=relaxed.atom_mask,
        residue_index=reference.residue_index, chain_index=reference.chain_index,
        b_factors=np.repeat(per_residue_b, relaxed.atom_mask.shape[1], axis=1) * (relaxed.atom_mask > 0),
        remarks=reference.remarks,
    )  # fmt: skip
