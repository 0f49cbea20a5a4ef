"""Hostile inputs to the autodiff engine (issue 15): control flow reading outer-scope tensors,
training-mode Dropout, ties in elementwise Max/Min, initializers a graph input overrides, and
graphs whose node list is not in topological order."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from harness import make_model, ort_vjp, rel_err, torch_vjp
from onnxcam.autodiff import add_gradients
from onnxcam.autodiff.graph import captures, overridable_initializers, topological
from onnxcam.errors import NotDifferentiableError


# ------------------------------------------------------------------------------ control flow
def _branch(name, op, scale):
    """A body reading `r` from the outer scope (not as a declared input)."""
    nodes = [helper.make_node(op, ["r", f"{name}_k"], [f"{name}_out"], name=f"{name}_node")]
    init = [numpy_helper.from_array(np.asarray(scale, np.float32), f"{name}_k")]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)],
                             init)


def _if_model(opset=13):
    """r = Relu(x); y = If(c, r*2, r+3) + r: the If's branches read r from the outer scope."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("If", ["c"], ["b"], name="branchy", then_branch=_branch("then", "Mul", 2.0),
                              else_branch=_branch("else", "Add", 3.0)),
             helper.make_node("Add", ["b", "r"], ["y"], name="sum")]
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    model = make_model(nodes, {"x": x, "c": np.array(True)}, ["y"], opset=opset)
    return model, x


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
@pytest.mark.parametrize("condition", [True, False])
def test_if_reading_the_target_from_the_outer_scope_is_differentiated_like_torch(condition, opset):
    """y = (r*2 if c else r+3) + r with r read by both branches from the outer scope: the branch's
    contribution used to be dropped (the gradient was 1 instead of 3 or 2)."""
    model, x = _if_model(opset)
    seed = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    r = np.maximum(x, 0)
    (g,), y = ort_vjp(model, {"x": x, "c": np.array(condition)}, ["r"], "y", seed)
    (ref,), ref_y = torch_vjp(lambda t: (t * 2 if condition else t + 3) + t, [r], seed)
    assert rel_err(y, ref_y) < 1e-6
    assert rel_err(g, ref) < 1e-6


def _branch_graph(name, nodes, output, initializers=()):
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                             list(initializers))


