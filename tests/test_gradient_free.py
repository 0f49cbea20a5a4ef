"""Eigen-CAM, Score-CAM, Group-CAM, Ablation-CAM, NormGrad, FullGrad, Finer-CAM and CF-CAM against
their reference code written out in tests/gradient_free_reference.py: maps within 1e-4 of the
map's maximum, on a small residual net, batches of 2-3 images."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import onnxcam
from onnxcam.cam.augment import CLASS_INPUT
from onnxcam.cam.methods.forward_only import RESIDUAL_OUTPUT
from onnxcam.errors import UsageError
from harness import session
from cam_reference import activations_and_gradients
import gradient_free_reference as ref
from torch_nets import TinyResNet, export, randomise_batchnorm

SIZE = 64
TOLERANCE = 1e-4  # of the map's maximum (maps are in [0, 1])


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torch.manual_seed(0)
    model = randomise_batchnorm(TinyResNet())
    path = export(model, tmp_path_factory.mktemp("gradient_free") / "resnet.onnx", SIZE)
    relus = [l.name for l in onnxcam.layers(path) if l.op == "Relu"]
    return model, path, {"layer2": relus[-3], "layer3": relus[-1]}


@pytest.fixture(scope="module")
def dead_resnet(tmp_path_factory):
    """Channels 0-7 of layer3's output are zero for every image (their runs are skipped)."""
    torch.manual_seed(0)
    model = randomise_batchnorm(TinyResNet())
    with torch.no_grad():
        model.layer3.bn2.bias[:8] = -100.0
        model.layer3.down[1].bias[:8] = -100.0
    path = export(model, tmp_path_factory.mktemp("gradient_free_dead") / "resnet.onnx", SIZE)
    return model, path, {"layer3": [l.name for l in onnxcam.layers(path) if l.op == "Relu"][-1]}


@pytest.fixture(scope="module")
def twin_resnet(tmp_path_factory):
    """Channels 8-15 of layer3's output are 2x (12-15: 4x) channels 0-7, to the bit: their Score-CAM
    masks are the same, one run serves each pair."""
    torch.manual_seed(0)
    model = randomise_batchnorm(TinyResNet())
    with torch.no_grad():
        for conv, bn in ((model.layer3.conv2, model.layer3.bn2), (model.layer3.down[0], model.layer3.down[1])):
            conv.weight[8:16] = conv.weight[0:8]
            bn.running_mean[8:16], bn.running_var[8:16] = bn.running_mean[0:8], bn.running_var[0:8]
            for scale, part in ((2.0, slice(8, 12)), (4.0, slice(12, 16))):
                twin = slice(part.start - 8, part.stop - 8)
                bn.weight[part], bn.bias[part] = scale * bn.weight[twin], scale * bn.bias[twin]
    path = export(model, tmp_path_factory.mktemp("gradient_free_twin") / "resnet.onnx", SIZE)
    return model, path, {"layer3": [l.name for l in onnxcam.layers(path) if l.op == "Relu"][-1]}


def images(n, seed=0, uniform=False):
    rng = np.random.default_rng(seed)
    shape = (n, 3, SIZE, SIZE)
    return (rng.uniform(0, 1, shape) if uniform else rng.standard_normal(shape)).astype(np.float32)


def close(result, expected):
    ref.assert_not_degenerate(expected)
    assert result.shape == expected.shape
    assert np.max(np.abs(result - expected)) <= TOLERANCE * np.max(expected)


def op_types(model):
    return {n.op_type for n in model.graph.node}


