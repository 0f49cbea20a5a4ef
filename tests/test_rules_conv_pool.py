"""VJP rules of the conv / pooling family against torch float64 autograd.

ONNX Runtime's CPU provider has no float64 Conv, ConvTranspose or AveragePool, so the ONNX side
runs in float32 and is compared with torch's float64 gradient at a relative tolerance of ~1e-4.
Every case also checks that the forward output equals the torch twin, so the twin (pads, divisor,
ceil_mode rule) is known to describe what ONNX Runtime computes.
"""

import itertools
import zlib

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from harness import dot_product_check, make_model, ort_vjp, rel_err, run, torch_vjp, gradient_model
from onnxcam.autodiff.shapes import infer_infos, make_value_info

OPSETS = [11, 13, 17, 19]
TOL = 1e-4
WORST = {}


@pytest.fixture(scope="module", autouse=True)
def report_worst():
    yield
    print("\nworst relative error per family:", {k: f"{v:.2e}" for k, v in sorted(WORST.items())})


def _record(family, err):
    WORST[family] = max(WORST.get(family, 0.0), err)
    return err


def t64(a):
    return torch.tensor(np.asarray(a, np.float64))


def check_against_torch(family, node, x, fn, opset, inits=None, tol=TOL, dynamic_batch=False):
    """Forward and gradient of a one-node model vs the torch float64 twin `fn`."""
    model = make_model([node], {"x": x}, [node.output[0]], inits or {}, opset=opset, dynamic_batch=dynamic_batch)
    with torch.no_grad():
        y_ref = fn(t64(x)).numpy()
    seed = np.random.default_rng(1).standard_normal(y_ref.shape).astype(np.float32)
    (gx,), y = ort_vjp(model, {"x": x}, ["x"], node.output[0], seed)
    (ref,), _ = torch_vjp(fn, [x], seed)
    assert rel_err(y, y_ref) < tol, "forward twin mismatch"
    err = _record(family, rel_err(gx, ref))
    assert err < tol
    return gx, ref


def torch_pad(x, begins, ends, value=0.0):
    """F.pad with ONNX-style per-axis begin/end lists (spatial axes only)."""
    flat = []
    for b, e in reversed(list(zip(begins, ends))):
        flat += [b, e]
    return F.pad(x, flat, value=value)


