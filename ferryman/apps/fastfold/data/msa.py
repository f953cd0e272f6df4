"""Multiple sequence alignments: A3M and Stockholm parsers, deletion matrices, deduplication.

Both formats are reduced to the query's columns, as AlphaFold2's parsers do: every residue a hit
has in a column where the query has a gap becomes a deletion counted on the next kept column.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ferryman.core.errors import UserError

# UniProt entry names carry the species mnemonic after the underscore (HBB_HUMAN, tr|Q0|Q0_9MYCO).
_SPECIES = re.compile(r"^(?:(?:tr|sp)\|[A-Z0-9]{6,10}(?:_\d+)?\|)?[A-Z0-9]{1,10}_(?P<species>[A-Z0-9]{1,5})(?:/|\s|$)")


@dataclass(kw_only=True)
class Msa:
    """Aligned sequences over the query's columns; row 0 is the query.

    `deletions[i][j]` counts the residues sequence i has between query columns j-1 and j.
    """

    sequences: list[str]
    deletions: list[list[int]]
    descriptions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.descriptions:
            self.descriptions = [""] * len(self.sequences)
        if not (len(self.sequences) == len(self.deletions) == len(self.descriptions)):
            raise ValueError("Msa: sequences, deletions and descriptions differ in length")

    def __len__(self) -> int:
        return len(self.sequences)

    def truncate(self, max_seqs: int) -> Msa:
        return Msa(
            sequences=self.sequences[:max_seqs],
            deletions=self.deletions[:max_seqs],
            descriptions=self.descriptions[:max_seqs],
        )

    def species(self) -> list[str]:
        out = []
        for desc in self.descriptions:
            match = _SPECIES.match(desc)
            out.append(match.group("species") if match else "")
        return out


def single_sequence_msa(sequence: str, description: str = "query") -> Msa:
    return Msa(sequences=[sequence], deletions=[[0] * len(sequence)], descriptions=[description])


def parse_a3m(text: str) -> Msa:
    """A3M: lower-case letters are insertions relative to the query and are dropped after counting."""
    names, rows = _read_fasta_like(text)
    sequences, deletions = [], []
    for row in rows:
        kept: list[str] = []
        dels: list[int] = []
        pending = 0
        for char in row:
            if char.islower():
                pending += 1
            elif char != ".":  # '.' is an insert-state gap some tools write; it carries no residue
                kept.append(char)
                dels.append(pending)
                pending = 0
        sequences.append("".join(kept))
        deletions.append(dels)
    return Msa(sequences=sequences, deletions=deletions, descriptions=names)


def parse_stockholm(text: str | Iterable[str], max_seqs: int | None = None) -> Msa:
    """Stockholm (jackhmmer, hmmsearch -A): blocks may interleave; the first sequence is the query.

    `text` may be an open file: lines are streamed, and rows after the first `max_seqs` names are
    skipped while reading (a UniRef90 search can return gigabytes, AF2 keeps 10000 hits).
    """
    rows: dict[str, list[str]] = {}
    descriptions: dict[str, str] = {}
    lines = text.splitlines() if isinstance(text, str) else text
    for line in lines:
        line = line.strip()
        if not line or line == "//":
            continue
        if line.startswith("#=GS"):
            parts = line.split(maxsplit=3)
            if len(parts) == 4 and parts[2] == "DE":
                descriptions[parts[1]] = parts[3]
            continue
        if line.startswith("#"):
            continue
        name, _, chunk = line.partition(" ")
        if name not in rows and max_seqs is not None and len(rows) >= max_seqs:
            continue
        rows.setdefault(name, []).append(chunk.strip())
    if not rows:
        return Msa(sequences=[], deletions=[])
    aligned = {name: "".join(chunks) for name, chunks in rows.items()}
    names = list(aligned)
    query = aligned[names[0]]
    keep = [i for i, char in enumerate(query) if char not in "-."]
    keep_set = set(keep)
    sequences, deletions = [], []
    for name in names:
        row = aligned[name]
        if len(row) != len(query):
            raise ValueError(f"Stockholm row {name!r} has {len(row)} columns, the query {len(query)}")
        kept, dels, pending = [], [], 0
        for i, char in enumerate(row):
            if i in keep_set:
                kept.append("-" if char == "." else char.upper())
                dels.append(pending)
                pending = 0
            elif char not in "-.":
                pending += 1
        sequences.append("".join(kept))
        deletions.append(dels)
    return Msa(sequences=sequences, deletions=deletions, descriptions=[f"{n} {descriptions.get(n, '')}".strip() for n in names])


def read_msa(path: str | Path, max_seqs: int | None = None) -> Msa:
    """Read an .a3m or .sto file (at most `max_seqs` rows); a parse failure is a UserError naming the file."""
    path = Path(path)
    try:
        if path.suffix in (".sto", ".stockholm"):
            with open(path, encoding="utf-8", errors="replace") as handle:
                msa = parse_stockholm(handle, max_seqs)
        elif path.suffix in (".a3m", ".fasta", ".fa", ".afa"):
            msa = parse_a3m(path.read_text(encoding="utf-8", errors="replace"))
            msa = msa if max_seqs is None else msa.truncate(max_seqs)
        else:
            raise UserError(f"{path}: unknown alignment format; use .a3m or .sto")
    except ValueError as exc:
        raise UserError(f"{path}: malformed alignment: {exc}") from None
    if len(msa) == 0:
        raise UserError(f"{path}: the alignment has no sequences")
    widths = {len(s) for s in msa.sequences}
    if len(widths) != 1:
        raise UserError(f"{path}: aligned rows differ in length ({sorted(widths)[:4]}); is it a valid alignment?")
    return msa


def check_query(msa: Msa, query: str, *, source: str) -> None:
    """An alignment made for another sequence would silently mislead the model."""
    if msa.sequences[0].replace("-", "") != query:
        raise UserError(
            f"{source}: the first sequence of the alignment is not the target sequence "
            f"({msa.sequences[0][:20]}... vs {query[:20]}...); was it computed for another target?"
        )


def merge_and_deduplicate(msas: Sequence[Msa]) -> Msa:
    """Concatenate alignments, keeping the first copy of every aligned sequence (AF2 behaviour)."""
    if not msas:
        raise ValueError("at least one MSA is required")
    seen: set[str] = set()
    sequences, deletions, descriptions = [], [], []
    for msa in msas:
        for seq, dels, desc in zip(msa.sequences, msa.deletions, msa.descriptions):
            if seq in seen:
                continue
            seen.add(seq)
            sequences.append(seq)
            deletions.append(dels)
            descriptions.append(desc)
    return Msa(sequences=sequences, deletions=deletions, descriptions=descriptions)


def to_a3m(msa: Msa) -> str:
    """Aligned FASTA over the query's columns: a valid A3M without insertion states.

    The inserted residues themselves are gone after parsing, so only their counts survive (in
    the features); the alignment files copied to msas/ keep them.
    """
    lines = []
    for i, (seq, desc) in enumerate(zip(msa.sequences, msa.descriptions)):
        lines.append(f">{desc or f'seq{i}'}")
        lines.append(seq)
    return "\n".join(lines) + "\n"


def _read_fasta_like(text: str) -> tuple[list[str], list[str]]:
    names: list[str] = []
    rows: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(">"):
            names.append(line[1:].strip())
            rows.append([])
        elif not rows:
            raise ValueError("sequence data before the first '>' header")
        else:
            rows[-1].append(line)
    return names, ["".join(r) for r in rows]
