"""Elementwise and activation VJP rules (rules/elementwise.py, rules/activations.py) against torch
float64 autograd.

Each test builds a one-node (or tiny) ONNX model, asks onnxcam for the gradient of
sum(seed * y) and compares it with torch.autograd of the equivalent functional op. The model is
first built in float64; ONNX Runtime's CPU provider has no float64 kernel for many activations
(HardSigmoid, Elu, Erf, Where, Greater...), and then the same check runs in float32 with a
float32 tolerance. Kinks (Relu/Clip/HardSwish/HardSigmoid bounds, Abs/Elu at 0) are pinned with
inputs exactly on them, since only the reference can decide those.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "2")

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from harness import NP_TO_ONNX, ort_vjp, rel_err, torch_vjp
from onnxcam.autodiff.shapes import infer_infos, make_value_info

OPSETS = [11, 13, 17]
# float64 results agree with torch to rounding; float32 ones to a few ulps of the largest value.
TOL = {np.float64: 1e-9, np.float32: 2e-6}
WORST = {}  # op family -> (worst relative error, dtype) — printed at the end with -s


def _record(family, err, dtype):
    key = f"{family} [{np.dtype(dtype).name}]"
    WORST[key] = max(WORST.get(key, 0.0), err)


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    print("\nworst relative error per op family:")
    for key in sorted(WORST):
        print(f"  {key:40s} {WORST[key]:.2e}")


# --------------------------------------------------------------------------- helpers
def build(nodes, inputs, outputs=("y",), initializers=None, opset=13, symbolic=None):
    """A model whose inputs are declared with the shapes of the example arrays, except the axes in
    `symbolic` ({input name: {axis: symbol}}) which become dim_params. By default the first axis
    of the inputs of the largest rank that carry the batch (size > 1) is the symbol "N"."""
    if symbolic is None:
        top = max(np.ndim(a) for a in inputs.values())
        batch = max((np.shape(a)[0] for a in inputs.values() if np.ndim(a) == top and top > 0), default=1)
        symbolic = {k: {0: "N"} for k, a in inputs.items() if np.ndim(a) == top and top > 0
                    and np.shape(a)[0] == batch and batch > 1}
    vis = []
    for name, arr in inputs.items():
        shape = list(np.shape(arr))
        for axis, sym in symbolic.get(name, {}).items():
            shape[axis] = sym
        vis.append(helper.make_tensor_value_info(name, NP_TO_ONNX[np.asarray(arr).dtype], shape))
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(nodes, "t", vis, [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None)
                                                 for o in outputs], inits)
    opset_ids = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opset_ids)
    model.ir_version = min(helper.find_min_ir_version_for(opset_ids), 10)
    infos = infer_infos(model)
    del model.graph.output[:]
    model.graph.output.extend(make_value_info(o, infos[o]) for o in outputs)
    return model


def _float_inputs(inputs, dtype):
    return {k: (np.asarray(v).astype(dtype) if np.asarray(v).dtype.kind == "f" else np.asarray(v))
            for k, v in inputs.items()}


def check(family, make_nodes, inputs, torch_fn, wrt, opset, *, initializers=None, symbolic=None,
          dtypes=(np.float64, np.float32), seed_rng=0, tol_scale=1.0):
    """Compare onnxcam's gradients of sum(seed*y) w.r.t. `wrt` with torch float64 autograd.

    `make_nodes()` returns the nodes; `torch_fn(*tensors)` takes the float inputs in the order of
    `inputs` (non-float inputs, like a bool condition, are passed as torch tensors too). The first
    dtype ORT can run is used. Returns the gradients (for further checks)."""
    last_error = None
    for dtype in dtypes:
        feeds = _float_inputs(inputs, dtype)
        inits = _float_inputs(initializers or {}, dtype)
        try:
            model = build(make_nodes(), feeds, initializers=inits, opset=opset, symbolic=symbolic)
            y_shape = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]) \
                .run(["y"], feeds)[0].shape
            seed = np.random.default_rng(seed_rng).standard_normal(y_shape).astype(dtype)
            grads, y = ort_vjp(model, feeds, list(wrt), "y", seed)
        except (ort.capi.onnxruntime_pybind11_state.NotImplemented, ort.capi.onnxruntime_pybind11_state.Fail,
                ort.capi.onnxruntime_pybind11_state.InvalidGraph) as e:
            if dtype == dtypes[-1] or not _no_kernel(e):
                raise
            last_error = e
            continue
        names = list(inputs)
        float_names = [k for k in names if feeds[k].dtype.kind == "f"]

        def ref_fn(*ts):
            by_name = dict(zip(float_names, ts))
            args = [by_name[k] if k in by_name else torch.tensor(feeds[k]) for k in names]
            return torch_fn(*args)

        ref_grads, ref_y = torch_vjp(ref_fn, [feeds[k] for k in float_names], seed)
        ref = dict(zip(float_names, ref_grads))
        tol = TOL[dtype] * tol_scale
        # The forward check only guards the test itself (is the reference the same function?):
        # some float64 kernels use float32 constants inside (ORT's tanh-Gelu), so it is loose.
        assert rel_err(y, ref_y) < (1e-5 if dtype == np.float32 else 1e-7), "forward differs from torch"
        for name, g in zip(wrt, grads):
            assert g.dtype == feeds[name].dtype, f"gradient of {name} has dtype {g.dtype}"
            err = rel_err(g, ref[name])
            _record(family, err, dtype)
            assert err < tol, f"{family}: d/d{name} rel err {err:.3g} (dtype {np.dtype(dtype).name})"
        return grads
    raise last_error


def _no_kernel(e):
    """ORT has no kernel (or the schema no type) for float64 here: retry in float32."""
    msg = str(e)
    return ("Could not find an implementation" in msg or "NOT_IMPLEMENTED" in msg
            or "Type 'tensor(double)'" in msg)


def f32(v):
    """Float attributes are stored as float32 in ONNX: the reference must use the same value."""
    return float(np.float32(v))


def node(op, inputs, outputs=("y",), **attrs):
    return helper.make_node(op, list(inputs), list(outputs), **attrs)


def rnd(*shape, seed=0, low=None, high=None):
    rng = np.random.default_rng(seed)
    if low is not None:
        return rng.uniform(low, high, shape)
    return rng.standard_normal(shape)


# --------------------------------------------------------------------------- binary arithmetic
BROADCASTS = [  # (shape of a, shape of b)
    ((2, 3, 4, 5), (2, 3, 4, 5)),
    ((2, 3, 4, 5), (2, 3, 1, 1)),   # SE-block [N,C,1,1] scale
    ((2, 3, 1, 1), (2, 3, 4, 5)),
    ((2, 3, 4, 5), (5,)),           # rank mismatch
    ((4, 1), (2, 3, 4, 5)),
    ((2, 3, 4, 5), ()),             # scalar
    ((), (2, 3, 4, 5)),
    ((1, 3, 1, 5), (2, 1, 4, 1)),   # both operands broadcast
    ((2, 3, 4, 5), (1, 3, 4, 1)),
]
BINARY = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a / b,
    "Pow": lambda a, b: a ** b,
}


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("shapes", BROADCASTS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("op", list(BINARY))
def test_binary_broadcast_both_operands(op, shapes, opset):
    sa, sb = shapes
    a = rnd(*sa, seed=1, low=0.5, high=2.0) if op in ("Pow",) else rnd(*sa, seed=1)
    if op in ("Div", "Pow"):  # keep the divisor away from 0 and the exponent moderate
        b = rnd(*sb, seed=2, low=0.5, high=2.0) * (np.where(rnd(*sb, seed=3) > 0, 1, -1) if op == "Div" else 1)
    else:
        b = rnd(*sb, seed=2)
    check(op, lambda: [node(op, ["a", "b"])], {"a": a, "b": b}, BINARY[op], ["a", "b"], opset)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("op", list(BINARY))
def test_binary_gradient_for_one_operand_with_constant_other(op, opset):
    """The other operand is an initializer (the usual case in exported models)."""
    a = rnd(2, 3, 4, 4, seed=4, low=0.5, high=2.0)
    c = rnd(3, 1, 1, seed=5, low=0.5, high=2.0)
    check(op, lambda: [node(op, ["a", "c"])], {"a": a}, lambda t: BINARY[op](t, torch.tensor(c)), ["a"], opset,
          initializers={"c": c})
    check(op, lambda: [node(op, ["c", "a"])], {"a": a}, lambda t: BINARY[op](torch.tensor(c), t), ["a"], opset,
          initializers={"c": c})


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("op", ["Add", "Mul", "Sub", "Div"])
@pytest.mark.parametrize("m", [1, 2])
def test_binary_symbolic_operand_that_may_be_one(op, m, opset):
    """b's first axis is a different symbol "M": only at run time is it known whether it broadcasts
    (M=1, gradient summed) or not (M=N)."""
    a = rnd(2, 3, 4, seed=6)
    b = rnd(m, 3, 4, seed=7, low=0.5, high=2.0)
    check(op, lambda: [node(op, ["a", "b"])], {"a": a, "b": b}, BINARY[op], ["a", "b"], opset,
          symbolic={"a": {0: "N"}, "b": {0: "M"}})


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("exponent", [2.0, 3.0, 0.5, -1.5])
def test_pow_constant_float_exponent(exponent, opset):
    a = rnd(2, 3, 5, seed=8, low=0.3, high=2.0)
    check("Pow", lambda: [node("Pow", ["a", "e"])], {"a": a}, lambda t: t ** exponent, ["a"], opset,
          initializers={"e": np.array(exponent)})


@pytest.mark.parametrize("opset", [13, 17])
def test_pow_integer_exponent(opset):
    """Pow-12+ allows an integer exponent; its gradient is cast to the base's type."""
    a = rnd(2, 3, 5, seed=9)  # negative bases are fine for an integer exponent
    e = np.array(3, np.int64)
    check("Pow", lambda: [node("Pow", ["a", "e"])], {"a": a}, lambda t: t ** 3, ["a"], opset,
          initializers={"e": e})