@pytest.mark.parametrize("condition", [True, False])
def test_if_with_several_outputs_a_nested_if_and_an_outer_name_as_output(condition):
    """then: (sigmoid(r * w) * s, tanh(r)), where the first output comes from a nested If reading r
    and w two scopes down; else: (r, r * s). Compared with torch autograd in float64.
    Compared with torch autograd in float64 for both conditions."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4)).astype(np.float64)
    s_value = rng.standard_normal((2, 4)).astype(np.float64)
    w = rng.standard_normal(4).astype(np.float64)
    nested = helper.make_node("If", ["c"], ["n_out"], name="nested_if",
                              then_branch=helper.make_graph(
                                  [helper.make_node("Mul", ["r", "w"], ["rw"]), helper.make_node("Sigmoid", ["rw"], ["sg"])],
                                  "nt", [], [helper.make_tensor_value_info("sg", TensorProto.DOUBLE, None)]),
                              else_branch=helper.make_graph(
                                  [helper.make_node("Neg", ["r"], ["neg"])], "ne", [],
                                  [helper.make_tensor_value_info("neg", TensorProto.DOUBLE, None)]))
    then_branch = helper.make_graph(
        [nested, helper.make_node("Mul", ["n_out", "s"], ["t1"]), helper.make_node("Tanh", ["r"], ["t2"])], "then", [],
        [helper.make_tensor_value_info("t1", TensorProto.DOUBLE, None),
         helper.make_tensor_value_info("t2", TensorProto.DOUBLE, None)])
    else_branch = helper.make_graph(  # (ONNX Runtime refuses an outer name as a body output: Identity)
        [helper.make_node("Identity", ["r"], ["e1"]), helper.make_node("Mul", ["r", "s"], ["e2"])], "else", [],
        [helper.make_tensor_value_info("e1", TensorProto.DOUBLE, None),
         helper.make_tensor_value_info("e2", TensorProto.DOUBLE, None)])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("If", ["c"], ["o1", "o2"], name="two_outputs", then_branch=then_branch,
                              else_branch=else_branch),
             helper.make_node("Mul", ["o1", "o1"], ["sq"], name="square"),
             helper.make_node("Add", ["sq", "o2"], ["y"], name="sum")]
    model = make_model(nodes, {"x": x, "s": s_value, "c": np.array(condition)}, ["y"], initializers={"w": w})
    seed = rng.standard_normal(x.shape)
    r = np.maximum(x, 0)
    (g,), y = ort_vjp(model, {"x": x, "s": s_value, "c": np.array(condition)}, ["r"], "y", seed)
    import torch
    s_t, w_t = torch.from_numpy(s_value), torch.from_numpy(w)

    def fn(t):
        o1, o2 = (torch.sigmoid(t * w_t) * s_t, torch.tanh(t)) if condition else (t, t * s_t)
        return o1 * o1 + o2
    (ref,), ref_y = torch_vjp(fn, [r], seed)
    assert rel_err(y, ref_y) < 1e-12
    assert rel_err(g, ref) < 1e-12


def test_an_if_whose_other_branch_ignores_the_target_gives_zero_there():
    then_branch = _branch("then", "Mul", 2.0)
    else_branch = _branch_graph("else", [helper.make_node("Mul", ["x", "k"], ["else_out"])], "else_out",
                                [numpy_helper.from_array(np.float32(5.0), "k")])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("If", ["c"], ["y"], name="one_sided", then_branch=then_branch, else_branch=else_branch)]
    x = np.random.default_rng(4).standard_normal((2, 3)).astype(np.float32)
    model = make_model(nodes, {"x": x, "c": np.array(False)}, ["y"])
    seed = np.ones_like(x)
    (g_false,), _ = ort_vjp(model, {"x": x, "c": np.array(False)}, ["r"], "y", seed)
    (g_true,), _ = ort_vjp(model, {"x": x, "c": np.array(True)}, ["r"], "y", seed)
    assert np.array_equal(g_false, np.zeros_like(x)) and np.array_equal(g_true, 2 * seed)


def _loop_model():
    """A Loop whose body adds r (an outer-scope tensor) to the carried value twice."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["acc_in", "r"], ["acc_out"], name="body_add")],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, ["A", "B"])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["A", "B"])])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Mul", ["x", "zero"], ["acc0"], name="zeros"),
             helper.make_node("Loop", ["trips", "", "acc0"], ["y"], name="looper", body=body)]
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    model = make_model(nodes, {"x": x}, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                       initializers={"trips": np.array(2, np.int64), "zero": np.array(0.0, np.float32)})
    return model, x


def test_a_loop_reading_the_target_from_the_outer_scope_is_differentiated():
    """It used to be reported as 'the score does not depend on the layer'."""
    model, x = _loop_model()
    seed = np.random.default_rng(12).standard_normal(x.shape).astype(np.float32)
    (g_r, g_x), y = ort_vjp(model, {"x": x}, ["r", "x"], "y", seed)
    assert rel_err(y, 2 * np.maximum(x, 0)) < 1e-6
    assert np.array_equal(g_r, 2 * seed) and rel_err(g_x, 2 * seed * (x > 0)) < 1e-7


def _recurrent_loop_model(trip_limit, stop_after):
    """h <- tanh(h * w + r) for at most `trip_limit` iterations, stopping after iteration `stop_after`
    (the body's condition); scan output h * i at every step; y = sum over steps + final h.
    r = Relu(x) is read from the outer scope, h0 = Sigmoid(x) is the loop-carried initial value."""
    body = helper.make_graph(
        [helper.make_node("Mul", ["h_in", "w"], ["hw"]), helper.make_node("Add", ["hw", "r"], ["pre"]),
         helper.make_node("Tanh", ["pre"], ["h_out"]), helper.make_node("Cast", ["i"], ["fi"], to=TensorProto.DOUBLE),
         helper.make_node("Mul", ["h_out", "fi"], ["step"]), helper.make_node("Less", ["i", "stop"], ["go_on"])],
        "recurrent", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                      helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                      helper.make_tensor_value_info("h_in", TensorProto.DOUBLE, ["A", "B"])],
        [helper.make_tensor_value_info("go_on", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.DOUBLE, ["A", "B"]),
         helper.make_tensor_value_info("step", TensorProto.DOUBLE, ["A", "B"])])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Sigmoid", ["x"], ["h0"], name="sig"),
             helper.make_node("Loop", ["trips", "start", "h0"], ["h_final", "steps"], name="recurrence", body=body),
             helper.make_node("ReduceSum", ["steps", "axis0"], ["summed"], keepdims=0, name="sum_steps"),
             helper.make_node("Add", ["summed", "h_final"], ["y"], name="total")]
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 3))
    w = rng.standard_normal(3)
    model = make_model(nodes, {"x": x}, [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, 3])],
                       initializers={"trips": np.array(trip_limit, np.int64), "start": np.array(True),
                                     "stop": np.array(stop_after, np.int64), "w": w, "axis0": np.array([0], np.int64)})
    return model, x, w


