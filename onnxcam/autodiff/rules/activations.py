"""Activation functions and Softmax/LogSoftmax."""

from __future__ import annotations

import math

from ..registry import vjp
from .common import forward_mask_grad, indicator, mask_grad, normalize_axis, select


@vjp("Relu")
def relu(ctx, node, grads):
    # Mask from the output (torch's gradient at 0 is 0) so Conv+Relu stays fusable.
    e, y = ctx.emit, node.outputs[0]
    return [forward_mask_grad(ctx, e.op("Greater", y, e.scalar(0.0, y)), grads[0])]


@vjp("Clip", differentiable=(0,))
def clip(ctx, node, grads):
    """Pass the gradient strictly inside (min, max).

    Exporters emit Clip mostly for ReLU6 (torch's hardtanh), whose gradient is 0 at both bounds;
    torch.clamp's autograd would pass it at the bounds. The two differ only at exactly min/max.

    The mask reads the output Y = min(max(X, lo), hi), like Relu's, so that ONNX Runtime can still
    fuse Conv+Clip in the forward pass (the backward then needs no separate pre-activation tensor).
    It is the same mask: X > lo <=> Y > lo and X < hi <=> Y < hi when lo < hi; when lo >= hi both
    are all false (no X lies strictly between, and Y = hi <= lo)."""
    e, y = ctx.emit, node.outputs[0]
    lo = node.input(1) if node.input(1) else None
    hi = node.input(2) if node.input(2) else None
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11 attribute form
        lo = e.scalar(node.attr("min"), y) if "min" in node.attrs else None
        hi = e.scalar(node.attr("max"), y) if "max" in node.attrs else None
    mask = None
    if lo is not None:
        mask = e.op("Greater", y, lo)
    if hi is not None:
        upper = e.op("Less", y, hi)
        mask = upper if mask is None else e.op("And", mask, upper)
    return [grads[0] if mask is None else forward_mask_grad(ctx, mask, grads[0])]


@vjp("LeakyRelu")
def leaky_relu(ctx, node, grads):
    e, x, g = ctx.emit, node.input(0), grads[0]
    alpha = node.attr("alpha", 0.01)
    positive = e.op("Greater", x, e.scalar(0.0, x))
    if 0.0 <= alpha <= 1.0:  # max(1, alpha) = 1 and max(0, alpha) = alpha: the local slope in two ops
        local = e.op("Max", indicator(ctx, positive, x), e.scalar(alpha, x))
    else:
        local = select(ctx, positive, None, e.scalar(alpha, x), x)
    return [e.op("Mul", g, local)]


@vjp("PRelu", differentiable=(0,))
def prelu(ctx, node, grads):
    e, x, slope, g = ctx.emit, node.input(0), node.input(1), grads[0]
    positive = e.op("Greater", x, e.scalar(0.0, x))
    return [e.op("Mul", g, select(ctx, positive, None, slope, x)), None]


@vjp("Sigmoid")
def sigmoid(ctx, node, grads):
    e, y = ctx.emit, node.outputs[0]
    return [e.op("Mul", grads[0], e.op("Mul", y, e.op("Sub", e.scalar(1.0, y), y)))]


@vjp("Tanh")
def tanh(ctx, node, grads):
    e, y = ctx.emit, node.outputs[0]
    return [e.op("Mul", grads[0], e.op("Sub", e.scalar(1.0, y), e.op("Mul", y, y)))]


@vjp("HardSigmoid")
def hard_sigmoid(ctx, node, grads):
    # alpha where 0 < alpha*x + beta < 1 (torch exports alpha = 1/6; ONNX's default is 0.2).
    e, x = ctx.emit, node.input(0)
    alpha, beta = node.attr("alpha", 0.2), node.attr("beta", 0.5)
    t = e.op("Add", e.op("Mul", x, e.scalar(alpha, x)), e.scalar(beta, x))
    inside = e.op("And", e.op("Greater", t, e.scalar(0.0, x)), e.op("Less", t, e.scalar(1.0, x)))
    return [mask_grad(ctx, inside, e.op("Mul", grads[0], e.scalar(alpha, x)))]


@vjp("HardSwish")
def hard_swish(ctx, node, grads):
    """y = x·clip(x/6 + 1/2, 0, 1), so dy/dx = 0 for x <= -3, x/3 + 1/2 for -3 < x < 3, 1 for x >= 3.

    The kinks follow torch's hardswish_backward (checked on torch 2.13: 0 at exactly -3, 1 at
    exactly 3), not the one-sided limits x/3 + 1/2 there."""
    e, x = ctx.emit, node.input(0)
    middle = e.op("Add", e.op("Div", x, e.scalar(3.0, x)), e.scalar(0.5, x))
    below_3 = e.op("Less", x, e.scalar(3.0, x))
    upper = select(ctx, below_3, middle, e.scalar(1.0, x), x)
    local = e.op("Mul", upper, indicator(ctx, e.op("Greater", x, e.scalar(-3.0, x)), x))
    return [e.op("Mul", grads[0], local)]


@vjp("Elu")
def elu(ctx, node, grads):
    e, x, y = ctx.emit, node.input(0), node.outputs[0]
    alpha = node.attr("alpha", 1.0)
    negative = e.op("Add", y, e.scalar(alpha, y))  # alpha*exp(x) = y + alpha for x <= 0
    local = select(ctx, e.op("Greater", x, e.scalar(0.0, x)), None, negative, x)
    return [e.op("Mul", grads[0], local)]


