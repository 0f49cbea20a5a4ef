"""Normalization VJP rules against torch float64 autograd (gradient w.r.t. X only)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import helper

from harness import dot_product_check, gradient_model, make_model, ort_vjp, rel_err, run, torch_vjp

WORST = {}
T = lambda a: torch.tensor(np.asarray(a, np.float64))  # noqa: E731


def _grad_x(model, x, feeds_extra=None, seed_shape=None):
    seed = np.random.default_rng(7).standard_normal(seed_shape or x.shape).astype(x.dtype)
    feeds = {"x": x, **(feeds_extra or {})}
    (gx,), _ = ort_vjp(model, feeds, ["x"], "y", seed)
    return gx, seed


def _compare(model, x, fn, feeds_extra=None, tol=1e-9):
    gx, seed = _grad_x(model, x, feeds_extra)
    (ref,), _ = torch_vjp(fn, [x], seed)
    err = rel_err(gx, ref)
    WORST[model.graph.node[0].op_type] = max(WORST.get(model.graph.node[0].op_type, 0.0), err)
    assert err < tol, err
    return err


def _declare_output_like_input(model):
    """ONNX shape inference leaves some outputs rankless (GroupNormalization): declare y like x."""
    model.graph.output[0].type.CopyFrom(model.graph.input[0].type)


# ------------------------------------------------------------------ BatchNormalization
@pytest.mark.parametrize("opset", [11, 13, 14, 15, 17])
@pytest.mark.parametrize("as_inputs", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (2, 3, 6), (4, 3)])
def test_batch_norm_inference(opset, as_inputs, shape):
    rng = np.random.default_rng(0)
    c = shape[1]
    x = rng.standard_normal(shape)
    scale, bias, mean = rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(c)
    var = rng.random(c) + 0.3
    params = {"scale": scale, "bias": bias, "mean": mean, "var": var}
    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], epsilon=1e-3)
    if as_inputs:  # scale/var are run-time tensors, not constants
        model = make_model([node], {"x": x, **params}, ["y"], opset=opset, dynamic_batch=True)
        extra = params
    else:
        model = make_model([node], {"x": x}, ["y"], params, opset=opset, dynamic_batch=True)
        extra = None
    _compare(model, x, lambda t: F.batch_norm(t, T(mean), T(var), T(scale), T(bias), False, 0.0, 1e-3),
             extra)


# ------------------------------------------------------------------ InstanceNormalization
@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (2, 4, 7)])
def test_instance_norm(opset, shape):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)  # ORT: no float64 InstanceNormalization
    scale, bias = rng.standard_normal(shape[1]).astype(np.float32), rng.standard_normal(shape[1]).astype(np.float32)
    node = helper.make_node("InstanceNormalization", ["x", "scale", "bias"], ["y"], epsilon=1e-4)
    model = make_model([node], {"x": x}, ["y"], {"scale": scale, "bias": bias}, opset=opset, dynamic_batch=True)
    _compare(model, x, lambda t: F.instance_norm(t, weight=T(scale), bias=T(bias), eps=1e-4), tol=1e-4)


def test_instance_norm_dynamic_spatial_float32():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)
    scale, bias = rng.standard_normal(3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    node = helper.make_node("InstanceNormalization", ["x", "scale", "bias"], ["y"])
    model = make_model([node], {"x": x}, ["y"], {"scale": scale, "bias": bias}, opset=13)
    for i, d in enumerate(["N", None, "H", "W"]):
        if d:
            model.graph.input[0].type.tensor_type.shape.dim[i].dim_param = d
    _compare(model, x, lambda t: F.instance_norm(t, weight=T(scale), bias=T(bias), eps=1e-5), tol=1e-4)


# ------------------------------------------------------------------ LayerNormalization
@pytest.mark.parametrize("opset", [17, 18, 21])
@pytest.mark.parametrize("axis", [-1, -2, 1])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm(opset, axis, with_bias):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 4, 6)) * 3 - 1
    norm_shape = x.shape[axis % 4:]
    scale, bias = rng.standard_normal(norm_shape), rng.standard_normal(norm_shape)
    inits = {"scale": scale, "bias": bias} if with_bias else {"scale": scale}
    node = helper.make_node("LayerNormalization", ["x", "scale"] + (["bias"] if with_bias else []), ["y"],
                            axis=axis, epsilon=1e-3)
    model = make_model([node], {"x": x}, ["y"], inits, opset=opset, dynamic_batch=True)
    b = T(bias) if with_bias else None
    _compare(model, x, lambda t: F.layer_norm(t, norm_shape, T(scale), b, 1e-3))


def test_layer_norm_broadcast_scale_and_stash_outputs_present():
    """Scale [1, D] broadcasting over the normalised [S, D]; Mean/InvStdDev outputs exist but do
    not feed the score."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 4, 6)).astype(np.float32)
    scale = rng.standard_normal((1, 6)).astype(np.float32)
    node = helper.make_node("LayerNormalization", ["x", "scale"], ["y", "m", "inv"], axis=1)
    model = make_model([node], {"x": x}, ["y"], {"scale": scale}, opset=17, dynamic_batch=True)
    _compare(model, x, lambda t: F.layer_norm(t, (4, 6), T(np.broadcast_to(scale, (4, 6)).copy()), None, 1e-5),
             tol=1e-4)


