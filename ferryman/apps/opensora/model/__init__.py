"""STDiT and its building blocks."""

from .stdit import STDiT, num_parameters

__all__ = ["STDiT", "num_parameters"]
