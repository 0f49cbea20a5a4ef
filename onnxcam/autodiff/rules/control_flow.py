"""If and Loop: control flow differentiated with control flow (Scan has no rule: refused by name).

An If's only input is its condition; it differentiates through the outer tensors its branches
read (captures). Each branch gets a backward body (the branch's own nodes recomputed, since their
values live only inside the forward body, then their VJPs, seeded with the If's output gradients
read from the outer scope), and one backward If on the same condition selects the branch that ran.

A Loop is run backwards. Its forward body is given extra scan outputs that record, at every
iteration, the loop-carried values entering it (the forward results are unchanged). A backward
Loop then runs as many iterations in reverse: each recomputes the body from the recorded state of
iteration i = T-1-j, differentiates it with the carried gradients of the loop-carried outputs and
the slice i of the scan outputs' gradients, carries the gradients of the state entering iteration i
on, and sums the gradients of the captured outer tensors. Scan has no rule: the walker refuses it.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from onnx import TensorProto, helper

from ..graph import captures
from ..registry import vjp
from ..shapes import TensorInfo, make_value_info

_NARROW = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
_FLOATS = (TensorProto.FLOAT, TensorProto.DOUBLE)


def _check(ctx, names):
    if ctx.body_gradients is None:
        raise NotImplementedError("control flow needs the walker's body differentiation")
    narrow = [name for name in names if ctx.info(name).dtype in _NARROW]
    if narrow:
        raise NotImplementedError(f"half-precision tensors read by a body ({', '.join(narrow)})")


def _graph(ctx, name, forward_body, prefix, emitted, outputs, likes, inputs=()):
    """A body graph: `prefix` nodes (defining what the forward nodes read), the forward body's
    nodes recomputed, the emitted VJP nodes, pruned to what `outputs` need; each output typed
    like the tensor (or TensorInfo) in `likes`."""
    from ..gradients import needed_nodes

    nodes = needed_nodes(list(prefix) + list(forward_body.node) + list(emitted), set(outputs))
    value_infos = [make_value_info(o, like if isinstance(like, TensorInfo) else ctx.info(like))
                   for o, like in zip(outputs, likes)]
    return helper.make_graph(nodes, ctx.emit.fresh(name), list(inputs), value_infos, list(forward_body.initializer))


@vjp("If", differentiable=())
def if_(ctx, node, grads):
    wrt = sorted(name for name in captures(node.proto) if name in ctx.active)
    if not wrt:
        return []
    _check(ctx, wrt)
    e = ctx.emit
    branches = {}
    for attr in node.proto.attribute:
        if attr.name not in ("then_branch", "else_branch"):
            continue
        body = attr.g
        seeds = {out.name: g for out, g in zip(body.output, grads) if g is not None}
        with e.nested() as emitted:
            found = ctx.body_gradients(ctx, body, seeds, wrt)
            # An Identity per output: defined inside the body, never an outer name (ONNX Runtime
            # refuses a body that returns an outer value directly).
            outputs = [e.op("Identity", found[w] if found[w] is not None else e.zeros_like(w), hint="branch_grad")
                       for w in wrt]
        branches[attr.name] = _graph(ctx, f"{body.name or 'branch'}_grad", body, (), emitted, outputs, wrt)
    outs = e.op("If", node.input(0), outputs=len(wrt), hint="if_grad", **branches)
    outs = outs if isinstance(outs, list) else [outs]
    for name, out in zip(wrt, outs):
        e.set_info(out, ctx.info(name).dtype, ctx.info(name).shape)
    return dict(zip(wrt, outs))


@vjp("Loop", differentiable=tuple(range(2, 1024)))
def loop(ctx, node, grads):
    e = ctx.emit
    proto = node.proto
    body = next(a.g for a in proto.attribute if a.name == "body")
    n_carried = len(node.inputs) - 2
    carried_in = [i.name for i in body.input[2:]]  # the body's names of the state entering an iteration
    carried_out = [o.name for o in body.output[1:1 + n_carried]]
    scan_out = [o.name for o in body.output[1 + n_carried:]]
    float_carried = [k for k in range(n_carried)
                     if (_body_input_dtype(body, 2 + k) or ctx.info(node.input(2 + k)).dtype) in _FLOATS + _NARROW]
    outer = sorted(name for name in captures(proto) if name in ctx.active)
    _check(ctx, outer + [node.input(2 + k) for k in float_carried if node.input(2 + k)])

    # 1. Record, in the forward Loop, the iteration number and the state entering each iteration.
    iterations, states = _record(ctx, proto, body, carried_in)

    # 2. The backward Loop: T iterations, carrying the state gradients and the captures' sums.
    count = e.op("Size", iterations)  # T, a scalar
    last = e.op("Sub", count, e.const(1, TensorProto.INT64))
    g_final = [grads[k] if grads[k] is not None else e.zeros_like(node.input(2 + k)) for k in float_carried]
    g_scan = {scan_out[k]: grads[n_carried + k] for k in range(len(scan_out)) if grads[n_carried + k] is not None}
    body_inputs, prefix = [], []
    j, cond_in = e.fresh("loop_grad_step"), e.fresh("loop_grad_cond")
    body_inputs += [helper.make_tensor_value_info(j, TensorProto.INT64, []),
                    helper.make_tensor_value_info(cond_in, TensorProto.BOOL, [])]
    carried_grads = [e.fresh("loop_grad_state") for _ in float_carried]
    sums = [e.fresh("loop_grad_sum") for _ in outer]
    for name, like in list(zip(carried_grads, [node.input(2 + k) for k in float_carried])) + list(zip(sums, outer)):
        info = ctx.info(like)
        body_inputs.append(make_value_info(name, info))
        e.set_info(name, info.dtype or TensorProto.FLOAT, info.shape)
    with e.nested() as emitted:
        i = e.op("Sub", last, j, hint="loop_grad_iteration")
        _define(e, body.input[0].name, "Identity", i)
        _define(e, body.input[1].name, "Identity", e.const(True, TensorProto.BOOL))
        for k, name in enumerate(carried_in):
            _define(e, name, "Gather", states[k], i, axis=0)
        prefix = list(emitted)  # what the recomputed forward nodes read: before them in the body
        del emitted[:]
        seeds = {carried_out[k]: g for k, g in zip(float_carried, carried_grads)}
        for name, g in g_scan.items():
            seeds[name] = e.op("Gather", g, i, axis=0, hint="loop_grad_slice")
        wrt = [carried_in[k] for k in float_carried] + outer
        # The state entering an iteration is shaped like the initial one (the usual, shape-invariant loop).
        typed = {body.input[0].name: TensorInfo(TensorProto.INT64, ()), body.input[1].name: TensorInfo(TensorProto.BOOL, ())}
        typed.update({name: ctx.info(node.input(2 + k)) for k, name in enumerate(carried_in)
                      if ctx.info(node.input(2 + k)).dtype})
        found = ctx.body_gradients(ctx, body, seeds, wrt, typed)
        outputs = [e.op("Identity", e.const(True, TensorProto.BOOL), hint="loop_grad_go_on")]
        for k in float_carried:
            g = found[carried_in[k]]
            outputs.append(e.op("Identity", g if g is not None else e.zeros_like(carried_in[k]), hint="loop_grad_next"))
        for name, total in zip(outer, sums):
            g = found[name]
            outputs.append(e.op("Add", total, g) if g is not None else e.op("Identity", total))
    likes = [TensorInfo(TensorProto.BOOL, ())] + [node.input(2 + k) for k in float_carried] + outer
    backward_body = _graph(ctx, f"{body.name or 'loop'}_grad", body, prefix, emitted, outputs, likes, body_inputs)
    initial = g_final + [e.zeros_like(name) for name in outer]
    results = e.op("Loop", count, "", *initial, outputs=len(initial), hint="loop_grad", body=backward_body)
    results = results if isinstance(results, list) else [results]
    gradients: Dict[object, Optional[str]] = {}
    for k, g in zip(float_carried, results):
        gradients[2 + k] = g
        e.set_info(g, ctx.info(node.input(2 + k)).dtype, ctx.info(node.input(2 + k)).shape)
    for name, g in zip(outer, results[len(float_carried):]):
        gradients[name] = g
        e.set_info(g, ctx.info(name).dtype, ctx.info(name).shape)
    return gradients


def _body_input_dtype(body, index: int) -> Optional[int]:
    return body.input[index].type.tensor_type.elem_type or None


def _define(e, name: str, op: str, *inputs, **attrs) -> None:
    """A node in the current scope whose output has a given (body) name."""
    e.nodes.append(helper.make_node(op, list(inputs), [name], name=e.fresh(f"{op}_node"), **attrs))


def _record(ctx, proto, body, carried_in: List[str]):
    """Add scan outputs to the forward Loop recording its iteration number and, for each loop-carried
    value, the value entering every iteration. Returns the outer names of those stacks."""
    e = ctx.emit
    while len(proto.output) < len(body.output) - 1:  # omitted trailing outputs: keep positions aligned
        proto.output.append("")
    recorded = []
    for name, dtype in [(body.input[0].name, TensorProto.INT64)] + [
            (name, _body_input_dtype(body, 2 + k) or TensorProto.FLOAT) for k, name in enumerate(carried_in)]:
        inner = e.fresh("loop_record")
        body.node.append(helper.make_node("Identity", [name], [inner], name=e.fresh("loop_record_node")))
        known = e.info(name)
        body.output.append(make_value_info(inner, TensorInfo(dtype, known.shape)))
        outer = e.fresh("loop_recorded")
        proto.output.append(outer)
        e.set_info(outer, dtype, None)
        recorded.append(outer)
    return recorded[0], recorded[1:]
