"""Residue constants, rigid transforms and atom-layout helpers shared by the fastfold model and data code."""