@pytest.mark.parametrize("trip_limit,stop_after", [(3, 10), (10, 2), (0, 5)])
def test_a_recurrent_loop_matches_torch_unrolled(trip_limit, stop_after):
    """Loop-carried state, scan outputs, a captured tensor, a trip count, an early stop from the body's
    condition, and zero iterations: gradients at r (captured) and h0 (initial state) against torch
    autograd of the unrolled loop in float64."""
    import torch

    model, x, w = _recurrent_loop_model(trip_limit, stop_after)
    seed = np.random.default_rng(14).standard_normal((2, 3))
    r, h0 = np.maximum(x, 0), 1 / (1 + np.exp(-x))
    (g_r, g_h0), y = ort_vjp(model, {"x": x}, ["r", "h0"], "y", seed)

    def unrolled(r_t, h_t):
        steps, i = [], 0
        while i < trip_limit:
            h_t = torch.tanh(h_t * torch.from_numpy(w) + r_t)
            steps.append(h_t * i)
            if not i < stop_after:
                break
            i += 1
        return (torch.stack(steps).sum(0) if steps else torch.zeros_like(h_t)) + h_t
    (ref_r, ref_h0), ref_y = torch_vjp(unrolled, [r, h0], seed)
    assert rel_err(y, ref_y) < 1e-12
    assert rel_err(g_r, ref_r) < 1e-12 and rel_err(g_h0, ref_h0) < 1e-12
    if trip_limit:
        assert np.abs(ref_r).max() > 0.1


def test_captures_are_found_at_any_depth():
    model, _ = _if_model()
    assert captures(model.graph.node[1]) == {"r"}
    outer = helper.make_node("If", ["c"], ["z"], then_branch=helper.make_graph(
        [model.graph.node[1]], "nest", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)]),
        else_branch=_branch("other", "Mul", 1.0))
    assert captures(outer) == {"r", "c"}


def test_topological_order_waits_for_what_a_branch_reads():
    model, _ = _if_model()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([nodes[1], nodes[2], nodes[0]])  # If first: it reads r, made by the last node
    order = [n.name for n in topological(model.graph)]
    assert order == ["relu", "branchy", "sum"]


def test_topological_order_of_a_reversed_chain_and_file_order_among_ready_nodes():
    n = 3000
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=f"n{i}") for i in range(n)]
    side = [helper.make_node("Neg", ["t0"], [f"s{j}"], name=f"s{j}") for j in range(3)]
    graph = helper.make_graph(list(reversed(nodes)) + side, "g",
                              [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1])], [])
    order = [node.name for node in topological(graph)]
    assert order[0] == "n0"
    positions = {name: i for i, name in enumerate(order)}
    assert all(positions[f"n{i}"] < positions[f"n{i + 1}"] for i in range(n - 1))
    # ready at the start: n0 (file position n-1) and the side nodes after it: kept in file order
    assert order.index("s0") < order.index("s1") < order.index("s2")
    assert len(order) == n + 3


def test_a_cycle_keeps_the_rest_in_file_order():
    nodes = [helper.make_node("Relu", ["b"], ["a"], name="one"), helper.make_node("Relu", ["a"], ["b"], name="two"),
             helper.make_node("Relu", ["x"], ["c"], name="free")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [])
    assert [n.name for n in topological(graph)] == ["free", "one", "two"]


