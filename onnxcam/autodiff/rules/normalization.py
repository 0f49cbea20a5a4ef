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
        factor = _per_channel(ctx, factor, rank)
    return [e.op("Mul", grads[0], factor)]


def _standardized_grad(ctx, x, h, axes, eps):
    """dX of X -> (X - mean) / sqrt(var + eps) over `axes`, given h = g * (scale broadcast).

    With x̂ = (X - μ)/σ: dX = (h - mean(h) - x̂ · mean(h · x̂)) / σ, the means over `axes`.
    μ and σ are recomputed from X (the optional Mean/InvStdDev outputs are rarely exported)."""
    e = ctx.emit
    mean = e.reduce("ReduceMean", x, axes, keepdims=True)
    centered = e.op("Sub", x, mean)
    var = e.reduce("ReduceMean", e.op("Mul", centered, centered), axes, keepdims=True)
    sigma = e.op("Sqrt", e.op("Add", var, e.scalar(eps, x)))
    xhat = e.op("Div", centered, sigma)
    mean_h = e.reduce("ReduceMean", h, axes, keepdims=True)
    mean_hx = e.reduce("ReduceMean", e.op("Mul", h, xhat), axes, keepdims=True)
    inner = e.op("Sub", e.op("Sub", h, mean_h), e.op("Mul", xhat, mean_hx))
    return e.op("Div", inner, sigma)


def _per_channel(ctx, t, rank):
    """A [C] tensor reshaped to [C, 1, ..., 1] so it broadcasts over NC*."""
    return ctx.emit.unsqueeze(t, list(range(1, rank - 1))) if rank > 2 else t


def _same_type(ctx, t, like):
    e = ctx.emit
    return t if e.dtype(t) == e.dtype(like) else e.cast(t, e.dtype(like))


@vjp("InstanceNormalization", differentiable=(0,))
def instance_norm(ctx, node, grads):
    """Y = scale_c · x̂ + B_c with x̂ standardised over the spatial axes of each (n, c)."""
    e, x = ctx.emit, node.input(0)
    rank = e.rank(x)
    h = e.op("Mul", grads[0], _per_channel(ctx, node.input(1), rank))
    return [_standardized_grad(ctx, x, h, list(range(2, rank)), node.attr("epsilon", 1e-5))]


@vjp("LayerNormalization", differentiable=(0,))
def layer_norm(ctx, node, grads):
    """Y = x̂ · Scale + B, x̂ standardised over axes [axis, rank); Scale broadcasts from the right.

    Only the Y output carries a gradient here: the Mean/InvStdDev outputs are training stashes."""
    if any(g is not None for g in grads[1:]):
        raise NotImplementedError("LayerNormalization: gradient through the Mean/InvStdDev outputs")
    e, x = ctx.emit, node.input(0)
    rank = e.rank(x)
    axis = node.attr("axis", -1)
    axis = axis + rank if axis < 0 else axis
    h = e.op("Mul", grads[0], _same_type(ctx, node.input(1), x))
    return [_standardized_grad(ctx, x, h, list(range(axis, rank)), node.attr("epsilon", 1e-5))]


@vjp("GroupNormalization", differentiable=(0,))
def group_norm(ctx, node, grads):
    """Standardise each group of C/G channels (with their spatial extent), then scale and shift.

    Opset 18 specified scale/bias per group ([G]), opset 21 per channel ([C]). Both are handled
    without looking at the opset: scale [S] is repeated C/S times into a per-channel [C] vector
    (S = G repeats each group's factor over its channels; S = C leaves it unchanged)."""
    e, x, scale = ctx.emit, node.input(0), node.input(1)
    groups = int(node.attr("num_groups"))
    rank = e.rank(x)
    c = e.dims(x)[1]
    s = e.dims(scale)[0]
    if isinstance(c, int) and isinstance(s, int) and c == s:
        per_channel = scale
    else:
        column = e.op("Reshape", scale, e.ints([-1, 1]))
        repeated = e.op("Expand", column, e.shape_of([s, e.d_div(c, s)]))
        per_channel = e.op("Reshape", repeated, e.ints([-1]))
    h = e.op("Mul", grads[0], _per_channel(ctx, _same_type(ctx, per_channel, x), rank))
    # [N, C, *] -> [N, G, C/G * prod(*)]: each group becomes one row to standardise.
    grouped = e.ints([0, groups, -1])
    x_g, h_g = e.op("Reshape", x, grouped), e.op("Reshape", h, grouped)
    dx = _standardized_grad(ctx, x_g, h_g, [2], node.attr("epsilon", 1e-5))
    return [e.op("Reshape", dx, e.shape_of_tensor_or_dims(x))]


@vjp("LpNormalization", differentiable=(0,))
def lp_norm(ctx, node, grads):
    """Y = X / ||X||_p along `axis` (p = 1 or 2): dX = (g - dn · sum(g · Y)) / ||X||, where
    dn = d||X||/dX · ||X|| is Y for p = 2 and sign(X) for p = 1."""
    e, x, y, g = ctx.emit, node.input(0), node.outputs[0], grads[0]
    p = node.attr("p", 2)
    if p not in (1, 2):
        raise NotImplementedError(f"LpNormalization with p={p}")
    axis = node.attr("axis", -1)
    norm = e.reduce("ReduceL2" if p == 2 else "ReduceL1", x, [axis], keepdims=True)
    dn = y if p == 2 else e.op("Sign", x)
    proj = e.reduce("ReduceSum", e.op("Mul", g, y), [axis], keepdims=True)
    return [e.op("Div", e.op("Sub", g, e.op("Mul", dn, proj)), norm)]
