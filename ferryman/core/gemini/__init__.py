"""Gemini heterogeneous memory: chunked parameters, gradients and optimizer states across device and host.

``engine = gemini(model, GeminiConfig(...), OptimConfig(...), dims)`` wraps any ``nn.Module``;
then ``loss = f(engine(batch)); engine.backward(loss); engine.step(); engine.zero_grad()``.
"""

from ferryman.core.gemini.config import GeminiConfig, OptimConfig
from ferryman.core.gemini.engine import GeminiEngine, gemini

__all__ = ["GeminiConfig", "GeminiEngine", "OptimConfig", "gemini"]