def same_pads(sizes, kernel, strides, dilations, mode):
    begins, ends = [], []
    for h, k, s, d in zip(sizes, kernel, strides, dilations):
        out = -(-h // s)
        total = max((out - 1) * s + d * (k - 1) + 1 - h, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else big)
        ends.append(big if mode == "SAME_UPPER" else small)
    return begins, ends


# --------------------------------------------------------------------------- Conv
# (x shape, w shape, attrs) ; W is [M, C/group, *k]
CONV_CASES = {
    "3x3_s1_p1": ((2, 3, 9, 9), (4, 3, 3, 3), dict(pads=[1, 1, 1, 1])),
    "s2_asym": ((2, 3, 10, 9), (4, 3, 3, 3), dict(strides=[2, 2], pads=[0, 1, 1, 2])),
    "s3_d2_asym": ((1, 2, 13, 12), (3, 2, 3, 3), dict(strides=[3, 3], dilations=[2, 2], pads=[2, 1, 0, 3])),
    "group2_s2": ((2, 4, 9, 8), (6, 2, 3, 3), dict(group=2, strides=[2, 2], pads=[1, 1, 1, 1])),
    "depthwise_s2": ((2, 4, 9, 9), (4, 1, 3, 3), dict(group=4, strides=[2, 2], pads=[1, 1, 1, 1])),
    "depthwise_mult2_s1_d2": ((1, 3, 8, 8), (6, 1, 3, 3), dict(group=3, dilations=[2, 2], pads=[2, 2, 2, 2])),
    "same_upper_s2": ((2, 3, 10, 9), (4, 3, 3, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "same_lower_s2_k4": ((2, 3, 9, 10), (4, 3, 4, 4), dict(auto_pad="SAME_LOWER", strides=[2, 2])),
    "same_upper_s1_k4": ((1, 2, 7, 8), (3, 2, 4, 4), dict(auto_pad="SAME_UPPER")),
    "valid_s2": ((2, 3, 10, 9), (4, 3, 3, 3), dict(auto_pad="VALID", strides=[2, 2])),
    "stem_7x7_s2_bias": ((1, 3, 32, 30), (8, 3, 7, 7), dict(strides=[2, 2], pads=[3, 3, 3, 3])),
    "1x1_s2_floor": ((2, 4, 9, 9), (3, 4, 1, 1), dict(strides=[2, 2])),
    "rect_3x5_s21": ((1, 2, 9, 11), (3, 2, 3, 5), dict(strides=[2, 1], pads=[1, 2, 0, 1])),
    "conv1d_s2_d2": ((2, 3, 17), (4, 3, 3), dict(strides=[2], dilations=[2], pads=[1, 2])),
    "conv3d_s2": ((1, 2, 7, 6, 7), (3, 2, 3, 3, 3), dict(strides=[2, 2, 2], pads=[1, 0, 1, 1, 1, 0])),
}


def conv_twin(w, b, attrs, x_shape):
    n_sp = len(x_shape) - 2
    k = list(w.shape[2:])
    strides = attrs.get("strides", [1] * n_sp)
    dilations = attrs.get("dilations", [1] * n_sp)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad.startswith("SAME"):
        begins, ends = same_pads(x_shape[2:], k, strides, dilations, auto_pad)
    elif auto_pad == "VALID":
        begins, ends = [0] * n_sp, [0] * n_sp
    else:
        pads = attrs.get("pads", [0] * 2 * n_sp)
        begins, ends = pads[:n_sp], pads[n_sp:]
    conv = getattr(F, f"conv{n_sp}d")

    def fn(x):
        return conv(torch_pad(x, begins, ends), t64(w), None if b is None else t64(b), stride=strides,
                    dilation=dilations, groups=attrs.get("group", 1))
    return fn


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_grid(case, opset):
    x_shape, w_shape, attrs = CONV_CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32) if "bias" in case else None
    inits = {"w": w} if b is None else {"w": w, "b": b}
    node = helper.make_node("Conv", ["x", "w"] + (["b"] if b is not None else []), ["y"], **attrs)
    check_against_torch("Conv", node, x, conv_twin(w, b, attrs, x_shape), opset, inits)


# --------------------------------------------------------------------------- ConvTranspose
# W is [C, M/group, *k]
CONVT_CASES = {
    "k3_s1_p1": ((2, 3, 6, 7), (3, 4, 3, 3), dict(pads=[1, 1, 1, 1])),
    "k3_s2_p1_op1": ((2, 3, 5, 6), (3, 4, 3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])),
    "k4_s2_p1": ((1, 4, 6, 5), (4, 2, 4, 4), dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    "group2_s2_d2_asym": ((2, 4, 5, 6), (4, 3, 3, 3), dict(group=2, strides=[2, 2], dilations=[2, 2], pads=[1, 0, 2, 1])),
    "depthwise_s2": ((1, 4, 5, 5), (4, 1, 3, 3), dict(group=4, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 0])),
    "s3_op2": ((1, 2, 4, 5), (2, 3, 3, 2), dict(strides=[3, 3], output_padding=[2, 1])),
    "output_shape": ((2, 2, 5, 5), (2, 3, 3, 3), dict(strides=[2, 2], output_shape=[9, 10])),
    "output_shape_same_upper": ((1, 2, 5, 4), (2, 3, 4, 4), dict(strides=[2, 2], output_shape=[10, 9], auto_pad="SAME_UPPER")),
    "same_upper_s2_k3": ((2, 2, 5, 6), (2, 3, 3, 3), dict(strides=[2, 2], auto_pad="SAME_UPPER")),
    "same_lower_s2_k3": ((2, 2, 5, 6), (2, 3, 3, 3), dict(strides=[2, 2], auto_pad="SAME_LOWER")),
    "valid_s2": ((1, 2, 4, 4), (2, 3, 3, 3), dict(strides=[2, 2], auto_pad="VALID")),
    "bias_k2_s2": ((2, 3, 4, 5), (3, 2, 2, 2), dict(strides=[2, 2])),
    "convt1d_s2": ((2, 3, 7), (3, 2, 4), dict(strides=[2], pads=[1, 2])),
    "convt3d_s2": ((1, 2, 3, 4, 3), (2, 2, 3, 3, 3), dict(strides=[2, 2, 2], pads=[1, 1, 0, 1, 0, 1])),
}


def ort_convt_pads(x_shape, k, attrs):
    """ONNX Runtime's resolution of output_shape / SAME (probed; the forward check pins it)."""
    n_sp = len(x_shape) - 2
    strides = attrs.get("strides", [1] * n_sp)
    dilations = attrs.get("dilations", [1] * n_sp)
    op = attrs.get("output_padding", [0] * n_sp)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if "output_shape" not in attrs and not auto_pad.startswith("SAME"):
        if auto_pad == "VALID":
            return [0] * n_sp, [0] * n_sp
        pads = attrs.get("pads", [0] * 2 * n_sp)
        return pads[:n_sp], pads[n_sp:]
    begins, ends = [], []
    for i in range(n_sp):
        full = strides[i] * (x_shape[2 + i] - 1) + op[i] + dilations[i] * (k[i] - 1) + 1
        out = attrs["output_shape"][i] if "output_shape" in attrs else x_shape[2 + i] * strides[i]
        total = max(full - out, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else big)
        ends.append(big if auto_pad == "SAME_UPPER" else small)
    return begins, ends


def convt_twin(w, b, attrs, x_shape):
    n_sp = len(x_shape) - 2
    k = list(w.shape[2:])
    strides = attrs.get("strides", [1] * n_sp)
    dilations = attrs.get("dilations", [1] * n_sp)
    op = attrs.get("output_padding", [0] * n_sp)
    begins, ends = ort_convt_pads(x_shape, k, attrs)
    convt = getattr(F, f"conv_transpose{n_sp}d")

    def fn(x):
        full = convt(x, t64(w), None, stride=strides, dilation=dilations, groups=attrs.get("group", 1))
        full = torch_pad(full, [0] * n_sp, op)  # output_padding: zeros at the end
        index = [slice(None), slice(None)] + [slice(begins[i], full.shape[2 + i] - ends[i]) for i in range(n_sp)]
        y = full[tuple(index)]
        return y if b is None else y + t64(b).reshape([1, -1] + [1] * n_sp)
    return fn


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("case", sorted(CONVT_CASES))
def test_conv_transpose_grid(case, opset):
    x_shape, w_shape, attrs = CONVT_CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    groups = attrs.get("group", 1)
    b = rng.standard_normal(w_shape[1] * groups).astype(np.float32) if "bias" in case else None
    inits = {"w": w} if b is None else {"w": w, "b": b}
    node = helper.make_node("ConvTranspose", ["x", "w"] + (["b"] if b is not None else []), ["y"], **attrs)
    check_against_torch("ConvTranspose", node, x, convt_twin(w, b, attrs, x_shape), opset, inits)


# --------------------------------------------------------------------------- AveragePool
AVG_GRID = list(itertools.product([0, 1], [0, 1], ["none", "sym1", "asym"], [1, 2]))


@pytest.mark.parametrize("opset", [11, 17, 19])
@pytest.mark.parametrize("count_include_pad,ceil_mode,pads,stride", AVG_GRID)
def test_average_pool_grid(count_include_pad, ceil_mode, pads, stride, opset):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 8, 7)).astype(np.float32)
    pad_list = {"none": [0, 0, 0, 0], "sym1": [1, 1, 1, 1], "asym": [1, 0, 0, 1]}[pads]
    attrs = dict(kernel_shape=[3, 3], strides=[stride, stride], pads=pad_list, ceil_mode=ceil_mode,
                 count_include_pad=count_include_pad)
    node = helper.make_node("AveragePool", ["x"], ["y"], **attrs)
    if pads != "asym":
        def fn(t):
            return F.avg_pool2d(t, 3, stride, pad_list[0], ceil_mode=bool(ceil_mode),
                                count_include_pad=bool(count_include_pad))
        check_against_torch("AveragePool", node, x, fn, opset)
    else:  # torch has no asymmetric pads: the op is linear, so a dot-product check is exact
        model = make_model([node], {"x": x}, ["y"], opset=opset)
        err = _record("AveragePool(dot)", dot_product_check(model, {"x": x}, "x", "y", eps=1e-1))
        assert err < 1e-5


