"""Sampling inside the graph: gradients over noisy copies of the input (SmoothGrad, Smooth
Grad-CAM++) or over points on a path from a baseline (Integrated Gradients, Integrated Grad-CAM),
folded into the batch axis.

A *pass* runs a copy of the forward graph (autodiff/clone.py) on S samples of every image, the
samples of a chunk stacked sample-major into one batch [k*N, ...], differentiates the copy (the
same target selection as on the original images: the seed of the class, box or pixels chosen on
x, repeated per sample) and reduces what the methods asked for over the samples with weights w_s
(1/S for noise; the quadrature weights of the integration rule for paths). With more samples than
`samples_per_chunk` the chunks run in an ONNX Loop, so memory stays that of one chunk: plain ONNX
Runtime needs no Python loop. Models with a fixed batch size run one sample per chunk.

Reproducible noise: standard normal noise either comes from the graph input ``onnxcam_noise``
([S, N, ...] in the input's layout and shape; option noise="input"), so tests feed the very noise
a reference used, or from RandomNormalLike with a fixed seed attribute (noise="random", the
default: a fresh session draws the same sequence; successive runs draw new noise).

Statistics a method can ask for (reduced over samples, per image):
  input_gradient       sum_s w_s g_s                  [N, C, H, W] float32 NCHW (g = dS/dx at the sample)
  input_gradient_sq    sum_s w_s g_s^2                [N, C, H, W]
  layer_gradient_sq    sum_s w_s G_s^2  (per layer)   [N, C, h, w] (G = dS/dA at the sample)
  layer_gradient_cube  sum_s w_s G_s^3  (per layer)
  layer_last           (A, G) of the last sample      (per layer)
  layer_path           sum_s w_s (A_s - A') * mean_hw G_s  (per layer; A' = A at the baseline)
Several methods asking for the same sampling and statistics share one pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..autodiff.clone import clone_forward, fixed_batch
from ..autodiff.emitter import Emitter
from ..autodiff.gradients import add_gradients, flush
from ..autodiff.registry import STANDARD
from ..errors import UsageError
from .spatial import activation_layout, to_nchw

NOISE, PATH = "noise", "path"
NOISE_INPUT = "onnxcam_noise"
BASELINE_INPUT = "onnxcam_baseline"
RULES = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")
BASELINES = ("zeros", "blur", "input")
STATISTICS = ("input_gradient", "input_gradient_sq", "layer_gradient_sq", "layer_gradient_cube", "layer_last",
              "layer_path")
SAMPLE_DIM = "onnxcam_samples"  # the symbolic batch of a chunk, k*N


@dataclass(frozen=True)
class Sampling:
    """How to sample; equal Samplings (with equal statistics) share one pass."""

    kind: str  # NOISE or PATH
    samples: int  # noisy copies, or integration steps
    samples_per_chunk: int = 0  # 0: all samples in one chunk
    # noise: sigma = noise_std if given, else noise_level * (max - min) of each image
    noise_level: float = 0.15
    noise_std: Optional[float] = None
    noise: str = "random"  # or "input": the graph input onnxcam_noise
    seed: int = 0
    # path: the integration rule and the baseline
    rule: str = "gausslegendre"
    baseline: str = "zeros"  # zeros, blur (Gaussian, blur_sigma pixels) or input (onnxcam_baseline)
    blur_sigma: float = 10.0

    def check(self, method: str) -> None:
        def bad(what):
            raise UsageError(f"method {method!r}: {what}")
        if not isinstance(self.samples, int) or self.samples < (2 if self.rule.startswith("riemann") else 1):
            bad(f"samples/steps must be an integer >= {2 if self.rule.startswith('riemann') else 1}, got {self.samples!r}")
        if not isinstance(self.samples_per_chunk, int) or self.samples_per_chunk < 0:
            bad(f"samples_per_chunk must be an integer >= 0 (0: all at once), got {self.samples_per_chunk!r}")
        if self.kind == NOISE:
            if self.noise not in ("random", "input"):
                bad(f"noise must be 'random' or 'input', got {self.noise!r}")
            if self.noise_std is None and not self.noise_level >= 0:
                bad(f"noise_level must be >= 0, got {self.noise_level!r}")
            if self.noise_std is not None and not self.noise_std >= 0:
                bad(f"noise_std must be >= 0, got {self.noise_std!r}")
        else:
            if self.rule not in RULES:
                bad(f"unknown integration rule {self.rule!r}; rules are {', '.join(RULES)}")
            if self.baseline not in BASELINES:
                bad(f"unknown baseline {self.baseline!r}; baselines are {', '.join(BASELINES)}")
            if self.baseline == "blur" and not self.blur_sigma > 0:
                bad(f"blur_sigma must be > 0, got {self.blur_sigma!r}")


@dataclass
class SampledPass:
    """What a pass built: statistics by name (per layer for the layer_* ones), the baseline."""

    statistics: Dict[str, object] = field(default_factory=dict)
    baseline: Optional[str] = None  # PATH: the baseline, float32 NCHW [N, C, H, W]
    baseline_score: Optional[str] = None  # PATH: S(baseline) [N] float32
    input_score: Optional[str] = None  # PATH: S(x) [N] float32, computed like S(baseline)


def path_rule(rule: str, steps: int) -> Tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) of captum's approximation methods, exactly: Gauss-Legendre on [0, 1], or
    Riemann sums with step 1/n (captum's trapezoid halves the first and last of those: its weights
    sum to (n - 1)/n, not 1)."""
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (x + 1.0), 0.5 * w
    n = steps
    weights = np.full(n, 1.0 / n)
    if rule == "riemann_trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
        alphas = np.linspace(0.0, 1.0, n)
    elif rule == "riemann_left":
        alphas = np.linspace(0.0, 1.0 - 1.0 / n, n)
    elif rule == "riemann_right":
        alphas = np.linspace(1.0 / n, 1.0, n)
    else:
        alphas = np.linspace(1.0 / (2 * n), 1.0 - 1.0 / (2 * n), n)
    return alphas, weights


