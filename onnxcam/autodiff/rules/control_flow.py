"""If: the VJP of a branch choice is the same choice of the branches' VJPs.

An If node's only input is its condition; what it differentiates through are the outer tensors
its branches read (captures). Each branch gets a backward body built by the walker (the branch's
own nodes recomputed, then their VJPs, seeded with the If's output gradients, which the body
reads from the outer scope), and one backward If, on the same condition, selects the gradients
of the branch that actually ran. Loop and Scan have no rule: the walker refuses them by name.
"""

from __future__ import annotations

from onnx import TensorProto

from ..graph import captures
from ..registry import vjp

_NARROW = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


@vjp("If", differentiable=())
def if_(ctx, node, grads):
    wrt = sorted(name for name in captures(node.proto) if name in ctx.active)
    if not wrt:
        return []
    if ctx.body_gradients is None:
        raise NotImplementedError("control flow needs the walker's body differentiation")
    narrow = [name for name in wrt if ctx.info(name).dtype in _NARROW]
    if narrow:
        raise NotImplementedError(f"half-precision tensors read by a branch ({', '.join(narrow)})")
    branches = {}
    for attr in node.proto.attribute:
        if attr.name in ("then_branch", "else_branch"):
            seeds = {out.name: g for out, g in zip(attr.g.output, grads) if g is not None}
            branches[attr.name] = ctx.body_gradients(ctx, attr.g, seeds, wrt)
    e = ctx.emit
    outs = e.op("If", node.input(0), outputs=len(wrt), hint="if_grad", **branches)
    outs = outs if isinstance(outs, list) else [outs]
    for name, out in zip(wrt, outs):
        e.set_info(out, ctx.info(name).dtype, ctx.info(name).shape)
    return dict(zip(wrt, outs))
