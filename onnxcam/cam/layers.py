"""Choosing what to explain: the output (and its pre-softmax logits) and the target layers."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import onnx

from ..autodiff.analysis import GraphAnalysis
from ..autodiff.gradients import differentiable_reads
from ..autodiff.registry import ZERO_GRADIENT_OPS
from ..autodiff.shapes import TensorInfo
from ..errors import LayerNotFoundError, UnsupportedModelError, UsageError
from ..modelio import check_graph_structure, graph_errors, load_model

# Ops that turn logits into probabilities: by default we explain their input (the logit).
PROBABILITY_OPS = {"Softmax", "LogSoftmax", "Sigmoid"}
# Ops that only reshape on the way from those to the graph output.
PASS_THROUGH_OPS = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}


@dataclass(frozen=True)
class LayerInfo:
    name: str  # the tensor
    op: str  # the producing op type
    node: str  # the producing node's name
    shape: Tuple[object, ...]
    auto: bool = False
    reason: str = ""  # why the automatic choice was made (set on that one only)


def choose_output(model: onnx.ModelProto, output: Optional[str], infos: Dict[str, TensorInfo]) -> str:
    """The output to explain: the one named, or the only float 2-D graph output."""
    names = [o.name for o in model.graph.output]
    if output is not None:
        if output not in names:
            produced = {t for n in model.graph.node for t in n.output}
            if output in produced:
                return output  # an intermediate tensor is allowed too
            close = difflib.get_close_matches(output, names, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; outputs are {names}"
            raise LayerNotFoundError(f"output {output!r} is not in the model{hint}")
        return output
    candidates = [o for o in names if infos.get(o) and infos[o].is_float and infos[o].rank == 2]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates and len(names) == 1:
        return names[0]
    raise UsageError(f"the model has {len(names)} outputs ({', '.join(names)}); name the one to explain "
                     "with --output / output=")


def logits_for(analysis: GraphAnalysis, output: str) -> Tuple[str, List[str]]:
    """The pre-probability tensor behind `output` (through Identity/Reshape...), and the ops skipped.
    Returns (output, []) when the output is not produced by Softmax/LogSoftmax/Sigmoid."""
    producers = analysis.producers
    tensor, skipped = output, []
    while tensor in producers:
        node = producers[tensor]
        if node.op_type in PASS_THROUGH_OPS:
            skipped.append(node.op_type)
            tensor = node.input[0]
            continue
        if node.op_type in PROBABILITY_OPS:
            return node.input[0], skipped + [node.op_type]
        break
    return output, []


def differentiable_feeders(analysis: GraphAnalysis, score: str) -> set:
    """Tensors from which `score` is reached through differentiable inputs of ops."""
    producers, infos = analysis.producers, analysis.infos
    seen, stack = {score}, [score]
    while stack:
        node = producers.get(stack.pop())
        if node is None or node.op_type in ZERO_GRADIENT_OPS:
            continue
        for name in differentiable_reads(node):  # with the outer tensors If/Loop bodies read
            info = infos.get(name)
            if name and name not in seen and (info is None or info.dtype is None or info.is_float):
                seen.add(name)
                stack.append(name)
    return seen


def candidate_layers(analysis: GraphAnalysis, score: str) -> List[LayerInfo]:
    """Every 4-D float activation on a differentiable path to `score` outside attention, in graph
    order (with the token sequences of transformers and MLP-mixers), the automatic choice marked
    with its reason. Any tensor can still be named as a layer."""
    infos, nodes = analysis.infos, analysis.nodes
    feeders = differentiable_feeders(analysis, score)
    constants = analysis.constant_names() | analysis.initializers
    unknown = [o for n in nodes for o in n.output if o in feeders and o not in constants
               and (infos.get(o) is None or infos[o].shape is None)]
    if unknown:
        analysis.probe(unknown)  # listing is best-effort for tensors whose rank nothing can tell
    found, order = [], {}
    for index, node in enumerate(nodes):
        for out in node.output:
            order[out] = index
            info = infos.get(out)
            if out in feeders and out not in constants and info is not None and info.rank == 4 and info.is_float:
                found.append(LayerInfo(out, node.op_type, node.name, info.shape))
    inside = attention_internals(analysis)  # heads x tokens x dims: not listed, never chosen
    found = [l for l in found if l.name not in inside]
    auto, reason = auto_layer(found), SPATIAL_REASON
    tokens = token_layers(analysis, feeders)
    unsure = [l.name for l in tokens if not isinstance(l.shape[1], int)]
    if unsure:  # shape inference loses token counts after dynamic Reshapes: measure them
        if analysis.probe(unsure):
            tokens = token_layers(analysis, feeders)
    found = sorted(found + tokens, key=lambda l: order[l.name])
    mixers = token_mixers(analysis, feeders)
    blocks = _after(order, last_downsampling(analysis, feeders), tokens + channels_last_norms(analysis, feeders))
    chosen = (None, "")
    # A transformer or mixer ends in token blocks (perhaps seen as a map); a hybrid whose last
    # feature map is computed after its attention (MobileViT's fold and convolutions, EdgeNeXt's
    # channel attention) ends as a CNN.
    if blocks and (auto is None or order[blocks[-1].name] >= order[_viewed(analysis, auto)]):
        chosen = auto_attention_layer(analysis, blocks, mixers, feeders)
    if chosen[0] is None and tokens and (auto is None or order[tokens[-1].name] > order[auto]):
        chosen = auto_token_layer(analysis, tokens, mixers, feeders)
    if chosen[0] is not None:
        auto, reason = chosen
    return [LayerInfo(l.name, l.op, l.node, _shown(l.shape), l.name == auto, reason if l.name == auto else "")
            for l in found]


def _shown(shape) -> Tuple[object, ...]:
    """A shape for people: a dim measured by a probe run varies with the input (None), its
    internal symbol ('probe_1_2') means nothing to a reader."""
    return tuple(None if isinstance(d, str) and d.startswith("probe_") else d for d in shape)


_VIEW_OPS = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"}


def _viewed(analysis, tensor: str) -> str:
    """What a tensor is a mere re-view of (through Reshape/Transpose...): PVT's and CAFormer's
    stage outputs are their last tokens seen as [N, C, h, w], not a feature map computed later."""
    node = analysis.producers.get(tensor)
    while node is not None and node.op_type in _VIEW_OPS and node.input and node.input[0] in analysis.producers:
        tensor = node.input[0]
        node = analysis.producers.get(tensor)
    return tensor


SPATIAL_REASON = "the last spatial feature map (h, w > 1) on the way to the score, outside attention"


def _norm_outputs(nodes, producers, consumers, constants=frozenset()) -> Dict[str, onnx.NodeProto]:
    """Outputs of layer norms: the LayerNormalization op, the decomposed pattern
    (x - mean) / Sqrt(var + eps) [* gamma] [+ beta] that older exports write, and the affine
    norms of MLP-mixers (ResMLP's alpha * x + beta: a Mul and an Add by constants)."""
    found = {}
    for n in nodes:
        if n.op_type == "LayerNormalization":
            found[n.output[0]] = n
        elif n.op_type == "Div" and len(n.input) == 2 and getattr(producers.get(n.input[1]), "op_type", "") == "Sqrt":
            out, node = n.output[0], n
            for op in ("Mul", "Add"):  # gamma, then beta
                nxt = consumers.get(out, [])
                if len(nxt) == 1 and nxt[0].op_type == op:
                    node, out = nxt[0], nxt[0].output[0]
            found[out] = node
        elif n.op_type == "Mul" and any(i in constants for i in n.input) and not all(i in constants for i in n.input):
            nxt = consumers.get(n.output[0], [])
            if len(nxt) == 1 and nxt[0].op_type == "Add" and any(i in constants for i in nxt[0].input):
                found.setdefault(nxt[0].output[0], nxt[0])
    return found


def _block_outputs(analysis, constants) -> Dict[str, onnx.NodeProto]:
    """Residual sums x + f(x) of two activations of one shape: the outputs of blocks."""
    infos = analysis.infos
    found = {}
    for n in analysis.nodes:
        if n.op_type == "Add" and len(n.input) == 2 and not any(i in constants for i in n.input):
            shapes = [getattr(infos.get(t), "shape", None) for t in (*n.input, n.output[0])]
            if all(s is not None for s in shapes) and len({len(s) for s in shapes}) == 1 and all(
                    len({d for d in dims if isinstance(d, int)}) <= 1 for dims in zip(*shapes)):
                found[n.output[0]] = n  # same rank, no two known sizes differ (no broadcast)
    return found


def token_layers(analysis: GraphAnalysis, feeders) -> List[LayerInfo]:
    """Token activations [N, T, C] (T > 1) on the path to the score: norm outputs and block outputs."""
    out = []
    infos, order = analysis.infos, analysis.order
    constants = analysis.constant_names() | analysis.initializers
    outputs = _block_outputs(analysis, constants)
    outputs.update(_norm_outputs(analysis.nodes, analysis.producers, analysis.consumers, constants))
    inside = attention_internals(analysis)
    for name, node in outputs.items():
        info = infos.get(name)
        if (name in feeders and name not in inside and info is not None and info.rank == 3 and info.is_float
                and info.shape[1] != 1):
            out.append(LayerInfo(name, node.op_type, node.name, info.shape))
    return sorted(out, key=lambda l: order[l.name])


# Ops that move or rescale attention's operands without computing features.
_ATTENTION_GLUE = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Slice", "Split", "Gather", "Identity", "Cast",
                   "Softmax", "Mul", "Div", "Add", "Where", "Concat", "Expand"}


