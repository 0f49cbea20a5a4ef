"""Structured targets (detection, segmentation, embedding, sequence) against torch autograd.

Each test builds a small torch model, exports it with the legacy exporter, explains it with
onnxcam and compares with the same score differentiated by torch (activations and gradients
via a forward hook + retain_grad, CAM by cam_reference.reference_cam)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import onnxcam
from cam_reference import reference_cam

CAM_TOL = 1e-3


# ---------------------------------------------------------------------- models
def conv(cin, cout, k=3, s=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2), nn.SiLU())


def make_anchors(sizes, strides):
    points, stride_column = [], []
    for (h, w), s in zip(sizes, strides):
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        points.append(torch.stack([xs, ys]).reshape(2, -1))
        stride_column.append(torch.full((1, h * w), float(s)))
    return torch.cat(points, 1), torch.cat(stride_column, 1)


class TinyYOLOv8(nn.Module):
    """Conv backbone, SPPF (MaxPool 5x5 s1 p2 thrice), nearest Upsample x2 + Concat neck, two
    levels sharing a head; DFL (Softmax over 16 bins per side, Conv with arange weights), Split
    into lt/rb, xywh decode, sigmoid class scores: output [N, 4+C, A]."""

    def __init__(self, classes=3, bins=16, size=64):
        super().__init__()
        self.bins = bins
        self.stem = nn.Sequential(conv(3, 16, 3, 2), conv(16, 32, 3, 2))  # stride 4
        self.down = conv(32, 32, 3, 2)  # stride 8
        self.sppf_cv1 = conv(32, 16, 1)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.sppf_cv2 = conv(64, 32, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = conv(64, 32)
        self.box_head = nn.Conv2d(32, 4 * bins, 1)
        self.cls_head = nn.Conv2d(32, classes, 1)
        self.dfl = nn.Conv2d(bins, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(bins, dtype=torch.float32).view(1, bins, 1, 1)
        anchors, strides = make_anchors([(size // 4, size // 4), (size // 8, size // 8)], [4, 8])
        self.register_buffer("anchors", anchors)
        self.register_buffer("strides", strides)

    def forward(self, x):
        p3 = self.stem(x)
        y = [self.sppf_cv1(self.down(p3))]
        y += [self.pool(y[-1]) for _ in range(3)]
        p4 = self.sppf_cv2(torch.cat(y, 1))
        f3 = self.fuse(torch.cat([self.up(p4), p3], 1))
        n = x.shape[0]
        box = torch.cat([self.box_head(f).flatten(2) for f in (f3, p4)], 2)  # [N, 4*bins, A]
        cls = torch.cat([self.cls_head(f).flatten(2) for f in (f3, p4)], 2)
        a = box.shape[2]
        dist = self.dfl(box.view(n, 4, self.bins, a).transpose(2, 1).softmax(1)).view(n, 4, a)
        lt, rb = dist.chunk(2, 1)
        x1y1, x2y2 = self.anchors - lt, self.anchors + rb
        xywh = torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], 1) * self.strides
        return torch.cat([xywh, cls.sigmoid()], 1)


class TinyYOLOv5(nn.Module):
    """One level, two anchors per cell: sigmoid over everything, xywh decode, Concat: [N, A, 5+C]."""

    def __init__(self, classes=4, size=64):
        super().__init__()
        self.classes = classes
        self.backbone = nn.Sequential(conv(3, 16, 3, 2), conv(16, 32, 3, 2), conv(32, 32, 3, 2))
        self.head = nn.Conv2d(32, 2 * (5 + classes), 1)
        g = size // 8
        ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        self.register_buffer("grid", torch.stack([xs, ys], -1).view(1, 1, g, g, 2).float())

    def forward(self, x):
        n = x.shape[0]
        p = self.head(self.backbone(x))
        g = p.shape[-1]
        y = p.view(n, 2, 5 + self.classes, g, g).permute(0, 1, 3, 4, 2).sigmoid()
        xy, wh, conf = y.split((2, 2, self.classes + 1), 4)
        xy = (xy * 2 + self.grid - 0.5) * 8
        wh = (wh * 2) ** 2 * 16
        return torch.cat([xy, wh, conf], 4).view(n, -1, 5 + self.classes)


class TinySegmenter(nn.Module):
    """Encoder (two stride-2 convs) and decoder (bilinear Upsample x2, conv) to K class logits."""

    def __init__(self, classes=4):
        super().__init__()
        self.encoder = nn.Sequential(conv(3, 16, 3, 2), conv(16, 32, 3, 2), nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU())
        self.decoder = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), conv(32, 16),
                                     nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                     nn.Conv2d(16, classes, 3, 1, 1))

    def forward(self, x):
        return self.decoder(self.encoder(x))


class TinyTextDetector(TinySegmenter):
    """DBNet-like: one sigmoid probability map [N, 1, H, W]."""

    def __init__(self):
        super().__init__(classes=1)

    def forward(self, x):
        return torch.sigmoid(super().forward(x))


class TinyEmbedder(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.features = nn.Sequential(conv(3, 16, 3, 2), conv(16, 32, 3, 2), nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU())
        self.fc = nn.Linear(32, dim)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class TinyCRNN(nn.Module):
    """Conv features -> mean over height -> [N, T, C'] -> Linear -> log_softmax: [N, T, classes]."""

    def __init__(self, classes=6):
        super().__init__()
        self.features = nn.Sequential(conv(3, 16, 3, 2), conv(16, 32, 3, 2), nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU())
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        f = self.features(x).mean(2).permute(0, 2, 1)
        return F.log_softmax(self.fc(f), dim=2)


# ---------------------------------------------------------------------- helpers
def export(model, path, hw, opset=13):
    x = torch.randn(2, 3, *hw)
    torch.onnx.export(model, x, str(path), opset_version=opset, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "N"}, "output": {0: "N"}}, dynamo=False)
    proto = onnx.load(str(path))
    if proto.ir_version > 8:
        proto.ir_version = 8
        onnx.save(proto, str(path))
    return str(path)


