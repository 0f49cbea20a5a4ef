"""Sampled methods: averages of gradients over noisy copies of the input or over a path from a
baseline, computed inside the graph (cam/sampling.py folds the samples into the batch axis and
chunks them in an ONNX Loop). The same wrappers captum composes (NoiseTunnel over a gradient
method, IntegratedGradients), applied to the input gradient or to the Grad-CAM family at layers.

Common options: ``samples`` (noisy copies) or ``steps`` (integration points);
``samples_per_chunk`` (samples per chunk of the batch, 0 = all at once: memory grows with it);
noise: ``noise_level`` (sigma = noise_level x (max - min) of each image, Smilkov et al.) or an
absolute ``noise_std``, ``noise`` ("random": in-graph RandomNormalLike with attribute ``seed``;
"input": the graph input ``onnxcam_noise`` [S, N, ...] of standard normal noise);
paths: ``rule`` (captum's gausslegendre, riemann_trapezoid/left/right/middle), ``baseline``
("zeros", "blur": Gaussian blur of sigma ``blur_sigma`` pixels, "input": the graph input
``onnxcam_baseline`` [N or 1, ...] shaped like the input).
"""

from __future__ import annotations

from typing import Optional

from onnx import TensorProto

from ..sampling import NOISE, PATH, Sampling, sampled_pass
from .input_space import magnitude_map, signed_map
from .maps import layer_maps
from .registry import Needs, map_method

COMPLETENESS_OUTPUT = "onnxcam_completeness"


def _noise(samples, noise_level, noise_std, noise, seed, samples_per_chunk) -> Sampling:
    return Sampling(NOISE, samples, samples_per_chunk, noise_level=noise_level, noise_std=noise_std, noise=noise,
                    seed=seed)


def _path(steps, rule, baseline, blur_sigma, samples_per_chunk) -> Sampling:
    return Sampling(PATH, steps, samples_per_chunk, rule=rule, baseline=baseline, blur_sigma=blur_sigma)


def _moments(ctx, method, sampling):
    p = sampled_pass(ctx, method, sampling, ("input_gradient", "input_gradient_sq"))
    return p.statistics["input_gradient"], p.statistics["input_gradient_sq"]


@map_method("smoothgrad", Needs(samples=NOISE))
def smoothgrad(ctx, samples: int = 16, noise_level: float = 0.15, noise_std: Optional[float] = None,
               noise: str = "random", seed: int = 0, samples_per_chunk: int = 8):
    """SmoothGrad (Smilkov et al. 2017; captum's NoiseTunnel "smoothgrad" over the gradient):
    mean over noisy copies of dS/dx; map max over channels of |.|, [0, 1]."""
    mean, _ = _moments(ctx, "smoothgrad", _noise(samples, noise_level, noise_std, noise, seed, samples_per_chunk))
    return magnitude_map(ctx, "smoothgrad", mean)


@map_method("smoothgrad-sq", Needs(samples=NOISE))
def smoothgrad_sq(ctx, samples: int = 16, noise_level: float = 0.15, noise_std: Optional[float] = None,
                  noise: str = "random", seed: int = 0, samples_per_chunk: int = 8):
    """SmoothGrad-Squared (captum's NoiseTunnel "smoothgrad_sq"): mean of (dS/dx)^2 over noisy
    copies; map max over channels, [0, 1]."""
    _, square = _moments(ctx, "smoothgrad-sq", _noise(samples, noise_level, noise_std, noise, seed,
                                                        samples_per_chunk))
    return magnitude_map(ctx, "smoothgrad-sq", square)


@map_method("vargrad", Needs(samples=NOISE))
def vargrad(ctx, samples: int = 16, noise_level: float = 0.15, noise_std: Optional[float] = None,
            noise: str = "random", seed: int = 0, samples_per_chunk: int = 8):
    """VarGrad (Adebayo et al. 2018; captum's NoiseTunnel "vargrad"): variance of dS/dx over noisy
    copies, mean(g^2) - mean(g)^2; map max over channels, [0, 1]."""
    e = ctx.emit
    mean, square = _moments(ctx, "vargrad", _noise(samples, noise_level, noise_std, noise, seed, samples_per_chunk))
    return magnitude_map(ctx, "vargrad", e.op("Sub", square, e.op("Mul", mean, mean)))


