"""AlphaFold2 training: structures -> training features -> crops -> the AF2 loss in the core loop.

structure.py (PDB/mmCIF via Biopython), features.py (ground truth and model inputs), crop.py,
dataset.py (the loader), step.py (the loss the loop calls), config.py (presets), run.py
(``fastfold train``).
"""