def tensor_of(path, module_path):
    """The ONNX tensor produced by the torch module at `module_path` (legacy exporter's naming)."""
    parts = module_path.split(".")
    prefix = "".join("/" + ".".join(parts[:i + 1]) for i in range(len(parts))) + "/"  # /a/a.0/
    outputs = [n.output[0] for n in onnx.load(path).graph.node if n.name.startswith(prefix)]
    assert outputs, module_path
    return outputs[-1]


def torch_reference(model, module, x, score_fn):
    """Activation and gradient of `module` for score_fn(output).sum(); returns (pairs, output)."""
    store = {}
    hook = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        out = model(torch.tensor(x))
        store["a"].retain_grad()
        score_fn(out).sum().backward()
    finally:
        hook.remove()
    return [(store["a"].detach().numpy(), store["a"].grad.numpy())], out.detach().numpy()


def images(n, hw, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, *hw)).astype(np.float32)


def check_cam(result, pairs, hw):
    diff = np.max(np.abs(result.cam - reference_cam("gradcam", pairs, hw)))
    assert diff <= CAM_TOL, diff
    return diff


# ---------------------------------------------------------------------- detection
def v8_selection(out, box=None, cls=None, threshold=None):
    """numpy reference of the documented rule; returns (weights [N, A, C], class, box)."""
    scores = out[:, 4:, :].transpose(0, 2, 1)
    n, a, c = scores.shape
    classes, boxes = np.zeros(n, np.int64), np.zeros(n, np.int64)
    weights = np.zeros_like(scores)
    for i in range(n):
        if box is not None and box[i] >= 0:
            classes[i] = scores[i, box[i]].argmax() if cls is None or cls[i] < 0 else cls[i]
            boxes[i] = box[i]
        else:
            classes[i] = scores[i].max(0).argmax() if cls is None or cls[i] < 0 else cls[i]
            boxes[i] = scores[i, :, classes[i]].argmax()
        weights[i, boxes[i], classes[i]] = 1
        if threshold is not None:
            if cls is None or cls[i] < 0:
                own = np.eye(c)[scores[i].argmax(1)]
            else:
                own = np.zeros((a, c)); own[:, cls[i]] = 1
            weights[i] = np.maximum(weights[i], own * (scores[i] > threshold))
    return weights, classes, boxes