# --------------------------------------------------------------------------- unary maths
UNARY = {  # op: (torch twin, input sampler)
    "Neg": (torch.neg, lambda: rnd(2, 3, 4, seed=10)),
    "Sqrt": (torch.sqrt, lambda: rnd(2, 3, 4, seed=10, low=0.2, high=3.0)),
    "Reciprocal": (torch.reciprocal, lambda: rnd(2, 3, 4, seed=10, low=0.3, high=3.0) * np.where(rnd(2, 3, 4, seed=11) > 0, 1, -1)),
    "Exp": (torch.exp, lambda: rnd(2, 3, 4, seed=10)),
    "Log": (torch.log, lambda: rnd(2, 3, 4, seed=10, low=0.2, high=3.0)),
    "Abs": (torch.abs, lambda: np.concatenate([rnd(2, 3, 4, seed=10), np.zeros((1, 3, 4))])),  # sign(0)=0 pinned
    "Erf": (torch.erf, lambda: rnd(2, 3, 4, seed=10)),
    "Sin": (torch.sin, lambda: rnd(2, 3, 4, seed=10) * 3),
    "Cos": (torch.cos, lambda: rnd(2, 3, 4, seed=10) * 3),
    "Sigmoid": (torch.sigmoid, lambda: rnd(2, 3, 4, seed=10) * 3),
    "Tanh": (torch.tanh, lambda: rnd(2, 3, 4, seed=10) * 2),
    "Relu": (F.relu, lambda: np.concatenate([rnd(2, 3, 4, seed=10), np.zeros((1, 3, 4))])),  # grad 0 at 0
    "Softplus": (F.softplus, lambda: rnd(2, 3, 4, seed=10) * 4),
    "Softsign": (F.softsign, lambda: np.concatenate([rnd(2, 3, 4, seed=10) * 3, np.zeros((1, 3, 4))])),
    "Identity": (lambda t: t, lambda: rnd(2, 3, 4, seed=10)),
}


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("op", list(UNARY))
def test_unary(op, opset):
    fn, sample = UNARY[op]
    check(op, lambda: [node(op, ["x"])], {"x": sample()}, fn, ["x"], opset)


