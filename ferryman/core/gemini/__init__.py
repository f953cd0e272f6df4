"""Gemini heterogeneous memory: chunked parameters, gradients and optimizer states across device and host.

``engine = gemini(model, GeminiConfig(...), OptimConfig(...), dims)`` wraps any ``nn.Module``;
then ``loss = f(engine(batch)); engine.backward(loss); engine.step(); engine.zero_grad()``.
"""

from ferryman.core.gemini.config import GeminiConfig
from ferryman.core.gemini.engine import GeminiEngine, gemini
from ferryman.core.optim import OptimConfig  # re-exported: every engine's optimizer config

__all__ = ["GeminiConfig", "GeminiEngine", "OptimConfig", "gemini"]