@pytest.mark.parametrize("opset,mode", [(13, "best"), (11, "given"), (13, "threshold")])
def test_yolov8_detection(tmp_path, opset, mode):
    torch.manual_seed(0)
    model = TinyYOLOv8().eval()
    path = export(model, tmp_path / "v8.onnx", (64, 64), opset)
    layer = tensor_of(path, "sppf_cv2")
    x = images(2, (64, 64))
    with torch.no_grad():
        out = model(torch.tensor(x)).numpy()
    box = cls = threshold = None
    inputs, options = {}, {}
    if mode == "given":
        box, cls = np.array([7, 300]), np.array([-1, 2])
        inputs = {"onnxcam_box": box}
    if mode == "threshold":
        threshold = float(np.quantile(out[:, 4:], 0.9))
        options = {"threshold": threshold}
    weights, classes, boxes = v8_selection(out, box, cls, threshold)
    result = onnxcam.Explainer(path, layer=layer, target="detection", target_options=options)(
        x, class_index=cls, inputs=inputs)
    np.testing.assert_array_equal(result.class_index, classes)
    np.testing.assert_array_equal(result.extras["onnxcam_box_index"], boxes)
    np.testing.assert_allclose(result.extras["onnxcam_box_coords"], out[np.arange(2), :4, boxes], rtol=1e-5)
    w = torch.tensor(weights.transpose(0, 2, 1))
    pairs, _ = torch_reference(model, model.sppf_cv2, x, lambda o: (o[:, 4:] * w).sum((1, 2)))
    np.testing.assert_allclose(result.score, (out[:, 4:] * w.numpy()).sum((1, 2)), rtol=1e-5)
    check_cam(result, pairs, (64, 64))


def test_yolov5_detection_of_a_class(tmp_path):
    torch.manual_seed(1)
    model = TinyYOLOv5().eval()
    path = export(model, tmp_path / "v5.onnx", (64, 64))
    x = images(3, (64, 64), seed=1)
    with torch.no_grad():
        out = model(torch.tensor(x)).numpy()
    scores = out[:, :, 4:5] * out[:, :, 5:]
    classes = np.array([1, 3, 0])
    boxes = scores[np.arange(3), :, classes].argmax(1)
    result = onnxcam.Explainer(path, layer=tensor_of(path, "backbone.2"), target="detection",
                               target_options={"layout": "v5"})(x, class_index=classes)
    np.testing.assert_array_equal(result.class_index, classes)
    np.testing.assert_array_equal(result.extras["onnxcam_box_index"], boxes)
    np.testing.assert_allclose(result.score, scores[np.arange(3), boxes, classes], rtol=1e-5)

    def score(o):
        return o[torch.arange(3), boxes, 4] * o[torch.arange(3), boxes, 5 + torch.tensor(classes)]
    pairs, _ = torch_reference(model, model.backbone[2], x, score)
    check_cam(result, pairs, (64, 64))


def test_detection_rejects_unknown_option(tmp_path):
    torch.manual_seed(0)
    path = export(TinyYOLOv5().eval(), tmp_path / "v5.onnx", (64, 64))
    with pytest.raises(onnxcam.OnnxcamError, match="thresold"):
        onnxcam.Explainer(path, layer=tensor_of(path, "backbone.2"), target="detection",
                          target_options={"thresold": 0.5})


# ---------------------------------------------------------------------- segmentation
def dominant_class(logits, background=0):
    counts = np.stack([(logits.argmax(1) == k).sum((1, 2)) for k in range(logits.shape[1])], 1).astype(float)
    counts[:, background] = 0.5
    return counts.argmax(1)