# --------------------------------------------------------------------------- Clip / ReLU6
def _clip_nodes(lo, hi):
    return lambda: [node("Clip", ["x", "lo" if lo is not None else "", "hi" if hi is not None else ""])]


def _kinky(lo, hi, seed=12):
    """Random values spread over both sides of the bounds, plus values exactly on them."""
    x = rnd(3, 4, 6, seed=seed) * 4 + 2
    flat = x.reshape(-1)
    if lo is not None:
        flat[:5] = lo
    if hi is not None:
        flat[5:10] = hi
    return x


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("lo,hi", [(0.0, 6.0), (-1.0, 2.5), (0.0, None), (0.5, None), (None, 6.0), (None, -0.5)])
def test_clip_input_form_with_bounds_pinned(lo, hi, opset):
    """Clip follows hardtanh: the gradient is 0 AT the bounds (ReLU6 exports), inside it passes."""
    inits = {}
    if lo is not None:
        inits["lo"] = np.array(lo)
    if hi is not None:
        inits["hi"] = np.array(hi)
    ref = lambda t: F.hardtanh(t, -math.inf if lo is None else lo, math.inf if hi is None else hi)
    check("Clip", _clip_nodes(lo, hi), {"x": _kinky(lo, hi)}, ref, ["x"], opset, initializers=inits)


