"""The walker: adds to a model the nodes that compute d(score)/d(target) for chosen tensors.

The score is ``sum(seed * score_tensor)``: the seed is the cotangent of `score_tensor`, either a
new graph input (``onnxcam_seed``) or a tensor the caller built in the graph (a one-hot, say).
Only nodes that both depend on a target and feed the score are differentiated; the forward
graph is shared, not copied. The walker knows no op by name: rules come from the registry.
"""

from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import NotDifferentiableError, UnsupportedModelError, LayerNotFoundError
from .analysis import GraphAnalysis, constant_values, known_tensors
from .emitter import Emitter
from .graph import ancestors, captures, node_reads, topological
from .registry import STANDARD, ZERO_GRADIENT_OPS, NodeView, RuleContext, get_rule
from .shapes import TensorInfo, infer_body_infos, infer_infos, make_value_info, probe_infos

SEED_INPUT = "onnxcam_seed"
MIN_OPSET, MAX_OPSET = 11, 21
_CUSTOM_HINT = ("Pick a target layer nearer the output (onnxcam layers MODEL), another output, "
                "or file an issue with the op type")


@dataclass
class GradientGraph:
    """What `add_gradients` built: the model (edited in place) and where things are."""
    model: onnx.ModelProto
    gradients: Dict[str, str]  # target tensor -> gradient tensor
    seed: str  # the seed tensor (graph input or caller's tensor)
    emitter: Emitter


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise UnsupportedModelError("the model imports no default-domain opset; is it an ONNX model?")


def check_opset(opset: int, where: str = "model") -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedModelError(
            f"{where}: opset {opset} is outside the supported range {MIN_OPSET}-{MAX_OPSET}; "
            f"re-export the model with an opset in that range (e.g. torch.onnx.export(..., opset_version=17))")


def add_gradients(model: onnx.ModelProto, targets: Sequence[str], score_tensor: str,
                  seed: Optional[str] = None, emitter: Optional[Emitter] = None,
                  infos: Optional[Dict[str, TensorInfo]] = None, score_name: Optional[str] = None,
                  analysis: Optional[GraphAnalysis] = None, mode: str = STANDARD) -> GradientGraph:
    """Edit `model` in place so that it also computes d(sum(seed * score_tensor))/d(target).

    `emitter` lets a caller emit nodes before (the seed) and after (the CAM) in one naming scope;
    `infos` overrides shape knowledge; `score_name` is how messages call the score (when the seed
    is given for an earlier tensor that stands for it). `analysis` is the caller's analysis of the
    original graph (built here otherwise); only its nodes are differentiated, so several calls on
    one model (one per rule `mode`, say) never walk each other's backward nodes. `mode` selects
    alternative rules where the registry has them (guided backprop's ReLU...)."""
    graph = model.graph
    opset = default_opset(model)
    check_opset(opset)
    analysis = analysis or GraphAnalysis(model, infos if infos is not None else
                                         (emitter.infos if emitter is not None else None))
    nodes, producers, known = analysis.nodes, analysis.producers, analysis.known
    for name in list(targets) + [score_tensor]:
        if name not in known:
            raise LayerNotFoundError(f"tensor {name!r} is not in the graph{_suggest(name, known)}")

    emit = emitter or new_emitter(model, analysis.infos)
    infos = emit.infos
    constants = analysis.constants
    active = _forward_active(nodes, targets, infos)
    feeding = _feeds(score_tensor, producers)
    if score_tensor not in active:
        blocked = [f"node {n.name or '(unnamed)'!r} ({n.op_type}{_QUANTIZED.get(n.op_type, '')})" for n in nodes
                   if _touches(n, active) and any(o in feeding for o in n.output)]
        where = f"; the path is cut at {', '.join(blocked)}" if blocked else ""
        raise UnsupportedModelError(
            f"the score tensor {score_name or score_tensor!r} does not depend on {', '.join(map(repr, targets))} through "
            f"differentiable ops{where}; pick a layer that feeds the chosen output")
    path = [n for n in nodes if any(o in active and o in feeding for o in n.output)
            and _touches(n, active)]
    _refuse_missing_rules(path, opset)

    unknown_rank = {t for n in path for t in list(n.input) + list(n.output)
                    if t and (infos.get(t) is None or infos[t].shape is None) and t not in constants}
    if unknown_rank:
        try:
            infos.update(analysis.probe(sorted(unknown_rank), required=True))
        except Exception as exc:  # onnxruntime refused to run the model to tell the shapes
            first = " ".join(str(exc).split())[:300]
            raise UnsupportedModelError(f"cannot learn the shapes of {len(unknown_rank)} tensor(s) on the path by "
                                        f"running the model in ONNX Runtime ({first}); check that the model runs "
                                        "in onnxruntime on its own") from None
    _measure_fixed_sizes(model, analysis, infos, path, constants)
    ctx = RuleContext(emit=emit, opset=opset, active=active, constants=constants, body_gradients=_body_gradients,
                      opset_imports=list(model.opset_import), mode=mode)

    if seed is None:
        seed = _add_seed_input(graph, score_tensor, infos)
    widened: Dict[str, str] = {}  # float16/bfloat16 forward tensors -> float32 copies
    grad_seed = _widen(emit, seed, widened, constants) if emit.dtype(seed) in _NARROW else seed
    contributions: Dict[str, List[str]] = {score_tensor: [grad_seed]}
    totals = _backpropagate(ctx, path, contributions, set(targets), widened)

    gradients = {}
    for target in targets:
        total = totals.get(target) or _total(emit, contributions.get(target), target)
        if total is None:
            raise UnsupportedModelError(f"no gradient reaches tensor {target!r} from {score_name or score_tensor!r}")
        if total in known or total == seed:  # never expose a forward tensor under a gradient name
            total = emit.op("Identity", total, hint="grad")
        gradients[target] = total
        emit.infos[total] = _grad_info(infos.get(target))
    flush(emit, graph)
    return GradientGraph(model, gradients, seed, emit)


