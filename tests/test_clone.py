"""Forward copies on a bigger batch (samples, masks), differentiated on their own."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from onnxcam.autodiff.analysis import GraphAnalysis
from onnxcam.autodiff.clone import clone_forward, tile_batch
from onnxcam.autodiff.gradients import add_gradients, flush, new_emitter, prune_unused
from onnxcam.autodiff.shapes import TensorInfo, make_value_info
from onnxcam.errors import UnsupportedModelError
from torch_nets import TinyResNet, export, randomise_batchnorm

SAMPLES = 3


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torch.manual_seed(2)
    model = randomise_batchnorm(TinyResNet()).eval()
    return model, export(model, tmp_path_factory.mktemp("clone") / "r.onnx", 32)


def _noisy_copy_model(path):
    """The model plus: x tiled SAMPLES times + a fed noise, the forward copy's logits, and the
    gradient of sum(logits_copy * seed) with respect to the noisy batch."""
    proto = onnx.load(path)
    first_node, first_init = len(proto.graph.node), len(proto.graph.initializer)
    analysis = GraphAnalysis(proto)
    emit = new_emitter(proto, analysis.infos)
    proto.graph.input.append(helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["SN", 3, 32, 32]))
    emit.set_info("noise", TensorProto.FLOAT, ("SN", 3, 32, 32))
    noisy = emit.op("Add", tile_batch(emit, "input", SAMPLES), "noise")
    emit.set_info(noisy, TensorProto.FLOAT, ("SN", 3, 32, 32))
    copy = clone_forward(analysis, emit, {"input": noisy}, ["output"], tag="sample", rename_dims={"N": "SN"})
    assert copy["output"] != "output" and all(n.name.startswith("onnxcam") for n in copy.analysis.nodes)
    proto.graph.input.append(helper.make_tensor_value_info("seed", TensorProto.FLOAT, ["SN", 10]))
    emit.set_info("seed", TensorProto.FLOAT, ("SN", 10))
    built = add_gradients(proto, [noisy], copy["output"], seed="seed", emitter=emit, analysis=copy.analysis)
    for name, tensor in (("copy_logits", copy["output"]), ("copy_grad", built.gradients[noisy])):
        emit.nodes.append(helper.make_node("Identity", [tensor], [name]))
        proto.graph.output.append(make_value_info(name, TensorInfo(TensorProto.FLOAT, ("SN", None))
                                                  if name == "copy_logits" else TensorInfo(TensorProto.FLOAT, None)))
    flush(emit, proto.graph)
    prune_unused(proto.graph, first_node, first_init)
    return proto


def test_forward_copy_on_a_tiled_batch_and_its_gradient(resnet):
    model, path = resnet
    proto = _noisy_copy_model(path)
    original_nodes = len(onnx.load(path).graph.node)
    original = {i.name: i.SerializeToString() for i in onnx.load(path).graph.initializer}
    copies = [i.name for i in proto.graph.initializer if i.name not in original
              and i.SerializeToString().replace(i.name.encode(), b"") in
              {v.replace(k.encode(), b"") for k, v in original.items()}]
    assert copies == []  # the copy reads the original weights
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    noise = rng.standard_normal((SAMPLES * 2, 3, 32, 32)).astype(np.float32) * 0.3
    seed = rng.standard_normal((SAMPLES * 2, 10)).astype(np.float32)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, copy_logits, grad = session.run(["output", "copy_logits", "copy_grad"],
                                            {"input": x, "noise": noise, "seed": seed})
    assert len(proto.graph.node) > original_nodes
    tiled = torch.tensor(np.tile(x, (SAMPLES, 1, 1, 1)) + noise, dtype=torch.float64, requires_grad=True)
    reference = model.double()(tiled)
    (reference * torch.tensor(seed, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(logits, model(torch.tensor(x, dtype=torch.float64)).detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(copy_logits, reference.detach().numpy(), rtol=1e-4, atol=1e-4)
    expected = tiled.grad.numpy()
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    model.float()


def test_copy_refuses_outputs_that_do_not_depend_on_the_replacement(resnet):
    _, path = resnet
    proto = onnx.load(path)
    analysis = GraphAnalysis(proto)
    emit = new_emitter(proto, analysis.infos)
    first = analysis.nodes[0].output[0]
    with pytest.raises(UnsupportedModelError, match="nothing to re-run"):
        clone_forward(analysis, emit, {"output": "x2"}, [first])


def test_a_replaced_tensor_maps_to_its_replacement(resnet):
    """A target layer that is the image input itself is, in a sampled copy, the sample."""
    _, path = resnet
    proto = onnx.load(path)
    analysis = GraphAnalysis(proto)
    emit = new_emitter(proto, analysis.infos)
    emit.set_info("x2", TensorProto.FLOAT, ("N", 3, 32, 32))
    copy = clone_forward(analysis, emit, {"input": "x2"}, ["output"])
    assert copy["input"] == "x2" and copy["output"] != "output"
    first_weight = proto.graph.initializer[0].name
    assert copy[first_weight] == first_weight


@pytest.mark.parametrize("method", ["smooth-gradcam++", "integrated-gradcam"])
def test_sampled_layer_methods_at_the_input_layer(resnet, method):
    import onnxcam

    _, path = resnet
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    cam = onnxcam.Explainer(path, method=method, layer="input")(x).cam
    assert cam.shape == (2, 32, 32) and np.isfinite(cam).all() and cam.max() > 0.5 and cam.std() > 0.01
