"""BatchNormalization (inference), InstanceNormalization, LayerNormalization, GroupNormalization."""

from __future__ import annotations

import numpy as np

from ..registry import vjp


@vjp("BatchNormalization", differentiable=(0,))
def batch_norm(ctx, node, grads):
    """Inference BatchNormalization is per-channel affine: dX = g * scale / sqrt(var + eps)."""
    if node.attr("training_mode", 0):
        raise NotImplementedError("BatchNormalization with training_mode=1")
    e, x = ctx.emit, node.input(0)
    eps = node.attr("epsilon", 1e-5)
    rank = e.rank(x)
    scale, var = ctx.value(node.input(1)), ctx.value(node.input(4))
    if scale is not None and var is not None:
        factor = (scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps))
        factor = e.const(factor.reshape([-1] + [1] * (rank - 2)), e.dtype(x))
    else:
        factor = e.op("Div", node.input(1), e.op("Sqrt", e.op("Add", node.input(4), e.scalar(eps, x))))
        factor = e.unsqueeze(factor, list(range(1, rank - 1)))
    return [e.op("Mul", grads[0], factor)]
