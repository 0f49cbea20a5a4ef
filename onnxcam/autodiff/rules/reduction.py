"""ReduceSum, ReduceMean, ReduceMax and friends.

Every rule first brings the incoming gradient (and, where needed, the output) back to the
"kept" layout, i.e. X's rank with size 1 on the reduced axes, so it broadcasts against X:
  - axes come from the attribute (ReduceSum < 13, the others < 18), or from input 1 (constant
    or run-time); no axes means all axes, unless noop_with_empty_axes=1 (then Y = X);
  - keepdims=0 is undone with Unsqueeze on the same axes (Unsqueeze's axes count in the
    output rank, which is X's rank, so negative reduction axes carry over unchanged).
Then each op's local derivative is a broadcasting product with X.
"""

from __future__ import annotations

from ..registry import vjp
from .common import normalize_axis


class _Axes:
    """The reduced axes of a Reduce* node: a static list of normalised ints, or a run-time tensor."""

    def __init__(self, ctx, node):
        e, x = ctx.emit, node.input(0)
        rank = e.rank(x)
        self.tensor = None  # run-time axes (1-D int64) when not known statically
        self.noop = int(node.attr("noop_with_empty_axes", 0))
        self.keepdims = int(node.attr("keepdims", 1))
        if "axes" in node.attrs:
            axes = list(node.attr("axes"))
        elif node.input(1) is not None:
            value = ctx.value(node.input(1))
            if value is None:
                self.tensor, self.static = node.input(1), None
                return
            axes = [int(a) for a in value.reshape(-1)]
        else:
            axes = []
        if not axes:  # empty: everything, or nothing with noop_with_empty_axes
            axes = [] if self.noop else list(range(rank))
        self.static = sorted({normalize_axis(int(a), rank) for a in axes})

    def kept(self, ctx, t):
        """`t` (shaped like Y) with the reduced axes restored as size 1."""
        if self.keepdims:
            return t
        if self.tensor is not None:  # opset >= 13 here: Unsqueeze takes its axes as an input
            return ctx.emit.op("Unsqueeze", t, self.tensor)
        return ctx.emit.unsqueeze(t, self.static) if self.static else t

    def reduce_sum(self, ctx, t):
        """ReduceSum over the same axes, keepdims=1."""
        e = ctx.emit
        if self.tensor is not None:
            return e.op("ReduceSum", t, self.tensor, keepdims=1, noop_with_empty_axes=self.noop)
        return e.reduce("ReduceSum", t, self.static, keepdims=True)


def _expand(ctx, g, x):
    return ctx.emit.op("Expand", g, ctx.emit.shape_of_tensor_or_dims(x))


@vjp("ReduceSum", differentiable=(0,))
def reduce_sum(ctx, node, grads):
    """Every reduced element contributes once: dX = Expand(g)."""
    axes = _Axes(ctx, node)
    return [_expand(ctx, axes.kept(ctx, grads[0]), node.input(0))]


@vjp("ReduceMean", differentiable=(0,))
def reduce_mean(ctx, node, grads):
    """dX = Expand(g) / count, where count = |X| / |Y| (the number of elements per mean)."""
    e, x, y = ctx.emit, node.input(0), node.outputs[0]
    axes = _Axes(ctx, node)
    dims = e.dims(x)
    if axes.static is not None and all(isinstance(dims[a], int) for a in axes.static):
        count = e.scalar(float(e.d_prod([dims[a] for a in axes.static])), x)
    else:
        size_x = e.op("Cast", e.op("Size", x), to=e.dtype(x))
        count = e.op("Div", size_x, e.op("Cast", e.op("Size", y), to=e.dtype(x)))
    return [_expand(ctx, e.op("Div", axes.kept(ctx, grads[0]), count), x)]