# ------------------------------------------------------------------------------ overridable weights
def test_an_initializer_that_is_also_a_graph_input_uses_the_fed_value():
    """keep_initializers_as_inputs: BatchNorm's scale is stored and declared as an input; the
    value fed at run time drives the forward pass, and must drive the gradient too."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    default = np.array([1.0, 2.0, 3.0], np.float32)
    fed = np.array([-0.5, 4.0, 0.25], np.float32)
    bias, mean, var = np.zeros(3, np.float32), np.zeros(3, np.float32), np.array([1.0, 0.5, 2.0], np.float32)
    nodes = [helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], name="bn")]
    model = make_model(nodes, {"x": x, "scale": default}, ["y"],
                       initializers={"scale": default, "bias": bias, "mean": mean, "var": var})
    assert overridable_initializers(model.graph) == {"scale"}
    seed = rng.standard_normal(x.shape).astype(np.float32)
    (gx,), y = ort_vjp(model, {"x": x, "scale": fed}, ["x"], "y", seed)
    factor = (fed / np.sqrt(var + 1e-5)).reshape(1, 3, 1, 1)
    assert rel_err(y, x * factor) < 1e-6  # the forward pass did use the fed scale
    assert rel_err(gx, seed * factor) < 1e-6


# ------------------------------------------------------------------------------ Dropout
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("mode", ["constant", "fed_true", "fed_false"])
@pytest.mark.parametrize("ratio", ["constant", "fed"])
def test_training_mode_dropout_gradient_uses_the_runs_mask(with_mask, mode, ratio):
    """Y = X · mask / (1 - p) in training mode: the gradient is g · mask / (1 - p) with the mask of
    the same run (compared with torch autograd through that mask), the identity when the mode is off."""
    p = 0.3
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 50)).astype(np.float32)
    inputs = {"x": x}
    initializers = {}
    if mode == "constant":
        initializers["training"] = np.array(True)
    else:
        inputs["training"] = np.array(mode == "fed_true")
    if ratio == "constant":
        initializers["ratio"] = np.array(p, np.float32)
    else:
        inputs["ratio"] = np.array(p, np.float32)
    outs = ["y", "mask"] if with_mask else ["y"]
    model = make_model([helper.make_node("Dropout", ["x", "ratio", "training"], outs, name="drop")], inputs, ["y"],
                       initializers=initializers)
    seed = rng.standard_normal(x.shape).astype(np.float32)
    (gx,), y = ort_vjp(model, inputs, ["x"], "y", seed)
    if mode == "fed_false":
        assert np.array_equal(y, x) and np.array_equal(gx, seed)
        return
    kept = y != 0  # x is never exactly 0, so the run's mask is where y is not
    assert 0.5 < kept.mean() < 0.9  # dropout did drop (p = 0.3)
    assert np.allclose(y[kept], x[kept] / (1 - p), rtol=1e-6)
    import torch
    (ref,), _ = torch_vjp(lambda t: t * torch.tensor(kept, dtype=torch.float64) / (1 - p), [x], seed)
    assert rel_err(gx, ref) < 1e-6


def test_a_torch_export_with_weights_as_inputs_differentiates_the_fed_weights():
    """torch.onnx.export(keep_initializers_as_inputs=True): every weight is also a graph input.
    Feed a different BatchNorm scale: the gradient at the Conv output must be torch's with that scale."""
    import io

    import onnxruntime as ort
    import torch

    import onnxcam

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.Linear(6, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    net = Net().eval()
    with torch.no_grad():
        net.bn.running_var.uniform_(0.5, 2.0)
    buf = io.BytesIO()
    torch.onnx.export(net, torch.randn(1, 3, 8, 8), buf, opset_version=13, keep_initializers_as_inputs=True,
                      do_constant_folding=False, dynamo=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    model = onnx.load_from_string(buf.getvalue())
    assert "bn.weight" in overridable_initializers(model.graph)
    conv_out = next(n.output[0] for n in model.graph.node if n.op_type == "Conv")
    augmented = onnxcam.augment(model, layer=conv_out, vjp=True)
    session = ort.InferenceSession(augmented.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    seed = rng.standard_normal((2, 4)).astype(np.float32)
    fed = rng.uniform(-2, 2, 6).astype(np.float32)
    gradient, = session.run(["onnxcam_gradient"], {"input": x, "onnxcam_seed": seed, "bn.weight": fed})
    with torch.no_grad():
        net.bn.weight.copy_(torch.from_numpy(fed))
    net = net.double()
    activation = net.conv(torch.from_numpy(x).double()).detach().requires_grad_(True)
    logits = net.fc(torch.relu(net.bn(activation)).mean((2, 3)))
    logits.backward(torch.from_numpy(seed).double())
    reference = activation.grad.numpy()
    assert np.abs(reference).max() > 1e-3
    assert rel_err(gradient, reference) < 1e-5


def test_an_if_beside_the_path_is_no_reason_to_refuse():
    """The branch reads the layer, but its output does not feed the score: the gradient is exact."""
    model, x = _if_model()
    model.graph.node[2].input[0] = "r"  # y = r + r; the If's output is now unused
    model.graph.output.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 3]))
    seed = np.random.default_rng(6).standard_normal(x.shape).astype(np.float32)
    (g,), _ = ort_vjp(model, {"x": x, "c": np.array(True)}, ["r"], "y", seed)
    assert rel_err(g, 2 * seed) < 1e-7