# ---------------------------------------------------------------------- Eigen-CAM
@pytest.mark.parametrize("method", ["eigencam", "eigen-gradcam"])
def test_eigen_cams_match_numpy_svd(resnet, method):
    model, path, layers = resnet
    x = images(3)
    pairs, classes, _ = activations_and_gradients(model, [model.layer3.relu], x, None)
    A, G = pairs[0]
    X = A if method == "eigencam" else A * G
    augmented = onnxcam.augment(path, method=method, layer=layers["layer3"])
    residual_name = f"{RESIDUAL_OUTPUT}__{method}"
    feeds = {"input": x, CLASS_INPUT: np.full(3, -1, np.int64)}
    names = [o.name for o in augmented.graph.output]
    outputs = dict(zip(names, session(augmented).run(None, feeds)))
    assert outputs[residual_name].shape == (3, 1) and np.all(outputs[residual_name] < 1e-3)
    corrected = np.array([ref.through_pipeline(ref.projection(X[n], True)[None], SIZE)[0] for n in range(3)])
    close(outputs["onnxcam_cam"], corrected)
    # pytorch-grad-cam's own sign is LAPACK's: the raw variant equals it up to sign
    raw = onnxcam.Explainer(path, method=method, layer=layers["layer3"],
                            method_options={method: {"sign": "raw"}})(x).cam
    for n in range(3):
        candidates = [ref.through_pipeline(s * ref.projection(X[n], False)[None], SIZE)[0] for s in (1, -1)]
        assert min(np.max(np.abs(raw[n] - c)) for c in candidates) <= TOLERANCE


def test_eigencam_builds_no_backward_pass_and_ignores_the_class(resnet):
    _, path, layers = resnet
    eigen = onnxcam.augment(path, method="eigencam", layer=layers["layer2"])
    grad = onnxcam.augment(path, method="gradcam", layer=layers["layer2"])
    assert "ConvTranspose" in op_types(grad) and "ConvTranspose" not in op_types(eigen)
    explainer = onnxcam.Explainer(path, method="eigencam", layer=layers["layer2"])
    x = images(2, seed=1)
    np.testing.assert_array_equal(explainer(x, class_index=[1, 2]).cam, explainer(x, class_index=[7, 3]).cam)


def test_eigencam_of_a_constant_feature_map_is_zero_not_nan(tmp_path):
    """Layer2's and layer3's outputs dead (zero): the centred activations are zero in both of
    principal_projection's branches (covariance at layer2: 8x8 > 32 channels; Gram at layer3:
    4x4 < 48 channels). The map must come out zero, the residual finite."""
    torch.manual_seed(0)
    model = randomise_batchnorm(TinyResNet())
    with torch.no_grad():
        for block in (model.layer2, model.layer3):
            block.bn2.bias[:] = -100.0
            block.down[1].bias[:] = -100.0
    path = export(model, tmp_path / "dead.onnx", SIZE)
    relus = [l.name for l in onnxcam.layers(path) if l.op == "Relu"]
    x = images(2, seed=3)
    for layer in (relus[-3], relus[-1]):
        augmented = onnxcam.augment(path, method="eigencam", layer=layer)
        names = [o.name for o in augmented.graph.output]
        outputs = dict(zip(names, session(augmented).run(None, {"input": x, CLASS_INPUT: np.full(2, -1, np.int64)})))
        assert np.all(np.isfinite(outputs[f"{RESIDUAL_OUTPUT}__eigencam"]))
        np.testing.assert_array_equal(outputs["onnxcam_cam"], np.zeros_like(outputs["onnxcam_cam"]))
    # the same net alive gives a non-zero map through the same code (the test can fail)
    alive = onnxcam.augment(export(randomise_batchnorm(TinyResNet()), tmp_path / "alive.onnx", SIZE),
                            method="eigencam", layer=relus[-1])
    names = [o.name for o in alive.graph.output]
    cam = dict(zip(names, session(alive).run(None, {"input": x, CLASS_INPUT: np.full(2, -1, np.int64)})))["onnxcam_cam"]
    assert np.all(cam.max(axis=(1, 2)) > 0.5)


# ---------------------------------------------------------------------- re-runs
@pytest.mark.parametrize("net,chunk_size", [("resnet", 1), ("resnet", 5), ("resnet", 200), ("dead_resnet", 5),
                                           ("twin_resnet", 5)])
