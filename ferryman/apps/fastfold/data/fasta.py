"""FASTA input for `fastfold predict`, validated before any work starts.

Monomer presets: one target per record. The multimer preset (``read_complexes``): a file is one
complex with one chain per record (AlphaFold2's convention), or, when its records use ColabFold's
``A:B`` notation, each record is one complex whose chains the colons separate. Chains are named
A, B, ... in order (AF2's PDB chain alphabet: A-Z, a-z, 0-9, so at most 62 chains).

Parsing uses Biopython's strict 'fasta' reader; every rejection is a UserError naming the file and
the record so the user can fix the input without reading a traceback.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

from ferryman.core.errors import UserError

STANDARD_AA = "ARNDCQEGHILKMFPSTWYV"
CHAIN_IDS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"  # AF2's PDB_CHAIN_IDS

# Ambiguity and rare codes a user may meet in UniProt records, with the usual substitution.
_SUBSTITUTES = {
    "X": "an unknown residue; replace it with the residue you expect, or remove it",
    "B": "Asx (D or N); replace it with D or N",
    "Z": "Glx (E or Q); replace it with E or Q",
    "J": "Xle (L or I); replace it with L or I",
    "U": "selenocysteine; replace it with C",
    "O": "pyrrolysine; replace it with K",
}
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, kw_only=True)
class FastaTarget:
    """One prediction target: `name` is a file-system safe form of the record id."""

    name: str
    record_id: str
    description: str
    sequence: str
    source: Path


def safe_name(record_id: str) -> str:
    """`sp|P68871|HBB_HUMAN` -> `sp_P68871_HBB_HUMAN`: usable as a folder name on every OS."""
    name = _SAFE_NAME.sub("_", record_id).strip("._")
    return name or "target"


def validate_sequence(sequence: str, *, where: str) -> str:
    """Return the sequence if it is a valid protein chain, else raise a UserError naming `where`."""
    if sequence.endswith("*"):  # a translated stop codon is harmless; keep the chain before it
        sequence = sequence[:-1]
    if not sequence:
        raise UserError(f"{where}: the sequence is empty")
    if len(sequence) >= 20 and set(sequence.upper()) <= set("ACGTUN"):
        raise UserError(f"{where}: this looks like a DNA/RNA sequence (only A, C, G, T/U, N); give the protein "
                        "sequence (translate it first)")  # fmt: skip
    for pos, letter in enumerate(sequence, start=1):
        if letter in STANDARD_AA:
            continue
        if letter.isalpha() and letter.islower():
            raise UserError(
                f"{where}: lower-case letter {letter!r} at position {pos}; write the sequence in upper "
                "case (lower case means an insertion in alignment formats, so it is not accepted here)"
            )
        if letter in _SUBSTITUTES:
            raise UserError(f"{where}: {letter!r} at position {pos} is {_SUBSTITUTES[letter]}")
        if letter == ":":
            raise UserError(f"{where}: ':' at position {pos} separates the chains of a complex (ColabFold's "
                            "notation); predict complexes with --model-preset multimer")  # fmt: skip
        if letter == "-" or letter == ".":
            raise UserError(f"{where}: gap {letter!r} at position {pos}; give the unaligned sequence")
        raise UserError(f"{where}: {letter!r} at position {pos} is not an amino-acid letter ({STANDARD_AA})")
    return sequence


def _records(path: Path) -> list:
    """Biopython records of a FASTA file that must hold at least one."""
    from Bio import SeqIO

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: FASTA file not found")
    try:  # utf-8-sig: editors on Windows start a UTF-8 file with a byte-order mark
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a text FASTA file ({exc.reason} at byte {exc.start})") from None
    # Blank lines before the first header are allowed; Biopython's strict reader takes them for
    # comments and refuses the file, so they go before it reads. Its one refusal (a first line
    # without '>') is then the check below, with a message that says what to fix.
    stripped = text.lstrip()
    skipped, text = text[: len(text) - len(stripped)].count("\n"), stripped
    if text and not text.startswith(">"):
        raise UserError(f"{path}: not a FASTA file: the first line must start with '>' (a record header)")
    for number, line in enumerate(text.splitlines(), start=skipped + 1):  # Biopython's Seq holds ASCII only
        if not line.startswith(">") and not line.isascii():
            bad = next(c for c in line if not c.isascii())
            raise UserError(f"{path}: line {number}: {bad!r} (U+{ord(bad):04X}) is not an amino-acid letter; "
                            "a sequence is written in plain ASCII letters")  # fmt: skip
    records = list(SeqIO.parse(io.StringIO(text), "fasta"))
    if not records:
        raise UserError(f"{path}: no FASTA records found")
    for index, record in enumerate(records, start=1):
        if not record.id:
            raise UserError(f"{path}: record {index}: the header line has no id after '>'")
    return records


def read_fasta(path: str | Path) -> list[FastaTarget]:
    """Parse and validate one FASTA file; at least one record is required."""
    path = Path(path)
    targets = []
    for index, record in enumerate(_records(path), start=1):
        record_id = record.id
        where = f"{path}: record {index} ({record_id!r})"
        sequence = validate_sequence(str(record.seq), where=where)
        targets.append(
            FastaTarget(
                name=safe_name(record_id),
                record_id=record_id,
                description=record.description,
                sequence=sequence,
                source=path,
            )
        )
    return targets


def read_fastas(paths: list[str | Path]) -> list[FastaTarget]:
    """All targets of all files; ids must be unique across files since they name output folders."""
    if not paths:
        raise UserError("no FASTA file given")
    targets: list[FastaTarget] = []
    seen: dict[str, FastaTarget] = {}
    for path in paths:
        for target in read_fasta(path):
            if target.name in seen:
                first = seen[target.name]
                raise UserError(
                    f"{target.source}: duplicate record id {target.record_id!r} (first seen in {first.source} "
                    f"as {first.record_id!r}); every record needs a unique id because it names the output folder"
                )
            seen[target.name] = target
            targets.append(target)
    return targets


@dataclass(frozen=True, kw_only=True)
class FastaChain:
    """One chain of a complex: its id in the outputs (A, B, ...) and where it came from."""

    chain_id: str
    sequence: str
    description: str


@dataclass(frozen=True, kw_only=True)
class ComplexTarget:
    """One complex for the multimer model: ``name`` names its output folder."""

    name: str
    record_id: str
    chains: tuple[FastaChain, ...]
    source: Path

    @property
    def sequence(self) -> str:
        """ColabFold's notation of the complex: the chains joined by ':'."""
        return ":".join(c.sequence for c in self.chains)


