"""Prediction outputs: PDB/mmCIF structures, confidence JSON files and plots."""
