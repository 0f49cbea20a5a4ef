"""Input-space methods: maps at the input's resolution read from the gradient at the input.

Each method computes an *attribution* shaped like the input ([N, C, H, W] float32, what captum's
``attribute`` returns) and reduces it to one map per image for display:
- unsigned methods (saliency): max over channels of |attribution|, divided by its per-image
  maximum: [0, 1], as the Grad-CAM family;
- signed methods (gradient, input-x-gradient, guided backprop, deconvnet, Guided Grad-CAM):
  the sum over channels (the first-order contribution of each pixel to the score, so the sign
  and the zero level mean something), divided by its per-image max |.|: [-1, 1].
The attribution itself is also a graph output, ``onnxcam_attribution__<method>`` (float32, in
the input's layout and shape), for comparisons with captum and for users who want the channels.

Modified backward passes (guided backprop, deconvnet) are rule modes of the autodiff registry
(autodiff/rules/modes.py): they change the backward of ``Relu`` nodes only, as captum and
pytorch-grad-cam do; Clip (ReLU6), LeakyRelu, HardSwish, SiLU and every other op keep their true
gradient.
"""

from __future__ import annotations

from onnx import TensorProto

from ...autodiff.rules.modes import DECONVNET, GUIDED
from .gradient_cams import gradcam
from .maps import NORMALISE_EPS, scale_by_max_abs, upsample
from .registry import Needs, map_method

ATTRIBUTION_OUTPUT = "onnxcam_attribution"


def attribution_output(method: str) -> str:
    return f"{ATTRIBUTION_OUTPUT}__{method}"


def expose_attribution(ctx, method: str, attribution: str) -> None:
    """Expose a float32 NCHW attribution as ``onnxcam_attribution__<method>`` in the input's layout."""
    e, image = ctx.emit, ctx.image
    laid_out = attribution if image.layout == "NCHW" else e.op("Transpose", attribution, perm=[0, 2, 3, 1])
    ctx.expose(attribution_output(method), laid_out, TensorProto.FLOAT, image.shape)


def signed_map(ctx, method: str, attribution: str) -> str:
    """Expose the attribution; the map is its sum over channels scaled by max |.| to [-1, 1]."""
    expose_attribution(ctx, method, attribution)
    e = ctx.emit
    return scale_by_max_abs(e, e.reduce("ReduceSum", attribution, [1], keepdims=True))


def magnitude_map(ctx, method: str, attribution: str) -> str:
    """Expose the attribution; the map is max over channels of |.| scaled by its maximum to [0, 1]."""
    expose_attribution(ctx, method, attribution)
    e = ctx.emit
    magnitude = e.reduce("ReduceMax", e.op("Abs", attribution), [1], keepdims=True)
    top = e.reduce("ReduceMax", magnitude, [1, 2, 3], keepdims=True)
    return e.op("Div", magnitude, e.op("Add", top, e.scalar(NORMALISE_EPS, magnitude)))


@map_method("saliency", Needs(input_gradient=True))
def saliency(ctx):
    """Saliency (Simonyan et al. 2014): max over channels of |dS/dx|, as captum's Saliency with
    abs=True reduced for display; scaled per image by its maximum to [0, 1]."""
    return magnitude_map(ctx, "saliency", ctx.emit.op("Abs", ctx.input_gradient()))


@map_method("gradient", Needs(input_gradient=True), signed=True)
def gradient(ctx):
    """Gradient (signed dS/dx, captum's Saliency with abs=False): sum over channels, scaled by
    max |.| to [-1, 1]."""
    return signed_map(ctx, "gradient", ctx.input_gradient())


@map_method("input-x-gradient", Needs(input_gradient=True), signed=True)
def input_x_gradient(ctx):
    """Input x gradient (Shrikumar et al. 2016, captum's InputXGradient): x * dS/dx, sum over
    channels, scaled by max |.| to [-1, 1]."""
    return signed_map(ctx, "input-x-gradient", ctx.emit.op("Mul", ctx.input(), ctx.input_gradient()))


@map_method("guided-backprop", Needs(input_gradient=True, rule_mode=GUIDED), signed=True)
def guided_backprop(ctx):
    """Guided backpropagation (Springenberg et al. 2015, captum's GuidedBackprop): at every Relu
    only positive gradients of active units pass back; sum over channels, [-1, 1]."""
    return signed_map(ctx, "guided-backprop", ctx.input_gradient(GUIDED))


@map_method("deconvnet", Needs(input_gradient=True, rule_mode=DECONVNET), signed=True)
def deconvnet(ctx):
    """Deconvnet (Zeiler & Fergus 2014, as Springenberg et al. and captum's Deconvolution): at
    every Relu the gradient's positive part passes back, whatever the forward sign; sum over
    channels, [-1, 1]."""
    return signed_map(ctx, "deconvnet", ctx.input_gradient(DECONVNET))


@map_method("guided-gradcam", Needs(activation=True, gradient=True, gradient_mean=True, input_gradient=True,
                                    rule_mode=GUIDED), signed=True)
def guided_gradcam(ctx):
    """Guided Grad-CAM (Selvaraju et al. 2017, as captum's GuidedGradCam): guided backpropagation
    times the Grad-CAM map relu(sum_k w_k A_k) upsampled bilinearly to the input, per channel
    (the mean over layers of each layer's map scaled by its maximum); sum over channels, [-1, 1]."""
    e = ctx.emit
    cams = []
    for layer in ctx.layers:
        cam = e.op("Relu", gradcam(e, ctx.activation(layer), ctx.gradient(layer)))
        # Scaled by its maximum (a positive factor per image; the max |.| scaling of the map
        # removes it): layers of different magnitudes weigh alike in the mean over layers.
        top = e.op("Max", e.reduce("ReduceMax", cam, [1, 2, 3], keepdims=True), e.scalar(1e-30, cam))
        cam = e.op("Div", cam, top)
        cams.append(upsample(e, cam, ctx.image))
    cam = cams[0] if len(cams) == 1 else e.reduce("ReduceMean", e.op("Concat", *cams, axis=1), [1], keepdims=True)
    return signed_map(ctx, "guided-gradcam", e.op("Mul", ctx.input_gradient(GUIDED), cam))