def attention_internals(analysis: GraphAnalysis) -> set:
    """Tensors inside attention: the operands and results of products of two activations
    (q @ k^T, attn @ v) and what only reshapes, splits, scales or masks them on the way — heads x
    tokens x dims tensors whose maps mean nothing. Linear layers and norms bound the region."""
    constants = analysis.constant_names() | analysis.initializers
    products = [n for n in analysis.nodes if n.op_type == "MatMul" and not any(i in constants for i in n.input)]
    inside, stack = set(), []
    for n in products:
        stack.extend(n.input)
        stack.extend(n.output)
    glue = _ATTENTION_GLUE
    while stack:
        tensor = stack.pop()
        if tensor in inside or tensor in constants or not tensor:
            continue
        inside.add(tensor)
        producer = analysis.producers.get(tensor)
        if producer is not None and producer.op_type in glue and not _joins_activations(producer, constants):
            stack.extend(producer.input)
        for consumer in analysis.consumers.get(tensor, []):
            if consumer.op_type in glue and not _joins_activations(consumer, constants):
                stack.extend(consumer.output)
    return inside


def _joins_activations(node, constants) -> bool:
    """An elementwise op of two activations (a residual sum): a block boundary, not glue."""
    return node.op_type in ("Add", "Mul", "Div", "Concat", "Where") and sum(
        1 for i in node.input if i and i not in constants) > 1