AVG_EXTRA = {
    "k2_s2": ((2, 3, 8, 7), dict(kernel_shape=[2, 2], strides=[2, 2])),
    "k3_s2_p1_cip0_ceil": ((1, 2, 10, 9), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    "k3_s1_p1_inception": ((1, 2, 7, 7), dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])),
    "k5_s3_p2_ceil_cip1": ((1, 2, 11, 13), dict(kernel_shape=[5, 5], strides=[3, 3], pads=[2, 2, 2, 2], ceil_mode=1,
                                                count_include_pad=1)),
    "avg1d": ((2, 3, 11), dict(kernel_shape=[3], strides=[2], pads=[1, 1], ceil_mode=1)),
    "avg3d": ((1, 2, 6, 7, 5), dict(kernel_shape=[3, 3, 2], strides=[2, 2, 1], pads=[1, 1, 0, 1, 1, 0])),
}


@pytest.mark.parametrize("opset", [13, 19])
@pytest.mark.parametrize("case", sorted(AVG_EXTRA))
def test_average_pool_extra(case, opset):
    x_shape, attrs = AVG_EXTRA[case]
    n_sp = len(x_shape) - 2
    x = np.random.default_rng(3).standard_normal(x_shape).astype(np.float32)
    pads = attrs.get("pads", [0] * 2 * n_sp)
    pool = getattr(F, f"avg_pool{n_sp}d")

    def fn(t):
        return pool(t, attrs["kernel_shape"], attrs["strides"], pads[:n_sp], ceil_mode=bool(attrs.get("ceil_mode", 0)),
                    count_include_pad=bool(attrs.get("count_include_pad", 0)))
    check_against_torch("AveragePool", helper.make_node("AveragePool", ["x"], ["y"], **attrs), x, fn, opset)


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_average_pool_auto_pad(auto_pad, opset):
    x = np.random.default_rng(4).standard_normal((1, 2, 8, 9)).astype(np.float32)
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 2], strides=[2, 2], auto_pad=auto_pad)
    model = make_model([node], {"x": x}, ["y"], opset=opset)
    err = _record("AveragePool(dot)", dot_product_check(model, {"x": x}, "x", "y", eps=1e-1))
    assert err < 1e-5