def adaptive_rule(probe: np.ndarray, nodes: int, floor: float = 0.25, placement: str = "mid"
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) of the input-adaptive rule from a forward-only probe of S along the path:
    probe[i] = S(x' + (i/M)(x - x')), i = 0..M. The density on probe cell i is
    (1 - floor) |S_{i+1} - S_i| / sum |dS| + floor / M (the change of S equidistributed, plus a
    uniform floor so flat stretches keep nodes); its CDF F is piecewise linear on the probe grid.
    The partition b_j = F^-1(j / nodes) gives one node per interval, weight b_{j+1} - b_j (weights
    sum to 1): placement "mid" puts it at (b_j + b_{j+1}) / 2, "cdfmid" at F^-1((j + 1/2) / nodes).
    The estimate stays sum_j w_j grad S(a_j) . (x - x'), a midpoint rule on a non-uniform
    partition: nothing is rescaled to match S(x) - S(x')."""
    probe = np.asarray(probe, np.float64)
    m = len(probe) - 1
    change = np.abs(np.diff(probe))
    total = change.sum()
    share = change / total if total > 0 else np.full(m, 1.0 / m)
    density = (1.0 - floor) * share + floor / m
    cdf = np.concatenate([[0.0], np.cumsum(density)])
    cdf /= cdf[-1]
    grid = np.arange(m + 1) / m

    def inverse(q):
        return np.interp(q, cdf, grid)
    bounds = inverse(np.arange(nodes + 1) / nodes)
    bounds[0], bounds[-1] = 0.0, 1.0
    weights = np.diff(bounds)
    if placement == "mid":
        alphas = 0.5 * (bounds[:-1] + bounds[1:])
    elif placement == "cdfmid":
        alphas = inverse((np.arange(nodes) + 0.5) / nodes)
    else:
        raise ValueError(f"unknown placement {placement!r}")
    return alphas, weights


def sampled_pass(ctx, method: str, sampling: Sampling, statistics: Tuple[str, ...]) -> SampledPass:
    """The pass for `sampling` computing `statistics`, built once per model and shared."""
    sampling.check(method)
    unknown = set(statistics) - set(STATISTICS)
    if unknown:
        raise ValueError(f"unknown sampling statistics {sorted(unknown)}")
    key = (sampling, tuple(sorted(statistics)))
    if key not in ctx.samplers:
        ctx.samplers[key] = _build_pass(ctx, method, sampling, tuple(sorted(statistics)))
    return ctx.samplers[key]


# ---------------------------------------------------------------------- the pass
def _build_pass(ctx, method, sampling: Sampling, statistics) -> SampledPass:
    e, image = ctx.emit, ctx.image
    at = _score_at(ctx)
    layers = list(ctx.layers) if any(s.startswith("layer_") for s in statistics) else []
    result = SampledPass()
    x = e.as_float32(image.name)  # the input in its own layout, float32
    per_image = [1, 2, 3]
    if sampling.kind == NOISE:
        n_samples = sampling.samples
        weights = np.full(n_samples, 1.0 / n_samples)
        if sampling.noise_std is not None:
            sigma = e.scalar(float(sampling.noise_std), x)
        else:
            spread = e.op("Sub", e.reduce("ReduceMax", x, per_image), e.reduce("ReduceMin", x, per_image))
            sigma = e.op("Mul", spread, e.scalar(float(sampling.noise_level), x))  # [N, 1, 1, 1]
        noise = _noise_input(ctx, method, sampling) if sampling.noise == "input" else None
        alphas = None
        baseline = None
    else:
        alphas_np, weights = path_rule(sampling.rule, sampling.samples)
        n_samples = len(alphas_np)
        alphas = e.const(alphas_np.astype(np.float32), TensorProto.FLOAT)
        baseline = _baseline(ctx, method, sampling, x)
        result.baseline = _nchw(e, baseline, image)
        result.baseline_score, baseline_layers = _baseline_forward(ctx, at, baseline, layers)
        seeded = ctx.seeded
        result.input_score = e.squeeze(e.as_float32(at(e, e.unsqueeze(seeded, [0]))[1]), [0])
    weights_t = e.const(np.asarray(weights, np.float32), TensorProto.FLOAT)

    chunk = sampling.samples_per_chunk or n_samples
    if fixed_batch(image.shape) is not None:
        chunk = 1  # a fixed batch cannot grow: one sample (N images) per chunk
    chunk = min(chunk, n_samples)
    chunks = -(-n_samples // chunk)

    def body(b: Emitter, start: Optional[str], model) -> List[Tuple[str, str]]:
        """The work of one chunk (samples start..start+chunk, or all when start is None), emitted
        through `b` into `model`: [(statistic key, partial sum over the chunk's samples [N, ...])]."""
        def take(t):
            if start is None:
                return t
            return b.op("Slice", t, start, b.op("Add", start, b.ints([chunk])), b.ints([0]))
        w = take(weights_t)  # [k]
        k = b.shape(w)  # [1]: k samples in this chunk
        if sampling.kind == NOISE:
            frame = b.op("Concat", k, b.shape(x), axis=0)  # [k, N, ...]
            if noise is not None:
                eps = b.as_float32(take(noise))
            else:
                eps = b.op("RandomNormalLike", b.op("Expand", x, frame), dtype=TensorProto.FLOAT,
                           seed=float(sampling.seed))
            samples = b.op("Add", b.unsqueeze(x, [0]), b.op("Mul", b.unsqueeze(sigma, [0]), eps))
        else:
            a = b.reshape(take(alphas), [-1, 1, 1, 1, 1])
            samples = b.op("Add", b.unsqueeze(baseline, [0]),
                           b.op("Mul", a, b.unsqueeze(b.op("Sub", x, baseline), [0])))
        folded = b.op("Reshape", samples, b.op("Concat", b.ints([-1]), _tail(b, x), axis=0))
        if image.dtype != TensorProto.FLOAT:
            folded = b.cast(folded, image.dtype)
        b.set_info(folded, image.dtype, _sample_shape(image.shape))
        grads, acts = _differentiate_copy(ctx, b, model, at, folded, layers)
        wk = b.reshape(w, [-1, 1, 1, 1, 1])
        partial = []

        def weighted_sum(view):
            return b.reduce("ReduceSum", b.op("Mul", wk, view), [0], keepdims=False)
        g = _split(b, _nchw(b, b.as_float32(grads[folded]), image), k)
        if "input_gradient" in statistics:
            partial.append(("input_gradient", weighted_sum(g)))
        if "input_gradient_sq" in statistics:
            partial.append(("input_gradient_sq", weighted_sum(b.op("Mul", g, g))))
        for layer in layers:
            a_view, g_view = _split(b, acts[layer], k), _split(b, grads[layer], k)
            g2 = b.op("Mul", g_view, g_view)
            if "layer_gradient_sq" in statistics:
                partial.append((("layer_gradient_sq", layer), weighted_sum(g2)))
            if "layer_gradient_cube" in statistics:
                partial.append((("layer_gradient_cube", layer), weighted_sum(b.op("Mul", g2, g_view))))
            if "layer_last" in statistics:
                last = b.op("Sub", k, b.ints([1]))
                partial.append((("layer_last_a", layer), b.op("Gather", a_view, b.squeeze(last, [0]), axis=0)))
                partial.append((("layer_last_g", layer), b.op("Gather", g_view, b.squeeze(last, [0]), axis=0)))
            if "layer_path" in statistics:
                pooled = b.reduce("ReduceMean", g_view, [3, 4], keepdims=True)
                change = b.op("Sub", a_view, b.unsqueeze(baseline_layers[layer], [0]))
                partial.append((("layer_path", layer), weighted_sum(b.op("Mul", change, pooled))))
        return partial

    if chunks == 1:
        sums = dict(body(e, None, ctx.proto))
    else:
        sums = _loop(ctx, body, chunks, chunk)
    for key, value in sums.items():
        if isinstance(key, tuple):
            name, layer = key
            if name.startswith("layer_last"):
                result.statistics.setdefault("layer_last", {}).setdefault(layer, [None, None])[
                    0 if name.endswith("_a") else 1] = value
            else:
                result.statistics.setdefault(name, {})[layer] = value
        else:
            result.statistics[key] = value
    return result


def _loop(ctx, body, chunks: int, chunk: int) -> Dict[object, str]:
    """Run `body` for every chunk in an ONNX Loop; returns the statistics summed over chunks (the
    last chunk's value for the "last sample" ones)."""
    e = ctx.emit
    b = Emitter(e.opset, e.infos, e.taken)
    shim = onnx.ModelProto()  # add_gradients flushes into a model's graph: the body's nodes collect here
    shim.opset_import.extend(ctx.proto.opset_import)
    shim.ir_version = ctx.proto.ir_version
    iteration, condition = e.fresh("chunk_index"), e.fresh("chunk_cond")
    start = b.op("Mul", b.reshape(iteration, [1]), b.ints([chunk]))
    partial = body(b, start, shim)
    keep_going = b.op("Identity", condition)
    flush(b, shim.graph)
    outputs = [helper.make_tensor_value_info(keep_going, TensorProto.BOOL, [])]
    outputs += [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for _, t in partial]
    graph = helper.make_graph(list(shim.graph.node), e.fresh("chunk_body"),
                              [helper.make_tensor_value_info(iteration, TensorProto.INT64, []),
                               helper.make_tensor_value_info(condition, TensorProto.BOOL, [])], outputs)
    e.initializers.extend(shim.graph.initializer)  # constants live in the outer graph (subgraphs read them)
    scans = e.op("Loop", e.const(np.array(chunks, np.int64), TensorProto.INT64),
                 e.const(np.array(True), TensorProto.BOOL), outputs=len(partial),
                 body=graph)
    scans = scans if isinstance(scans, list) else [scans]
    for scan in scans:
        e.set_info(scan, TensorProto.FLOAT, None)
    sums = {}
    for (key, _), scan in zip(partial, scans):
        last = isinstance(key, tuple) and key[0].startswith("layer_last")
        sums[key] = (e.op("Gather", scan, e.const(np.array(-1, np.int64), TensorProto.INT64), axis=0) if last
                     else e.reduce("ReduceSum", scan, [0], keepdims=False))
    return sums


def _differentiate_copy(ctx, b, model, at, folded, layers):
    """Forward copy on the folded samples, its seed (the original selection), one backward pass.
    Returns (gradients by tensor: the samples' and each layer's [k*N, ...] float32 NCHW for
    layers, layer activations by layer name float32 NCHW)."""
    image, analysis = ctx.image, ctx.analysis
    batch = image.shape[0]
    rename = {batch: SAMPLE_DIM} if isinstance(batch, str) else {}
    copy = clone_forward(analysis, b, {image.name: folded}, [ctx.seeded] + layers, tag="sample", rename_dims=rename)
    seeded = copy[ctx.seeded]
    view = b.op("Reshape", seeded, b.op("Concat", b.ints([-1]), b.shape(ctx.seeded), axis=0))
    seed_view, _ = at(b, view)
    seed = b.op("Reshape", seed_view, b.shape(seeded))
    b.set_info(seed, b.dtype(seeded), b.info(seeded).shape)
    targets = [folded] + [copy[layer] for layer in layers]
    built = add_gradients(model, targets, seeded, seed=seed, emitter=b,
                          analysis=copy.analysis, mode=STANDARD, score_name=ctx.seeded)
    grads = {folded: built.gradients[folded]}
    acts = {}
    for layer in layers:
        layout = activation_layout(b, layer, image, ctx.spec.layout, analysis.producers)
        grads[layer] = to_nchw(b, b.as_float32(built.gradients[copy[layer]]), image, layout, ctx.spec.token_grid)
        acts[layer] = to_nchw(b, b.as_float32(copy[layer]), image, layout, ctx.spec.token_grid)
    return grads, acts


def _baseline_forward(ctx, at, baseline, layers):
    """S(baseline) [N] float32 and the layer activations at the baseline (float32 NCHW), from one
    more forward copy (no backward)."""
    e, image = ctx.emit, ctx.image
    fed = baseline if image.dtype == TensorProto.FLOAT else e.cast(baseline, image.dtype)
    e.set_info(fed, image.dtype, image.shape)
    copy = clone_forward(ctx.analysis, e, {image.name: fed}, [ctx.seeded] + layers, tag="baseline")
    score = e.squeeze(e.as_float32(at(e, e.unsqueeze(copy[ctx.seeded], [0]))[1]), [0])
    acts = {}
    for layer in layers:
        layout = activation_layout(e, layer, image, ctx.spec.layout, ctx.analysis.producers)
        acts[layer] = to_nchw(e, e.as_float32(copy[layer]), image, layout, ctx.spec.token_grid)
    return score, acts


# ---------------------------------------------------------------------- the target on samples
def _score_at(ctx):
    """fn(emit, view [k, N, ...] of the seeded tensor) -> (seed view, score [k, N]): the target's
    selection made on the original images, applied to other evaluations of the seeded tensor.
    Targets whose score is linear in that tensor (class, segmentation, sequence, YOLOv8 boxes)
    reuse their seed; the others (embedding cosine, YOLOv5 objectness x class) say how (Target.at)."""
    target = ctx.target
    negate = ctx.seed != target.seed  # counterfactual: the negated score

    def at(b, view):
        if target.at is not None:
            seed, score = target.at(b, view)
        else:
            seed = b.op("Expand", target.seed, b.shape(view))
            axes = list(range(2, len(b.info(target.seed).shape or ()) + 1))
            product = b.op("Mul", seed, view)
            score = b.reduce("ReduceSum", product, axes, keepdims=False) if axes else product
        if negate:
            seed, score = b.op("Neg", seed), b.op("Neg", score)
        return seed, score
    return at


# ---------------------------------------------------------------------- inputs
def _noise_input(ctx, method, sampling: Sampling) -> str:
    """The graph input the standard normal noise is read from, [S, N, ...] like the input."""
    name = NOISE_INPUT if not any(i.name == NOISE_INPUT for i in ctx.proto.graph.input) else f"{NOISE_INPUT}__{method}"
    image = ctx.image
    shape = [sampling.samples] + [d if isinstance(d, int) else None for d in image.shape]
    ctx.proto.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    ctx.emit.set_info(name, TensorProto.FLOAT, shape)
    return name


def _baseline(ctx, method, sampling: Sampling, x: str) -> str:
    """The baseline, float32 in the input's layout: zeros, a Gaussian blur of x, or a graph input."""
    e, image = ctx.emit, ctx.image
    if sampling.baseline == "zeros":
        return e.op("Mul", x, e.scalar(0.0, x))
    if sampling.baseline == "input":
        shape = [d if isinstance(d, int) else None for d in image.shape]
        shape[0] = None
        ctx.proto.graph.input.append(helper.make_tensor_value_info(BASELINE_INPUT, TensorProto.FLOAT, shape))
        e.set_info(BASELINE_INPUT, TensorProto.FLOAT, shape)
        return e.op("Expand", BASELINE_INPUT, e.shape(x))  # [1, ...] or [N, ...] to the batch
    return _blur(e, x, image, sampling.blur_sigma)


def _blur(e, x, image, sigma: float) -> str:
    """Separable Gaussian blur (radius 3 sigma, edge padding), per channel, in the input's layout."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    channels = image.channels
    if not isinstance(channels, int):
        raise UsageError("baseline 'blur' needs a fixed channel count in the model's input")
    nchw = _nchw(e, x, image)
    padded = e.pad(nchw, [0, 0, radius, radius, 0, 0, radius, radius], mode="edge")
    rows = e.const(np.tile(taps.reshape(1, 1, -1, 1), (channels, 1, 1, 1)), TensorProto.FLOAT)
    cols = e.const(np.tile(taps.reshape(1, 1, 1, -1), (channels, 1, 1, 1)), TensorProto.FLOAT)
    blurred = e.op("Conv", e.op("Conv", padded, rows, group=channels), cols, group=channels)
    return blurred if image.layout == "NCHW" else e.op("Transpose", blurred, perm=[0, 2, 3, 1])


# ---------------------------------------------------------------------- small pieces
def _nchw(e, name, image):
    return name if image.layout == "NCHW" else e.op("Transpose", name, perm=[0, 3, 1, 2])


def _tail(e, x):
    """Shape of x without its batch axis, [rank - 1] int64."""
    return e.op("Slice", e.shape(x), e.ints([1]), e.ints([np.iinfo(np.int64).max]), e.ints([0]))


def _split(e, t, k):
    """[k*N, ...] -> [k, N, ...]."""
    return e.op("Reshape", t, e.op("Concat", k, e.ints([-1]), _tail(e, t), axis=0))


def _sample_shape(shape):
    return (SAMPLE_DIM,) + tuple(shape[1:]) if isinstance(shape[0], str) or shape[0] is None else tuple(shape)
