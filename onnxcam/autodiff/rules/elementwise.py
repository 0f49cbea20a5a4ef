"""Broadcasting arithmetic and simple unary maths: Add, Sub, Mul, Div, Pow, Neg, Sqrt, Exp..."""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from ..registry import vjp
from .common import mask_grad, unbroadcast


@vjp("Add", "Sub")
def add_sub(ctx, node, grads):
    g, y = grads[0], node.outputs[0]
    a, b = node.input(0), node.input(1)
    da = unbroadcast(ctx, g, a, y) if ctx.needs(node, 0) else None
    db = None
    if ctx.needs(node, 1):
        gb = ctx.emit.op("Neg", g) if node.op == "Sub" else g
        db = unbroadcast(ctx, gb, b, y)
    return [da, db]


@vjp("Mul")
def mul(ctx, node, grads):
    g, y = grads[0], node.outputs[0]
    a, b = node.input(0), node.input(1)
    e = ctx.emit
    da = unbroadcast(ctx, e.op("Mul", g, b), a, y) if ctx.needs(node, 0) else None
    db = unbroadcast(ctx, e.op("Mul", g, a), b, y) if ctx.needs(node, 1) else None
    return [da, db]


@vjp("Div")
def div(ctx, node, grads):
    g, y = grads[0], node.outputs[0]
    a, b = node.input(0), node.input(1)
    e = ctx.emit
    g_over_b = e.op("Div", g, b)
    da = unbroadcast(ctx, g_over_b, a, y) if ctx.needs(node, 0) else None
    db = None
    if ctx.needs(node, 1):  # d(a/b)/db = -y/b
        db = unbroadcast(ctx, e.op("Neg", e.op("Mul", g_over_b, y)), b, y)
    return [da, db]


@vjp("Pow")
def power(ctx, node, grads):
    g, y = grads[0], node.outputs[0]
    a, b = node.input(0), node.input(1)
    e = ctx.emit
    da = db = None
    if ctx.needs(node, 0):
        exponent = ctx.value(b)
        if exponent is not None and exponent.size == 1 and float(exponent) == 2.0:
            local = e.op("Mul", a, e.scalar(2.0, a))  # the common x**2 of decomposed norms
        else:
            b_f = b if e.dtype(b) == e.dtype(a) else e.cast(b, e.dtype(a))
            local = e.op("Mul", b_f, e.op("Pow", a, e.op("Sub", b_f, e.scalar(1.0, a))))
        da = unbroadcast(ctx, e.op("Mul", g, local), a, y)
    if ctx.needs(node, 1):  # d(a^b)/db = y * ln(a)
        db = unbroadcast(ctx, e.op("Mul", g, e.op("Mul", y, e.op("Log", a))), b, y)
    return [da, db]


@vjp("Neg")
def neg(ctx, node, grads):
    return [ctx.emit.op("Neg", grads[0])]


@vjp("Sqrt")
def sqrt(ctx, node, grads):
    e, y = ctx.emit, node.outputs[0]
    return [e.op("Div", grads[0], e.op("Mul", y, e.scalar(2.0, y)))]


@vjp("Reciprocal")
def reciprocal(ctx, node, grads):
    e, y = ctx.emit, node.outputs[0]
    return [e.op("Neg", e.op("Mul", grads[0], e.op("Mul", y, y)))]


@vjp("Exp")
def exp(ctx, node, grads):
    return [ctx.emit.op("Mul", grads[0], node.outputs[0])]


@vjp("Log")
def log(ctx, node, grads):
    return [ctx.emit.op("Div", grads[0], node.input(0))]


@vjp("Abs")
def absolute(ctx, node, grads):
    # sign(x) with sign(0) = 0, as torch.
    x = node.input(0)
    return [ctx.emit.op("Mul", grads[0], ctx.emit.op("Sign", x))]


@vjp("Sin")
def sin(ctx, node, grads):
    return [ctx.emit.op("Mul", grads[0], ctx.emit.op("Cos", node.input(0)))]


@vjp("Cos")
def cos(ctx, node, grads):
    e = ctx.emit
    return [e.op("Neg", e.op("Mul", grads[0], e.op("Sin", node.input(0))))]


@vjp("Erf")
def erf(ctx, node, grads):
    e, x = ctx.emit, node.input(0)
    local = e.op("Mul", e.op("Exp", e.op("Neg", e.op("Mul", x, x))), e.scalar(2.0 / math.sqrt(math.pi), x))
    return [e.op("Mul", grads[0], local)]