# --------------------------------------------------------------------------- MaxPool
MAX_CASES = {
    "3x3_s2_p1": ((2, 3, 9, 10), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    "2x2_s2": ((2, 3, 8, 9), dict(kernel_shape=[2, 2], strides=[2, 2])),
    "sppf_5x5_s1_p2": ((1, 4, 10, 10), dict(kernel_shape=[5, 5], strides=[1, 1], pads=[2, 2, 2, 2])),
    "3x3_s2_ceil": ((1, 3, 10, 9), dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    "3x3_s2_p1_ceil": ((1, 3, 10, 8), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    "3x3_s1_d2_p2": ((1, 2, 9, 9), dict(kernel_shape=[3, 3], strides=[1, 1], dilations=[2, 2], pads=[2, 2, 2, 2])),
    "2x3_s2_d2": ((2, 2, 11, 12), dict(kernel_shape=[2, 3], strides=[2, 2], dilations=[2, 2])),
    "asym_pads": ((1, 2, 9, 8), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 2, 1])),
    "maxpool1d": ((2, 3, 13), dict(kernel_shape=[3], strides=[2], pads=[1, 1])),
    "maxpool3d": ((1, 2, 6, 7, 5), dict(kernel_shape=[2, 3, 2], strides=[2, 2, 1], pads=[0, 1, 0, 0, 1, 1])),
}


def maxpool_twin(attrs, n_sp):
    strides = attrs.get("strides", [1] * n_sp)
    dilations = attrs.get("dilations", [1] * n_sp)
    pads = attrs.get("pads", [0] * 2 * n_sp)
    pool = getattr(F, f"max_pool{n_sp}d")
    symmetric = pads[:n_sp] == pads[n_sp:] and all(2 * p <= k for p, k in zip(pads, attrs["kernel_shape"]))

    def fn(t):
        if symmetric:
            return pool(t, attrs["kernel_shape"], strides, pads[:n_sp], dilation=dilations,
                        ceil_mode=bool(attrs.get("ceil_mode", 0)))
        return pool(torch_pad(t, pads[:n_sp], pads[n_sp:], value=-np.inf), attrs["kernel_shape"], strides, 0,
                    dilation=dilations, ceil_mode=bool(attrs.get("ceil_mode", 0)))
    return fn


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("case", sorted(MAX_CASES))
def test_max_pool_grid(case, opset):
    x_shape, attrs = MAX_CASES[case]
    x = np.random.default_rng(5).standard_normal(x_shape).astype(np.float32)
    node = helper.make_node("MaxPool", ["x"], ["y"], **attrs)
    check_against_torch("MaxPool", node, x, maxpool_twin(attrs, len(x_shape) - 2), opset)


@pytest.mark.parametrize("opset", [11, 13, 17, 19])
@pytest.mark.parametrize("case", ["3x3_s2_p1", "sppf_5x5_s1_p2", "3x3_s2_p1_ceil", "3x3_s1_d2_p2", "2x2_s2"])
def test_max_pool_ties_pinned_to_torch(case, opset):
    """ReLU zeros and small integers make many equal maxima; torch sends each window's gradient to
    the first maximum in row-major window order (MaxUnpool-style overwriting would differ)."""
    x_shape, attrs = MAX_CASES[case]
    rng = np.random.default_rng(11)
    x = np.maximum(rng.integers(-3, 3, size=x_shape), 0).astype(np.float32)
    assert (x == 0).mean() > 0.4
    node = helper.make_node("MaxPool", ["x"], ["y"], **attrs)
    gx, ref = check_against_torch("MaxPool(ties)", node, x, maxpool_twin(attrs, len(x_shape) - 2), opset)
    # The tie rule matters here: spreading the gradient evenly over ties would differ.
    assert np.count_nonzero(gx) < x.size


@pytest.mark.parametrize("opset", [11, 17])
def test_max_pool_with_indices_output(opset):
    x = np.random.default_rng(6).standard_normal((2, 3, 9, 9)).astype(np.float32)
    node = helper.make_node("MaxPool", ["x"], ["y", "idx"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    model = make_model([node], {"x": x}, ["y"], opset=opset)
    seed = np.random.default_rng(1).standard_normal((2, 3, 5, 5)).astype(np.float32)
    (gx,), _ = ort_vjp(model, {"x": x}, ["x"], "y", seed)
    (ref,), _ = torch_vjp(lambda t: F.max_pool2d(t, 3, 2, 1), [x], seed)
    assert _record("MaxPool", rel_err(gx, ref)) < TOL


def test_max_pool_is_scatter_free():
    x = np.random.default_rng(6).standard_normal((1, 2, 9, 9)).astype(np.float32)
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    gmodel, _ = gradient_model(make_model([node], {"x": x}, ["y"], opset=17), ["x"], "y")
    ops = {n.op_type for n in gmodel.graph.node}
    assert not ops & {"MaxUnpool", "ScatterND", "ScatterElements", "Scatter"}
    assert all(len(n.output) == 1 for n in gmodel.graph.node if n.op_type == "MaxPool")


# --------------------------------------------------------------------------- global pools, LpPool
@pytest.mark.parametrize("opset", [11, 13, 17, 19])
def test_global_max_pool_ties_first_match(opset):
    rng = np.random.default_rng(12)
    x = np.maximum(rng.integers(-2, 3, size=(2, 4, 5, 6)), 0).astype(np.float32)
    x[0, 0] = 0.0  # a channel that is all ties
    node = helper.make_node("GlobalMaxPool", ["x"], ["y"])
    check_against_torch("GlobalMaxPool", node, x, lambda t: F.adaptive_max_pool2d(t, 1), opset)
    x = rng.standard_normal((2, 3, 7, 5)).astype(np.float32)
    check_against_torch("GlobalMaxPool", node, x, lambda t: F.adaptive_max_pool2d(t, 1), opset)


@pytest.mark.parametrize("opset", [11, 17])
def test_global_max_and_average_pool_1d_3d(opset):
    rng = np.random.default_rng(13)
    x3 = rng.standard_normal((2, 3, 4, 5, 3)).astype(np.float32)
    x1 = rng.standard_normal((2, 3, 9)).astype(np.float32)
    check_against_torch("GlobalMaxPool", helper.make_node("GlobalMaxPool", ["x"], ["y"]), x3,
                        lambda t: F.adaptive_max_pool3d(t, 1), opset)
    check_against_torch("GlobalAveragePool", helper.make_node("GlobalAveragePool", ["x"], ["y"]), x1,
                        lambda t: t.mean(2, keepdim=True), opset)


@pytest.mark.parametrize("opset", OPSETS)
def test_global_average_pool(opset):
    x = np.random.default_rng(14).standard_normal((2, 5, 6, 7)).astype(np.float32)
    check_against_torch("GlobalAveragePool", helper.make_node("GlobalAveragePool", ["x"], ["y"]), x,
                        lambda t: t.mean((2, 3), keepdim=True), opset, dynamic_batch=True)


@pytest.mark.parametrize("opset", [11, 18, 19])
def test_lp_pool_p2_matches_torch(opset):
    x = np.random.default_rng(15).standard_normal((2, 3, 8, 9)).astype(np.float32)
    node = helper.make_node("LpPool", ["x"], ["y"], kernel_shape=[3, 2], strides=[2, 2], p=2)
    check_against_torch("LpPool", node, x, lambda t: F.lp_pool2d(t, 2, (3, 2), (2, 2)), opset)
    node = helper.make_node("GlobalLpPool", ["x"], ["y"], p=2)
    check_against_torch("GlobalLpPool", node, x,
                        lambda t: t.pow(2).sum((2, 3), keepdim=True).sqrt(), opset)


@pytest.mark.parametrize("opset", [11, 18])
@pytest.mark.parametrize("p", [1, 3])
def test_lp_pool_other_p_dot_product(p, opset):
    rng = np.random.default_rng(16)
    x = (rng.uniform(0.3, 2.0, size=(1, 2, 7, 8)) * rng.choice([-1, 1], size=(1, 2, 7, 8))).astype(np.float32)
    attrs = dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 1], p=p)
    for node in [helper.make_node("LpPool", ["x"], ["y"], **attrs), helper.make_node("GlobalLpPool", ["x"], ["y"], p=p)]:
        model = make_model([node], {"x": x}, ["y"], opset=opset)
        err = _record("LpPool(dot)", dot_product_check(model, {"x": x}, "x", "y", eps=1e-3))
        assert err < 2e-3


# --------------------------------------------------------------------------- dynamic batch and spatial
def make_dynamic_model(node, x, inits, opset):
    """`x` declared as [N, C, H, W...] with symbolic batch and spatial sizes."""
    shape = ["N", x.shape[1]] + [f"S{i}" for i in range(x.ndim - 2)]
    graph = helper.make_graph([node], "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = min(helper.find_min_ir_version_for(opsets), 10)
    infos = infer_infos(model)
    model.graph.output[0].CopyFrom(make_value_info(node.output[0], infos[node.output[0]]))
    return model


def _dyn_cases():
    rng = np.random.default_rng(21)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    wt = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    return {
        "conv_same_upper_s2": (helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2]),
                               {"w": w}, lambda x_shape: conv_twin(w, None, dict(auto_pad="SAME_UPPER", strides=[2, 2]), x_shape)),
        "conv_s2_p1": (helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2], pads=[1, 0, 1, 1]),
                       {"w": w}, lambda x_shape: conv_twin(w, None, dict(strides=[2, 2], pads=[1, 0, 1, 1]), x_shape)),
        "convt_same_lower_s2": (helper.make_node("ConvTranspose", ["x", "w"], ["y"], auto_pad="SAME_LOWER", strides=[2, 2]),
                                {"w": wt}, lambda x_shape: convt_twin(wt, None, dict(auto_pad="SAME_LOWER", strides=[2, 2]), x_shape)),
        "convt_s2_p1_op1": (helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1],
                                             output_padding=[1, 1]), {"w": wt},
                            lambda x_shape: convt_twin(wt, None, dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]), x_shape)),
        "avgpool_ceil_p1_cip0": (helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                                  pads=[1, 1, 1, 1], ceil_mode=1), {},
                                 lambda x_shape: (lambda t: F.avg_pool2d(t, 3, 2, 1, ceil_mode=True, count_include_pad=False))),
        "avgpool_same_upper": (helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                                auto_pad="SAME_UPPER"), {}, None),
        "maxpool_ceil_p1": (helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                             pads=[1, 1, 1, 1], ceil_mode=1), {},
                            lambda x_shape: (lambda t: F.max_pool2d(t, 3, 2, 1, ceil_mode=True))),
        "maxpool_same_lower": (helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                                auto_pad="SAME_LOWER"), {},
                               lambda x_shape: (lambda t: F.max_pool2d(torch_pad(
                                   t, *same_pads(x_shape[2:], [3, 3], [2, 2], [1, 1], "SAME_LOWER"), value=-np.inf), 3, 2))),
        "global_max": (helper.make_node("GlobalMaxPool", ["x"], ["y"]), {},
                       lambda x_shape: (lambda t: F.adaptive_max_pool2d(t, 1))),
        "global_avg": (helper.make_node("GlobalAveragePool", ["x"], ["y"]), {},
                       lambda x_shape: (lambda t: t.mean((2, 3), keepdim=True))),
    }


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("case", sorted(_dyn_cases()))
def test_dynamic_batch_and_spatial(case, opset):
    """One augmented model, run at two batch sizes and two spatial sizes of both parities."""
    node, inits, twin = _dyn_cases()[case]
    model = make_dynamic_model(node, np.zeros((1, 3, 1, 1), np.float32), inits, opset)
    gmodel, built = gradient_model(model, ["x"], "y")
    onnx.checker.check_model(gmodel, full_check=True)
    rng = np.random.default_rng(22)
    for x_shape in [(2, 3, 9, 11), (3, 3, 12, 10)]:
        x = rng.standard_normal(x_shape).astype(np.float32)
        y = run(model, {"x": x}, ["y"])["y"]
        seed = rng.standard_normal(y.shape).astype(np.float32)
        out = run(gmodel, {"x": x, built.seed: seed}, [built.gradients["x"], "y"])
        gx = out[built.gradients["x"]]
        assert np.array_equal(out["y"], y)
        if twin is None:  # linear op without a torch twin for these pads: adjoint identity
            u = rng.standard_normal(x_shape).astype(np.float32)
            lhs = float(np.sum(seed.astype(np.float64) * run(model, {"x": u}, ["y"])["y"]))
            rhs = float(np.sum(gx.astype(np.float64) * u))
            assert _record("dynamic", abs(lhs - rhs) / (abs(lhs) + abs(rhs))) < 1e-5
            continue
        (ref,), y_ref = torch_vjp(twin(x_shape), [x], seed)
        assert rel_err(y, y_ref) < TOL
        assert _record("dynamic", rel_err(gx, ref)) < TOL