@vjp("ReduceMax", "ReduceMin", differentiable=(0,))
def reduce_max_min(ctx, node, grads):
    """The gradient goes to the elements equal to the extreme value.

    Tie rule: split evenly among the ties, dX = mask * g / count(mask), which is what
    torch.amax / torch.amin (and torch.max(x) without dim) do. (torch.max(x, dim), which also
    returns indices, gives everything to one element instead; exporters emit ReduceMax for
    both, and the two differ only on exact ties.)"""
    e, x, y = ctx.emit, node.input(0), node.outputs[0]
    axes = _Axes(ctx, node)
    mask = e.op("Equal", x, axes.kept(ctx, y))
    count = axes.reduce_sum(ctx, e.op("Cast", mask, to=e.dtype(x)))
    share = e.op("Div", axes.kept(ctx, grads[0]), count)
    return [e.op("Where", mask, share, e.scalar(0.0, x))]


@vjp("ReduceL2", differentiable=(0,))
def reduce_l2(ctx, node, grads):
    """Y = sqrt(sum X^2): dX = g * X / Y, and 0 where Y = 0 (torch's norm subgradient)."""
    e, x, y = ctx.emit, node.input(0), node.outputs[0]
    axes = _Axes(ctx, node)
    y_k, g_k = axes.kept(ctx, y), axes.kept(ctx, grads[0])
    zero = e.scalar(0.0, x)
    g_over_y = e.op("Where", e.op("Equal", y_k, zero), zero, e.op("Div", g_k, y_k))
    return [e.op("Mul", x, g_over_y)]


@vjp("ReduceL1", differentiable=(0,))
def reduce_l1(ctx, node, grads):
    """Y = sum |X|: dX = g * sign(X) (0 at X = 0, as torch)."""
    e, x = ctx.emit, node.input(0)
    axes = _Axes(ctx, node)
    return [e.op("Mul", e.op("Sign", x), axes.kept(ctx, grads[0]))]


@vjp("ReduceSumSquare", differentiable=(0,))
def reduce_sum_square(ctx, node, grads):
    """Y = sum X^2: dX = 2 X g."""
    e, x = ctx.emit, node.input(0)
    axes = _Axes(ctx, node)
    return [e.op("Mul", e.op("Mul", x, e.scalar(2.0, x)), axes.kept(ctx, grads[0]))]


@vjp("ReduceLogSumExp", differentiable=(0,))
def reduce_log_sum_exp(ctx, node, grads):
    """Y = log sum exp X: dX = g * softmax = g * exp(X - Y)."""
    e, x, y = ctx.emit, node.input(0), node.outputs[0]
    axes = _Axes(ctx, node)
    return [e.op("Mul", e.op("Exp", e.op("Sub", x, axes.kept(ctx, y))), axes.kept(ctx, grads[0]))]


@vjp("ReduceLogSum", differentiable=(0,))
def reduce_log_sum(ctx, node, grads):
    """Y = log sum X: dX = g / sum X = g / exp(Y)."""
    e, x, y = ctx.emit, node.input(0), node.outputs[0]
    axes = _Axes(ctx, node)
    return [_expand(ctx, e.op("Div", axes.kept(ctx, grads[0]), e.op("Exp", axes.kept(ctx, y))), x)]


@vjp("ReduceProd", differentiable=(0,))
def reduce_prod(ctx, node, grads):
    """dX_i = g * prod_{j != i} X_j, exact at zeros without dividing by them:
    for X_i != 0 it is Y / X_i (0 when another element is 0); for X_i = 0 it is the product of
    the non-zero elements when X_i is the only zero of its group, else 0."""
    e, x, y = ctx.emit, node.input(0), node.outputs[0]
    axes = _Axes(ctx, node)
    zero, one = e.scalar(0.0, x), e.scalar(1.0, x)
    is_zero = e.op("Equal", x, zero)
    safe_x = e.op("Where", is_zero, one, x)
    zeros = axes.reduce_sum(ctx, e.op("Cast", is_zero, to=e.dtype(x)))
    if axes.tensor is not None:
        prod_nonzero = e.op("ReduceProd", safe_x, axes.tensor, keepdims=1, noop_with_empty_axes=axes.noop)
    else:
        prod_nonzero = e.reduce("ReduceProd", safe_x, axes.static, keepdims=True)
    lone_zero = e.op("Where", e.op("Equal", zeros, one), prod_nonzero, zero)
    others = e.op("Where", is_zero, lone_zero, e.op("Div", axes.kept(ctx, y), safe_x))
    return [e.op("Mul", others, axes.kept(ctx, grads[0]))]
