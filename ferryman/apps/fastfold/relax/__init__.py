"""Amber relaxation of predicted structures (OpenMM + pdbfixer)."""