@pytest.mark.parametrize("ceil_mode,count_include_pad", [(0, 0), (1, 0), (1, 1)])
def test_average_pool_dilations_opset19(ceil_mode, count_include_pad):
    """AveragePool gained dilations at opset 19; torch has no dilated avg_pool, and the op is linear."""
    x = np.random.default_rng(8).standard_normal((1, 2, 11, 10)).astype(np.float32)
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 2], strides=[2, 1], dilations=[2, 3],
                            pads=[1, 1, 2, 0], ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    model = make_model([node], {"x": x}, ["y"], opset=19)
    err = _record("AveragePool(dot)", dot_product_check(model, {"x": x}, "x", "y", eps=1e-1))
    assert err < 1e-5


# --------------------------------------------------------------------------- Conv's input gradient as a Conv
# conv_adjoint: stride 1 -> Conv with the transposed, flipped weight; large strided depthwise
# kernels -> zero insertion + stride-1 Conv; the rest stays ConvTranspose. Each case names the
# form it must take, so a speed path cannot silently fall back.
ADJ_TOL = 1e-5
ADJOINT_CASES = {
    # name: (x shape, w shape, attrs, expected form)
    "s1_group1": ((2, 3, 9, 8), (4, 3, 3, 3), dict(pads=[1, 1, 1, 1]), "conv"),
    "s1_group2": ((2, 4, 9, 8), (6, 2, 3, 3), dict(group=2, pads=[1, 1, 1, 1]), "conv"),
    "s1_depthwise": ((2, 5, 9, 8), (5, 1, 3, 3), dict(group=5, pads=[1, 1, 1, 1]), "conv"),
    "s1_depthwise_mult3": ((1, 2, 7, 8), (6, 1, 5, 5), dict(group=2, pads=[2, 2, 2, 2]), "conv"),
    "s1_dilation2_asym": ((1, 3, 11, 10), (4, 3, 3, 3), dict(dilations=[2, 2], pads=[1, 4, 3, 0]), "conv"),
    "s1_depthwise_dil2_rect": ((1, 4, 10, 11), (4, 1, 3, 5), dict(group=4, dilations=[2, 1], pads=[0, 2, 4, 1]), "conv"),
    "s1_same_upper_k4": ((1, 2, 7, 8), (3, 2, 4, 4), dict(auto_pad="SAME_UPPER"), "conv"),
    "s1_same_lower_k4x3": ((1, 2, 9, 8), (3, 2, 4, 3), dict(auto_pad="SAME_LOWER"), "conv"),
    "s1_valid": ((2, 3, 8, 9), (4, 3, 3, 2), dict(auto_pad="VALID"), "conv"),
    "s1_1x1": ((2, 6, 5, 7), (4, 6, 1, 1), {}, "conv"),
    "s1_conv1d_d2": ((2, 3, 17), (4, 3, 3), dict(dilations=[2], pads=[3, 1]), "conv"),
    "s1_conv3d_group": ((1, 4, 5, 6, 5), (4, 2, 3, 3, 3), dict(group=2, pads=[1, 0, 1, 1, 2, 1]), "conv"),
    "s1_pad_beyond_kernel": ((1, 2, 6, 6), (3, 2, 1, 1), dict(pads=[1, 1, 1, 1]), "convtranspose"),
    "dw5_s2_even": ((2, 6, 12, 12), (6, 1, 5, 5), dict(group=6, strides=[2, 2], pads=[2, 2, 2, 2]), "zero_insert"),
    "dw5_s2_odd": ((1, 6, 13, 11), (6, 1, 5, 5), dict(group=6, strides=[2, 2], pads=[2, 2, 2, 2]), "zero_insert"),
    "dw5_s2_same_upper_even": ((1, 4, 12, 10), (4, 1, 5, 5), dict(group=4, strides=[2, 2], auto_pad="SAME_UPPER"),
                               "zero_insert"),
    "dw5_s2_same_lower_odd": ((1, 4, 11, 13), (4, 1, 5, 5), dict(group=4, strides=[2, 2], auto_pad="SAME_LOWER"),
                              "zero_insert"),
    "dw5_s2_mult2_valid": ((1, 3, 11, 12), (6, 1, 5, 5), dict(group=3, strides=[2, 2], auto_pad="VALID"), "zero_insert"),
    "dw7_s3_dil1_asym": ((1, 3, 16, 14), (3, 1, 7, 7), dict(group=3, strides=[3, 3], pads=[3, 1, 2, 3]), "zero_insert"),
    "dw5_s2_conv3d": ((1, 2, 7, 8, 6), (2, 1, 5, 5, 5), dict(group=2, strides=[2, 2, 2], pads=[2, 2, 2, 2, 2, 2]),
                      "zero_insert"),
    "dw5_s2_conv1d": ((2, 3, 15), (3, 1, 5), dict(group=3, strides=[2], pads=[2, 1]), "zero_insert"),
    "dw3_s2_even": ((2, 6, 12, 12), (6, 1, 3, 3), dict(group=6, strides=[2, 2], pads=[1, 1, 1, 1]), "convtranspose"),
    "dw3_s2_odd": ((1, 6, 13, 11), (6, 1, 3, 3), dict(group=6, strides=[2, 2], pads=[1, 1, 1, 1]), "convtranspose"),
    "1x1_s2_odd": ((2, 4, 9, 11), (3, 4, 1, 1), dict(strides=[2, 2]), "convtranspose"),
    "3x3_s2": ((1, 3, 10, 9), (4, 3, 3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1]), "convtranspose"),
    "7x7_s2_stem": ((1, 3, 20, 18), (8, 3, 7, 7), dict(strides=[2, 2], pads=[3, 3, 3, 3]), "convtranspose"),
}


