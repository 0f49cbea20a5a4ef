"""Second-generation gradient methods: NormGrad, FullGrad, Finer-CAM (and CF-CAM in cf_cam.py).

Each reads what its declaration names: NormGrad the layers' A and G; FullGrad the input gradient
and the gradients at every bias-carrying layer (cam/biases.py); Finer-CAM the layers' gradients
of its own comparison score (cam/seeds.py), from a backward pass of their own.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ...errors import UsageError
from .gradient_cams import gradcam
from .maps import NORMALISE_EPS, normalise, upsample
from .registry import Needs, layer_method, map_method

FLAT = 1e-30  # a constant map divided by this stays 0 instead of NaN
NORMGRAD_VARIANTS = ("norm", "selective")
NORMGRAD_COMBINATIONS = ("product", "mean")


@map_method("normgrad", Needs(activation=True, gradient=True))
def normgrad(ctx, variant="norm", combine="product"):
    """NormGrad (Rebuffi et al. 2020, "There and Back Again"): the norm of the gradient of a
    virtual 1x1 convolution's weights at each location, ||a_ij|| * ||g_ij|| over channels;
    variant "selective": ||relu(a_ij * g_ij)|| (TorchRay's norm_grad_selective). Each layer's map
    is upsampled (bilinear) and scaled by (m - min) / max; several layers are combined by their
    product (the authors' multi-layer combination) or, with combine="mean", pytorch-grad-cam's mean."""
    if variant not in NORMGRAD_VARIANTS:
        raise UsageError(f"normgrad variant must be one of {', '.join(NORMGRAD_VARIANTS)}; got {variant!r}")
    if combine not in NORMGRAD_COMBINATIONS:
        raise UsageError(f"normgrad combine must be one of {', '.join(NORMGRAD_COMBINATIONS)}; got {combine!r}")
    e = ctx.emit
    maps = []
    for layer in ctx.layers:
        A, G = ctx.activation(layer), ctx.gradient(layer)
        if variant == "norm":
            raw = e.op("Mul", _channel_norm(e, A), _channel_norm(e, G))
        else:
            raw = _channel_norm(e, e.op("Relu", e.op("Mul", A, G)))
        up = upsample(e, raw, ctx.image)
        shifted = e.op("Sub", up, e.reduce("ReduceMin", up, [1, 2, 3], keepdims=True))
        maps.append(e.op("Div", shifted, e.op("Add", e.reduce("ReduceMax", shifted, [1, 2, 3], keepdims=True),
                                               e.scalar(FLAT, shifted))))
    if len(maps) == 1:
        return maps[0]
    if combine == "mean":
        return normalise(e, e.reduce("ReduceMean", e.op("Concat", *maps, axis=1), [1], keepdims=True))
    product = maps[0]
    for m in maps[1:]:
        product = e.op("Mul", product, m)
    return product


@map_method("fullgrad", Needs(input_gradient=True, bias_gradients=True))
def fullgrad(ctx):
    """FullGrad (Srinivas & Fleuret 2019), pytorch-grad-cam's: |x * dS/dx| per input channel plus,
    for every Conv/BatchNorm with a bias b, sum_c |b_c * dS/dz_c|, each channel min-max scaled and
    upsampled to the input, all summed, then min-max scaled. (Upsampling is linear: the channel
    sum is taken before it, once per layer.)"""
    e = ctx.emit
    if not ctx.bias_gradients:
        raise UsageError("fullgrad found no Conv or BatchNormalization with a constant bias on the path to the score")
    terms = [e.reduce("ReduceSum", _scale_channels(e, e.op("Abs", e.op("Mul", ctx.input(), ctx.input_gradient()))),
                      [1], keepdims=True)]
    for gradient, bias in ctx.bias_gradients:
        b = e.const(np.asarray(bias, np.float32).reshape(1, -1, 1, 1), TensorProto.FLOAT)
        per_channel = _scale_channels(e, e.op("Abs", e.op("Mul", gradient, b)))
        summed = e.set_info(e.reduce("ReduceSum", per_channel, [1], keepdims=True), TensorProto.FLOAT, [None, 1, None, None])
        terms.append(upsample(e, summed, ctx.image))
    total = terms[0] if len(terms) == 1 else e.op("Sum", *terms)
    return normalise(e, total)


@layer_method("finercam", needs=Needs(activation=True, gradient=True, seed="finer"))
def finercam(emit, A, G, alpha=1.0, comparison_categories=(1, 2, 3)):
    """Finer-CAM (Zhang et al. 2025, pytorch-grad-cam's FinerCAM over GradCAM): Grad-CAM of the
    score sum_k p_k (z_c - alpha z_k) / sum_k p_k against the classes k whose logits are nearest
    to the explained class's (positions `comparison_categories` in that order); options alpha
    and comparison_categories are read by that score (cam/seeds.py)."""
    return gradcam(emit, A, G)


# ---------------------------------------------------------------------- pieces
def _channel_norm(e, x):
    """||x||_2 over the channel axis: [N, 1, h, w]."""
    return e.op("Sqrt", e.reduce("ReduceSum", e.op("Mul", x, x), [1], keepdims=True))


def _scale_channels(e, x):
    """pytorch-grad-cam's scale_accross_batch_and_channels: each [h, w] plane to [0, 1]."""
    shifted = e.op("Sub", x, e.reduce("ReduceMin", x, [2, 3], keepdims=True))
    return e.op("Div", shifted, e.op("Add", e.reduce("ReduceMax", shifted, [2, 3], keepdims=True),
                                     e.scalar(NORMALISE_EPS, shifted)))
