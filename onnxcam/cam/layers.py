"""Choosing what to explain: the output (and its pre-softmax logits) and the target layers."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import onnx

from ..autodiff.analysis import GraphAnalysis
from ..autodiff.gradients import _differentiable_inputs
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
        for i in _differentiable_inputs(node):
            name = node.input[i]
            info = infos.get(name)
            if name and name not in seen and (info is None or info.dtype is None or info.is_float):
                seen.add(name)
                stack.append(name)
    return seen


def candidate_layers(analysis: GraphAnalysis, score: str) -> List[LayerInfo]:
    """Every 4-D float activation on a differentiable path to `score`, in graph order, the
    automatic choice marked."""
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
    auto = auto_layer(found)
    tokens = token_layers(analysis, feeders)
    unsure = [l.name for l in tokens if not isinstance(l.shape[1], int)]
    if unsure:  # shape inference loses token counts after dynamic Reshapes: measure them
        if analysis.probe(unsure):
            tokens = token_layers(analysis, feeders)
    if tokens and (auto is None or order[tokens[-1].name] > order[auto]):
        # A transformer: attention follows the last feature map (the patch embedding).
        found = sorted(found + tokens, key=lambda l: order[l.name])
        auto = auto_token_layer(analysis, tokens, feeders) or auto
    return [LayerInfo(l.name, l.op, l.node, l.shape, l.name == auto) for l in found]


def _norm_outputs(nodes, producers, consumers) -> Dict[str, onnx.NodeProto]:
    """Outputs of layer norms: the LayerNormalization op, or the decomposed pattern
    (x - mean) / Sqrt(var + eps) [* gamma] [+ beta] that older exports write."""
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
    return found


def token_layers(analysis: GraphAnalysis, feeders) -> List[LayerInfo]:
    """Token activations [N, T, C] (T > 1) produced by a layer norm on the path to the score."""
    out = []
    infos, order = analysis.infos, analysis.order
    for name, node in _norm_outputs(analysis.nodes, analysis.producers, analysis.consumers).items():
        info = infos.get(name)
        if name in feeders and info is not None and info.rank == 3 and info.is_float and info.shape[1] != 1:
            out.append(LayerInfo(name, node.op_type, node.name, info.shape))
    return sorted(out, key=lambda l: order[l.name])


def auto_token_layer(analysis: GraphAnalysis, tokens: Sequence[LayerInfo], feeders) -> Optional[str]:
    """The last norm output that still feeds an attention Softmax: its every token gets a gradient
    (pytorch-grad-cam's ViT recipe uses blocks[-1].norm1; later norms only see the class token)."""
    consumers = analysis.consumers
    for layer in reversed(tokens):
        seen, stack = {layer.name}, [layer.name]
        while stack:
            for node in consumers.get(stack.pop(), []):
                if node.op_type == "Softmax" and node.output[0] in feeders:
                    return layer.name
                for o in node.output:
                    if o not in seen and o in feeders:
                        seen.add(o)
                        stack.append(o)
    return tokens[-1].name if tokens else None


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