@pytest.mark.parametrize("opset", OPSETS)
def test_clip_is_relu6_at_the_kinks(opset):
    x = np.array([[-1.0, 0.0, 0.0, 1e-3, 3.0, 6.0 - 1e-3, 6.0, 6.0, 7.0]])
    check("Clip", _clip_nodes(0.0, 6.0), {"x": x}, F.relu6, ["x"], opset,
          initializers={"lo": np.array(0.0), "hi": np.array(6.0)})


@pytest.mark.parametrize("opset", OPSETS)
def test_clip_without_bounds_is_identity(opset):
    check("Clip", lambda: [node("Clip", ["x"])], {"x": rnd(2, 5, seed=13)}, lambda t: t, ["x"], opset)


@pytest.mark.parametrize("opset", OPSETS)
def test_clip_bounds_from_graph_inputs(opset):
    """min/max computed in the graph (not initializers) still work; they get no gradient."""
    x = _kinky(0.0, 6.0)
    nodes = lambda: [node("Identity", ["lo0"], ["lo"]), node("Identity", ["hi0"], ["hi"]),
                     node("Clip", ["x", "lo", "hi"])]
    check("Clip", nodes, {"x": x}, F.relu6, ["x"], opset,
          initializers={"lo0": np.array(0.0), "hi0": np.array(6.0)})


# --------------------------------------------------------------------------- parametric activations
@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("alpha", [0.01, 0.2, 1.5, -0.2])
def test_leaky_relu(alpha, opset):
    x = np.concatenate([rnd(2, 3, 4, seed=14), np.zeros((1, 3, 4))])  # slope at 0, as torch
    check("LeakyRelu", lambda: [node("LeakyRelu", ["x"], alpha=alpha)], {"x": x},
          lambda t: F.leaky_relu(t, f32(alpha)), ["x"], opset)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("slope_shape", [(3, 1, 1), (1,), (1, 1, 1)])