# ------------------------------------------------------------------ GroupNormalization
@pytest.mark.parametrize("opset,per_group", [(18, True), (21, False)])
@pytest.mark.parametrize("groups", [1, 2, 3, 6])
@pytest.mark.parametrize("shape", [(2, 6, 5, 4), (2, 6, 7)])
def test_group_norm(opset, per_group, groups, shape):
    """Opset 18 scale/bias are per group ([G]); opset 21's are per channel ([C])."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(np.float32) * 2 + 1
    c = shape[1]
    n = groups if per_group else c
    scale, bias = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    node = helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"], num_groups=groups, epsilon=1e-4)
    model = make_model([node], {"x": x}, ["y"], {"scale": scale, "bias": bias}, opset=opset, dynamic_batch=True)
    _declare_output_like_input(model)
    w = np.repeat(scale, c // n).astype(np.float64)
    bb = np.repeat(bias, c // n).astype(np.float64)
    seed = np.random.default_rng(7).standard_normal(x.shape).astype(x.dtype)
    # not ort_vjp: the checker rejects GroupNormalization-18 as deprecated, though ORT runs it
    gmodel, built = gradient_model(model, ["x"], "y")
    gx = run(gmodel, {"x": x, built.seed: seed}, [built.gradients["x"]])[built.gradients["x"]]
    (ref,), y_ref = torch_vjp(lambda t: F.group_norm(t, groups, T(w), T(bb), 1e-4), [x], seed)
    y = run(model, {"x": x})["y"]  # the per-group/per-channel reading matches ORT's forward
    assert rel_err(y, y_ref) < 1e-4
    err = rel_err(gx, ref)
    WORST["GroupNormalization"] = max(WORST.get("GroupNormalization", 0.0), err)
    assert err < 1e-4  # ORT has no float64 GroupNormalization


# ------------------------------------------------------------------ LpNormalization
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("opset", [11, 13, 18])
def test_lp_norm(p, axis, opset):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4, 5)) + 0.1
    node = helper.make_node("LpNormalization", ["x"], ["y"], p=p, axis=axis)
    model = make_model([node], {"x": x}, ["y"], opset=opset, dynamic_batch=True)
    _compare(model, x, lambda t: F.normalize(t, p=float(p), dim=axis, eps=0.0))


def test_layer_norm_dot_product_float32():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    scale = rng.standard_normal(8).astype(np.float32)
    node = helper.make_node("LayerNormalization", ["x", "scale"], ["y"])
    model = make_model([node], {"x": x}, ["y"], {"scale": scale}, opset=17)
    assert dot_product_check(model, {"x": x}, "x", "y", eps=1e-2) < 1e-3


def test_report_worst():
    print("worst relative errors:", WORST)