def _complex(name: str, parts: list[tuple[str, str, str]], source: Path) -> ComplexTarget:
    """``parts``: (raw sequence, description, where) per chain, in order."""
    if len(parts) > len(CHAIN_IDS):
        raise UserError(f"{source}: {name!r} has {len(parts)} chains; at most {len(CHAIN_IDS)} can be named "
                        f"(PDB chain ids A-Z, a-z, 0-9), as in AlphaFold2")  # fmt: skip
    chains = tuple(
        FastaChain(chain_id=chain_id, sequence=validate_sequence(raw, where=where), description=description)
        for chain_id, (raw, description, where) in zip(CHAIN_IDS, parts)
    )
    return ComplexTarget(name=safe_name(name), record_id=name, chains=chains, source=source)


def read_complex_fasta(path: str | Path) -> list[ComplexTarget]:
    """The complexes of one FASTA file: the whole file (one chain per record), or one per record
    when records separate chains with ':' (ColabFold)."""
    path = Path(path)
    records = _records(path)
    if any(":" in str(r.seq) for r in records):
        complexes = []
        for i, r in enumerate(records, start=1):
            pieces = str(r.seq).split(":")
            where = [f"{path}: record {i} ({r.id!r}) chain {k} of {len(pieces)}" for k in range(1, len(pieces) + 1)]
            complexes.append(_complex(r.id, [(raw, r.description, w) for raw, w in zip(pieces, where)], path))
        return complexes
    parts = [(str(r.seq), r.description, f"{path}: record {i} ({r.id!r})") for i, r in enumerate(records, start=1)]
    return [_complex(path.stem, parts, path)]


def read_complexes(paths: list[str | Path]) -> list[ComplexTarget]:
    """Every complex of every file; names must be unique since they name output folders."""
    if not paths:
        raise UserError("no FASTA file given")
    targets: list[ComplexTarget] = []
    seen: dict[str, ComplexTarget] = {}
    for path in paths:
        for target in read_complex_fasta(path):
            if target.name in seen:
                raise UserError(f"{target.source}: complex {target.record_id!r} has the name of one in "
                                f"{seen[target.name].source}; every complex needs a unique name (the file name, "
                                "or the record id with ':' chains) because it names the output folder")  # fmt: skip
            seen[target.name] = target
            targets.append(target)
    return targets
