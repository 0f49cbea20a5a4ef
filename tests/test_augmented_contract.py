"""The augmented-model contract as every ONNX Runtime binding sees it.

Every run-time choice onnxcam adds (onnxcam_class, onnxcam_box, onnxcam_step, onnxcam_mask,
onnxcam_reference) must be a plain graph input: one backed by a same-name initializer is an
"overridable initializer" that onnxruntime-node and onnxruntime-web do not list, and so silently
ignore or refuse. And a session must open on the augmented model without a word at WARNING level
when it opens silently on the original (ONNX Runtime warns about initializers listed as inputs).
The user's own graph is left as it came: only inputs onnxcam adds are checked.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcam

CHOICE_INPUTS = {"onnxcam_class", "onnxcam_box", "onnxcam_step", "onnxcam_mask", "onnxcam_reference"}
FEATURE = "features"  # the explained layer of every tiny model below


def tiny_model(head: str) -> onnx.ModelProto:
    """Conv-ReLU features [N, 8, 16, 16] then one head per target kind, opset 13, dynamic batch."""
    rng = np.random.default_rng(0)
    weights = {"conv_w": rng.normal(size=(8, 3, 3, 3)) * 0.3, "conv_b": rng.normal(size=8) * 0.1}
    nodes = [helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], [FEATURE])]
    if head in ("class", "embedding"):
        weights.update(fc_w=rng.normal(size=(6, 8)), fc_b=rng.normal(size=6) * 0.1)
        nodes += [helper.make_node("GlobalAveragePool", [FEATURE], ["pooled"]),
                  helper.make_node("Flatten", ["pooled"], ["flat"]),
                  helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["out"], transB=1)]
    elif head == "detection":  # YOLOv8 layout [N, 4 + 3 classes, 256 anchors]
        weights.update(head_w=rng.normal(size=(7, 8, 1, 1)), shape=np.array([0, 7, -1]))
        nodes += [helper.make_node("Conv", [FEATURE, "head_w"], ["head"]),
                  helper.make_node("Reshape", ["head", "shape"], ["out"])]
    elif head == "segmentation":  # [N, 3 classes, 16, 16]
        weights.update(head_w=rng.normal(size=(3, 8, 1, 1)))
        nodes += [helper.make_node("Conv", [FEATURE, "head_w"], ["out"])]
    elif head == "sequence":  # CTC-style [N, 16 steps, 5 classes]
        weights.update(head_w=rng.normal(size=(5, 8, 1, 1)))
        nodes += [helper.make_node("Conv", [FEATURE, "head_w"], ["head"]),
                  helper.make_node("ReduceMean", ["head"], ["columns"], axes=[2], keepdims=0),
                  helper.make_node("Transpose", ["columns"], ["out"], perm=[0, 2, 1])]
    initializers = [numpy_helper.from_array(np.asarray(v, np.int64 if k == "shape" else np.float32), k)
                    for k, v in weights.items()]
    graph = helper.make_graph(nodes, f"tiny_{head}",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


TARGETS = {  # target: the choice inputs that target must add
    "class": {"onnxcam_class"},
    "detection": {"onnxcam_class", "onnxcam_box"},
    "segmentation": {"onnxcam_class", "onnxcam_mask"},
    "embedding": {"onnxcam_reference"},
    "sequence": {"onnxcam_class", "onnxcam_step"},
}


@pytest.fixture(scope="module")
def models():
    """target -> (original, augmented)."""
    return {target: (tiny_model(target), onnxcam.augment(tiny_model(target), layer=FEATURE, target=target))
            for target in TARGETS}


@pytest.mark.parametrize("target", TARGETS)
def test_choices_are_plain_inputs(models, target):
    original, augmented = models[target]
    added = [i.name for i in augmented.graph.input if i.name not in {o.name for o in original.graph.input}]
    assert set(added) >= TARGETS[target], f"{target}: expected inputs {sorted(TARGETS[target])}, got {added}"
    assert set(added) <= CHOICE_INPUTS, f"{target}: unexpected added inputs {added}"
    backed = sorted(set(added) & {i.name for i in augmented.graph.initializer})
    assert not backed, f"{target}: inputs backed by an initializer (bindings other than Python ignore them): {backed}"
    # What every binding lists as its inputs (Python's get_inputs(), JS inputNames, C++ GetInputCount).
    import onnxruntime as ort
    session = ort.InferenceSession(augmented.SerializeToString(), providers=["CPUExecutionProvider"])
    assert {i.name for i in session.get_inputs()} >= set(added)


OPEN_SESSIONS = textwrap.dedent("""
    import sys
    import onnxruntime as ort
    ort.set_default_logger_severity(2)          # WARNING and above
    for path in sys.argv[1:]:
        print("=== " + path, file=sys.stderr, flush=True)
        options = ort.SessionOptions()
        options.log_severity_level = 2
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
""")


def test_sessions_open_without_warnings(models, tmp_path):
    """ONNX Runtime's log at WARNING level, in a fresh process (it writes to the process's stderr):
    empty for each original model, and so for its augmented twin."""
    paths = []
    for target, (original, augmented) in models.items():
        for kind, model in (("original", original), ("augmented", augmented)):
            paths.append(tmp_path / f"{target}.{kind}.onnx")
            onnx.save(model, paths[-1])
    done = subprocess.run([sys.executable, "-c", OPEN_SESSIONS, *map(str, paths)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    logs = {}
    for section in done.stderr.split("=== ")[1:]:
        path, _, log = section.partition("\n")
        logs[path] = log.strip()
    assert set(logs) == set(map(str, paths))
    noisy_originals = {p: log for p, log in logs.items() if p.endswith(".original.onnx") and log}
    assert not noisy_originals, f"the test's own models must open silently: {noisy_originals}"
    noisy = {p: log for p, log in logs.items() if log}
    assert not noisy, "ONNX Runtime warns when opening augmented models:\n" + "\n".join(
        f"{p}: {log[:300]}" for p, log in noisy.items())


def test_loop_methods_open_without_warnings(tmp_path):
    """Methods whose samples or re-runs live in a Loop capture the weights. torch's exporter reads
    equal zero biases through Identity nodes (the MobileNetV3-style net here has two), and ONNX
    Runtime warned "Implicit input name ... cannot be safely updated" on every session until the
    augmenter merged such aliases."""
    import torch
    from torch_nets import TinyMobileNetV3, export

    torch.manual_seed(0)
    original = export(TinyMobileNetV3(), tmp_path / "original.onnx", 64)
    assert any(n.op_type == "Identity" for n in onnx.load(str(original)).graph.node)
    paths = [original]
    for method in ("smoothgrad", "integrated-gradients", "scorecam", "groupcam"):
        paths.append(tmp_path / f"{method}.onnx")
        augmented = onnxcam.augment(str(original), method=method)
        assert any(n.op_type == "Loop" for n in augmented.graph.node)
        onnx.save(augmented, paths[-1])
    done = subprocess.run([sys.executable, "-c", OPEN_SESSIONS, *map(str, paths)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    logs = {path: log.strip() for path, _, log in
            (section.partition("\n") for section in done.stderr.split("=== ")[1:])}
    assert set(logs) == set(map(str, paths)) and not any(logs.values()), logs