def token_mixers(analysis: GraphAnalysis, feeders) -> Dict[str, Tuple[str, str]]:
    """Nodes (by output) through which every token reaches the score, as (kind, description):
    "attention" (a Softmax whose query axis is longer than 1, unlike CaiT's class attention),
    "linear" (a Linear across the token axis, MLP-mixers) or "pooling" (a mean over tokens)."""
    constants = analysis.constant_names() | analysis.initializers
    infos = analysis.infos
    unsure = [n.output[0] for n in analysis.nodes if n.op_type == "Softmax" and n.output[0] in feeders
              and not isinstance(_axis(infos.get(n.output[0]), -2), int)]
    if unsure:  # is the query axis 1 (class attention)? Measure what inference lost.
        analysis.probe(unsure)
    found = {}
    for n in analysis.nodes:
        out = n.output[0] if n.output else ""
        if out not in feeders:
            continue
        shape = getattr(infos.get(n.input[0] if n.input else ""), "shape", None)
        if n.op_type == "Softmax":
            out_shape = getattr(infos.get(out), "shape", None)
            if out_shape is None or len(out_shape) < 3 or out_shape[-2] != 1:
                found[out] = ("attention", f"self-attention ({n.name or out})")
        elif n.op_type in ("ReduceMean", "ReduceSum", "ReduceMax") and shape is not None:
            axes = _reduce_axes(analysis, n)
            rank = len(shape)
            if axes is None or any(a % rank in range(1, rank - 1) for a in axes):
                found[out] = ("pooling", f"pooling over tokens ({n.name or out})")
        elif n.op_type in ("GlobalAveragePool", "GlobalMaxPool"):
            found[out] = ("pooling", f"pooling ({n.name or out})")
        elif n.op_type == "MatMul" and n.input[1] in constants:
            producer = analysis.producers.get(n.input[0])
            perm = next((list(a.ints) for a in producer.attribute if a.name == "perm"), None) if (
                producer is not None and producer.op_type == "Transpose") else None
            if perm is not None and len(perm) == 3 and perm[-1] == 1:
                found[out] = ("linear", f"a Linear across tokens ({n.name or out})")
    return found


