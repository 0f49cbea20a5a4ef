"""Model-parameter randomisation, cascading from the top (Adebayo, Gilmer, Muelly, Goodfellow, Hardt &
Kim, "Sanity Checks for Saliency Maps", NeurIPS 2018, section 3.1).

The ONNX model's weight-bearing nodes (Conv, ConvTranspose, Gemm, MatMul with a constant operand,
and the scale/bias of normalisation layers) are taken in reverse graph order — the output layer
first. Stage k re-draws the constant weights of the top k of them (weights and biases, from a
normal distribution with the original tensor's standard deviation, seeded; running mean and
variance of BatchNormalization are left alone, so the network still computes), re-explains the same
images for the same class with the same method and layer, and compares each map with the original
one by Spearman rank correlation and SSIM. A method that explains the model should lose the
similarity quickly; one that still draws the same map on random weights is an edge detector.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import NonFiniteError
from .similarity import spearman, ssim

# op -> indices of its inputs that hold learned weights (when they are initializers)
WEIGHT_INPUTS: Dict[str, tuple] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
    "GroupNormalization": (1, 2),
}


@dataclass
class SanityStage:
    stage: int  # how many layers are randomised (from the top)
    node: str  # the deepest node randomised at this stage
    op: str
    spearman: np.ndarray  # [N]
    ssim: np.ndarray  # [N]


@dataclass
class SanityResult:
    layers: List[str] = field(default_factory=list)  # weight-bearing nodes, top first
    stages: List[SanityStage] = field(default_factory=list)


def weight_layers(proto: onnx.ModelProto) -> List[onnx.NodeProto]:
    """Weight-bearing nodes whose weights are initializers, output side first."""
    constants = {t.name for t in proto.graph.initializer}
    found = [node for node in proto.graph.node
             if any(i < len(node.input) and node.input[i] in constants for i in WEIGHT_INPUTS.get(node.op_type, ()))]
    return found[::-1]


def randomised_copy(proto: onnx.ModelProto, nodes: List[onnx.NodeProto], rng: np.random.Generator) -> onnx.ModelProto:
    """A copy of the model with the constant weights of `nodes` re-drawn.

    Each re-drawn weight gets its own new initializer and only that node's input is re-wired:
    exporters share one initializer between equal tensors (torch gives a fresh BatchNormalization's
    running variance as an Identity of its all-ones scale), and re-drawing the shared tensor would
    hand the normalisation a negative variance.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    originals = {t.name: t for t in copy.graph.initializer}
    targets = [node for node, original in zip(copy.graph.node, proto.graph.node)
               if any(original == wanted for wanted in nodes)]  # protobuf messages compare by value
    for k, node in enumerate(targets):
        for i in WEIGHT_INPUTS[node.op_type]:
            if i >= len(node.input) or node.input[i] not in originals:
                continue
            values = numpy_helper.to_array(originals[node.input[i]])
            if not np.issubdtype(values.dtype, np.floating):
                continue
            scale = float(values.std()) or float(np.abs(values).mean()) or 0.01
            fresh = rng.normal(0.0, scale, size=values.shape).astype(values.dtype)
            name = f"{node.input[i]}.randomised{k}"
            copy.graph.initializer.append(numpy_helper.from_array(fresh, name))
            node.input[i] = name
    used = {name for node in copy.graph.node for name in node.input} | {o.name for o in copy.graph.output}
    kept = [t for t in copy.graph.initializer if t.name in used]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    return copy


def stage_counts(n_layers: int, max_stages: Optional[int]) -> List[int]:
    """Which cumulative counts to evaluate: all 1..n, or max_stages of them spread evenly (n included)."""
    if not max_stages or max_stages >= n_layers:
        return list(range(1, n_layers + 1))
    picks = np.unique(np.round(np.linspace(1, n_layers, max_stages)).astype(int))
    return [int(k) for k in picks]


def cascading_randomisation(source, method: str, x: np.ndarray, original: np.ndarray, classes: np.ndarray,
                            max_stages: Optional[int] = None, seed: int = 0) -> SanityResult:
    """Spearman and SSIM of each image's map against `original` at every stage.

    `source` is a MapSource (maps.py) whose model is re-drawn; `original` are the maps of the
    untouched model for `classes`.
    """
    from ..modelio import load_model

    proto = load_model(source.model)
    layers = weight_layers(proto)
    result = SanityResult(layers=[n.name or n.op_type for n in layers])
    target_layers = list(source.explainer(method).layers)  # the same target tensor(s) at every stage
    layer = target_layers[0] if len(target_layers) == 1 else target_layers
    for k in stage_counts(len(layers), max_stages):
        rng = np.random.default_rng(seed + k)
        model = randomised_copy(proto, layers[:k], rng)
        try:
            from ..runtime import Explainer

            explainer = Explainer(model, layer=layer, method=method, output=source.output,
                                  providers=source.providers, target=source.target,
                                  target_options=source.target_options)
            maps = explainer(x, class_index=classes, batch_size=source.batch_size).cam
            rho = np.array([spearman(o, m) for o, m in zip(original, maps)])
            sim = np.array([ssim(o, m) for o, m in zip(original, maps)])
        except NonFiniteError:  # random weights overflowed: no map to compare
            rho = sim = np.full(len(x), np.nan)
        node = layers[k - 1]
        result.stages.append(SanityStage(stage=k, node=node.name or node.op_type, op=node.op_type,
                                         spearman=rho, ssim=sim))
    return result