def _adjoint_form(gmodel, n_forward):
    """Which form the input gradient took: the backward's spatial ops after the forward node."""
    ops = [n for n in gmodel.graph.node[n_forward:]]
    transposes = [n for n in ops if n.op_type == "ConvTranspose"]
    convs = [n for n in ops if n.op_type == "Conv"]
    if convs and not transposes:
        return "conv"
    if convs and all(any(a.name == "kernel_shape" and all(k == 1 for k in a.ints) for a in n.attribute)
                     for n in transposes):
        return "zero_insert"
    return "convtranspose" if transposes and not convs else "mixed"


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("case", sorted(ADJOINT_CASES))
def test_conv_input_gradient_forms(case, opset):
    x_shape, w_shape, attrs, form = ADJOINT_CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    gx, ref = check_against_torch("Conv(adjoint)", node, x, conv_twin(w, None, attrs, x_shape), opset, {"w": w},
                                  tol=ADJ_TOL)
    assert np.abs(ref).max() > 1e-3  # a real gradient, not two zero maps
    gmodel, _ = gradient_model(make_model([node], {"x": x}, ["y"], {"w": w}, opset=opset), ["x"], "y")
    assert _adjoint_form(gmodel, 1) == form


def test_stride1_depthwise_gradient_has_no_conv_transpose():
    """The speed path itself: a stride-1 depthwise Conv's input gradient is a Conv, no ConvTranspose."""
    x = np.random.default_rng(30).standard_normal((1, 8, 10, 10)).astype(np.float32)
    w = np.random.default_rng(31).standard_normal((8, 1, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=8, pads=[1, 1, 1, 1])
    gmodel, _ = gradient_model(make_model([node], {"x": x}, ["y"], {"w": w}, opset=13), ["x"], "y")
    ops = [n.op_type for n in gmodel.graph.node]
    assert "ConvTranspose" not in ops and ops.count("Conv") == 2


@pytest.mark.parametrize("case", ["s1_group2", "dw5_s2_odd"])
def test_conv_adjoint_weight_computed_in_graph(case, tmp_path):
    """W' is derived from W by graph nodes: no new weight-sized initializer (the file does not
    grow), and ONNX Runtime folds those nodes when the session is created (its optimized model
    keeps no Slice or Transpose)."""
    import onnxruntime as ort
    x_shape, w_shape, attrs, _ = ADJOINT_CASES[case]
    x = np.zeros(x_shape, np.float32)
    w = np.random.default_rng(32).standard_normal(w_shape).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], {"x": x}, ["y"], {"w": w}, opset=17)
    gmodel, _ = gradient_model(model, ["x"], "y")
    added = [i for i in gmodel.graph.initializer if i.name != "w"]
    assert sum(int(np.prod(i.dims)) for i in added) < w.size
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(gmodel.SerializeToString(), options, providers=["CPUExecutionProvider"])
    folded = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "Slice" not in folded and "Transpose" not in folded and "Reshape" not in folded


