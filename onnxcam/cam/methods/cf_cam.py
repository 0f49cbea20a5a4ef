"""CF-CAM (He et al. 2025, "Cluster Filter Class Activation Mapping"), from the authors' code
(github.com/jerryp-hfut/CF-CAM, cfcam.py), entirely in the graph, per image:

1. Channel L2 norms over h*w; channels at or above their 75th percentile are "important" and keep
   their own gradient: w_k = mean_ij G_k.
2. The others are clustered with DBSCAN (scikit-learn's semantics) on their flattened maps:
   eps = the 25th percentile of their pairwise distances (max 1e-5), min_samples = max(2,
   floor(0.05 R)) for R of them. DBSCAN is expressed exactly, without its sequential loop:
   neighbours = distance <= eps (a point is its own neighbour); core points have >= min_samples
   neighbours; clusters are the connected components of core points under the neighbour relation
   (label propagation to the smallest core index, in an ONNX Loop until nothing changes, with
   pointer jumping); a non-core point next to a core point joins the component of its
   smallest-index core neighbour, which is what scikit-learn's expansion order gives it (clusters
   are discovered in the order of their smallest core index, and a border point keeps the first
   cluster that reaches it); the rest is noise and is dropped.
3. Within each cluster the mean gradient map is smoothed by the authors' "bilateral filter" (a
   correlation with one h x w kernel: a Gaussian of the distance to the map's centre, sigma 5,
   times a Gaussian of the gradient's deviation from its mean, sigma 0.1, normalised; 'same'
   padding) and w_k = its spatial mean, for every member. Only that mean is needed, so the
   correlation is never formed: mean(K * m) = sum_u K[u] S[u] / (h w) with S = m B for a constant
   0/1 matrix B [hw, hw] (which output positions see input q through kernel offset u).
4. Softmax of w over the kept channels, cam = relu(sum_k softmax(w)_k A_k), upsampled (bilinear),
   divided by its maximum.

Distances come from the Gram matrix in float64 (the authors compute them directly in float32);
a pair whose distance lies within rounding of eps could fall on the other side: measured, not
assumed, by tools/compare_gradient_free.py.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ...errors import UsageError
from .maps import upsample
from .registry import Needs, map_method

BIG = 1e9  # label of a point in no cluster (labels are channel indices < 2^24, exact in float32)
EPS_FLOOR = 1e-5  # the authors' max(eps, 1e-5)
FILTER_EPS = 1e-6  # the authors' kernel normalisation


@map_method("cfcam", Needs(activation=True, gradient=True))
def cfcam(ctx, sigma_spatial=5.0, sigma_range=0.1, norm_percentile=75.0, eps_percentile=25.0,
          min_samples_ratio=0.05):
    """CF-CAM (He et al. 2025): important channels keep their mean gradient; the others are
    clustered by DBSCAN (exact, in the graph) and take their cluster's bilateral-filtered mean
    gradient; noise channels are dropped; softmax weights, relu, upsampled, divided by the max."""
    e = ctx.emit
    maps = [_cf_map(ctx, layer, float(sigma_spatial), float(sigma_range), float(norm_percentile),
                    float(eps_percentile), float(min_samples_ratio)) for layer in ctx.layers]
    fused = maps[0] if len(maps) == 1 else e.reduce("ReduceMean", e.op("Concat", *maps, axis=1), [1], keepdims=True)
    return fused


def _cf_map(ctx, layer, sigma_spatial, sigma_range, norm_q, eps_q, ratio):
    e = ctx.emit
    A, G = ctx.activation(layer), ctx.gradient(layer)
    c, h, w = ctx.known_shape(layer, A)
    n = e.dims(A)[0]
    hw = h * w
    f = e.reshape(A, [n, c, hw])
    g = e.reshape(G, [n, c, hw])
    f64 = e.cast(f, TensorProto.DOUBLE)

    # 1. important channels
    norms = e.op("Sqrt", e.reduce("ReduceSum", e.op("Mul", f, f), [2], keepdims=False))  # [N, C]
    cut = _percentile_static(e, norms, norm_q, c)  # [N, 1]
    important = e.greater_equal(norms, cut)
    remaining = e.op("Not", important)

    # 2. DBSCAN on the remaining channels
    gram = e.op("MatMul", f64, e.op("Transpose", f64, perm=[0, 2, 1]))  # [N, C, C]
    sq = e.reduce("ReduceSum", e.op("Mul", f64, f64), [2], keepdims=True)  # [N, C, 1]
    d2 = e.op("Sub", e.op("Add", sq, e.op("Transpose", sq, perm=[0, 2, 1])), e.op("Mul", gram, e.scalar(2.0, gram)))
    dist = e.op("Sqrt", e.op("Relu", d2))
    both = e.op("And", e.unsqueeze(remaining, [2]), e.unsqueeze(remaining, [1]))  # [N, C, C]
    off_diagonal = e.const(~np.eye(c, dtype=bool)[None], TensorProto.BOOL)
    pairs = e.op("And", both, off_diagonal)
    eps = _percentile_masked(e, dist, pairs, eps_q, c)  # [N, 1, 1] float64
    eps = e.op("Max", eps, e.scalar(EPS_FLOOR, eps))
    r = e.reduce("ReduceSum", e.cast(remaining, TensorProto.FLOAT), [1], keepdims=True)  # [N, 1]
    min_samples = e.op("Max", e.op("Floor", e.op("Mul", r, e.scalar(ratio, r))), e.scalar(2.0, r))
    labels = dbscan(e, dist, remaining, eps, min_samples, c)
    big = e.scalar(BIG, labels)
    clustered = e.op("And", remaining, e.op("Less", labels, big))

    # 3. cluster mean gradients, filtered; their spatial means
    same = e.op("And", e.op("Equal", e.unsqueeze(labels, [2]), e.unsqueeze(labels, [1])),
                e.op("And", e.unsqueeze(clustered, [2]), e.unsqueeze(clustered, [1])))
    members = e.cast(same, TensorProto.FLOAT)  # [N, C, C]
    size = e.op("Max", e.reduce("ReduceSum", members, [2], keepdims=True), e.scalar(1.0, members))  # [N, C, 1]
    mean_g = e.op("Div", e.op("MatMul", members, g), size)  # [N, C, hw]
    filtered_mean = _filtered_mean(e, mean_g, h, w, sigma_spatial, sigma_range)  # [N, C]

    # 4. weights, map
    own = e.reduce("ReduceMean", g, [2], keepdims=False)
    weights = e.op("Where", important, own, filtered_mean)
    kept = e.op("Or", important, clustered)
    logits = e.op("Where", kept, weights, e.scalar(-BIG, weights))
    soft = e.op("Where", kept, e.op("Softmax", logits, axis=1) if e.opset >= 13 else _softmax(e, logits),
                e.scalar(0.0, weights))
    cam = e.reduce("ReduceSum", e.op("Mul", e.unsqueeze(soft, [2, 3]), A), [1], keepdims=True)
    cam = e.set_info(e.op("Relu", cam), TensorProto.FLOAT, [None, 1, None, None])
    up = upsample(e, cam, ctx.image)
    top = e.reduce("ReduceMax", up, [1, 2, 3], keepdims=True)
    return e.op("Div", up, e.op("Where", e.op("Greater", top, e.scalar(0.0, top)), top, e.scalar(1.0, top)))


def dbscan(e, dist, eligible, eps, min_samples, c):
    """scikit-learn's DBSCAN labels, exactly, as tensors: dist [N, C, C] pairwise distances,
    eligible [N, C] bool (the points taking part), eps [N, 1, 1] (dist's type), min_samples
    [N, 1] float. Returns float32 [N, C]: the smallest core index of each point's cluster (the
    cluster id; scikit-learn numbers clusters in that order), BIG for noise and ineligible points."""
    both = e.op("And", e.unsqueeze(eligible, [2]), e.unsqueeze(eligible, [1]))
    near = e.op("And", e.less_equal(dist, eps), both)  # own neighbour included (distance 0)
    count = e.reduce("ReduceSum", e.cast(near, TensorProto.FLOAT), [2], keepdims=False)  # [N, C]
    core = e.op("And", eligible, e.greater_equal(count, min_samples))
    core_links = e.op("And", near, e.op("And", e.unsqueeze(core, [2]), e.unsqueeze(core, [1])))
    index = e.const(np.arange(c, dtype=np.float32)[None], TensorProto.FLOAT)  # [1, C]
    big = e.scalar(BIG, index)
    start = e.op("Where", core, index, big)  # [N, C]: core points start as their own label
    labels = _propagate(e, core_links, start, c)
    border_links = e.op("And", near, e.unsqueeze(core, [1]))  # j is a core neighbour of i
    reached = e.reduce("ReduceMin", e.op("Where", border_links, e.unsqueeze(labels, [1]), big), [2], keepdims=False)
    return e.op("Where", core, labels, reached)  # noise stays BIG


def _propagate(e, links, labels, c):
    """Smallest label over each connected component of `links` [N, C, C] (bool), by a Loop of
    min-over-neighbours steps with pointer jumping, stopping when nothing changes (at most C)."""
    outer_nodes, outer_shapes = e.nodes, e._shape_cache
    e.nodes, e._shape_cache = [], {}
    try:
        step, go, current = e.fresh("step"), e.fresh("go"), e.fresh("labels")
        e.set_info(current, TensorProto.FLOAT, (None, c))
        big = e.scalar(BIG, current)
        via = e.reduce("ReduceMin", e.op("Where", links, e.unsqueeze(current, [1]), big), [2], keepdims=False)
        lowered = e.op("Min", current, via)
        safe = e.op("Where", e.op("Less", lowered, big), lowered, e.scalar(0.0, lowered))
        jumped = e.op("GatherElements", lowered, e.cast(safe, TensorProto.INT64), axis=1)
        updated = e.op("Where", e.op("Less", lowered, big), e.op("Min", lowered, jumped), lowered)
        changed = e.op("Greater", e.reduce("ReduceMax", e.op("Abs", e.op("Sub", updated, current)), [0, 1],
                                           keepdims=False), e.scalar(0.0, current))
        body_nodes = e.nodes
    finally:
        e.nodes, e._shape_cache = outer_nodes, outer_shapes
    body = helper.make_graph(body_nodes, e.fresh("dbscan_components"),
                             [helper.make_tensor_value_info(step, TensorProto.INT64, []),
                              helper.make_tensor_value_info(go, TensorProto.BOOL, []),
                              helper.make_tensor_value_info(current, TensorProto.FLOAT, None)],
                             [helper.make_tensor_value_info(changed, TensorProto.BOOL, []),
                              helper.make_tensor_value_info(updated, TensorProto.FLOAT, None)])
    out = e.fresh("components")
    e.nodes.append(helper.make_node("Loop", [e.const(np.array(c + 1, np.int64), TensorProto.INT64),
                                             e.const(np.array(True), TensorProto.BOOL), labels], [out],
                                    name=e.fresh("components_loop"), body=body))
    return e.set_info(out, TensorProto.FLOAT, (None, c))


def _filtered_mean(e, m, h, w, sigma_spatial, sigma_range):
    """The spatial mean of the authors' bilateral filter of each map m [N, C, h*w]: [N, C]."""
    hw = h * w
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    spatial = np.exp(-(((rows - h / 2) ** 2 + (cols - w / 2) ** 2) / (2 * sigma_spatial ** 2)))
    spatial = e.const(spatial.reshape(1, 1, hw).astype(np.float32), TensorProto.FLOAT)
    deviation = e.op("Sub", m, e.reduce("ReduceMean", m, [2], keepdims=True))
    range_w = e.op("Exp", e.op("Div", e.op("Neg", e.op("Mul", deviation, deviation)), e.scalar(2 * sigma_range ** 2, m)))
    kernel = e.op("Mul", spatial, range_w)
    kernel = e.op("Div", kernel, e.op("Add", e.reduce("ReduceSum", kernel, [2], keepdims=True), e.scalar(FILTER_EPS, m)))
    window = e.const(_window_matrix(h, w), TensorProto.FLOAT)  # [hw, hw]
    seen = e.op("MatMul", m, window)  # S[u] = sum of the padded map under the kernel at offset u
    return e.op("Div", e.reduce("ReduceSum", e.op("Mul", kernel, seen), [2], keepdims=False), e.scalar(float(hw), m))