def test_prelu_slope_broadcast(slope_shape, opset):
    x = rnd(2, 3, 4, 5, seed=15)
    x[0, :, 0, 0] = 0.0
    slope = rnd(*slope_shape, seed=16) * 0.5
    w = torch.tensor(slope.reshape(-1))
    check("PRelu", lambda: [node("PRelu", ["x", "s"])], {"x": x}, lambda t: F.prelu(t, w), ["x"], opset,
          initializers={"s": slope})


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("alpha,beta,kinks", [(1 / 6, 0.5, (-3.0, 3.0)), (0.2, 0.5, (-2.5, 2.5)), (0.5, 0.25, (-0.5, 1.5))])
def test_hard_sigmoid(alpha, beta, kinks, opset):
    """torch exports F.hardsigmoid with alpha=1/6; ONNX's default is 0.2. Gradient alpha strictly
    inside (0, 1), 0 at the kinks (torch's hardsigmoid_backward uses -3 < x < 3)."""
    x = rnd(3, 4, 5, seed=17) * 3
    x.reshape(-1)[:4] = [kinks[0], kinks[1], kinks[0], kinks[1]]
    ref = (F.hardsigmoid if alpha == 1 / 6 else (lambda t: F.hardtanh(f32(alpha) * t + f32(beta), 0.0, 1.0)))
    check("HardSigmoid", lambda: [node("HardSigmoid", ["x"], alpha=alpha, beta=beta)], {"x": x}, ref, ["x"], opset,
          tol_scale=10)  # the float32 attributes alpha/beta differ from torch's 1/6 by ~1e-8 relative


@pytest.mark.parametrize("opset", [14, 17])
def test_hard_swish_with_kinks(opset):
    """torch: 0 for x <= -3, x/3 + 1/2 for -3 < x < 3, 1 for x >= 3 (pinned at exactly +-3)."""
    x = rnd(3, 4, 5, seed=18) * 4
    x.reshape(-1)[:6] = [-3.0, 3.0, -3.0, 3.0, 0.0, -3.0001]
    check("HardSwish", lambda: [node("HardSwish", ["x"])], {"x": x}, F.hardswish, ["x"], opset)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_elu(alpha, opset):
    x = np.concatenate([rnd(2, 3, 4, seed=19) * 2, np.zeros((1, 3, 4))])
    check("Elu", lambda: [node("Elu", ["x"], alpha=alpha)], {"x": x}, lambda t: F.elu(t, f32(alpha)), ["x"], opset)


@pytest.mark.parametrize("opset", OPSETS)
def test_selu(opset):
    """Also at x = 100, where exp(x) overflows float32: the unselected branch must not poison the
    gradient (the rule selects arithmetically, x*1 + y*0, so y must stay finite)."""
    x = np.concatenate([rnd(2, 3, 4, seed=20) * 2, np.zeros((1, 3, 4))])
    x[0, 0, :2] = [100.0, 95.0]
    check("Selu", lambda: [node("Selu", ["x"])], {"x": x}, F.selu, ["x"], opset)


@pytest.mark.parametrize("opset", [13, 17])  # Celu is opset 12+
@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_celu(alpha, opset):
    x = np.concatenate([rnd(2, 3, 4, seed=21) * 2, np.zeros((1, 3, 4))])
    x[0, 0, :2] = [100.0, 200.0]  # exp(x / alpha) overflows: see test_selu
    check("Celu", lambda: [node("Celu", ["x"], alpha=alpha)], {"x": x}, lambda t: F.celu(t, f32(alpha)), ["x"], opset)


@pytest.mark.parametrize("opset", [18, 20])  # Mish is opset 18+
def test_mish(opset):
    check("Mish", lambda: [node("Mish", ["x"])], {"x": rnd(2, 3, 4, seed=22) * 3}, F.mish, ["x"], opset)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_opset20(approximate):
    check("Gelu", lambda: [node("Gelu", ["x"], approximate=approximate)], {"x": rnd(2, 3, 4, seed=23) * 3},
          lambda t: F.gelu(t, approximate=approximate), ["x"], 20)