@map_method("integrated-gradients", Needs(samples=PATH), signed=True)
def integrated_gradients(ctx, steps: int = 32, rule: str = "gausslegendre", baseline: str = "zeros",
                         blur_sigma: float = 10.0, samples_per_chunk: int = 8):
    """Integrated Gradients (Sundararajan et al. 2017; captum's IntegratedGradients):
    (x - x') * sum_i w_i dS/dx(x' + a_i (x - x')); sum over channels, [-1, 1]. Also the output
    onnxcam_completeness__integrated-gradients [N]: sum(attribution) - (S(x) - S(x'))."""
    e = ctx.emit
    p = sampled_pass(ctx, "integrated-gradients", _path(steps, rule, baseline, blur_sigma, samples_per_chunk),
                     ("input_gradient",))
    attribution = e.op("Mul", e.op("Sub", ctx.input(), p.baseline), p.statistics["input_gradient"])
    total = e.reduce("ReduceSum", attribution, [1, 2, 3], keepdims=False)
    residual = e.op("Sub", total, e.op("Sub", p.input_score, p.baseline_score))
    ctx.expose(f"{COMPLETENESS_OUTPUT}__integrated-gradients", residual, TensorProto.FLOAT, (ctx.image.shape[0],))
    return signed_map(ctx, "integrated-gradients", attribution)


@map_method("smooth-gradcam++", Needs(activation=True, samples=NOISE, layers=True))
def smooth_gradcam_plus_plus(ctx, samples: int = 4, noise_std: Optional[float] = 0.3, noise_level: float = 0.15,
                             noise: str = "random", seed: int = 0, samples_per_chunk: int = 4):
    """Smooth Grad-CAM++ (Omeiza et al. 2019) as torchcam's SmoothGradCAMpp: D_p = mean over
    noisy copies of G^p; alpha = D2 / (2 D2 + sum_ij A D3 + 1e-8) with A at x; w_k = sum_ij alpha
    relu(G of the last copy); map sum_k w_k A_k of the last copy, then the CAM pipeline. Noise:
    torchcam's absolute std 0.3 unless noise_std=None (then noise_level)."""
    e = ctx.emit
    p = sampled_pass(ctx, "smooth-gradcam++", _noise(samples, noise_level, noise_std, noise, seed, samples_per_chunk),
                     ("layer_gradient_sq", "layer_gradient_cube", "layer_last"))
    raw = []
    for layer in ctx.layers:
        d2, d3 = p.statistics["layer_gradient_sq"][layer], p.statistics["layer_gradient_cube"][layer]
        last_a, last_g = p.statistics["layer_last"][layer]
        spread = e.reduce("ReduceSum", e.op("Mul", d3, ctx.activation(layer)), [2, 3], keepdims=True)
        alpha = e.op("Div", d2, e.op("Add", e.op("Add", e.op("Mul", d2, e.scalar(2.0, d2)), spread),
                                     e.scalar(1e-8, d2)))
        weights = e.reduce("ReduceSum", e.op("Mul", alpha, e.op("Relu", last_g)), [2, 3], keepdims=True)
        raw.append(e.reduce("ReduceSum", e.op("Mul", weights, last_a), [1], keepdims=True))
    return _cam(ctx, "smooth-gradcam++", raw)


@map_method("integrated-gradcam", Needs(samples=PATH, layers=True))
def integrated_gradcam(ctx, steps: int = 32, rule: str = "gausslegendre", baseline: str = "zeros",
                       blur_sigma: float = 10.0, samples_per_chunk: int = 8):
    """Integrated Grad-CAM (Sattarzadeh et al. 2021): sum_k sum_i w_i (A_k(x_i) - A_k(x'))
    mean_hw dS/dA_k(x_i) along x_i = x' + a_i (x - x'), then the CAM pipeline."""
    e = ctx.emit
    p = sampled_pass(ctx, "integrated-gradcam", _path(steps, rule, baseline, blur_sigma, samples_per_chunk),
                     ("layer_path",))
    raw = [e.reduce("ReduceSum", p.statistics["layer_path"][layer], [1], keepdims=True) for layer in ctx.layers]
    return _cam(ctx, "integrated-gradcam", raw)


def _cam(ctx, method, raw):
    """The shared CAM pipeline (ReLU, min-max, upsampling, multi-layer fuse) for raw layer maps."""
    fused, stacked = layer_maps(ctx.emit, raw, ctx.image)
    if stacked is not None:
        ctx.layer_maps[method] = stacked
    return fused