@vjp("Selu")
def selu(ctx, node, grads):
    e, x = ctx.emit, node.input(0)
    alpha = node.attr("alpha", 1.67326319217681884765625)
    gamma = node.attr("gamma", 1.05070102214813232421875)
    # exp(min(x, 0)): the same for x <= 0, and finite where the branch is not selected.
    negative = e.op("Mul", e.op("Exp", e.op("Min", x, e.scalar(0.0, x))), e.scalar(alpha * gamma, x))
    local = select(ctx, e.op("Greater", x, e.scalar(0.0, x)), e.scalar(gamma, x), negative, x)
    return [e.op("Mul", grads[0], local)]


@vjp("Celu")
def celu(ctx, node, grads):
    e, x = ctx.emit, node.input(0)
    alpha = node.attr("alpha", 1.0)
    negative = e.op("Exp", e.op("Div", e.op("Min", x, e.scalar(0.0, x)), e.scalar(alpha, x)))  # finite, see Selu
    local = select(ctx, e.op("Greater", x, e.scalar(0.0, x)), None, negative, x)
    return [e.op("Mul", grads[0], local)]


@vjp("Softplus")
def softplus(ctx, node, grads):
    e, x = ctx.emit, node.input(0)
    return [e.op("Mul", grads[0], e.op("Sigmoid", x))]


@vjp("Softsign")
def softsign(ctx, node, grads):
    e, x = ctx.emit, node.input(0)
    d = e.op("Add", e.scalar(1.0, x), e.op("Abs", x))
    return [e.op("Div", grads[0], e.op("Mul", d, d))]


@vjp("ThresholdedRelu")
def thresholded_relu(ctx, node, grads):
    e, x = ctx.emit, node.input(0)
    return [mask_grad(ctx, e.op("Greater", x, e.scalar(node.attr("alpha", 1.0), x)), grads[0])]


@vjp("Mish")
def mish(ctx, node, grads):
    # d/dx x*tanh(softplus(x)) = tanh(sp) + x*sigmoid(x)*(1 - tanh(sp)^2)
    e, x = ctx.emit, node.input(0)
    t = e.op("Tanh", e.op("Softplus", x))
    local = e.op("Add", t, e.op("Mul", e.op("Mul", x, e.op("Sigmoid", x)),
                                e.op("Sub", e.scalar(1.0, x), e.op("Mul", t, t))))
    return [e.op("Mul", grads[0], local)]


@vjp("Gelu")
def gelu(ctx, node, grads):
    e, x = ctx.emit, node.input(0)
    if node.attr("approximate", "none") == "tanh":
        k = math.sqrt(2.0 / math.pi)
        x2 = e.op("Mul", x, x)
        inner = e.op("Mul", e.op("Add", x, e.op("Mul", e.op("Mul", x2, x), e.scalar(0.044715, x))), e.scalar(k, x))
        t = e.op("Tanh", inner)
        d_inner = e.op("Mul", e.scalar(k, x), e.op("Add", e.scalar(1.0, x), e.op("Mul", x2, e.scalar(3 * 0.044715, x))))
        local = e.op("Add", e.op("Mul", e.scalar(0.5, x), e.op("Add", e.scalar(1.0, x), t)),
                     e.op("Mul", e.op("Mul", e.scalar(0.5, x), x),
                          e.op("Mul", e.op("Sub", e.scalar(1.0, x), e.op("Mul", t, t)), d_inner)))
    else:  # exact: Phi(x) + x*phi(x)
        cdf = e.op("Mul", e.scalar(0.5, x),
                   e.op("Add", e.scalar(1.0, x), e.op("Erf", e.op("Mul", x, e.scalar(1 / math.sqrt(2.0), x)))))
        pdf = e.op("Mul", e.op("Exp", e.op("Mul", e.op("Mul", x, x), e.scalar(-0.5, x))),
                   e.scalar(1 / math.sqrt(2 * math.pi), x))
        local = e.op("Add", cdf, e.op("Mul", x, pdf))
    return [e.op("Mul", grads[0], local)]


def _softmax_axes(ctx, node):
    """Axes the op normalises over: one axis from opset 13, all axes from `axis` on before."""
    rank = ctx.emit.rank(node.input(0))
    if ctx.opset >= 13:
        return [normalize_axis(node.attr("axis", -1), rank)]
    return list(range(normalize_axis(node.attr("axis", 1), rank), rank))


@vjp("Softmax")
def softmax(ctx, node, grads):
    e, y, g = ctx.emit, node.outputs[0], grads[0]
    gy = e.op("Mul", g, y)
    return [e.op("Mul", y, e.op("Sub", g, e.reduce("ReduceSum", gy, _softmax_axes(ctx, node), keepdims=True)))]


@vjp("LogSoftmax")
def log_softmax(ctx, node, grads):
    e, y, g = ctx.emit, node.outputs[0], grads[0]
    total = e.reduce("ReduceSum", g, _softmax_axes(ctx, node), keepdims=True)
    return [e.op("Sub", g, e.op("Mul", e.op("Exp", y), total))]