def test_scorecam_matches_pytorch_grad_cam_recipe(request, net, chunk_size):
    model, path, layers = request.getfixturevalue(net)
    x = images(2)
    pairs, classes, _ = activations_and_gradients(model, [model.layer3], x, None)
    A = pairs[0][0]
    assert (A.max(axis=(2, 3)) == 0).sum() >= (16 if net == "dead_resnet" else 1)  # all-zero channels: skipped runs
    if net == "twin_resnet":  # twins with a non-zero map share a run
        assert np.array_equal(A[:, 8:12], 2 * A[:, :4]) and (A[:, :8].max(axis=(2, 3)) > 0).sum() >= 8
    weights = ref.scorecam_weights(model, A, x, classes)
    expected = ref.through_pipeline((weights[:, :, None, None] * A).sum(1), SIZE)
    result = onnxcam.Explainer(path, method="scorecam", layer=layers["layer3"],
                               method_options={"scorecam": {"chunk_size": chunk_size}})(x)
    close(result.cam, expected)


def test_scorecam_finds_the_channels_with_the_same_scaled_map():
    """_same_scaled_maps against numpy: the first channel of the same image with exactly the same
    min-max scaled map and a range >= SCORECAM_SAME_RANGE, else the channel itself."""
    from onnx import TensorProto, helper
    from onnxcam.autodiff.emitter import Emitter
    from onnxcam.autodiff.shapes import TensorInfo
    from onnxcam.cam.methods.perturbation import SCORECAM_SAME_RANGE, _same_scaled_maps

    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (2, 12, 3, 4)).astype(np.float32)
    a[:, 3] = 0.0
    a[:, 3, 1, 2] = 5.0  # one-pixel channels: 3, 7 (image 0 only), 9, 11 (twice 3, at a tiny range)
    a[0, 7], a[:, 9], a[:, 11] = a[0, 3] * 0.25, a[:, 3] * 2.0, a[:, 3] * 1e-4
    a[:, 5] = 3 * a[:, 1] + 1  # the same map shifted and scaled (exact only up to rounding: compared as is)
    a[1, 10] = a[0, 2]  # image 1's channel 10 is image 0's channel 2: images do not mix
    a[:, 8] = 0.0  # all-zero: range 0, never merged
    e = Emitter(13, {"A": TensorInfo(TensorProto.FLOAT, ("N", 12, 3, 4))}, {"A"})
    same = _same_scaled_maps(e, "A", 12)
    graph = helper.make_graph(e.nodes, "same", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["N", 12, 3, 4])],
                              [helper.make_tensor_value_info(same, TensorProto.INT64, [12, "N"])], e.initializers)
    got = session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)).run(
        None, {"A": a})[0]
    flat = a.reshape(2, 12, -1)
    low, spread = flat.min(2, keepdims=True), np.ptp(flat, 2, keepdims=True)
    scaled = (flat - low) / np.where(spread > 0, spread, 1)
    expected = np.array([[next(j for j in range(12) if j == c or (spread[n, j, 0] >= SCORECAM_SAME_RANGE and spread[
        n, c, 0] >= SCORECAM_SAME_RANGE and np.array_equal(scaled[n, j], scaled[n, c]))) for n in range(2)]
        for c in range(12)])
    assert expected[7, 0] == 3 and expected[9, 1] == 3 and expected[11, 0] == 11 and expected[10, 1] == 10
    np.testing.assert_array_equal(got, expected)


def test_scorecam_on_a_fixed_batch_model_pads_only_the_last_chunk(tmp_path):
    """A fixed batch axis runs exactly N0 rows per chunk: the last chunk is padded by repeating
    its last row and the padding's scores dropped (an odd number of rows to run, so it is)."""
    torch.manual_seed(0)
    model = randomise_batchnorm(TinyResNet()).eval()
    path = str(tmp_path / "fixed.onnx")
    torch.onnx.export(model, torch.randn(2, 3, SIZE, SIZE), path, opset_version=13, input_names=["input"],
                      output_names=["output"], dynamo=False)
    x = images(2, seed=3)
    pairs, classes, _ = activations_and_gradients(model, [model.layer3], x, None)
    A = pairs[0][0]
    assert (A.max(axis=(2, 3)) > 0).sum() % 2 == 1  # rows to run over both images: odd, the last chunk padded
    expected = ref.through_pipeline((ref.scorecam_weights(model, A, x, classes)[:, :, None, None] * A).sum(1), SIZE)
    result = onnxcam.Explainer(path, method="scorecam", layer=[l.name for l in onnxcam.layers(path)
                                                               if l.op == "Relu"][-1])(x)
    close(result.cam, expected)


