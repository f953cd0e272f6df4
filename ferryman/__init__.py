"""Ferryman: large models on the hardware people have.

Import layers point one way: ``ferryman.kernels`` <- ``ferryman.core`` <- ``ferryman.apps.<app>``.
"""

__version__ = "0.1.0"
