"""The augmenter against pytorch-grad-cam's formulas, and the augmented-model contract."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch

import onnxcam
from onnxcam.cam.augment import CAM_OUTPUT, CLASS_INPUT, CLASS_OUTPUT, SCORE_OUTPUT
from harness import session
from cam_reference import GRADIENT_CAMS, activations_and_gradients, reference_cam
from torch_nets import TinyMobileNetV3, TinyResNet, export, randomise_batchnorm

SIZE = 64


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torch.manual_seed(0)
    model = randomise_batchnorm(TinyResNet())
    path = export(model, tmp_path_factory.mktemp("resnet") / "resnet.onnx", SIZE)
    return model, path, [model.layer3.relu]


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    torch.manual_seed(1)
    model = randomise_batchnorm(TinyMobileNetV3())
    path = export(model, tmp_path_factory.mktemp("mnv3") / "mnv3.onnx", SIZE, opset=11)
    return model, path, [model.last[2]]


def images(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


@pytest.mark.parametrize("method", GRADIENT_CAMS)  # the others: test_gradient_free.py and their own tests
@pytest.mark.parametrize("net", ["resnet", "mobilenet"])
def test_methods_match_pytorch_grad_cam_formulas(request, net, method):
    model, path, modules = request.getfixturevalue(net)
    x = images(3)
    explainer = onnxcam.Explainer(path, method=method)
    result = explainer(x)
    logits_fn = getattr(model, "logits", None)
    pairs, classes, _ = activations_and_gradients(model, modules, x, None, logits_fn)
    expected = reference_cam(method, pairs, (SIZE, SIZE))
    np.testing.assert_array_equal(result.class_index, classes)
    assert result.cam.shape == (3, SIZE, SIZE) and result.cam.dtype == np.float32
    assert np.max(np.abs(result.cam - expected)) <= 1e-3
    assert result.cam.min() >= 0 and result.cam.max() <= 1


def test_auto_layer_is_the_last_activation_before_pooling(resnet, mobilenet):
    # At opset 11 torch writes HardSwish as x * HardSigmoid(x): the Mul is the activation output.
    for (_, path, _), ops, hw in ((resnet, {"Relu"}, SIZE // 16), (mobilenet, {"HardSwish", "Mul"}, SIZE // 4)):
        chosen = [l for l in onnxcam.layers(path) if l.auto]
        assert len(chosen) == 1 and chosen[0].op in ops
        assert chosen[0].shape[2:] == (hw, hw)


def test_explicit_class_and_counterfactual(resnet):
    model, path, modules = resnet
    x = images(2, seed=3)
    for counterfactual in (False, True):
        explainer = onnxcam.Explainer(path, counterfactual=counterfactual)
        # classes whose Grad-CAM and counterfactual map are both non-empty for these images
        result = explainer(x, class_index=[6, 8])
        pairs, _, logits = activations_and_gradients(model, modules, x, torch.tensor([6, 8]),
                                                     counterfactual=counterfactual)
        np.testing.assert_array_equal(result.class_index, [6, 8])
        np.testing.assert_allclose(result.score, logits[[0, 1], [6, 8]], rtol=1e-4, atol=1e-5)
        expected = reference_cam("gradcam", pairs, (SIZE, SIZE))
        assert np.max(np.abs(result.cam - expected)) <= 1e-3


def test_multi_layer_mode_matches_reference(resnet):
    model, path, _ = resnet
    layer_names = [l.name for l in onnxcam.layers(path) if l.op == "Relu"][-4:]
    # the last Relu of layer2 and of layer3 (block outputs)
    targets = [layer_names[1], layer_names[3]]
    explainer = onnxcam.Explainer(path, layer=targets)
    x = images(2, seed=5)
    result = explainer(x)
    pairs, _, _ = activations_and_gradients(model, [model.layer2.relu, model.layer3.relu], x, None)
    # BasicBlock's relu module runs twice; the hook keeps its last call (the block output)
    expected = reference_cam("gradcam", pairs, (SIZE, SIZE))
    assert result.layer_cams.shape == (2, 2, SIZE, SIZE)
    assert np.max(np.abs(result.cam - expected)) <= 1e-3


def test_original_outputs_bit_identical_and_contract(resnet, tmp_path):
    _, path, _ = resnet
    original = onnx.load(path)
    augmented = onnxcam.augment(path)
    onnx.checker.check_model(augmented, full_check=True)
    assert augmented.ir_version == original.ir_version
    assert [(o.domain, o.version) for o in augmented.opset_import] == [(o.domain, o.version) for o in original.opset_import]
    assert all(n.domain in ("", "ai.onnx") for n in augmented.graph.node)
    names = [o.name for o in augmented.graph.output]
    assert names[:len(original.graph.output)] == [o.name for o in original.graph.output]
    assert {CAM_OUTPUT, CLASS_OUTPUT, SCORE_OUTPUT} <= set(names)
    x = images(3, seed=9)
    automatic = {"input": x, CLASS_INPUT: np.full(3, -1, np.int64)}
    plain = session(original).run(None, {"input": x})[0]
    aug = session(augmented).run(None, automatic)
    assert np.array_equal(plain, aug[0])  # bit-identical with optimizations disabled
    optimized = session(augmented, optimize=True).run(["output"], automatic)[0]
    np.testing.assert_allclose(optimized, plain, rtol=1e-5, atol=1e-6)
    # The class is a real graph input (no initializer behind it: every binding lists it);
    # -1 == the top class given explicitly == one -1 for the whole batch
    assert CLASS_INPUT in [i.name for i in augmented.graph.input]
    assert CLASS_INPUT not in {i.name for i in augmented.graph.initializer}
    sess = session(augmented)
    minus_one = sess.run([CAM_OUTPUT, CLASS_OUTPUT], automatic)
    given = sess.run([CAM_OUTPUT, CLASS_OUTPUT], {"input": x, CLASS_INPUT: minus_one[1]})
    once = sess.run([CAM_OUTPUT, CLASS_OUTPUT], {"input": x, CLASS_INPUT: np.array([-1], np.int64)})
    for a, b in ((minus_one, given), (minus_one, once)):
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(minus_one[1], plain.argmax(1))


def test_batch_maps_equal_per_image_maps(mobilenet):
    _, path, _ = mobilenet
    explainer = onnxcam.Explainer(path, method="gradcam++")
    x = images(3, seed=11)
    batch = explainer(x)
    for i in range(3):
        single = explainer(x[i:i + 1])
        np.testing.assert_allclose(single.cam[0], batch.cam[i], atol=1e-5)
        assert single.class_index[0] == batch.class_index[i]


def test_augmented_model_runs_in_a_fresh_process_without_onnxcam(resnet, tmp_path):
    _, path, _ = resnet
    out = tmp_path / "augmented.onnx"
    onnx.save(onnxcam.augment(path), str(out))
    x = images(2, seed=13)
    np.save(tmp_path / "x.npy", x)
    expected = onnxcam.Explainer(path)(x).cam
    script = textwrap.dedent(f"""
        import sys, numpy as np, onnxruntime as ort
        s = ort.InferenceSession({str(out)!r}, providers=["CPUExecutionProvider"])
        x = np.load({str(tmp_path / 'x.npy')!r})
        cam = s.run(["onnxcam_cam"], {{"input": x, "onnxcam_class": np.full(len(x), -1, np.int64)}})[0]
        np.save({str(tmp_path / 'cam.npy')!r}, cam)
        assert "onnxcam" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=str(tmp_path))
    np.testing.assert_allclose(np.load(tmp_path / "cam.npy"), expected, atol=1e-5)