@pytest.mark.parametrize("net,where", [("resnet", "block output"), ("resnet", "inside a residual block"),
                                       ("dead_resnet", "block output")])
def test_ablationcam_reruns_only_the_tail(request, net, where):
    model, path, layers = request.getfixturevalue(net)
    x = images(2, seed=2)
    if where == "block output":
        module, layer = model.layer3, layers["layer3"]  # (the block's relu module runs twice: hook the block)
    else:  # the tail's Add reads the block's shortcut from outside the re-run part: tiled
        module, layer = model.layer3.bn1, "/layer3/conv1/Conv_output_0"
    pairs, classes, logits = activations_and_gradients(model, [module], x, None)
    A = pairs[0][0]
    weights = ref.ablation_weights(model, module, x, classes, logits, A.shape[1])
    expected = ref.through_pipeline((weights[:, :, None, None] * A).sum(1), SIZE)
    augmented = onnxcam.augment(path, method="ablationcam", layer=layer, method_options={"ablationcam": {"chunk_size": 7}})
    copied_convs = sum(n.op_type == "Conv" for loop in augmented.graph.node if loop.op_type == "Loop"
                       for n in loop.attribute[0].g.node)
    assert copied_convs == (0 if where == "block output" else 1)  # only conv2 of the block is re-run
    cam = session(augmented).run(["onnxcam_cam"], {"input": x, CLASS_INPUT: np.full(2, -1, np.int64)})[0]
    close(cam, expected)


def test_reruns_share_the_weights(resnet):
    _, path, layers = resnet
    original = onnx.load(path)
    augmented = onnxcam.augment(path, method="scorecam", layer=layers["layer3"])
    weight_bytes = sum(len(t.raw_data) for t in original.graph.initializer)
    added = sum(len(t.raw_data) for t in augmented.graph.initializer) - weight_bytes
    assert added < 0.05 * weight_bytes


@pytest.mark.parametrize("groups", [32, 5])
def test_groupcam_matches_the_authors_code(resnet, groups):
    model, path, layers = resnet
    x = images(2)
    pairs, classes, _ = activations_and_gradients(model, [model.layer3.relu], x, None)
    A, G = pairs[0]
    expected = np.array([ref.groupcam(model, A[n:n + 1], G[n:n + 1], x[n:n + 1], classes[n], groups) for n in range(2)])
    result = onnxcam.Explainer(path, method="groupcam", layer=layers["layer3"],
                               method_options={"groupcam": {"groups": groups, "chunk_size": 4}})(x)
    close(result.cam, expected)


def test_rerun_methods_refuse_nonlinear_targets_and_counterfactuals(resnet):
    _, path, _ = resnet
    with pytest.raises(UsageError, match="linear"):
        onnxcam.augment(path, method="scorecam", target="embedding")
    with pytest.raises(UsageError, match="counterfactual"):
        onnxcam.augment(path, method="ablationcam", counterfactual=True)
    with pytest.raises(UsageError, match="chunk_size"):
        onnxcam.augment(path, method="scorecam", method_options={"scorecam": {"chunk_size": 0}})


# ---------------------------------------------------------------------- second generation
@pytest.mark.parametrize("variant", ["norm", "selective"])
def test_normgrad_multi_layer_product(resnet, variant):
    model, path, layers = resnet
    x = images(2)
    pairs, _, _ = activations_and_gradients(model, [model.layer2.relu, model.layer3.relu], x, None)
    expected = ref.normgrad(pairs, SIZE, variant)
    result = onnxcam.Explainer(path, method="normgrad", layer=[layers["layer2"], layers["layer3"]],
                               method_options={"normgrad": {"variant": variant}})(x)
    close(result.cam, expected)


