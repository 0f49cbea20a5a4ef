"""Ops that move data without arithmetic: Reshape, Flatten, Transpose, Concat, Slice, Gather..."""

from __future__ import annotations

from ..registry import vjp
from .common import reshape_like


@vjp("Reshape", "Flatten", "Squeeze", "Unsqueeze", differentiable=(0,))
def reshape(ctx, node, grads):
    return [reshape_like(ctx, grads[0], node.input(0))]