@pytest.mark.parametrize("opset,mode", [(13, "dominant"), (11, "class"), (13, "mask")])
def test_segmentation(tmp_path, opset, mode):
    torch.manual_seed(2)
    model = TinySegmenter().eval()
    path = export(model, tmp_path / "seg.onnx", (48, 64), opset)
    x = images(2, (48, 64), seed=2)
    with torch.no_grad():
        logits = model(torch.tensor(x)).numpy()
    if mode == "class":  # an explicit class that is predicted somewhere, but not the dominant one
        counts = [np.bincount(logits[i].argmax(0).ravel(), minlength=logits.shape[1]) for i in range(2)]
        classes = np.array([min((k for k in range(len(c)) if c[k] > 0), key=lambda k: c[k]) for c in counts])
    else:
        classes = dominant_class(logits)
    masks = (logits.argmax(1) == classes[:, None, None]).astype(np.float32)
    inputs = {}
    if mode == "mask":  # a box region for the first image; the second keeps its arg-max mask
        user = np.zeros((2, 48, 64), np.float32)
        user[0, 10:30, 5:40] = 1
        masks[0] = user[0]
        inputs = {"onnxcam_mask": user}
    result = onnxcam.Explainer(path, layer=tensor_of(path, "encoder.3"), target="segmentation")(
        x, class_index=classes if mode == "class" else None, inputs=inputs)
    np.testing.assert_array_equal(result.class_index, classes)
    m = torch.tensor(masks)
    pairs, _ = torch_reference(model, model.encoder[3], x,
                               lambda o: (o[torch.arange(2), torch.tensor(classes)] * m).sum((1, 2)))
    np.testing.assert_allclose(result.score, (logits[np.arange(2), classes] * masks).sum((1, 2)), rtol=1e-4)
    check_cam(result, pairs, (48, 64))


@pytest.mark.parametrize("keep_probabilities", [True, False])
def test_text_detector_probability_map(tmp_path, keep_probabilities):
    torch.manual_seed(3)
    model = TinyTextDetector().eval()
    path = export(model, tmp_path / "db.onnx", (64, 64))
    x = images(2, (64, 64), seed=3)
    with torch.no_grad():
        prob = model(torch.tensor(x)).numpy()
    threshold = float(np.quantile(prob, 0.7))  # an untrained map sits near 0.5 everywhere
    mask = torch.tensor((prob > threshold).astype(np.float32))
    result = onnxcam.Explainer(path, layer=tensor_of(path, "encoder.3"), target="segmentation",
                               keep_probabilities=keep_probabilities, target_options={"threshold": threshold})(x)
    assert 0 < mask.sum() < mask.numel()
    # The pixels come from the probability map; what is summed is the map itself with
    # keep_probabilities, else the logits behind its Sigmoid.
    forward = model if keep_probabilities else (lambda t: TinySegmenter.forward(model, t))
    pairs, out = torch_reference(forward, model.encoder[3], x, lambda o: (o * mask).sum((1, 2, 3)))
    np.testing.assert_array_equal(result.class_index, [0, 0])
    np.testing.assert_allclose(result.score, (out * mask.numpy()).sum((1, 2, 3)), rtol=1e-4)
    check_cam(result, pairs, (64, 64))


# ---------------------------------------------------------------------- embeddings and sequences
def test_embedding_cosine_to_reference(tmp_path):
    torch.manual_seed(4)
    model = TinyEmbedder().eval()
    path = export(model, tmp_path / "emb.onnx", (64, 64))
    x = images(3, (64, 64), seed=4)
    reference = np.random.default_rng(5).standard_normal((1, 16)).astype(np.float32)
    result = onnxcam.Explainer(path, layer=tensor_of(path, "features.3"), target="embedding")(
        x, inputs={"onnxcam_reference": reference})
    r = torch.tensor(reference)
    pairs, out = torch_reference(model, model.features[3], x, lambda e: F.cosine_similarity(e, r))
    expected = (out @ reference.T)[:, 0] / np.linalg.norm(out, axis=1) / np.linalg.norm(reference)
    np.testing.assert_allclose(result.score, expected, rtol=1e-5)
    np.testing.assert_array_equal(result.class_index, [-1, -1, -1])
    check_cam(result, pairs, (64, 64))


