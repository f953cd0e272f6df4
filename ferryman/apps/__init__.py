"""Domain applications. Each app imports ferryman.core and ferryman.kernels, never another app."""
