"""onnxcam.portable: separating the weights a Conv and a ConvTranspose share (OpenVINO computes
one of the two wrongly; tools/check_openvino.py shows it). Here: the pattern is found where
augmenting puts it, removed completely, and ONNX Runtime's outputs do not move by a bit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcam
from harness import session
from onnxcam.portable import separate_conv_weights, shared_conv_weights

RNG = np.random.default_rng(0)
W = RNG.normal(size=(4, 4, 3, 3)).astype(np.float32)
X = RNG.normal(size=(2, 4, 8, 8)).astype(np.float32)


def two_nodes(order=("Conv", "ConvTranspose"), weight_as="initializer") -> onnx.ModelProto:
    nodes = [helper.make_node(order[0], ["x", "W"], ["y"], pads=[1, 1, 1, 1], name="first"),
             helper.make_node(order[1], ["y", "W"], ["z"], pads=[1, 1, 1, 1], name="second")]
    initializers = [numpy_helper.from_array(W, "W")]
    if weight_as == "Constant":
        nodes.insert(0, helper.make_node("Constant", [], ["W"], value=initializers.pop()))
    graph = helper.make_graph(nodes, "two_nodes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4, 8, 8])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def outputs(model, feeds):
    return session(model).run(None, feeds)


@pytest.mark.parametrize("order", [("Conv", "ConvTranspose"), ("ConvTranspose", "Conv")])
@pytest.mark.parametrize("weight_as", ["initializer", "Constant"])
def test_two_nodes_get_separate_weights(order, weight_as):
    model = two_nodes(order, weight_as)
    [shared] = shared_conv_weights(model)
    assert (shared.name, shared.nbytes) == ("W", W.nbytes)
    assert shared.conv_nodes == (("first",) if order[0] == "Conv" else ("second",))
    portable = separate_conv_weights(model)
    assert shared_conv_weights(portable) == []
    assert shared_conv_weights(model) == [shared], "the input model is left as it came"
    onnx.checker.check_model(portable)
    assert (portable.ir_version, portable.opset_import) == (model.ir_version, model.opset_import)
    np.testing.assert_array_equal(outputs(portable, {"x": X})[0], outputs(model, {"x": X})[0])


def test_weights_that_are_inputs_or_not_shared_are_left_alone():
    model = two_nodes(("Conv", "Conv"))
    assert shared_conv_weights(model) == []
    assert separate_conv_weights(model) == model
    overridable = two_nodes()
    overridable.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 4, 3, 3]))
    assert shared_conv_weights(overridable) == [], "a graph input may change at run time: not a constant"


def resnet_like() -> onnx.ModelProto:
    """Stem Conv, two downsampling residual blocks (3x3/2 Conv-ReLU, 3x3 Conv, 1x1/2 shortcut Conv),
    GAP, Gemm. Explaining the stem differentiates every block: the strided Convs' input gradients
    are ConvTransposes reading the forward weight (w1, w3, s1, s3); the stride-1 ones are Convs of a
    transposed copy the graph computes (w2, w4), which is not the pattern OpenVINO gets wrong."""
    rng = np.random.default_rng(1)
    weights = {f"w{i}": rng.normal(size=(8, 3 if i == 0 else 8, 3, 3)).astype(np.float32) * 0.3 for i in range(5)}
    weights.update({f"s{i}": rng.normal(size=(8, 8, 1, 1)).astype(np.float32) * 0.3 for i in (1, 3)})
    weights.update(fc_w=rng.normal(size=(5, 8)).astype(np.float32), fc_b=np.zeros(5, np.float32))
    nodes = [helper.make_node("Conv", ["image", "w0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["stem"])]
    previous = "stem"
    for block in (1, 3):
        nodes += [helper.make_node("Conv", [previous, f"w{block}"], [f"a{block}"], pads=[1, 1, 1, 1], strides=[2, 2]),
                  helper.make_node("Relu", [f"a{block}"], [f"r{block}"]),
                  helper.make_node("Conv", [f"r{block}", f"w{block + 1}"], [f"b{block}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Conv", [previous, f"s{block}"], [f"short{block}"], strides=[2, 2]),
                  helper.make_node("Add", [f"b{block}", f"short{block}"], [f"sum{block}"]),
                  helper.make_node("Relu", [f"sum{block}"], [f"block{block}"])]
        previous = f"block{block}"
    nodes += [helper.make_node("GlobalAveragePool", [previous], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "resnet_like", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_augmented_model_at_a_middle_layer():
    augmented = onnxcam.augment(resnet_like(), layer="stem")
    shared = shared_conv_weights(augmented)
    assert sorted(w.name for w in shared) == ["s1", "s3", "w1", "w3"], "every strided Conv after the layer"
    portable = separate_conv_weights(augmented)
    assert shared_conv_weights(portable) == []
    added = len(portable.graph.initializer) - len(augmented.graph.initializer)
    assert added == 4 and sum(w.nbytes for w in shared) == 2 * 8 * 8 * (3 * 3 + 1) * 4
    image = np.random.default_rng(2).normal(size=(2, 3, 16, 16)).astype(np.float32)
    feeds = {"image": image, "onnxcam_class": np.array([-1, 3], np.int64)}
    expected = outputs(augmented, feeds)
    assert expected[1].std() > 0.05, "the map must not be flat"
    for got, want in zip(outputs(portable, feeds), expected):
        np.testing.assert_array_equal(got, want)


def test_last_layer_grad_cam_has_nothing_to_separate():
    augmented = onnxcam.augment(resnet_like(), layer="block3")
    assert shared_conv_weights(augmented) == []


def test_augment_portable_option_separates_the_weights(tmp_path):
    """augment(..., portable=True): no weight shared by a Conv and a ConvTranspose, same maps."""
    import onnxruntime as ort
    import torch

    import onnxcam
    from onnxcam.portable import shared_conv_weights
    from torch_nets import TinyResNet, export, randomise_batchnorm

    torch.manual_seed(0)
    path = export(randomise_batchnorm(TinyResNet()), tmp_path / "r.onnx", 32)
    layer = "/layer2/relu_1/Relu_output_0"
    plain, portable = onnxcam.augment(path, layer=layer), onnxcam.augment(path, layer=layer, portable=True)
    assert shared_conv_weights(plain) and not shared_conv_weights(portable)
    x = {"input": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32),
         "onnxcam_class": np.full(2, -1, np.int64)}
    maps = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["onnxcam_cam"], x)[0]
            for m in (plain, portable)]
    assert maps[0].max() > 0.5
    np.testing.assert_array_equal(maps[0], maps[1])