def test_scan_on_the_path_is_refused_naming_the_node():
    body = helper.make_graph([helper.make_node("Add", ["s_in", "row"], ["s_out"]),
                              helper.make_node("Identity", ["s_out"], ["row_out"])], "scan_body",
                             [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [3]),
                              helper.make_tensor_value_info("row", TensorProto.FLOAT, [3])],
                             [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [3]),
                              helper.make_tensor_value_info("row_out", TensorProto.FLOAT, [3])])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Scan", ["init", "r"], ["final", "y"], name="scanner", body=body, num_scan_inputs=1)]
    x = np.random.default_rng(7).standard_normal((2, 3)).astype(np.float32)
    model = make_model(nodes, {"x": x}, ["y"], initializers={"init": np.zeros(3, np.float32)})
    with pytest.raises(NotDifferentiableError, match="'scanner' \\(Scan.*unrolled"):
        add_gradients(model, ["r"], "y")


def test_a_cyclic_graph_is_refused_naming_the_nodes_on_the_cycle():
    from onnxcam import augment
    from onnxcam.errors import UnsupportedModelError
    from test_hardening import conv_net

    model = conv_net(extra_nodes=[helper.make_node("Add", ["relu", "loopback"], ["mixed"], name="mix"),
                                  helper.make_node("Relu", ["mixed"], ["loopback"], name="back")], head_input="mixed")
    with pytest.raises(UnsupportedModelError, match="cycle: node\\(s\\) 'mix' \\(Add\\), 'back' \\(Relu\\) depend"):
        augment(model)


