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


def _swap_last(ctx, t, rank):
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return ctx.emit.op("Transpose", t, perm=perm)


@vjp("MatMul")
def matmul(ctx, node, grads):
    """Y = A @ B with numpy semantics: dA = unb(g @ Bᵀ, A), dB = unb(Aᵀ @ g, B) (ᵀ = swap the last
    two axes).

    1-D operands are promoted first (A [k] -> [1, k], B [k] -> [k, 1]) and g gets the dropped
    axis back. The products have shape batch(Y) + A[-2:] (resp. B[-2:]), not Y's shape, so that is
    the shape unbroadcasting sums down from."""
    e, g = ctx.emit, grads[0]
    a, b, y = node.input(0), node.input(1), node.outputs[0]
    ra, rb = e.rank(a), e.rank(b)
    a_shape, b_shape = list(e.info(a).shape), list(e.info(b).shape)
    y_shape = list(e.info(y).shape) if e.info(y).shape is not None else None
    # promoted operands and gradient
    a2, a2_shape = (a, a_shape) if ra >= 2 else (e.unsqueeze(a, [0]), [1] + a_shape)
    b2, b2_shape = (b, b_shape) if rb >= 2 else (e.unsqueeze(b, [1]), b_shape + [1])
    g2 = g
    if ra == 1:
        g2 = e.unsqueeze(g2, [-2] if rb >= 2 else [0])
    if rb == 1:
        g2 = e.unsqueeze(g2, [-1])
    batch_rank = max(len(a2_shape), len(b2_shape)) - 2
    # unknown batch dims make unbroadcast decide at run time
    batch = y_shape[:batch_rank] if y_shape is not None else [None] * batch_rank
    if ra == 1:
        e.set_info(a2, e.dtype(a), a2_shape)
    if rb == 1:
        e.set_info(b2, e.dtype(b), b2_shape)
    da = db = None
    if ctx.needs(node, 0):
        full = e.op("MatMul", g2, _swap_last(ctx, b2, len(b2_shape)))
        e.set_info(full, e.dtype(a), batch + a2_shape[-2:])
        da = unbroadcast(ctx, full, a2, full)
        if ra == 1:
            da = e.op("Reshape", da, e.shape_of_tensor_or_dims(a))
    if ctx.needs(node, 1):
        full = e.op("MatMul", _swap_last(ctx, a2, len(a2_shape)), g2)
        e.set_info(full, e.dtype(b), batch + b2_shape[-2:])
        db = unbroadcast(ctx, full, b2, full)
        if rb == 1:
            db = e.op("Reshape", db, e.shape_of_tensor_or_dims(b))
    return [da, db]


def _tokens(subscript):
    """'...ij' -> ['...', 'i', 'j']."""
    out, i = [], 0
    while i < len(subscript):
        if subscript.startswith("...", i):
            out.append("...")
            i += 3
        else:
            out.append(subscript[i])
            i += 1
    return out


def _parse_einsum(equation):
    equation = equation.replace(" ", "")
    lhs, _, rhs = equation.partition("->")
    ins = [_tokens(s) for s in lhs.split(",")]
    if "->" not in equation:  # implicit output: ellipsis, then letters used once, sorted
        letters = [t for s in ins for t in s if t != "..."]
        rhs = ("..." if any("..." in s for s in ins) else "") + "".join(
            sorted(ch for ch in set(letters) if letters.count(ch) == 1))
    return ins, _tokens(rhs)


