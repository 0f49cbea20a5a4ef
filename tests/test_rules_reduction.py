"""Reduce* VJP rules against torch float64 autograd: axes as attribute / constant input / run-time
input, keepdims, default all-axes, noop_with_empty_axes, ties and zeros."""

import numpy as np
import pytest
import torch
from onnx import helper

from harness import make_model, ort_vjp, rel_err, torch_vjp


WORST = {}


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = x.prod(d, keepdim=True)
    return x if keep else x.reshape([s for i, s in enumerate(x.shape) if i not in dims])


TWINS = {
    "ReduceSum": lambda x, d, k: x.sum(d, keepdim=k),
    "ReduceMean": lambda x, d, k: x.mean(d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.linalg.vector_norm(x, 2, d, keepdim=k),
    "ReduceL1": lambda x, d, k: x.abs().sum(d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(d, keepdim=k),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: torch.log(x.sum(d, keepdim=k)),
    "ReduceProd": _prod,
}


def _axes_as_input(op, opset):
    return opset >= (13 if op == "ReduceSum" else 18)


def _build(op, axes, keepdims, opset, x, runtime_axes=False, noop=None, dynamic=True, y_shape=None):
    """A one-node model; axes=None means no axes at all."""
    attrs = {"keepdims": keepdims}
    if noop is not None:
        attrs["noop_with_empty_axes"] = noop
    inputs, inits, node_inputs = {"x": x}, {}, ["x"]
    if axes is not None:
        if _axes_as_input(op, opset):
            arr = np.asarray(axes, np.int64)
            if runtime_axes:
                inputs["axes"] = arr
            else:
                inits["axes"] = arr
            node_inputs.append("axes")
        else:
            attrs["axes"] = list(axes)
    node = helper.make_node(op, node_inputs, ["y"], **attrs)
    model = make_model([node], inputs, ["y"], inits, opset=opset, dynamic_batch=dynamic)
    if runtime_axes and y_shape is not None:  # inference can't know the rank: declare it
        elem = model.graph.input[0].type.tensor_type.elem_type
        model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", elem, y_shape))
    feeds = {k: v for k, v in inputs.items()}
    return model, feeds


def _check(op, axes, keepdims, opset, x, runtime_axes=False, noop=None, tol=1e-9, dims=None, dynamic=True):
    if dims is None:
        dims = list(range(x.ndim)) if not axes else [a % x.ndim for a in axes]
    if dims == []:  # noop_with_empty_axes: no reduction, but the elementwise part stays (|x|, x^2...)
        ref_fn = lambda t: TWINS[op](t.unsqueeze(-1), [t.ndim], True).squeeze(-1)  # noqa: E731
    else:
        ref_fn = lambda t: TWINS[op](t, dims, bool(keepdims))  # noqa: E731
    y_ref = ref_fn(torch.tensor(x.astype(np.float64))).detach().numpy()
    model, feeds = _build(op, axes, keepdims, opset, x, runtime_axes, noop, dynamic, y_ref.shape)
    seed = np.random.default_rng(1).standard_normal(y_ref.shape).astype(x.dtype)
    (gx,), y = ort_vjp(model, feeds, ["x"], "y", seed)
    (ref,), _ = torch_vjp(ref_fn, [x], seed)
    assert y.shape == y_ref.shape
    err = rel_err(gx, ref)
    WORST[op] = max(WORST.get(op, 0.0), err)
    assert err < tol, (op, axes, keepdims, opset, err)
    return err


def _input(op, shape=(2, 3, 4), seed=0):
    x = np.random.default_rng(seed).standard_normal(shape)
    if op in ("ReduceLogSum",):
        x = np.abs(x) + 0.5
    if op == "ReduceProd":
        x = np.sign(x) * (np.abs(x) + 0.5)
    return x  # float64


@pytest.mark.parametrize("op", sorted(TWINS))
@pytest.mark.parametrize("opset", [11, 13, 17, 18])
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("axes", [None, [1], [-1, 0]])
def test_reduce_matches_torch(op, opset, keepdims, axes):
    _check(op, axes, keepdims, opset, _input(op))


@pytest.mark.parametrize("op", sorted(TWINS))
@pytest.mark.parametrize("keepdims", [0, 1])
def test_runtime_axes_input(op, keepdims):
    opset = 18
    _check(op, [0, -1], keepdims, opset, _input(op), runtime_axes=True)


@pytest.mark.parametrize("op", sorted(TWINS))
@pytest.mark.parametrize("runtime", [False, True])
def test_empty_axes(op, runtime):
    """Empty axes reduce everything, unless noop_with_empty_axes=1 (then Y = X)."""
    x = _input(op)
    _check(op, [], 0, 18, x, runtime_axes=runtime, noop=0, dims=[0, 1, 2])
    _check(op, [], 1, 18, x, runtime_axes=runtime, noop=1, dims=[])


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin"])
@pytest.mark.parametrize("opset", [13, 18])
def test_ties_split_evenly_like_amax(op, opset):
    x = np.random.default_rng(3).integers(-2, 3, size=(3, 4, 5)).astype(np.float64)  # many ties
    for keepdims in (0, 1):
        _check(op, [1, 2], keepdims, opset, x)
        _check(op, None, keepdims, opset, x)
    # and the split really differs from giving everything to one element
    model, feeds = _build(op, [2], 1, opset, x)
    (gx,), _ = ort_vjp(model, feeds, ["x"], "y", np.ones((3, 4, 1)))
    assert np.all(gx <= 1.0) and np.any((gx > 0) & (gx < 1))


def test_prod_with_zeros_is_exact():
    x = _input("ReduceProd", (3, 4, 5))
    x[0, 1, 2] = 0.0  # one zero in its group
    x[1, 2, 0] = x[1, 2, 3] = 0.0  # two zeros in their group
    _check("ReduceProd", [2], 1, 13, x)
    _check("ReduceProd", [2], 0, 18, x)


def test_l2_of_zero_group_gives_zero_like_torch():
    x = _input("ReduceL2", (2, 3, 4))
    x[1, 2, :] = 0.0
    _check("ReduceL2", [2], 0, 13, x)


def test_float32_dynamic_batch():
    x = _input("ReduceMean", (3, 5, 7)).astype(np.float32)
    _check("ReduceMean", [1, 2], 0, 13, x, tol=1e-5)
    _check("ReduceMax", [1], 1, 11, x, tol=1e-5)


def test_report_worst():
    print("worst relative errors:", WORST)
