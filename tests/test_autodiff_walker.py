"""The walker itself: path selection, accumulation, refusals, linearity, dynamic batch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from harness import make_model, ort_vjp, rel_err
from onnxcam.autodiff import add_gradients
from onnxcam.errors import LayerNotFoundError, NotDifferentiableError, UnsupportedModelError


def _fanout_model(opset=13):
    # x feeds three consumers; one branch goes through ArgMax (no gradient) into a Gather index.
    nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]),
             helper.make_node("Exp", ["x"], ["ex"]),
             helper.make_node("Add", ["sq", "ex"], ["s"]),
             helper.make_node("ArgMax", ["x"], ["am"], axis=1, keepdims=0),
             helper.make_node("Gather", ["s", "am"], ["y"], axis=1)]
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float64)
    return make_model(nodes, {"x": x}, ["y", "s"], opset=opset), x


def test_fanout_contributions_are_summed_and_argmax_stops():
    model, x = _fanout_model()
    seed = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float64)
    (g,), _ = ort_vjp(model, {"x": x}, ["x"], "s", seed)
    assert rel_err(g, seed * (2 * x + np.exp(x))) < 1e-12


def test_gradient_is_linear_in_the_seed():
    model, x = _fanout_model()
    rng = np.random.default_rng(2)
    s1, s2 = rng.standard_normal((2, 4, 5))
    (g1,), _ = ort_vjp(model, {"x": x}, ["x"], "s", s1)
    (g2,), _ = ort_vjp(model, {"x": x}, ["x"], "s", s2)
    (g12,), _ = ort_vjp(model, {"x": x}, ["x"], "s", 2 * s1 - 3 * s2)
    assert rel_err(g12, 2 * g1 - 3 * g2) < 1e-12


def test_all_missing_rules_are_listed_at_once():
    nodes = [helper.make_node("MyOp", ["x"], ["a"], domain="com.example", name="custom_1"),
             helper.make_node("Hardmax", ["a"], ["b"], name="hm"),
             helper.make_node("LpNormalization", ["b"], ["c"], name="lp"),
             helper.make_node("Relu", ["c"], ["y"])]
    x = np.ones((2, 3), np.float32)
    model = make_model(nodes, {"x": x}, ["y"])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(NotDifferentiableError) as info:
        add_gradients(model, ["x"], "y")
    message = str(info.value)
    for part in ("custom_1", "com.example::MyOp", "custom-domain", "hm", "Hardmax", "opset 13", "layer"):
        assert part in message
    assert len(info.value.problems) >= 2


def test_quantized_op_on_path_is_refused_with_advice():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dequant")]
    x = np.ones((2, 3), np.float32)
    model = make_model(nodes, {"x": x}, ["y"], {"s": np.float32(0.1), "z": np.uint8(0)})
    with pytest.raises(UnsupportedModelError, match="'quant' \\(QuantizeLinear: quantized op, explain the float model"):
        add_gradients(model, ["x"], "y")


def test_unknown_tensor_gets_suggestions():
    model, _ = _fanout_model()
    with pytest.raises(LayerNotFoundError, match="did you mean 'sq'"):
        add_gradients(model, ["sqq"], "s")


def test_target_not_feeding_score_is_a_clear_error():
    model, _ = _fanout_model()
    with pytest.raises(UnsupportedModelError, match="does not depend"):
        add_gradients(model, ["ex"], "sq")


@pytest.mark.parametrize("opset", [11, 12, 13, 17, 18, 21])
def test_unknown_size_broadcast_operand_at_every_opset(opset):
    # b's second axis is symbolic: it may be 1 (broadcast) or equal to a's, decided at run time.
    a = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((2, 1)).astype(np.float32)
    nodes = [helper.make_node("Mul", ["a", "b"], ["y"])]
    model = make_model(nodes, {"a": a, "b": b}, ["y"], opset=opset)
    model.graph.input[1].type.tensor_type.shape.dim[1].dim_param = "K"
    seed = np.random.default_rng(2).standard_normal((2, 3)).astype(np.float32)
    (ga, gb), _ = ort_vjp(model, {"a": a, "b": b}, ["a", "b"], "y", seed)
    assert rel_err(gb, (seed * a).sum(1, keepdims=True)) < 1e-6
    assert rel_err(ga, seed * b) < 1e-6
    b_full = np.random.default_rng(3).standard_normal((2, 3)).astype(np.float32)
    (ga, gb), _ = ort_vjp(model, {"a": a, "b": b_full}, ["a", "b"], "y", seed)
    assert rel_err(gb, seed * a) < 1e-6


def test_original_model_untouched_and_opset_kept():
    model, x = _fanout_model(opset=11)
    before = model.SerializeToString()
    import copy
    edited = copy.deepcopy(model)
    add_gradients(edited, ["x"], "s")
    assert model.SerializeToString() == before
    assert edited.ir_version == model.ir_version
    assert [o.version for o in edited.opset_import] == [11]
    onnx.checker.check_model(edited, full_check=True)
