"""The node-order hints (autodiff/schedule.py): ONNX Runtime's default order computes the ReLU
masks during the forward pass, and the hints change no value."""

import glob
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcam
from onnxcam.cam import augment as augment_module

CHANNELS = 32  # NCHWc-sized: ONNX Runtime's layout transformer renumbers the convolutions


def _convnet(depth=4):
    rng = np.random.RandomState(0)
    nodes, inits, x, c = [], [], "input", 3
    for i in range(depth):
        w = numpy_helper.from_array((rng.randn(CHANNELS, c, 3, 3) / np.sqrt(9 * c)).astype(np.float32), f"w{i}")
        b = numpy_helper.from_array((rng.randn(CHANNELS) * 0.1).astype(np.float32), f"b{i}")
        inits += [w, b]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"conv{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
        x, c = f"relu{i}", CHANNELS
    inits.append(numpy_helper.from_array((rng.randn(10, CHANNELS) * 0.3).astype(np.float32), "fc"))
    nodes += [helper.make_node("GlobalAveragePool", [x], ["pooled"], name="gap"),
              helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                 ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _run(model, tmp_path, profile):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(str(tmp_path), "profile")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.random.RandomState(1).randn(2, 3, 32, 32).astype(np.float32)
    feeds = {"input": x, "onnxcam_class": np.full(2, -1, np.int64)}
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    order = None
    if profile:
        with open(session.end_profiling()) as f:
            events = json.load(f)
        order = [e["name"][:-len("_kernel_time")] for e in events
                 if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return outputs, order


@pytest.mark.parametrize("method", ["saliency", "guided-gradcam"])
def test_masks_run_during_the_forward_pass(method, tmp_path):
    augmented = onnxcam.augment(_convnet(), layer="relu3", method=method)
    _, order = _run(augmented, tmp_path, profile=True)
    masks = [i for i, name in enumerate(order) if name.startswith("onnxcam/Greater")]
    score = next(i for i, name in enumerate(order) if name == "fc")  # the end of the forward pass
    # relu0..relu2's masks at least (relu3's is read first thing in the backward pass either way)
    assert sum(i < score for i in masks) >= 3, order


@pytest.mark.parametrize("method", ["saliency", "guided-gradcam"])
def test_hints_change_no_value(method, tmp_path, monkeypatch):
    hinted, _ = _run(onnxcam.augment(_convnet(), layer="relu3", method=method), tmp_path, profile=False)
    monkeypatch.setattr(augment_module, "order_for_depth_first", lambda *args: 0)
    plain, _ = _run(onnxcam.augment(_convnet(), layer="relu3", method=method), tmp_path, profile=False)
    assert hinted.keys() == plain.keys()
    for name in plain:
        np.testing.assert_array_equal(hinted[name], plain[name], err_msg=name)