@vjp("Einsum")
def einsum(ctx, node, grads):
    """Einsum is linear in each operand: the gradient of operand i is again an Einsum, with the
    output subscript and operand i's subscript swapped: dX_i = einsum('out,others->in_i', g, ...).

    Indices of X_i that appear nowhere else (summed out of X_i alone, as in 'bij->bi') cannot be
    produced by that Einsum: the gradient is constant along them, so they are added back with
    Unsqueeze + Expand. A broadcast ellipsis ('...ij,jk->...ik' with a smaller or size-1 batch)
    is summed back down. Repeated indices within one operand (diagonals) are refused."""
    e, g, y = ctx.emit, grads[0], node.outputs[0]
    ins, out = _parse_einsum(node.attr("equation"))
    if len(ins) != len(node.inputs):
        raise NotImplementedError(f"Einsum equation {node.attr('equation')!r} does not match its inputs")
    results = []
    for i, sub in enumerate(ins):
        if not ctx.needs(node, i):
            results.append(None)
            continue
        letters = [t for t in sub if t != "..."]
        if len(set(letters)) != len(letters):
            raise NotImplementedError(f"Einsum {node.attr('equation')!r}: repeated index in one operand")
        if "..." in sub and "..." not in out:
            raise NotImplementedError(f"Einsum {node.attr('equation')!r}: ellipsis summed out")
        others = [ins[j] for j in range(len(ins)) if j != i]
        avail = set(out) | {t for s in others for t in s}
        target = [t for t in sub if t == "..." or t in avail]
        extra_ellipsis = "..." in avail and "..." not in sub  # ORT won't sum an ellipsis away
        if extra_ellipsis:
            target = ["..."] + target
        eq = ",".join("".join(s) for s in [out] + others) + "->" + "".join(target)
        grad = e.op("Einsum", g, *[node.inputs[j] for j in range(len(ins)) if j != i], equation=eq)
        x = node.inputs[i]
        if extra_ellipsis:  # X_i is shared across the whole ellipsis: sum it out
            ell_rank = _ellipsis_rank(ctx, y, out)
            if ell_rank:
                grad = e.reduce("ReduceSum", grad, list(range(ell_rank)), keepdims=False)
            else:
                grad = e.op("Identity", grad)
        grad = _sum_broadcast_ellipsis(ctx, grad, target, x, sub, y, out)
        missing = [axis for axis, t in enumerate(_axes_of(sub, e.rank(x))) if t not in avail]
        if missing:
            grad = e.op("Expand", e.unsqueeze(grad, missing), e.shape_of_tensor_or_dims(x))
        results.append(grad)
    return results


def _axes_of(sub, rank):
    """One token per axis of a tensor with subscript `sub` ('...' repeated over its axes)."""
    n_ell = rank - sum(t != "..." for t in sub)
    axes = []
    for t in sub:
        axes.extend(["..."] * n_ell if t == "..." else [t])
    return axes


def _ellipsis_rank(ctx, y, out):
    shape = ctx.emit.info(y).shape
    if shape is None:
        raise NotImplementedError("Einsum with an ellipsis: output rank unknown")
    return len(shape) - (len(out) - 1)


def _sum_broadcast_ellipsis(ctx, grad, target, x, sub, y, out):
    """`grad` carries Y's full ellipsis; sum it down to X's ellipsis (fewer or size-1 axes)."""
    if "..." not in sub:
        return grad
    e = ctx.emit
    x_shape, y_shape = e.info(x).shape, e.info(y).shape
    if y_shape is None:
        raise NotImplementedError("Einsum with an ellipsis: output shape unknown")
    ell_x = x_shape[sub.index("..."):][:len(x_shape) - (len(sub) - 1)]
    ell_y = y_shape[out.index("..."):][:len(y_shape) - (len(out) - 1)]
    lead = len(ell_y) - len(ell_x)
    start = target.index("...")
    ones = []
    for j, xd in enumerate(ell_x):
        yd = ell_y[lead + j]
        if xd == 1 and yd != 1:
            ones.append(start + lead + j)
        elif not (isinstance(xd, int) or xd == yd or yd == 1):
            raise NotImplementedError("Einsum: cannot tell whether an ellipsis axis is broadcast")
    if ones:
        grad = e.reduce("ReduceSum", grad, ones, keepdims=True)
    if lead:
        grad = e.reduce("ReduceSum", grad, list(range(start, start + lead)), keepdims=False)
    return grad