@pytest.mark.parametrize("opset,step", [(13, None), (11, 5)])
def test_sequence_greedy_path_and_one_step(tmp_path, opset, step):
    torch.manual_seed(6)
    model = TinyCRNN().eval()
    x = images(2, (32, 96), seed=6)
    with torch.no_grad():  # centre the untrained classes so the greedy path mixes blanks and symbols
        model.fc.bias -= model.fc(model.features(torch.tensor(x)).mean(2).permute(0, 2, 1)).mean((0, 1))
    path = export(model, tmp_path / "crnn.onnx", (32, 96), opset)
    with torch.no_grad():
        logits = model.fc(model.features(torch.tensor(x)).mean(2).permute(0, 2, 1)).numpy()
    k = logits.argmax(2)
    if step is None:
        weights = np.eye(6)[k] * (k != 0)[:, :, None]
        assert 0 < (k != 0).sum() < k.size  # some blanks, some symbols
        classes, inputs = [-1, -1], {}
    else:
        weights = np.zeros_like(logits)
        weights[:, step, k[:, step]] = 1
        classes, inputs = k[:, step], {"onnxcam_step": np.array([step])}
    result = onnxcam.Explainer(path, layer=tensor_of(path, "features.3"), target="sequence")(x, inputs=inputs)
    np.testing.assert_array_equal(result.extras["onnxcam_path"], k)
    np.testing.assert_array_equal(result.class_index, classes)
    np.testing.assert_allclose(result.score, (logits * weights).sum((1, 2)), rtol=1e-5)
    w = torch.tensor(weights, dtype=torch.float32)
    logits_of = lambda t: model.fc(model.features(t).mean(2).permute(0, 2, 1))  # noqa: E731 (behind LogSoftmax)
    pairs, _ = torch_reference(logits_of, model.features[3], x, lambda o: (o * w).sum((1, 2)))
    check_cam(result, pairs, (32, 96))


# ---------------------------------------------------------------------- exports: fp16, several inputs
def test_fp16_segmenter_matches_its_float32_twin(tmp_path):
    """A half-precision export: the targets build their masks in the model's own type."""
    torch.manual_seed(2)
    model = TinySegmenter().eval().half()
    x16 = torch.randn(2, 3, 48, 64).half()
    path16 = str(tmp_path / "seg16.onnx")
    torch.onnx.export(model, x16, path16, opset_version=13, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "N"}, "output": {0: "N"}}, dynamo=False)
    path32 = export(model.float(), tmp_path / "seg32.onnx", (48, 64))
    x = images(2, (48, 64), seed=2).astype(np.float16)
    layer = tensor_of(path32, "encoder.3")
    r16 = onnxcam.Explainer(path16, layer=layer, target="segmentation")(x)
    r32 = onnxcam.Explainer(path32, layer=layer, target="segmentation")(x.astype(np.float32))
    assert r16.cam.dtype == np.float32 and r16.score.dtype == np.float32
    np.testing.assert_array_equal(r16.class_index, r32.class_index)
    np.testing.assert_allclose(r16.score, r32.score, rtol=2e-3)
    assert np.max(np.abs(r16.cam - r32.cam)) <= 2e-2


class TwoInputClassifier(nn.Module):
    """An image and a per-image prior added to the logits (a second, non-image input)."""

    def __init__(self, classes=5):
        super().__init__()
        self.features = nn.Sequential(conv(3, 16, 3, 2), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(32, classes)

    def forward(self, x, prior):
        return self.fc(self.features(x).mean((2, 3))) + prior


def test_model_with_a_second_input_passes_it_through(tmp_path):
    torch.manual_seed(7)
    model = TwoInputClassifier().eval()
    path = str(tmp_path / "two.onnx")
    torch.onnx.export(model, (torch.randn(2, 3, 32, 32), torch.randn(2, 5)), path, opset_version=13,
                      input_names=["image", "prior"], output_names=["logits"],
                      dynamic_axes={"image": {0: "N"}, "prior": {0: "N"}, "logits": {0: "N"}}, dynamo=False)
    x = images(3, (32, 32), seed=7)
    prior = (np.random.default_rng(8).standard_normal((3, 5)) * 3).astype(np.float32)
    result = onnxcam.Explainer(path, layer=tensor_of(path, "features.2"))(x, batch_size=2, inputs={"prior": prior})
    pr = torch.tensor(prior)
    with torch.no_grad():
        classes = model(torch.tensor(x), pr).argmax(1)
    pairs, _ = torch_reference(lambda t: model(t, pr), model.features[2], x,
                               lambda o: o.gather(1, classes[:, None])[:, 0])
    np.testing.assert_array_equal(result.class_index, classes.numpy())
    check_cam(result, pairs, (32, 32))