def _measure_fixed_sizes(model, analysis: GraphAnalysis, infos, path, constants) -> None:
    """A model whose inputs have fixed sizes apart from the batch has fixed feature-map sizes too,
    which shape inference loses behind padding computed at run time (TF-style "same" exports such
    as EfficientNet-Lite's). Measured once by running the model (the probe keeps as numbers only
    the sizes that do not vary with the batch), they let the rules emit static shapes: Conv's
    input gradient as a Conv with constant pads instead of a ConvTranspose followed by run-time
    Slice/Pad arithmetic."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits and not vi.name.startswith("onnxcam")]
    for vi in inputs:  # image-like inputs only: an integer input (Slice bounds...) may set sizes itself
        tensor = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        dims = list(tensor.shape.dim) if tensor is not None and tensor.HasField("shape") else []
        if (tensor is None or tensor.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
                or len(dims) < 3 or any(not d.HasField("dim_value") for d in dims[1:])):
            return
    batch_names = {vi.type.tensor_type.shape.dim[0].dim_param for vi in inputs} - {""}

    def is_loose(shape):  # a lost size, or a batch symbol shape inference made up instead of the input's
        return (any(not isinstance(d, int) for d in shape[1:])
                or (len(shape) > 0 and not isinstance(shape[0], int) and shape[0] not in batch_names))

    loose = sorted({t for n in path for t in list(n.input) + list(n.output)
                    if t and t not in constants and infos.get(t) is not None and infos[t].shape is not None
                    and is_loose(infos[t].shape)})
    if not loose:
        return
    # A forward copy (cam/sampling.py's samples) is measured through the tensors it copies: its
    # own names are not in the model, and its batch symbol is the copy's.
    origin = getattr(analysis, "copied_from", {})
    if origin:  # only the copied tensors: the rest of a copy's path is not this model's to measure
        loose = [name for name in loose if name in origin]
        if not loose:
            return
    originals = {name: origin.get(name, name) for name in loose}
    try:  # not analysis.probe: a failure here must not mark these tensors unmeasurable for later askers
        found = probe_infos(analysis.model, sorted(set(originals.values())) + [vi.name for vi in inputs])
    except Exception:  # measuring is an optimisation: the rules handle symbolic sizes too
        return
    # A size that varied in the probe gets the probe's symbol, the same for every tensor whose size
    # varied alike (so a residual Add sees equal batch sizes on both sides); the one that varied like
    # an input's batch takes that input's own name for it.
    rename = {}
    for vi in inputs:
        probed = found.get(vi.name)
        declared = list(vi.type.tensor_type.shape.dim)
        if probed is not None and probed.shape is not None and len(probed.shape) == len(declared):
            for d, p in zip(declared, probed.shape):
                if isinstance(p, str) and d.HasField("dim_param"):
                    rename.setdefault(p, d.dim_param)
    for name in loose:
        probed = found.get(originals[name])
        if probed is not None and probed.shape is not None:
            dims = tuple(rename.get(d, d) for d in probed.shape)
            if originals[name] != name:  # a copy keeps its own batch; it gains the sizes that are fixed
                own = infos[name].shape
                if len(own) != len(dims):
                    continue
                dims = (own[0],) + tuple(p if isinstance(p, int) else o for p, o in zip(dims[1:], own[1:]))
            infos[name] = TensorInfo(probed.dtype or infos[name].dtype, dims)


def _backpropagate(ctx: RuleContext, path, contributions: Dict[str, List[str]], targets: set,
                   widened: Dict[str, str]) -> Dict[str, str]:
    """Walk `path` backwards, turning each node's output gradients into its inputs' (and its
    bodies' captured tensors') contributions. Returns the gradients of targets that are produced
    on the path themselves (their contributions are consumed on the way)."""
    emit, active, constants = ctx.emit, ctx.active, ctx.constants
    totals: Dict[str, str] = {}
    for node_proto in reversed(path):
        view = NodeView(node_proto)
        grads_out = [_total(emit, contributions.pop(o, None), o) for o in view.outputs]
        for o, g in zip(view.outputs, grads_out):  # before the remap below renames the outputs
            if o in targets and g is not None:
                totals[o] = g
        narrow = [t for t in view.inputs + view.outputs if t and emit.info(t).dtype in _NARROW]
        if narrow:  # half-precision models: the backward pass runs in float32 on widened copies
            view.remap({t: _widen(emit, t, widened, constants) for t in narrow})
        if all(g is None for g in grads_out):
            continue
        rule = get_rule(view.op, ctx.mode)
        try:
            result = rule.fn(ctx, view, grads_out)
        except (NotImplementedError, KeyError) as exc:
            detail = exc.args[0] if exc.args else type(exc).__name__
            raise UnsupportedModelError(
                f"node {view.name or '(unnamed)'!r} ({view.op}, opset {ctx.opset}): cannot build its gradient: "
                f"{detail}. {_CUSTOM_HINT}") from None
        for i, g in _as_items(result, len(view.inputs)):
            name = i if isinstance(i, str) else view.original_input(i)  # a name: a body's capture
            if g is None or name is None or name not in active:
                continue
            if emit.info(g).shape is None:  # gradients are shaped like their tensors
                emit.infos[g] = _grad_info(emit.infos.get(name))
            contributions.setdefault(name, []).append(g)
    return totals


def _body_gradients(ctx: RuleContext, body, seeds: Dict[str, str], wrt: Sequence[str],
                    inputs: Optional[Dict[str, TensorInfo]] = None) -> Dict[str, Optional[str]]:
    """Inside a control-flow body's scope (the caller opens it with `emit.nested()`, after defining
    what the body's inputs need): the VJP nodes of `body`'s nodes for d(sum_j seed_j * output_j)/d(w),
    w in `wrt` (outer names the body reads, or the body's own inputs). `seeds` maps body output
    names to gradient tensors readable there. Returns each w's gradient, None where none reaches.
    The body's forward nodes are not emitted: the caller recomputes them in the same scope. Used by
    the If and Loop rules; nested bodies recurse through it. `inputs` types the body's inputs
    where its own declarations say too little (shapes inside it are then inferred again)."""
    nodes = topological(body)
    if inputs:
        inferred = infer_body_infos(body, ctx.opset_imports, ctx.emit.infos, inputs)
        for name, info in list(inputs.items()) + list(inferred.items()):
            known = ctx.emit.infos.get(name)
            if known is None or known.shape is None:
                ctx.emit.infos[name] = info
    constants = ChainMap(constant_values(body, nodes, ctx.opset_imports), ctx.constants)
    active = _forward_active(nodes, wrt, ctx.emit.infos)
    producers = {out: node for node in nodes for out in node.output if out}
    feeding = set()
    for output in seeds:
        feeding |= _feeds(output, producers)
    path = [n for n in nodes if any(o in active and o in feeding for o in n.output) and _touches(n, active)]
    _refuse_missing_rules(path, ctx.opset)
    inner = RuleContext(emit=ctx.emit, opset=ctx.opset, active=active, constants=constants,
                        body_gradients=ctx.body_gradients, opset_imports=ctx.opset_imports, mode=ctx.mode)
    contributions = {output: [g] for output, g in seeds.items()}
    totals = _backpropagate(inner, path, contributions, set(wrt), {})
    return {name: totals.get(name) or _total(ctx.emit, contributions.get(name), name) for name in wrt}


def needed_nodes(nodes, outputs: set) -> List[onnx.NodeProto]:
    """The nodes that `outputs` need, in their order (reads of nested bodies count)."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node_reads(node))
    return kept[::-1]


def new_emitter(model: onnx.ModelProto, infos: Optional[Dict[str, TensorInfo]] = None) -> Emitter:
    """An emitter for `model` at its own opset, knowing every tensor name already taken."""
    graph = model.graph
    taken = known_tensors(graph, graph.node) | {n.name for n in graph.node if n.name}
    return Emitter(default_opset(model), infos if infos is not None else infer_infos(model), taken)


def flush(emit: Emitter, graph) -> None:
    """Append what `emit` has accumulated to the graph (after every forward node: topological)."""
    graph.node.extend(emit.nodes)
    graph.initializer.extend(emit.initializers)
    emit.nodes, emit.initializers = [], []


def prune_unused(graph, first_new: int, first_new_initializer: int) -> int:
    """Remove onnxcam's own nodes (from index `first_new` on) and initializers (from
    `first_new_initializer` on) that no graph output needs; the user's are never touched. Rules ask for shapes they may not use, and a stray Shape on a forward
    tensor gives it a second consumer, which stops ONNX Runtime fusing Conv+Relu there.
    Returns how many nodes were removed."""
    needed = {o.name for o in graph.output}
    for node in graph.node[:first_new]:
        needed.update(node.input)
    new_nodes = list(graph.node[first_new:])
    kept = []
    for node in reversed(new_nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
            needed.update(captures(node))  # subgraphs read outer names too
    kept.reverse()
    del graph.node[first_new:]
    graph.node.extend(kept)
    inputs = {i.name for i in graph.input}
    unused = [t for t in graph.initializer[first_new_initializer:] if t.name not in needed and t.name not in inputs]
    for tensor in unused:
        graph.initializer.remove(tensor)
    return len(new_nodes) - len(kept)


# ---------------------------------------------------------------------- path finding
def _suggest(name, known) -> str:
    import difflib
    close = difflib.get_close_matches(name, sorted(known), n=3)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


def _differentiable_inputs(node: onnx.NodeProto) -> Sequence[int]:
    rule = get_rule(node.op_type)
    if rule is not None and rule.differentiable is not None:
        return [i for i in rule.differentiable if i < len(node.input)]
    return range(len(node.input))


def differentiable_reads(node: onnx.NodeProto) -> List[str]:
    """The tensors a gradient can flow to from `node`'s outputs: its differentiable inputs and the
    outer names its bodies read (for cam/layers.py's search of candidate layers as well)."""
    names = [node.input[i] for i in _differentiable_inputs(node) if node.input[i]]
    if node.attribute:
        names += sorted(captures(node) - set(names))
    return names


def _forward_active(nodes, targets, infos) -> set:
    """Floating-point tensors that depend on a target through differentiable inputs (or through
    outer names that a control-flow body reads)."""
    active = set(targets)
    for node in nodes:
        if node.op_type in ZERO_GRADIENT_OPS:
            continue
        if not _touches(node, active):
            continue
        for out in node.output:
            info = infos.get(out)
            if out and (info is None or info.dtype is None or info.is_float):
                active.add(out)
    return active


def _touches(node, active) -> bool:
    if any(node.input[i] in active for i in _differentiable_inputs(node) if node.input[i]):
        return True
    return bool(node.attribute) and any(name in active for name in captures(node))


def _feeds(score_tensor, producers) -> set:
    """Tensors the score depends on."""
    return ancestors([score_tensor], producers)


_QUANTIZED = {op: ": quantized op, explain the float model instead" for op in (
    "QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QuantizeLinear", "DynamicQuantizeLinear")}
_QUANTIZED.update({op: ": integer output, no gradient" for op in ("ArgMax", "ArgMin", "TopK", "NonMaxSuppression",
                                                                   "Cast", "NonZero")})


_CONTROL_FLOW = {
    "Scan": "control flow (the scan body reads the layer) is not differentiated; re-export with the scan "
            "unrolled (or as a Loop) or pick a layer after the Scan",
}


def _refuse_missing_rules(path, opset) -> None:
    problems = []
    for node in path:
        label = f"node {node.name or '(unnamed)'!r} ({node.domain + '::' if node.domain else ''}{node.op_type}, opset {opset})"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{label}: custom-domain op")
        elif node.op_type in ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QuantizeLinear",
                              "DequantizeLinear", "DynamicQuantizeLinear"):
            problems.append(f"{label}: quantized op; explain the float model instead")
        elif node.op_type in _CONTROL_FLOW and get_rule(node.op_type) is None:
            problems.append(f"{label}: {_CONTROL_FLOW[node.op_type]}")
        elif get_rule(node.op_type) is None:
            problems.append(f"{label}: no gradient rule")
    if problems:
        raise NotDifferentiableError(problems, hint=_CUSTOM_HINT)


# ---------------------------------------------------------------------- helpers
def _add_seed_input(graph, score_tensor, infos) -> str:
    info = infos.get(score_tensor) or TensorInfo(TensorProto.FLOAT, None)
    graph.input.append(make_value_info(SEED_INPUT, info))
    infos[SEED_INPUT] = info
    return SEED_INPUT


_NARROW = {TensorProto.FLOAT16, TensorProto.BFLOAT16}


def _grad_info(forward: Optional[TensorInfo]) -> TensorInfo:
    """Gradients are shaped like their tensor; half-precision ones are computed in float32."""
    if forward is None:
        return TensorInfo(None, None)
    return TensorInfo(TensorProto.FLOAT if forward.dtype in _NARROW else forward.dtype, forward.shape)


def _widen(emit: Emitter, name: str, widened: Dict[str, str], constants) -> str:
    """A float32 copy of a half-precision tensor (one per tensor), with its shape and value known."""
    if name not in widened:
        wide = emit.cast(name, TensorProto.FLOAT)
        emit.set_info(wide, TensorProto.FLOAT, emit.info(name).shape)
        if name in constants:
            constants[wide] = constants[name].astype(np.float32)
        widened[name] = wide
    return widened[name]


def _total(emit: Emitter, parts: Optional[List[str]], like: str) -> Optional[str]:
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    total = emit.op("Sum", *parts, hint="grad_sum")
    emit.infos[total] = _grad_info(emit.infos.get(like))
    return total


def _as_items(result, n_inputs):
    if result is None:
        return []
    if isinstance(result, dict):
        return list(result.items())
    return list(enumerate(result))[:n_inputs]
