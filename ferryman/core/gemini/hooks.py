"""Module hooks that gather chunks before use and release them after, in forward and in backward.

Forward: a pre-hook gathers the chunks holding the module's own parameters, a post-hook releases
them. Backward: the post-hook puts a gradient hook on the module's outputs (it fires when their
gradient is known, before autograd reaches the module's own backward nodes: gather again) and the
pre-hook one on its inputs (it fires once the input gradients exist, after the module's backward:
release). Tensor hooks rather than identity autograd Functions, because models modify module
outputs in place (``x += residual``), which autograd forbids on a custom Function's outputs.
Non-reentrant activation checkpointing re-runs the forward inside backward; the recomputation goes
through the same forward hooks, so it gathers and releases like any forward, and the gradient
hooks it registers never fire.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_leaves


@dataclass(eq=False)
class CallToken:
    """One forward call of one module; pairs its pre- and post-backward events."""

    module_index: int
    pre_fired: bool = False
    post_fired: bool = False
    inputs_pending: int = 0  # input gradients still to come; the module's backward ends at zero

    def input_grad_arrived(self) -> bool:
        self.inputs_pending -= 1
        return self.inputs_pending == 0


def _grad_tensors(tree) -> list[torch.Tensor]:
    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor) and x.requires_grad]


def install(engine, modules: list[nn.Module]) -> list:
    """Register the hooks on every module that owns parameters; returns the handles."""
    handles = []
    for index, module in enumerate(modules):
        stack: list[CallToken] = []

        def pre(mod, args, kwargs, index=index, stack=stack):
            token = CallToken(index)
            stack.append(token)
            engine.pre_forward(index)
            if torch.is_grad_enabled():
                inputs = _grad_tensors((args, kwargs))
                token.inputs_pending = len(inputs)
                for tensor in inputs:
                    tensor.register_hook(lambda grad, token=token: engine.post_backward(token))

        def post(mod, args, output, stack=stack):
            token = stack.pop()
            engine.post_forward(token.module_index)
            if torch.is_grad_enabled():
                tensors = _grad_tensors(output)
                for tensor in tensors:
                    tensor.register_hook(lambda grad, token=token: engine.pre_backward(token))
                if tensors:
                    engine.watch(token)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, always_call=True))  # release even on errors
    return handles