def _axis(info, axis):
    shape = getattr(info, "shape", None)
    return shape[axis] if shape is not None and len(shape) >= abs(axis) else None


def _reduce_axes(analysis, node):
    for a in node.attribute:
        if a.name == "axes":
            return list(a.ints)
    if len(node.input) > 1 and node.input[1] in analysis.constants:
        return [int(v) for v in analysis.constants[node.input[1]].reshape(-1)]
    return None


def last_downsampling(analysis: GraphAnalysis, feeders) -> int:
    """Graph position of the last strided Conv or pooling on the path (the last patch embedding
    or downsampling): blocks after it work at the final resolution."""
    last = -1
    for index, n in enumerate(analysis.nodes):
        if n.op_type in ("Conv", "MaxPool", "AveragePool") and n.output[0] in feeders:
            strides = next((list(a.ints) for a in n.attribute if a.name == "strides"), [1])
            if any(s > 1 for s in strides):
                last = index
    return last


def channels_last_norms(analysis: GraphAnalysis, feeders) -> List[LayerInfo]:
    """Norm outputs [N, h, w, C] normalised over the last axis (timm's Swin works in NHWC)."""
    out = []
    for name, node in _norm_outputs(analysis.nodes, analysis.producers, analysis.consumers).items():
        info = analysis.infos.get(name)
        if (name in feeders and info is not None and info.rank == 4 and info.is_float
                and _attr_int(node, "axis", -1) in (-1, 3) and _spatial((0, 0) + tuple(info.shape[1:3]))):
            out.append(LayerInfo(name, node.op_type, node.name, info.shape))
    return out


def _attr_int(node, name, default):
    return next((a.i for a in node.attribute if a.name == name), default)


def _after(order, position, layers):
    return sorted((l for l in layers if order.get(l.name, -1) > position), key=lambda l: order[l.name])


def auto_attention_layer(analysis, norms: Sequence[LayerInfo], mixers, feeders) -> Tuple[Optional[str], str]:
    """The last norm output, at the final resolution, that feeds self-attention or a Linear across
    tokens: blocks[-1].norm1, pytorch-grad-cam's recipe for ViT and Swin (later tensors reach
    only the class token in a ViT; CaiT's class attention has one query and does not count)."""
    mixing = {t: m for t, m in mixers.items() if m[0] in ("attention", "linear")}
    reaching = _reaching(analysis, mixing, feeders)
    residuals = set(_block_outputs(analysis, analysis.constant_names() | analysis.initializers))
    for layer in reversed(norms):
        if layer.name not in residuals and layer.name in reaching:
            return layer.name, (f"the last block's norm output {_dims(layer.shape)} that feeds "
                                    f"{mixing[reaching[layer.name]][1]}: every token gets a gradient")
    return None, ""