@pytest.mark.parametrize("opset", OPSETS)
def test_decomposed_gelu_via_erf(opset):
    """What the exporters emit below opset 20: x * 0.5 * (1 + erf(x / sqrt 2))."""
    nodes = lambda: [node("Div", ["x", "r2"], ["d"]), node("Erf", ["d"], ["e"]), node("Add", ["e", "one"], ["p"]),
                     node("Mul", ["x", "p"], ["m"]), node("Mul", ["m", "half"], ["y"])]
    check("Erf", nodes, {"x": rnd(2, 3, 8, seed=24) * 2}, F.gelu, ["x"], opset,
          initializers={"r2": np.array(math.sqrt(2.0)), "one": np.array(1.0), "half": np.array(0.5)})


# --------------------------------------------------------------------------- Softmax family
def _flat_softmax(fn, axis):
    def ref(t):
        axis_ = axis % t.dim()
        return fn(t.reshape(*t.shape[:axis_], -1), -1).reshape(t.shape)
    return ref


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [None, 1, 2, 3, -1, -3, 0])
def test_softmax_opset11_flattens_trailing_axes(op, axis):
    """Before opset 13, Softmax(axis) normalises over all axes from `axis` on (default axis=1)."""
    fn = torch.softmax if op == "Softmax" else torch.log_softmax
    attrs = {} if axis is None else {"axis": axis}
    x = rnd(2, 3, 4, 5, seed=25) * 2
    check(op, lambda: [node(op, ["x"], **attrs)], {"x": x}, _flat_softmax(fn, 1 if axis is None else axis), ["x"], 11)


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [None, 1, 2, -1, -2, 0])
def test_softmax_opset13_single_axis(op, axis, opset):
    fn = torch.softmax if op == "Softmax" else torch.log_softmax
    attrs = {} if axis is None else {"axis": axis}
    x = rnd(2, 3, 4, 5, seed=26) * 2
    check(op, lambda: [node(op, ["x"], **attrs)], {"x": x}, lambda t: fn(t, -1 if axis is None else axis), ["x"], opset)


# --------------------------------------------------------------------------- Where / variadic
@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("shapes", [((1, 3, 1, 5), (2, 3, 4, 5), (4, 1)), ((2, 3, 4, 5), (), (2, 3, 4, 5)),
                                    ((4, 5), (2, 1, 4, 5), (3, 1, 1))], ids=str)
def test_where_broadcast(shapes, opset):
    sc, sa, sb = shapes
    cond = rnd(*sc, seed=27) > 0
    a, b = rnd(*sa, seed=28), rnd(*sb, seed=29)
    sym = {"a": {0: "N"}} if len(sa) == 4 else {}
    check("Where", lambda: [node("Where", ["c", "a", "b"])], {"c": cond, "a": a, "b": b},
          lambda c, ta, tb: torch.where(c, ta, tb), ["a", "b"], opset, symbolic=sym)


VARIADIC = {
    "Sum": lambda *ts: sum(ts[1:], ts[0]),
    "Mean": lambda *ts: sum(ts[1:], ts[0]) / len(ts),
    "Max": lambda *ts: _chain(torch.maximum, ts),
    "Min": lambda *ts: _chain(torch.minimum, ts),
}


