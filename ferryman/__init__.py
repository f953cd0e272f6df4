"""Ferryman: large models on the hardware people have.

Import layers point one way: ``ferryman.kernels`` <- ``ferryman.core`` <- ``ferryman.apps.<app>``.
"""

import os

__version__ = "0.1.0"

# PyTorch serves CPU tensors of 2 MiB and more from transparent huge pages when this is set before
# its first CPU allocation (it reads the variable once; the CLIs import ferryman before torch): a fresh pair-sized temporary then takes a few page faults instead of thousands,
# which is a third of a matmul's time at N_res 128 (fastfold's trunk 1.2-1.3x faster on CPU,
# docs/benchmarks.md). The numbers computed are the same; THP_MEM_ALLOC_ENABLE=0 opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