def auto_token_layer(analysis: GraphAnalysis, tokens: Sequence[LayerInfo], mixers,
                     feeders) -> Tuple[Optional[str], str]:
    """Without a norm feeding attention (LeViT's BatchNorm'd Linears): the last norm or block
    output whose every token reaches the score through a token mixer (pooling counts)."""
    reaching = _reaching(analysis, mixers, feeders)
    for layer in reversed(tokens):
        if layer.name in reaching:
            what = "block output (residual sum)" if layer.op == "Add" else "norm output"
            return layer.name, (f"the last token {what} {_dims(layer.shape)} whose every token reaches the "
                                f"score, through {mixers[reaching[layer.name]][1]}")
    if not tokens:
        return None, ""
    return tokens[-1].name, f"the last token norm or block output {_dims(tokens[-1].shape)} (no token mixer after it)"


def _dims(shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else "?" for d in shape) + "]"


def _reaching(analysis, mixers, feeders) -> Dict[str, str]:
    """Tensor -> the first token mixer it feeds (graph order), for every tensor upstream of one."""
    reach: Dict[str, str] = {}
    for mixer in sorted(mixers, key=lambda t: analysis.order.get(t, 0)):
        stack = [mixer]
        while stack:
            tensor = stack.pop()
            node = analysis.producers.get(tensor)
            if node is None:
                continue
            for i in node.input:
                if i in feeders and i not in reach:
                    reach[i] = mixer
                    stack.append(i)
    return reach


def _spatial(shape) -> bool:
    return all(not isinstance(d, int) or d > 1 for d in shape[2:4])


def auto_layer(found: Sequence[LayerInfo]) -> Optional[str]:
    """The last spatial feature map (h, w > 1) before the pooling that feeds the score: in graph
    order it is the last such tensor, which is already the output of the block's activation."""
    spatial = [l for l in found if _spatial(l.shape)]
    return spatial[-1].name if spatial else None


def layers(model, output: Optional[str] = None, keep_probabilities: bool = False,
           name: Optional[str] = None) -> List[LayerInfo]:
    """Candidate target layers of a model (path or ModelProto), the automatic choice marked."""
    label = name or (os.fspath(model) if isinstance(model, (str, os.PathLike)) else "model")
    proto = load_model(model)
    check_graph_structure(proto, label)
    with graph_errors(proto, label):
        analysis = GraphAnalysis(proto)
        out = choose_output(proto, output, analysis.infos)
        score = out if keep_probabilities else logits_for(analysis, out)[0]
        return candidate_layers(analysis, score)


def resolve_layers(requested, candidates: List[LayerInfo], all_tensors: set, model_label: str = "model") -> List[str]:
    """Turn "auto", a name or a list of names into target tensor names, with clear errors."""
    if requested is None or requested == "auto" or requested == ["auto"]:
        auto = [l.name for l in candidates if l.auto]
        if not auto:
            raise UnsupportedModelError(
                f"{model_label}: found no 4-D feature map with spatial size > 1 on a differentiable path to the "
                "score; name a target tensor with --layer (see `onnxcam layers MODEL`)")
        return auto
    names = [requested] if isinstance(requested, str) else list(requested)
    for name in names:
        if name not in all_tensors:
            pool = [l.name for l in candidates] or sorted(all_tensors)
            close = difflib.get_close_matches(name, pool, n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "; see `onnxcam layers MODEL`"
            raise LayerNotFoundError(f"{model_label}: layer {name!r} is not a tensor of the model{hint}")
    return names