def test_vjp_mode_exposes_the_raw_engine(resnet):
    model, path, modules = resnet
    layer = [l.name for l in onnxcam.layers(path) if l.auto][0]
    augmented = onnxcam.augment(path, layer=layer, vjp=True)
    x = images(2, seed=17)
    seed = np.random.default_rng(0).standard_normal((2, 10)).astype(np.float32)
    act, grad = session(augmented).run(["onnxcam_activation", "onnxcam_gradient"], {"input": x, "onnxcam_seed": seed})
    store = {}
    hook = modules[0].register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    logits = model(torch.tensor(x))
    hook.remove()
    store["a"].retain_grad()
    (logits * torch.tensor(seed)).sum().backward()
    np.testing.assert_allclose(act, store["a"].detach().numpy(), rtol=1e-4, atol=1e-5)
    err = np.abs(grad - store["a"].grad.numpy()).max() / np.abs(store["a"].grad.numpy()).max()
    assert err < 1e-4


def test_dynamic_spatial_size_serves_several_image_sizes(tmp_path):
    torch.manual_seed(2)
    model = randomise_batchnorm(TinyResNet())
    path = export(model, tmp_path / "dyn.onnx", SIZE, dynamic_spatial=True)
    explainer = onnxcam.Explainer(path)
    for size in (64, 96):
        x = np.random.default_rng(size).standard_normal((2, 3, size, size)).astype(np.float32)
        result = explainer(x)
        pairs, _, _ = activations_and_gradients(model, [model.layer3.relu], x, None)
        assert result.cam.shape == (2, size, size)
        assert np.max(np.abs(result.cam - reference_cam("gradcam", pairs, (size, size)))) <= 1e-3


def test_no_added_node_reads_a_conv_output(resnet):
    """A second consumer of a Conv output stops ONNX Runtime fusing Conv+Relu/Add there: the
    gradient of a mid-network target must read activations after their Relu, never a Conv output."""
    _, path, _ = resnet
    original = onnx.load(path)
    conv_outputs = {n.output[0] for n in original.graph.node if n.op_type == "Conv"}
    layer2 = [l.name for l in onnxcam.layers(path) if l.name.startswith("/layer2/") and l.op == "Relu"][-1]
    augmented = onnxcam.augment(path, layer=layer2)
    added = augmented.graph.node[len(original.graph.node):]
    assert not [n.name for n in added if conv_outputs & set(n.input)]
    used = {i for n in augmented.graph.node for i in n.input} | {o.name for o in augmented.graph.output}
    assert all(o in used for n in added for o in n.output if o), "dead nodes left in the graph"
