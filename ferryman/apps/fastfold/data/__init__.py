"""Data pipeline of fastfold predict: FASTA, alignments, search tools, templates and AF2 features."""
