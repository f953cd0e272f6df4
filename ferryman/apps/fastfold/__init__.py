"""FastFold: AlphaFold2 monomer inference and training on Ferryman's core.

``model/`` holds the network (AF2 Suppl. algorithms), ``common/`` residue constants and rigid-body
geometry, ``weights.py`` the official parameter import/export, ``parallelize.py`` dynamic axial
parallelism, ``presets.py`` the model configurations. Nothing heavy is imported here.
"""