@vjp("Identity")
def identity(ctx, node, grads):
    return [grads[0]]


@vjp("Dropout", differentiable=(0,))
def dropout(ctx, node, grads):
    """Inference Dropout (no training_mode, or a constant false one) is the identity. In training
    mode Y = X · mask / (1 - ratio) with a random mask drawn at each run, so the gradient must use
    the mask of that same run: the node's mask output (added to the node when the model does not
    ask for it) scales g by 1/(1 - ratio) where kept. A run-time training_mode selects either."""
    e, g = ctx.emit, grads[0]
    mode = node.input(2) if ctx.opset >= 12 else None
    mode_value = ctx.value(mode) if mode else None
    if mode is None or (mode_value is not None and not bool(np.asarray(mode_value).reshape(-1)[0])):
        return [g]
    mask = node.outputs[1] if len(node.outputs) > 1 and node.outputs[1] else _add_mask_output(ctx, node)
    ratio = node.input(1)
    ratio_value = 0.5 if ratio is None else ctx.value(ratio)
    if ratio_value is not None:
        keep = 1.0 - float(np.asarray(ratio_value).reshape(-1)[0])
        scale = e.scalar(1.0 / keep if keep > 0 else 0.0, g)
    else:
        one = e.scalar(1.0, g)
        scale = e.op("Div", one, e.op("Sub", one, e.cast(ratio, e.dtype(g))))
    # Where, not mask_grad: ratio 1 makes scale infinite where every unit is dropped.
    trained = e.op("Where", mask, e.op("Mul", g, scale), e.scalar(0.0, g))
    return [trained if mode_value is not None else e.op("Where", mode, trained, g)]


def _add_mask_output(ctx, node) -> str:
    """Give the forward Dropout node its optional mask output (its other outputs are unchanged)."""
    name = ctx.emit.fresh("dropout_mask")
    while len(node.proto.output) < 1:
        node.proto.output.append("")
    if len(node.proto.output) == 1:
        node.proto.output.append(name)
    else:
        node.proto.output[1] = name
    ctx.emit.set_info(name, TensorProto.BOOL, ctx.emit.info(node.outputs[0]).shape)
    return name


@vjp("Cast", differentiable=(0,))
def cast(ctx, node, grads):
    # Only float->float casts carry a gradient (the walker stops at integer outputs).
    return [ctx.emit.cast(grads[0], ctx.emit.dtype(node.input(0)))]


@vjp("Where", differentiable=(1, 2))
def where(ctx, node, grads):
    e, g, y = ctx.emit, grads[0], node.outputs[0]
    cond, a, b = node.input(0), node.input(1), node.input(2)
    da = unbroadcast(ctx, mask_grad(ctx, cond, g), a, y) if ctx.needs(node, 1) else None
    db = unbroadcast(ctx, mask_grad(ctx, e.op("Not", cond), g), b, y) if ctx.needs(node, 2) else None
    return [None, da, db]


@vjp("Sum")
def sum_(ctx, node, grads):
    y = node.outputs[0]
    return [unbroadcast(ctx, grads[0], x, y) if ctx.needs(node, i) else None for i, x in enumerate(node.inputs)]


@vjp("Mean")
def mean(ctx, node, grads):
    e, y = ctx.emit, node.outputs[0]
    g = e.op("Div", grads[0], e.scalar(float(len(node.inputs)), y))
    return [unbroadcast(ctx, g, x, y) if ctx.needs(node, i) else None for i, x in enumerate(node.inputs)]


@vjp("Max", "Min")
def max_min(ctx, node, grads):
    """Ties split the gradient evenly among the inputs equal to the result, as torch does:
    torch.maximum gives each of two tied inputs half, and amax over stacked inputs 1/k each."""
    e, g, y = ctx.emit, grads[0], node.outputs[0]
    if len(node.inputs) == 1:
        return [g]
    hits = [e.op("Equal", x, y) for x in node.inputs]
    count = e.op("Sum", *[e.cast(hit, e.dtype(g)) for hit in hits])
    share = e.op("Div", g, count)
    return [unbroadcast(ctx, mask_grad(ctx, hit, share), x, y) if ctx.needs(node, i) else None
            for i, (x, hit) in enumerate(zip(node.inputs, hits))]