@pytest.mark.parametrize("flag", [True, False])
def test_grad_cam_through_an_if_between_the_layer_and_the_head_matches_torch(flag):
    """Conv -> Relu (the layer) -> If(flag: a*a, else sigmoid(a)) -> GAP -> Gemm, explained by the
    Explainer with the flag fed at run time, against pytorch-grad-cam's formulas on a torch twin."""
    import torch

    from cam_reference import activations_and_gradients, reference_cam
    from onnxcam import Explainer

    rng = np.random.default_rng(8)
    w = (rng.standard_normal((6, 3, 3, 3)) * 0.4).astype(np.float32)
    g = (rng.standard_normal((4, 6)) * 0.5).astype(np.float32)
    body = {True: _branch_graph("square", [helper.make_node("Mul", ["relu", "relu"], ["sq"])], "sq"),
            False: _branch_graph("squash", [helper.make_node("Sigmoid", ["relu"], ["sig"])], "sig")}
    nodes = [helper.make_node("Conv", ["input", "W"], ["conv"], pads=[1, 1, 1, 1], name="conv0"),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu0"),
             helper.make_node("If", ["flag"], ["b"], name="choice", then_branch=body[True], else_branch=body[False]),
             helper.make_node("GlobalAveragePool", ["b"], ["gap"], name="gap0"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flat0"),
             helper.make_node("Gemm", ["flat", "G"], ["logits"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "branchy_net",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8]),
                               helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(g, "G")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    result = Explainer(model, layer="relu")(x, inputs={"flag": np.array(flag)})

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False)
            self.relu = torch.nn.ReLU()
            with torch.no_grad():
                self.conv.weight.copy_(torch.from_numpy(w))

        def forward(self, t):
            a = self.relu(self.conv(t))
            b = a * a if flag else torch.sigmoid(a)
            return b.mean((2, 3)) @ torch.from_numpy(g).T

    twin = Twin().eval()
    pairs, classes, logits = activations_and_gradients(twin, [twin.relu], x, None)
    assert rel_err(result.outputs["logits"], logits) < 1e-5
    assert np.array_equal(result.class_index, classes)
    assert np.abs(result.cam - reference_cam("gradcam", pairs, (8, 8))).max() < 1e-4


@pytest.mark.parametrize("shift", [1.0, -1.0])
def test_a_scripted_torch_export_with_a_data_dependent_if_matches_torch(shift):
    """torch.jit.script + torch.onnx.export turns `if x.mean() > 0` into an If whose branches read the
    Relu output from the outer scope (the issue's case, from a real exporter). Grad-CAM at that Relu
    against pytorch-grad-cam's formulas on the eager module, for both branches."""

    import torch

    from cam_reference import activations_and_gradients, reference_cam
    from onnxcam import Explainer

    torch.manual_seed(1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.relu, self.fc = torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Linear(6, 4)

        def forward(self, x):
            a = self.relu(self.conv(x))
            if bool(x.mean() > 0):
                b = a * a
            else:
                b = torch.sigmoid(a) + a
            return self.fc(b.mean((2, 3)))

    net = Net().eval()
    model = _export_scripted(net, (1, 3, 8, 8))
    if_node = next(n for n in model.graph.node if n.op_type == "If")
    relu_out = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    assert relu_out in captures(if_node) and relu_out not in if_node.input
    x = (np.random.default_rng(9).standard_normal((2, 3, 8, 8)) + shift).astype(np.float32)
    result = Explainer(model, layer=relu_out)(x)
    pairs, classes, logits = activations_and_gradients(net, [net.relu], x, None)
    assert rel_err(result.outputs["logits"], logits) < 1e-5
    assert np.array_equal(result.class_index, classes)
    assert np.abs(result.cam - reference_cam("gradcam", pairs, (8, 8))).max() < 1e-4


@pytest.mark.parametrize("condition", [True, False])
def test_a_loop_inside_an_if_branch_is_differentiated(condition):
    """then: a Loop adding r (captured two scopes up) twice; else: r * 1."""
    loop_model, _ = _loop_model()
    loop = next(n for n in loop_model.graph.node if n.op_type == "Loop")
    then_branch = helper.make_graph(
        [helper.make_node("Mul", ["x", "zero"], ["acc0"]), loop], "then", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("If", ["c"], ["out"], name="outer", then_branch=then_branch,
                              else_branch=_branch("else", "Mul", 1.0))]
    x = np.random.default_rng(10).standard_normal((2, 3)).astype(np.float32)
    model = make_model(nodes, {"x": x, "c": np.array(condition)},
                       [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3])],
                       initializers={"trips": np.array(2, np.int64), "zero": np.array(0.0, np.float32)})
    seed = np.random.default_rng(11).standard_normal(x.shape).astype(np.float32)
    (g,), y = ort_vjp(model, {"x": x, "c": np.array(condition)}, ["r"], "out", seed)
    assert rel_err(y, (2 if condition else 1) * np.maximum(x, 0)) < 1e-6
    assert rel_err(g, (2 if condition else 1) * seed) < 1e-7


def test_an_if_reading_a_half_precision_layer_is_refused_clearly():
    from onnxcam.errors import UnsupportedModelError

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("If", ["c"], ["y"], name="half_if",
                              then_branch=_branch_graph("t", [helper.make_node("Neg", ["r"], ["t_out"])], "t_out"),
                              else_branch=_branch_graph("e", [helper.make_node("Abs", ["r"], ["e_out"])], "e_out"))]
    for branch in nodes[1].attribute:
        branch.g.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    x = np.random.default_rng(11).standard_normal((2, 3)).astype(np.float16)
    model = make_model(nodes, {"x": x, "c": np.array(True)}, ["y"])
    with pytest.raises(UnsupportedModelError, match="'half_if' \\(If.*half-precision"):
        add_gradients(model, ["r"], "y")