def _chain(fn, ts):
    out = ts[0]
    for t in ts[1:]:
        out = fn(out, t)
    return out


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("op", list(VARIADIC))
@pytest.mark.parametrize("shapes", [((2, 3, 4),), ((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (3, 1), (4,)),
                                    ((1, 3, 1), (2, 1, 4), ())], ids=str)
def test_variadic_broadcast(op, shapes, opset):
    """Random inputs: no ties, so Max/Min's tie rule does not matter here (see the next test)."""
    inputs = {f"x{i}": rnd(*s, seed=30 + i) for i, s in enumerate(shapes)}
    check(op, lambda: [node(op, list(inputs))], inputs, VARIADIC[op], list(inputs), opset)


def _ties(op):
    """a and b tie in half the entries; c (broadcast [1, 6]) joins a three-way tie in column 1."""
    a = np.round(rnd(2, 6, seed=40))
    b = a.copy()
    b[:, ::2] += np.sign(rnd(2, 3, seed=41))
    c = np.full((1, 6), -10.0 if op == "Max" else 10.0)
    c[0, 1] = a[:, 1].max() if op == "Max" else a[:, 1].min()
    return a, b, c


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("op", ["Max", "Min"])
def test_max_min_two_input_ties_split_evenly_as_torch(op, opset):
    """torch.maximum/minimum give each of two tied inputs half the gradient (float64 autograd)."""
    a, b, _ = _ties(op)
    model = build([node(op, ["a", "b"])], {"a": a, "b": b}, opset=opset)
    seed = rnd(2, 6, seed=42)
    (ga, gb), y = ort_vjp(model, {"a": a, "b": b}, ["a", "b"], "y", seed)
    fn = torch.maximum if op == "Max" else torch.minimum
    (ra, rb), ry = torch_vjp(fn, [a, b], seed)
    assert (a == b).any() and (a != b).any()  # ties and non-ties both exercised
    assert np.array_equal(y, ry)
    assert rel_err(ga, ra) < 1e-12 and rel_err(gb, rb) < 1e-12


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("op", ["Max", "Min"])
def test_max_min_three_input_ties_split_evenly_as_torch_amax(op, opset):
    """Three inputs, broadcast: 1/k to each of k tied inputs, as torch's amax/amin over the stacked
    inputs (the n-ary reading of torch's tie rule; ReduceMax follows the same)."""
    a, b, c = _ties(op)
    model = build([node(op, ["a", "b", "c"])], {"a": a, "b": b, "c": c}, opset=opset)
    seed = rnd(2, 6, seed=42)
    (ga, gb, gc), y = ort_vjp(model, {"a": a, "b": b, "c": c}, ["a", "b", "c"], "y", seed)

    def fn(*ts):
        stacked = torch.stack(torch.broadcast_tensors(*ts))
        return stacked.amax(0) if op == "Max" else stacked.amin(0)
    (ra, rb, rc), ry = torch_vjp(fn, [a, b, c], seed)
    assert np.array_equal(y, ry)
    assert np.any(np.isclose(ra, seed / 3)) and np.any(rc != 0)  # the three-way tie is exercised
    for got, ref in ((ga, ra), (gb, rb), (gc, rc)):
        assert rel_err(got, ref) < 1e-12


# --------------------------------------------------------------------------- Cast, Identity, Dropout
@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("src,dst", [(np.float32, np.float64), (np.float64, np.float32)])
def test_cast_between_float_types(src, dst, opset):
    """x -> Cast -> Mul(.., x cast again) -> y: the gradient comes back in x's own type."""
    x = rnd(2, 3, 4, seed=43).astype(src)
    to = NP_TO_ONNX[np.dtype(dst)]
    model = build([node("Cast", ["x"], ["c"], to=to), node("Mul", ["c", "c"], ["y"])], {"x": x}, opset=opset)
    seed = rnd(2, 3, 4, seed=44).astype(dst)
    (gx,), _ = ort_vjp(model, {"x": x}, ["x"], "y", seed)
    assert gx.dtype == src
    ref = 2 * x.astype(dst).astype(np.float64) * seed.astype(np.float64)
    err = rel_err(gx, ref)
    _record("Cast", err, np.float32)
    assert err < 1e-6


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_dropout_inference_is_identity(with_mask, opset):
    outs = ["y", "mask"] if with_mask else ["y"]
    check("Dropout", lambda: [node("Dropout", ["x"], outs)], {"x": rnd(2, 3, 4, seed=45)}, lambda t: t, ["x"], opset)


# --------------------------------------------------------------------------- invariants
def _chain_model(opset):
    """x[N,C,H,W] -> Mul by [C,1,1] -> Add its [N,C,1,1] mean -> SiLU -> Clip -> Tanh -> Softmax(axis=1).
    (ReduceMean keeps its axes attribute up to opset 17; Softmax flattens below opset 13.)"""
    return [node("Mul", ["x", "w"], ["m"]), node("ReduceMean", ["m"], ["p"], axes=[2, 3], keepdims=1),
            node("Add", ["m", "p"], ["a"]), node("Sigmoid", ["a"], ["s"]), node("Mul", ["a", "s"], ["silu"]),
            node("Clip", ["silu", "lo", "hi"], ["c"]), node("Tanh", ["c"], ["t"]),
            node("Softmax", ["t"], ["y"], axis=1)]


def _chain_torch(w, opset):
    def fn(t):
        m = t * torch.tensor(w, dtype=t.dtype)
        a = m + m.mean((2, 3), keepdim=True)
        tt = torch.tanh(F.hardtanh(a * torch.sigmoid(a), -0.5, 2.0))
        return _flat_softmax(torch.softmax, 1)(tt) if opset < 13 else torch.softmax(tt, 1)
    return fn


def test_gradient_is_linear_in_the_seed():
    opset = 11
    x = rnd(2, 3, 4, 5, seed=46)
    w = rnd(3, 1, 1, seed=47)
    inits = {"w": w, "lo": np.array(-0.5), "hi": np.array(2.0)}
    model = build(_chain_model(opset), {"x": x}, initializers=inits, opset=opset)
    model = _float32_if_needed(model, x)
    x = x.astype(_dtype_of(model))
    s1, s2 = rnd(2, 3, 4, 5, seed=48).astype(x.dtype), rnd(2, 3, 4, 5, seed=49).astype(x.dtype)
    (g1,), _ = ort_vjp(model, {"x": x}, ["x"], "y", s1)
    (g2,), _ = ort_vjp(model, {"x": x}, ["x"], "y", s2)
    (g12,), _ = ort_vjp(model, {"x": x}, ["x"], "y", (2.5 * s1 - 0.75 * s2).astype(x.dtype))
    assert rel_err(g12, 2.5 * g1.astype(np.float64) - 0.75 * g2) < (1e-12 if x.dtype == np.float64 else 1e-5)
    (ref,), _ = torch_vjp(_chain_torch(w, opset), [x], s1)
    assert rel_err(g1, ref) < 1e-5
    assert np.abs(g1).max() > 0


def _dtype_of(model):
    return helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)


