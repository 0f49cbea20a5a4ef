"""The bias-carrying tensors of a graph, for FullGrad's bias-gradients.

FullGrad (Srinivas & Fleuret 2019; pytorch-grad-cam's FullGrad) sums, over every layer with a
bias b, |b * dS/dz| where z is that layer's output. pytorch-grad-cam takes torch's Conv2d layers
with a bias and its BatchNorm2d layers (bias = beta - mean * gamma / sqrt(var + eps), the bias of
the affine map the layer computes in inference). An ONNX exporter folds a BatchNorm that follows
a bias-free Conv into that Conv's weights and bias: the folded Conv's output is the BatchNorm's
output and its bias is exactly the BatchNorm's effective bias, so the same term is found either
way. (A Conv *with* its own bias followed by a BatchNorm is two terms in torch and one folded term
in the export: the one case where the two differ.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np


@dataclass(frozen=True)
class Bias:
    output: str  # the layer's output tensor z
    bias: np.ndarray  # [C] float32, the bias along z's channel axis (1)


def bias_tensors(analysis) -> List[Bias]:
    """Conv nodes with a constant bias and inference BatchNormalization nodes, in graph order."""
    constants = analysis.constants
    found: List[Bias] = []
    for node in analysis.nodes:
        if node.op_type == "Conv" and len(node.input) > 2 and node.input[2] in constants:
            found.append(Bias(node.output[0], np.asarray(constants[node.input[2]], np.float32).reshape(-1)))
        elif node.op_type == "BatchNormalization" and all(i in constants for i in node.input[1:5]):
            scale, beta, mean, var = (np.asarray(constants[i], np.float64) for i in node.input[1:5])
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            found.append(Bias(node.output[0], (beta - mean * scale / np.sqrt(var + eps)).astype(np.float32)))
    return found
