"""Memory-statistics tracer: what the warm-up step used, in what order, beside how much activation memory.

ColossalAI Gemini's memstats collector, reduced: every time a module gathers its chunks (forward,
backward and activation-checkpoint recomputation alike) the tracer logs one event with the
module's index and the non-model memory at that moment. After the warm-up step the events give
each chunk's future uses (for evicting the chunk needed latest, Belady's rule) and the memory the
activations will want at each point of the next steps.
"""

from __future__ import annotations

import bisect
import math

import torch


class MemTracer:
    """Events of the warm-up step; queried by position ("clock") in later steps."""

    def __init__(self) -> None:
        self.modules: list[int] = []
        self.non_model: list[int] = []
        self.recording = True
        self._uses: dict[int, list[int]] = {}
        self.saved_bytes = 0  # CPU probe: bytes of activations autograd is holding

    def record(self, module_index: int, non_model_bytes: int) -> None:
        self.modules.append(module_index)
        self.non_model.append(non_model_bytes)

    def touch(self, non_model_bytes: int) -> None:
        """Raise the last event's figure: a module's activations appear while it runs."""
        if self.recording and self.non_model:
            self.non_model[-1] = max(self.non_model[-1], non_model_bytes)

    def finish(self, chunks_of_module: dict[int, list[int]]) -> None:
        self.recording = False
        self._uses = {}
        for pos, module in enumerate(self.modules):
            for chunk in chunks_of_module.get(module, []):
                self._uses.setdefault(chunk, []).append(pos)

    @property
    def ready(self) -> bool:
        return not self.recording and bool(self.modules)

    def next_use(self, chunk: int, clock: int) -> float:
        """Position of the chunk's next use at or after ``clock`` (inf when none is recorded)."""
        uses = self._uses.get(chunk, [])
        i = bisect.bisect_left(uses, clock)
        return uses[i] if i < len(uses) else math.inf

    def upcoming(self, clock: int, count: int) -> list[int]:
        """Module indices of the next ``count`` events after ``clock``."""
        return self.modules[clock + 1 : clock + 1 + count]

    def non_model_at(self, clock: int) -> int:
        if not self.non_model:
            return 0
        window = self.non_model[max(0, clock - 1) : clock + 2] or self.non_model[-1:]
        return max(window)

    # -- CPU probe: count saved activations through autograd's saved-tensor hooks -------------
    def saved_tensor_hooks(self, is_model_data) -> torch.autograd.graph.saved_tensors_hooks:
        def pack(t: torch.Tensor):
            if not is_model_data(t):
                self.saved_bytes += t.numel() * t.element_size()
                return (t, True)
            return (t, False)

        def unpack(packed):
            t, counted = packed
            if counted:
                self.saved_bytes -= t.numel() * t.element_size()
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