def _float32_if_needed(model, x):
    """Clip has no float64 kernel at opset 11 in ORT: fall back to a float32 copy of the model."""
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        return model
    except (ort.capi.onnxruntime_pybind11_state.NotImplemented, ort.capi.onnxruntime_pybind11_state.Fail):
        m32 = build(_chain_model(11), {"x": x.astype(np.float32)}, opset=11, initializers={
            "w": numpy_helper.to_array(model.graph.initializer[0]).astype(np.float32),
            "lo": np.array(-0.5, np.float32), "hi": np.array(2.0, np.float32)})
        return m32


@pytest.mark.parametrize("opset", OPSETS)
def test_one_graph_serves_several_batch_sizes(opset):
    """The augmented graph is built once with a symbolic batch and run at batch 1 and 3."""
    from harness import gradient_model, run
    w = rnd(3, 1, 1, seed=50).astype(np.float32)
    inits = {"w": w, "lo": np.array(-0.5, np.float32), "hi": np.array(2.0, np.float32)}
    x3 = rnd(3, 3, 4, 5, seed=51).astype(np.float32)
    model = build(_chain_model(opset), {"x": x3}, initializers=inits, opset=opset)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    gmodel, built = gradient_model(model, ["x"], "y")
    onnx.checker.check_model(gmodel, full_check=True)
    for n in (1, 3):
        x = x3[:n]
        seed = rnd(n, 3, 4, 5, seed=52 + n).astype(np.float32)
        out = run(gmodel, {"x": x, built.seed: seed}, [built.gradients["x"]])
        (ref,), _ = torch_vjp(_chain_torch(w.astype(np.float64), opset), [x], seed)
        err = rel_err(out[built.gradients["x"]], ref)
        _record("chain (batch 1/3)", err, np.float32)
        assert err < 1e-5
