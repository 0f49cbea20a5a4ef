"""Gemm, MatMul, Einsum."""

from __future__ import annotations

from ..registry import vjp
from .common import unbroadcast


@vjp("Gemm")
def gemm(ctx, node, grads):
    """Y = alpha * A' B' + beta * C with A' = A or A^T, B' = B or B^T."""
    e, g, y = ctx.emit, grads[0], node.outputs[0]
    a, b, c = node.input(0), node.input(1), node.input(2)
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    ta, tb = node.attr("transA", 0), node.attr("transB", 0)
    da = db = dc = None
    if ctx.needs(node, 0):
        if ta:
            da = e.op("Gemm", b, g, alpha=alpha, transA=tb, transB=1)
        else:
            da = e.op("Gemm", g, b, alpha=alpha, transB=1 - tb)
    if ctx.needs(node, 1):
        if tb:
            db = e.op("Gemm", g, a, alpha=alpha, transA=1, transB=ta)
        else:
            db = e.op("Gemm", a, g, alpha=alpha, transA=1 - ta)
    if c is not None and ctx.needs(node, 2):
        gc = g if beta == 1.0 else e.op("Mul", g, e.scalar(beta, g))
        dc = unbroadcast(ctx, gc, c, y)
    return [da, db, dc]