def _window_matrix(h, w):
    """B[q, u] = 1 when input position q meets kernel offset u for some output position of a
    'same'-padded correlation with an h x w kernel (torch pads (k-1)//2 before)."""
    top, left = (h - 1) // 2, (w - 1) // 2
    qr, qc = np.divmod(np.arange(h * w), w)
    ur, uc = qr.copy(), qc.copy()
    pr = qr[:, None] - ur[None, :] + top
    pc = qc[:, None] - uc[None, :] + left
    return ((pr >= 0) & (pr < h) & (pc >= 0) & (pc < w)).astype(np.float32)


def _percentile_static(e, x, q, count):
    """numpy's linear percentile over the last axis of x [N, count] (count an int): [N, 1]."""
    ordered, _ = e.op("TopK", x, e.ints([count]), outputs=2, axis=-1, largest=0, sorted=1)
    position = q / 100.0 * (count - 1)
    lo = int(np.floor(position))
    hi = min(lo + 1, count - 1)
    a = e.slice(ordered, [lo], [lo + 1], [-1])
    b = e.slice(ordered, [hi], [hi + 1], [-1])
    return e.op("Add", a, e.op("Mul", e.op("Sub", b, a), e.scalar(position - lo, a)))


def _percentile_masked(e, x, mask, q, c):
    """numpy's linear percentile of the entries of x [N, C, C] where `mask`: [N, 1, 1] (same type)."""
    big = e.scalar(np.finfo(np.float64).max, x)
    flat = e.reshape(e.op("Where", mask, x, big), [-1, c * c])
    ordered, _ = e.op("TopK", flat, e.ints([c * c]), outputs=2, axis=1, largest=0, sorted=1)
    count = e.reduce("ReduceSum", e.cast(mask, TensorProto.DOUBLE), [1, 2], keepdims=False)  # [N]
    position = e.op("Mul", e.op("Max", e.op("Sub", count, e.scalar(1.0, count)), e.scalar(0.0, count)),
                    e.scalar(q / 100.0, count))
    lo = e.op("Floor", position)
    frac = e.op("Sub", position, lo)
    lo_i = e.unsqueeze(e.cast(lo, TensorProto.INT64), [1])
    hi_i = e.unsqueeze(e.cast(e.op("Min", e.op("Add", lo, e.scalar(1.0, lo)),
                                   e.op("Max", e.op("Sub", count, e.scalar(1.0, count)), e.scalar(0.0, count))),
                              TensorProto.INT64), [1])
    a = e.op("GatherElements", ordered, lo_i, axis=1)
    b = e.op("GatherElements", ordered, hi_i, axis=1)
    value = e.op("Add", a, e.op("Mul", e.op("Sub", b, a), e.unsqueeze(frac, [1])))
    return e.unsqueeze(value, [2])  # [N, 1, 1]


def _softmax(e, z):
    ex = e.op("Exp", e.op("Sub", z, e.reduce("ReduceMax", z, [1], keepdims=True)))
    return e.op("Div", ex, e.reduce("ReduceSum", ex, [1], keepdims=True))