@pytest.mark.parametrize("batch", [1, 3])
def test_a_scripted_torch_export_with_a_data_dependent_loop_matches_torch(batch):
    """torch.jit.script turns `for _ in range(x.shape[0] + 1): h = tanh(h * 0.5 + a)` into a Loop
    whose trip count depends on the batch and whose body reads the Relu output `a` from the outer
    scope. Grad-CAM at that Relu against pytorch-grad-cam's formulas on the eager module."""

    import torch

    from cam_reference import activations_and_gradients, reference_cam
    from onnxcam import Explainer

    torch.manual_seed(2)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.relu, self.fc = torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Linear(6, 4)

        def forward(self, x):
            a = self.relu(self.conv(x))
            h = torch.zeros_like(a)
            for _ in range(x.shape[0] + 1):
                h = torch.tanh(h * 0.5 + a)
            return self.fc(h.mean((2, 3)))

    net = Net().eval()
    model = _export_scripted(net, (2, 3, 8, 8))
    loop_node = next(n for n in model.graph.node if n.op_type == "Loop")
    relu_out = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    assert relu_out in captures(loop_node)
    x = np.random.default_rng(9).standard_normal((batch, 3, 8, 8)).astype(np.float32)
    result = Explainer(model, layer=relu_out)(x)
    pairs, classes, logits = activations_and_gradients(net, [net.relu], x, None)
    assert rel_err(result.outputs["logits"], logits) < 1e-5
    assert np.array_equal(result.class_index, classes)
    assert np.abs(result.cam - reference_cam("gradcam", pairs, (8, 8))).max() < 1e-4


# ------------------------------------------------------------------------------ automatic layer
def _pooled_classifier(inline: bool):
    """x -> Conv -> Relu (r) -> global average pool -> Gemm. With inline=False the pooling sits in
    an If's branches, which read r from the outer scope (the If's only input is its condition)."""
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "fc")
    pool = [helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Flatten", ["p"], ["f"])]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    if inline:
        nodes += pool
    else:
        def branch(name):
            renamed = [helper.make_node(n.op_type, list(n.input), [f"{name}_{o}" for o in n.output]) for n in pool]
            renamed[1].input[0] = f"{name}_p"
            return helper.make_graph(renamed, name, [], [helper.make_tensor_value_info(f"{name}_f", TensorProto.FLOAT, None)])
        nodes.append(helper.make_node("If", ["cond"], ["f"], then_branch=branch("then"), else_branch=branch("else")))
        inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    nodes.append(helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1))
    graph = helper.make_graph(nodes, "pooled", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])],
                              [w, fc])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


def test_automatic_layer_sees_what_control_flow_bodies_read():
    """The automatic layer used to ignore tensors read only inside an If's branches (no candidate
    layer at all here); now the If model explains r exactly as the same model without the If."""
    import onnxcam
    from harness import session as ort_session

    plain, branchy = _pooled_classifier(True), _pooled_classifier(False)
    for model in (plain, branchy):
        assert [l.name for l in onnxcam.layers(model) if l.auto] == ["r"]
    x = np.random.default_rng(6).standard_normal((1, 3, 8, 8)).astype(np.float32)
    maps = []
    for model, extra in ((plain, {}), (branchy, {"cond": np.array(True)})):
        augmented = onnxcam.augment(model)
        names = [o.name for o in augmented.graph.output]
        feeds = {"x": x, "onnxcam_class": np.array([2], np.int64), **extra}
        maps.append(dict(zip(names, ort_session(augmented).run(None, feeds)))["onnxcam_cam"])
    assert maps[0].max() > 0.5  # not an all-zero map
    np.testing.assert_allclose(maps[1], maps[0], atol=1e-6)


def _export_scripted(net, shape):
    """torch.jit.script + the legacy exporter at opset 13 (data-dependent If/Loop kept), dynamic batch."""
    import io
    import warnings

    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.jit.script(net), (torch.randn(shape),), buf, opset_version=13, dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return onnx.load_from_string(buf.getvalue())
