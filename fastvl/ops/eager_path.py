"""The eager fast path of fastvl's custom ops.

Each fused op is a ``torch.library`` custom op (so torch.compile traces it as one node, with its fake
implementation and its registered autograd). Called eagerly, that layer costs more host time than the
op's launches (schema binding, two dispatcher redispatches, the autograd wrapper): at the tiny shapes
of VL models the host is the bottleneck. So eager calls run the same forward function, setup_context
and backward under a plain ``torch.autograd.Function``; only torch.compile goes through the custom op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def eager_function(name: str, forward: Callable, setup_context: Callable, backward: Callable,
                   outputs: int, results: int = 1) -> type[torch.autograd.Function]:
    """An autograd.Function running ``forward(*inputs)`` (the custom op's body, returning ``outputs``
    tensors), then the custom op's ``setup_context(ctx, inputs, output)``; it returns the first
    ``results`` of them (the op's results: the others are internal, e.g. gradients computed in the
    forward or a log-sum-exp) and its backward is the custom op's ``backward(ctx, *grads, None, ...)``,
    with ``ctx.eager`` set."""
    unused = (None,) * (outputs - results)

    def run(ctx, *inputs):
        ctx.eager = True  # tells the backward to run its launches directly too
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output[0] if results == 1 else tuple(output[:results])

    def grads(ctx, *grad):
        return backward(ctx, *grad, *unused)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(run), "backward": staticmethod(grads)})


def call(custom_op: Callable, eager: type[torch.autograd.Function], *inputs, results: int = 1):
    """The custom op's first ``results`` outputs (one tensor, or a tuple of them) while torch.compile
    traces, else the eager Function's."""
    if torch.compiler.is_compiling():
        output = custom_op(*inputs)
        return output[0] if results == 1 else tuple(output[:results])
    return eager.apply(*inputs)
