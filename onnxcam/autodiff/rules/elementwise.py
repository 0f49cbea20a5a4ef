"""Broadcasting arithmetic and simple unary maths: Add, Sub, Mul, Div, Pow, Neg, Sqrt, Exp..."""

from __future__ import annotations

import math

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


@vjp("Identity", "Dropout")
def identity(ctx, node, grads):
    # Dropout at inference is the identity; its optional mask output carries no gradient.
    return [grads[0]]


@vjp("Cast", differentiable=(0,))
def cast(ctx, node, grads):
    # Only float->float casts carry a gradient (the walker stops at integer outputs).
    return [ctx.emit.cast(grads[0], ctx.emit.dtype(node.input(0)))]


@vjp("Where", differentiable=(1, 2))
def where(ctx, node, grads):
    e, g, y = ctx.emit, grads[0], node.outputs[0]
    cond, a, b = node.input(0), node.input(1), node.input(2)
    zero = e.scalar(0.0, g)
    da = unbroadcast(ctx, e.op("Where", cond, g, zero), a, y) if ctx.needs(node, 1) else None
    db = unbroadcast(ctx, e.op("Where", cond, zero, g), b, y) if ctx.needs(node, 2) else None
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
    """The gradient goes to the first input equal to the result (torch's max/min pick one too;
    for two inputs torch.maximum splits ties evenly — documented difference, ties are measure-zero)."""
    e, g, y = ctx.emit, grads[0], node.outputs[0]
    taken = None
    out = []
    for i, x in enumerate(node.inputs):
        hit = e.op("Equal", x, y)
        first = hit if taken is None else e.op("And", hit, e.op("Not", taken))
        taken = hit if taken is None else e.op("Or", taken, hit)
        out.append(unbroadcast(ctx, mask_grad(ctx, first, g), x, y) if ctx.needs(node, i) else None)
    return out