def test_fullgrad_matches_pytorch_grad_cam(resnet):
    model, path, _ = resnet
    x = images(2)
    expected, count = ref.fullgrad(model, x, SIZE)
    assert count == 9  # BatchNorms, folded into the exported Convs' biases
    close(onnxcam.Explainer(path, method="fullgrad")(x).cam, expected)


def test_finercam_matches_pytorch_grad_cam(resnet):
    model, path, layers = resnet
    x = images(3)
    A, G = ref.finer_gradients(model, model.layer3.relu, x, alpha=0.6, positions=(1, 3))
    expected = ref.through_pipeline((G.mean((2, 3))[:, :, None, None] * A).sum(1), SIZE)
    result = onnxcam.Explainer(path, method="finercam", layer=layers["layer3"],
                               method_options={"finercam": {"alpha": 0.6, "comparison_categories": [1, 3]}})(x)
    close(result.cam, expected)


def test_cfcam_matches_the_authors_code_with_several_clusters(resnet):
    model, path, layers = resnet
    x = images(2, uniform=True)
    pairs, _, _ = activations_and_gradients(model, [model.layer3.relu], x, None)
    A, G = pairs[0]
    found = [ref.cfcam(A[n], G[n], SIZE) for n in range(2)]
    assert max(f[1] for f in found) >= 2 and min(f[2] for f in found) >= 1  # clusters and noise exercised
    result = onnxcam.Explainer(path, method="cfcam", layer=layers["layer3"])(x)
    close(result.cam, np.array([f[0] for f in found]))