@pytest.mark.parametrize("source", ["input", "dequantize"])
def test_conv_adjoint_with_a_weight_that_is_not_constant(source):
    """A weight fed at run time or produced by DequantizeLinear: W' is computed at run time."""
    rng = np.random.default_rng(33)
    x = rng.standard_normal((2, 4, 8, 9)).astype(np.float32)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    attrs = dict(group=2, pads=[1, 0, 1, 2])
    if source == "input":
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"], **attrs)]
        model = make_model(nodes, {"x": x, "w": w}, ["y"], opset=13)
        feeds, w_used = {"x": x, "w": w}, w
    else:
        scale = np.float32(0.05)
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        nodes = [helper.make_node("DequantizeLinear", ["q", "scale"], ["w"]),
                 helper.make_node("Conv", ["x", "w"], ["y"], **attrs)]
        model = make_model(nodes, {"x": x}, ["y"], {"q": q, "scale": scale}, opset=13)
        feeds, w_used = {"x": x}, q.astype(np.float32) * scale
    gmodel, built = gradient_model(model, ["x"], "y")
    assert _adjoint_form(gmodel, len(nodes)) == "conv"
    y = run(model, feeds, ["y"])["y"]
    seed = rng.standard_normal(y.shape).astype(np.float32)
    gx = run(gmodel, dict(feeds, **{built.seed: seed}), [built.gradients["x"]])[built.gradients["x"]]
    (ref,), _ = torch_vjp(conv_twin(w_used, None, attrs, x.shape), [x], seed)
    assert _record("Conv(adjoint)", rel_err(gx, ref)) < ADJ_TOL


def test_conv_adjoint_float16_model():
    """Half-precision model: the backward runs in float32 on widened copies of x and W."""
    rng = np.random.default_rng(34)
    x = rng.standard_normal((1, 4, 9, 8)).astype(np.float16)
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float16)
    attrs = dict(group=4, pads=[1, 1, 1, 1])
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    model = make_model([node], {"x": x}, ["y"], {"w": w}, opset=13)
    gmodel, built = gradient_model(model, ["x"], "y")
    gmodel.graph.output[-1].type.tensor_type.elem_type = TensorProto.FLOAT  # the harness declares x's type
    assert _adjoint_form(gmodel, 1) == "conv"
    seed_type = next(i for i in gmodel.graph.input if i.name == built.seed).type.tensor_type.elem_type
    seed = rng.standard_normal((1, 4, 9, 8)).astype(helper.tensor_dtype_to_np_dtype(seed_type))
    gx = run(gmodel, {"x": x, built.seed: seed}, [built.gradients["x"]])[built.gradients["x"]]
    (ref,), _ = torch_vjp(conv_twin(w.astype(np.float32), None, attrs, x.shape), [x.astype(np.float32)],
                          seed.astype(np.float64))
    assert gx.dtype == np.float32 and _record("Conv(adjoint fp16)", rel_err(gx, ref)) < ADJ_TOL


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("case", ["s1_depthwise_dil2_rect", "s1_same_upper_k4", "s1_conv3d_group", "dw5_s2_odd"])
def test_conv_adjoint_dynamic_spatial(case, opset):
    """Symbolic batch and spatial sizes, run at two sizes of both parities: the stride-1 form
    (static pads even for SAME) needs no size; the strided depthwise one falls back to ConvTranspose."""
    _, w_shape, attrs, form = ADJOINT_CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()) + 1)
    w = rng.standard_normal(w_shape).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    n_sp = len(w_shape) - 2
    model = make_dynamic_model(node, np.zeros((1, w_shape[1] * attrs.get("group", 1)) + (1,) * n_sp, np.float32),
                               {"w": w}, opset)
    gmodel, built = gradient_model(model, ["x"], "y")
    onnx.checker.check_model(gmodel, full_check=True)
    assert _adjoint_form(gmodel, 1) == ("convtranspose" if form == "zero_insert" else form)
    channels = w_shape[1] * attrs.get("group", 1)
    for spatial in [(9, 11, 10)[:n_sp], (12, 8, 7)[:n_sp]]:
        x_shape = (2, channels) + spatial
        x = rng.standard_normal(x_shape).astype(np.float32)
        y = run(model, {"x": x}, ["y"])["y"]
        seed = rng.standard_normal(y.shape).astype(np.float32)
        gx = run(gmodel, {"x": x, built.seed: seed}, [built.gradients["x"]])[built.gradients["x"]]
        (ref,), y_ref = torch_vjp(conv_twin(w, None, attrs, x_shape), [x], seed)
        assert rel_err(y, y_ref) < TOL
        assert _record("Conv(adjoint dynamic)", rel_err(gx, ref)) < ADJ_TOL


