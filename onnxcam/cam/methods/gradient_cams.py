"""The Grad-CAM family: channel weightings of one layer's activations A by its gradients G.

Each method returns the raw map [N, 1, h, w] before ReLU/normalisation (A and G are float32
[N, C, h, w]); the shared CAM pipeline owns the rest. Formulas follow pytorch-grad-cam, so maps
agree numerically with it.
"""

from __future__ import annotations

from dataclasses import replace

from .registry import LAYER_NEEDS, layer_method

SPATIAL = [2, 3]


def weighted_sum(emit, weights, A):
    """sum_k w_k A_k over channels, keeping a channel axis of 1: [N, 1, h, w]."""
    return emit.reduce("ReduceSum", emit.op("Mul", weights, A), [1], keepdims=True)


@layer_method("gradcam", needs=replace(LAYER_NEEDS, gradient_mean=True))
def gradcam(emit, A, G):
    """Grad-CAM (Selvaraju et al. 2017): w_k = mean_ij G_kij."""
    return weighted_sum(emit, emit.reduce("ReduceMean", G, SPATIAL, keepdims=True), A)


@layer_method("gradcam++")
def gradcam_plus_plus(emit, A, G):
    """Grad-CAM++ (Chattopadhay et al. 2018), eq. 19: alpha = G^2 / (2 G^2 + sum_ij(A) G^3 + eps),
    alpha = 0 where G = 0; w_k = sum_ij relu(G) alpha."""
    g2 = emit.op("Mul", G, G)
    g3 = emit.op("Mul", g2, G)
    sum_a = emit.reduce("ReduceSum", A, SPATIAL, keepdims=True)
    denominator = emit.op("Add", emit.op("Add", emit.op("Mul", g2, emit.scalar(2.0, G)), emit.op("Mul", sum_a, g3)),
                          emit.scalar(1e-6, G))
    alpha = emit.op("Div", g2, denominator)
    zero = emit.scalar(0.0, G)
    alpha = emit.op("Where", emit.op("Equal", G, zero), zero, alpha)
    weights = emit.reduce("ReduceSum", emit.op("Mul", emit.op("Relu", G), alpha), SPATIAL, keepdims=True)
    return weighted_sum(emit, weights, A)


@layer_method("xgradcam")
def xgradcam(emit, A, G):
    """XGrad-CAM (Fu et al. 2020): w_k = sum_ij G A / (sum_ij A + eps)."""
    sum_a = emit.reduce("ReduceSum", A, SPATIAL, keepdims=True)
    normalised = emit.op("Div", emit.op("Mul", G, A), emit.op("Add", sum_a, emit.scalar(1e-7, A)))
    return weighted_sum(emit, emit.reduce("ReduceSum", normalised, SPATIAL, keepdims=True), A)


@layer_method("hirescam")
def hirescam(emit, A, G):
    """HiResCAM (Draelos & Carin 2020): sum_k G_k * A_k, element-wise, no spatial averaging."""
    return emit.reduce("ReduceSum", emit.op("Mul", G, A), [1], keepdims=True)


@layer_method("gradcam-elementwise")
def gradcam_elementwise(emit, A, G):
    """Grad-CAM element-wise (pytorch-grad-cam's GradCAMElementWise): sum_k relu(G_k * A_k)."""
    return emit.reduce("ReduceSum", emit.op("Relu", emit.op("Mul", G, A)), [1], keepdims=True)


@layer_method("layercam")
def layercam(emit, A, G):
    """LayerCAM (Jiang et al. 2021): sum_k relu(G_k) * A_k."""
    return emit.reduce("ReduceSum", emit.op("Mul", emit.op("Relu", G), A), [1], keepdims=True)

