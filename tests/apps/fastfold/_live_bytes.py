"""Live tensor memory counted op by op: deterministic, unlike RSS or timing.

``LiveBytes`` is a TorchDispatchMode that sees every tensor an op returns. A storage it has not
seen is new memory; a finaliser on the storage's Python object (which torch keeps alive exactly
as long as the storage) takes it off again when it is freed. Storages that existed before
(parameters, inputs) are registered with ``ignore`` so that only memory made inside counts.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """``peak``: most bytes live at once; ``sizes``: every new storage's size, in order."""

    def __init__(self, *existing: torch.Tensor):
        super().__init__()
        self.live = self.peak = 0
        self.sizes: list[int] = []
        self._seen: dict[int, weakref.finalize] = {}
        for t in existing:
            self._register(t.untyped_storage(), counted=False)

    def _register(self, storage, counted: bool) -> None:
        key, nbytes = storage._cdata, storage.nbytes() if counted else 0
        self._seen[key] = weakref.finalize(storage, self._free, key, nbytes)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        if counted:
            self.sizes.append(nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self._seen:
                self._register(t.untyped_storage(), counted=True)
        return out