def _live_nodes(model, output):
    """The nodes `output` depends on, in graph order (emitted helpers nothing reads are pruned by
    the augmenter, not by the harness)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    live, todo = set(), [output]
    while todo:
        node = producers.get(todo.pop())
        if node is not None and id(node) not in live:
            live.add(id(node))
            todo.extend(i for i in node.input if i)
    return [n for n in model.graph.node if id(n) in live]


def _computed_pad_conv_model(pads, conv_attrs, w, x_shape, opset=13):
    """x -> Pad(pads computed by Constant/ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast nodes,
    as torch exports F.pad for TF-style "same" padding) -> Conv(pads 0). Shape inference loses
    the padded sizes; input sizes are fixed apart from the batch."""
    n_sp = len(x_shape) - 2
    # torch's layout: [last axis begin, last axis end, ..., first axis begin, first axis end]
    torch_order = []
    for i in reversed(range(n_sp)):
        torch_order += [pads[i], pads[n_sp + i]]
    c = lambda name, v: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(v, np.int64)))
    nodes = [c("zeros_n", [4]), helper.make_node("ConstantOfShape", ["zeros_n"], ["zeros"],
                                                  value=helper.make_tensor("v", TensorProto.INT64, [1], [0])),
             c("given", torch_order), helper.make_node("Concat", ["given", "zeros"], ["flat"], axis=0),
             c("pairs_shape", [-1, 2]), helper.make_node("Reshape", ["flat", "pairs_shape"], ["pairs"]),
             c("st", [-1]), c("en", [-(2 ** 63)]), c("ax", [0]), c("sp", [-1]),
             helper.make_node("Slice", ["pairs", "st", "en", "ax", "sp"], ["reversed"]),
             helper.make_node("Transpose", ["reversed"], ["cols"], perm=[1, 0]),
             c("flat_shape", [-1]), helper.make_node("Reshape", ["cols", "flat_shape"], ["onnx_pads"]),
             helper.make_node("Cast", ["onnx_pads"], ["pads64"], to=TensorProto.INT64),
             helper.make_node("Pad", ["x", "pads64"], ["xp"], mode="constant"),
             helper.make_node("Conv", ["xp", "w"], ["y"], **conv_attrs)]
    return make_model(nodes, {"x": np.zeros(x_shape, np.float32)}, ["y"], {"w": w}, opset=opset, dynamic_batch=True)


@pytest.mark.parametrize("case", ["dw3_s1", "dw3_s2_tf_same", "dw5_s2_tf_same", "3x3_s1_group1"])
def test_pad_before_conv_is_absorbed_into_the_adjoint(case):
    """TF-style "same" padding (explicit Pad, Conv without pads): the pads fold to constants, the
    padded sizes are measured, and the Pad's gradient (a crop) goes into the adjoint's own pads:
    no Slice, Pad or shape arithmetic at run time, and the gradient is torch's."""
    from onnxcam import augment  # noqa: F401  (the augmenter's path: add_gradients via the harness)
    spec = {"dw3_s1": ((2, 4, 9, 9), (4, 1, 3, 3), dict(group=4), [1, 1, 1, 1]),
            "dw3_s2_tf_same": ((2, 4, 10, 9), (4, 1, 3, 3), dict(group=4, strides=[2, 2]), [0, 1, 1, 1]),
            "dw5_s2_tf_same": ((1, 4, 12, 11), (4, 1, 5, 5), dict(group=4, strides=[2, 2]), [1, 2, 2, 2]),
            "3x3_s1_group1": ((2, 3, 8, 7), (5, 3, 3, 3), {}, [1, 1, 1, 1])}[case]
    x_shape, w_shape, attrs, pads = spec
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    model = _computed_pad_conv_model(pads, attrs, w, x_shape)
    gmodel, built = gradient_model(model, ["x"], "y")
    backward = [n.op_type for n in _live_nodes(gmodel, built.gradients["x"])[len(model.graph.node):]]
    assert not {"Shape", "Pad", "Gather"} & set(backward)
    assert backward.count("Slice") <= 1  # the weight's flip (folded by ONNX Runtime), no crop
    y = run(model, {"x": x}, ["y"])["y"]
    seed = rng.standard_normal(y.shape).astype(np.float32)
    gx = run(gmodel, {"x": x, built.seed: seed}, [built.gradients["x"]])[built.gradients["x"]]
    twin = conv_twin(w, None, dict(attrs, pads=pads), x_shape)
    (ref,), y_ref = torch_vjp(twin, [x], seed)
    assert rel_err(y, y_ref) < TOL
    assert _record("Conv(after Pad)", rel_err(gx, ref)) < ADJ_TOL


def test_measured_sizes_share_the_input_batch_symbol():
    """Sizes measured for a fixed-size input keep one batch symbol (the input's): a residual Add
    around a computed Pad + Conv then needs no run-time unbroadcasting (Shape/ReduceSum)."""
    rng = np.random.default_rng(50)
    x_shape = (2, 4, 9, 9)
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    model = _computed_pad_conv_model([1, 1, 1, 1], dict(group=4), w, x_shape)
    model.graph.node.append(helper.make_node("Add", ["y", "x"], ["z"]))
    model.graph.output[0].name = "z"
    gmodel, built = gradient_model(model, ["x"], "z")
    backward = [n.op_type for n in _live_nodes(gmodel, built.gradients["x"])[len(model.graph.node):]]
    assert not {"Shape", "ReduceSum", "Pad"} & set(backward) and backward.count("Slice") <= 1
    x = rng.standard_normal(x_shape).astype(np.float32)
    z = run(model, {"x": x}, ["z"])["z"]
    seed = rng.standard_normal(z.shape).astype(np.float32)
    gx = run(gmodel, {"x": x, built.seed: seed}, [built.gradients["x"]])[built.gradients["x"]]
    conv = conv_twin(w, None, dict(group=4, pads=[1, 1, 1, 1]), x_shape)
    (ref,), _ = torch_vjp(lambda t: conv(t) + t, [x], seed)
    assert _record("Conv(after Pad)", rel_err(gx, ref)) < ADJ_TOL