def test_dbscan_in_the_graph_equals_scikit_learns(tmp_path):
    """Chains (components needing many propagation steps), border points, noise, ineligible points."""
    from onnx import TensorProto, helper
    from onnxcam.autodiff.gradients import new_emitter
    from onnxcam.cam.methods.cf_cam import BIG, dbscan

    rng = np.random.default_rng(0)
    chain = np.cumsum(rng.uniform(0.5, 0.9, (12, 1)), axis=0) * np.array([[1.0, 0.3]])
    blob = rng.normal([20, 20], 0.4, (8, 2))
    lonely = rng.uniform(-30, -10, (5, 2))
    points = np.concatenate([chain, blob, lonely, chain[::-1] + 40])[rng.permutation(37)]
    eligible = rng.uniform(size=37) > 0.1
    c, eps, min_samples = len(points), 1.0, 3
    graph = helper.make_graph([], "dbscan", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, c, 2]),
                                              helper.make_tensor_value_info("keep", TensorProto.BOOL, [1, c])], [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    emit = new_emitter(model, {})
    emit.set_info("x", TensorProto.DOUBLE, (1, c, 2))
    diff = emit.op("Sub", emit.unsqueeze("x", [2]), emit.unsqueeze("x", [1]))
    dist = emit.op("Sqrt", emit.reduce("ReduceSum", emit.op("Mul", diff, diff), [3], keepdims=False))
    labels = dbscan(emit, dist, "keep", emit.const(np.full((1, 1, 1), eps), TensorProto.DOUBLE),
                    emit.const(np.full((1, 1), min_samples, np.float32), TensorProto.FLOAT), c)
    emit.nodes.append(helper.make_node("Identity", [labels], ["labels"]))
    model.graph.node.extend(emit.nodes)
    model.graph.initializer.extend(emit.initializers)
    model.graph.output.append(helper.make_tensor_value_info("labels", TensorProto.FLOAT, None))
    ours = session(model).run(None, {"x": points[None], "keep": eligible[None]})[0][0]
    expected = np.full(c, -1)
    expected[eligible] = ref.dbscan_labels(points[eligible], eps, min_samples)
    assert len(set(expected[expected >= 0])) >= 3 and np.sum(expected == -1) >= 3
    # same partition: clusters named by their smallest core index here, by discovery order there
    ours_partition = {frozenset(np.where(ours == v)[0]) for v in set(ours[ours < BIG])}
    expected_partition = {frozenset(np.where(expected == v)[0]) for v in set(expected[expected >= 0])}
    assert ours_partition == expected_partition
    np.testing.assert_array_equal(ours >= BIG, expected == -1)


# ---------------------------------------------------------------------- several at once
def test_several_methods_in_one_model_equal_each_alone(resnet):
    _, path, layers = resnet
    methods = ["eigencam", "scorecam", "gradcam", "fullgrad"]
    x = images(2, seed=4)
    together = onnxcam.Explainer(path, method=methods, layer=layers["layer3"])(x)
    for method in methods:
        alone = onnxcam.Explainer(path, method=method, layer=layers["layer3"])(x).cam
        np.testing.assert_allclose(together.cams[method], alone, atol=1e-6)


def test_ablationcam_with_the_segmentation_target(tmp_path):
    """A score linear in the output (pytorch-grad-cam's SemanticSegmentationTarget: the class's
    logits summed over its predicted pixels), re-run on the ablated copies."""
    from test_targets import TinySegmenter, dominant_class, export as export_segmenter, images as seg_images, tensor_of

    torch.manual_seed(2)
    model = TinySegmenter().eval()
    path = export_segmenter(model, tmp_path / "seg.onnx", (48, 64))
    x = seg_images(2, (48, 64), seed=2)
    module = model.encoder[3]
    with torch.no_grad():
        logits = model(torch.tensor(x)).numpy()
    classes = dominant_class(logits)
    masks = torch.tensor((logits.argmax(1) == classes[:, None, None]).astype(np.float32))
    store = {}
    handle = module.register_forward_hook(lambda m, i, o: store.setdefault("a", o.detach()))
    with torch.no_grad():
        model(torch.tensor(x))
    handle.remove()
    A = store["a"].numpy()
    weights = np.zeros(A.shape[:2])
    for n in range(2):
        def score(out):
            return float((out[0, classes[n]] * masks[n]).sum())
        original = score(ref.with_output_replaced(model, module, torch.tensor(x[n:n + 1]), lambda o: o))
        for k in range(A.shape[1]):
            def ablate(o, k=k):
                o = o.clone()
                o[:, k] = 0 if o.min() == 0 else o.min() - 1e7
                return o
            weights[n, k] = (original - score(ref.with_output_replaced(model, module, torch.tensor(x[n:n + 1]), ablate))) \
                / original
    expected = np.array([ref.scale(ref.scale(np.maximum((weights[n][:, None, None] * A[n]).sum(0), 0)[None],
                                                 (64, 48)))[0] for n in range(2)])
    result = onnxcam.Explainer(path, method="ablationcam", layer=tensor_of(path, "encoder.3"), target="segmentation",
                               method_options={"ablationcam": {"chunk_size": 9}})(x)
    np.testing.assert_array_equal(result.class_index, classes)
    close(result.cam, expected)


class ViewFlattenResNet(TinyResNet):
    """Flattens with x.view(x.size(0), -1): the export computes the Reshape's [N, -1] from
    Shape(input), which a re-run of the tail must recompute on its own rows."""

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).view(x.size(0), -1))


def test_ablationcam_when_the_tail_reshapes_by_the_input_batch(tmp_path):
    torch.manual_seed(0)
    model = randomise_batchnorm(ViewFlattenResNet())
    path = export(model, tmp_path / "view.onnx", SIZE)
    assert any(n.op_type == "Shape" for n in onnx.load(path).graph.node)
    x = images(3, seed=6)
    pairs, classes, logits = activations_and_gradients(model, [model.layer3], x, None)
    A = pairs[0][0]
    weights = ref.ablation_weights(model, model.layer3, x, classes, logits, A.shape[1])
    expected = ref.through_pipeline((weights[:, :, None, None] * A).sum(1), SIZE)
    layer = [l.name for l in onnxcam.layers(path) if l.op == "Relu"][-1]
    result = onnxcam.Explainer(path, method="ablationcam", layer=layer,
                               method_options={"ablationcam": {"chunk_size": 10}})(x)
    close(result.cam, expected)
