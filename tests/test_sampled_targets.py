"""The new methods on every target, NHWC and fp16 models, against torch autograd in float64.

Sampled methods keep the selection made on the original images (the class, box, pixels or
steps chosen on x) and apply it to every sample; where the score is not linear in the output
(YOLOv5's objectness x class, the embedding's cosine) the score itself is recomputed per sample.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import onnxcam
from test_input_space import compare, gausslegendre, noise_sigma, relu_backward
from test_targets import (TinyCRNN, TinyEmbedder, TinySegmenter, TinyYOLOv5, TinyYOLOv8, dominant_class, export,
                          tensor_of, v8_selection)
from torch_nets import TinyResNet, randomise_batchnorm
from torch_nets import export as export_square

STEPS, SAMPLES = 3, 2
METHODS = ["guided-backprop", "integrated-gradients", "smoothgrad", "integrated-gradcam"]


def grads(forward, module, x, score_fn, mode=None):
    """(dS/dx, A, dS/dA) in float64 for score_fn(output) summed over the batch."""
    store = {}
    hook = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        with relu_backward(mode):
            t = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
            out = forward(t)
            store["a"].retain_grad()
            score_fn(out).sum().backward()
    finally:
        hook.remove()
    return t.grad.numpy(), store["a"].detach().numpy(), store["a"].grad.numpy()


def references(forward, module, x, score_fn, noise):
    g_guided = grads(forward, module, x, score_fn, "guided")[0]
    alphas, weights = gausslegendre(STEPS)
    path = [grads(forward, module, a * x, score_fn) for a in alphas]
    ig = x * sum(w * p[0] for w, p in zip(weights, path))
    a_zero = grads(forward, module, 0 * x, score_fn)[1]
    raw = sum(w * ((p[1] - a_zero) * p[2].mean((2, 3), keepdims=True)).sum(1) for w, p in zip(weights, path))
    samples = x[None] + noise_sigma(x, 0.15)[None] * noise
    mean = np.mean([grads(forward, module, s, score_fn)[0] for s in samples], 0)
    return {"guided-backprop": g_guided, "integrated-gradients": ig, "smoothgrad": mean,
            "integrated-gradcam": cam_pipeline_hw(raw, x.shape[2:])}


def cam_pipeline_hw(raw, hw):
    from cam_reference import scale
    return scale(scale(np.maximum(raw, 0), (hw[1], hw[0])))


def check(path, layer, x, forward, module, score_fn, target, target_options=None, inputs=None, class_index=None):
    noise = np.random.default_rng(3).standard_normal((SAMPLES,) + x.shape).astype(np.float32)
    explainer = onnxcam.Explainer(path, layer=layer, method=METHODS, target=target,
                                  target_options=target_options or {}, method_options={
                                      "integrated-gradients": {"steps": STEPS, "samples_per_chunk": 2},
                                      "integrated-gradcam": {"steps": STEPS},
                                      "smoothgrad": {"samples": SAMPLES, "noise": "input", "samples_per_chunk": 1}})
    result = explainer(x, class_index=class_index, inputs={**(inputs or {}), "onnxcam_noise": noise})
    refs = references(forward, module, x.astype(np.float64), score_fn, noise.astype(np.float64))
    from test_input_space import magnitude_map, signed_map
    for method in METHODS:
        ref = refs[method]
        if method == "integrated-gradcam":
            compare(method, None, result.cams[method], None, ref)
            continue
        as_map = magnitude_map if method == "smoothgrad" else signed_map
        compare(method, result.extras[f"onnxcam_attribution__{method}"], result.cams[method], ref, as_map(ref))
    return result


def images(n, hw, seed):
    return np.random.default_rng(seed).standard_normal((n, 3, *hw)).astype(np.float32)


def test_yolov8_best_box(tmp_path):
    torch.manual_seed(0)
    model = TinyYOLOv8().eval()
    path = export(model, tmp_path / "v8.onnx", (64, 64))
    x = images(2, (64, 64), 0)
    with torch.no_grad():
        out = model(torch.tensor(x)).numpy()
    weights = torch.tensor(v8_selection(out)[0].transpose(0, 2, 1), dtype=torch.float64)
    model.double()
    check(path, tensor_of(path, "sppf_cv2"), x, model, model.sppf_cv2, lambda o: (o[:, 4:] * weights).sum((1, 2)),
          "detection")


def test_yolov5_objectness_times_class(tmp_path):
    torch.manual_seed(1)
    model = TinyYOLOv5().eval()
    path = export(model, tmp_path / "v5.onnx", (64, 64))
    x = images(2, (64, 64), 1)
    with torch.no_grad():
        out = model(torch.tensor(x)).numpy()
    classes = np.array([1, 3])
    boxes = (out[:, :, 4:5] * out[:, :, 5:])[np.arange(2), :, classes].argmax(1)
    model.double()
    check(path, tensor_of(path, "backbone.2"), x, model, model.backbone[2],
          lambda o: o[torch.arange(2), boxes, 4] * o[torch.arange(2), boxes, 5 + torch.tensor(classes)],
          "detection", {"layout": "v5"}, class_index=classes)


def test_segmentation_dominant_class(tmp_path):
    torch.manual_seed(2)
    model = TinySegmenter().eval()
    path = export(model, tmp_path / "seg.onnx", (48, 64))
    x = images(2, (48, 64), 2)
    with torch.no_grad():
        logits = model(torch.tensor(x)).numpy()
    classes = dominant_class(logits)
    mask = torch.tensor((logits.argmax(1) == classes[:, None, None]).astype(np.float64))
    model.double()
    check(path, tensor_of(path, "encoder.3"), x, model, model.encoder[3],
          lambda o: (o[torch.arange(2), torch.tensor(classes)] * mask).sum((1, 2)), "segmentation")


def test_embedding_cosine(tmp_path):
    torch.manual_seed(4)
    model = TinyEmbedder().eval()
    path = export(model, tmp_path / "emb.onnx", (64, 64))
    x = images(2, (64, 64), 4)
    reference = np.random.default_rng(5).standard_normal((1, 16)).astype(np.float32)
    r = torch.tensor(reference, dtype=torch.float64)
    model.double()
    check(path, tensor_of(path, "features.3"), x, model, model.features[3], lambda e: F.cosine_similarity(e, r),
          "embedding", inputs={"onnxcam_reference": reference})


def test_sequence_greedy_path(tmp_path):
    torch.manual_seed(6)
    model = TinyCRNN().eval()
    x = images(2, (32, 96), 6)
    with torch.no_grad():
        model.fc.bias -= model.fc(model.features(torch.tensor(x)).mean(2).permute(0, 2, 1)).mean((0, 1))
    path = export(model, tmp_path / "crnn.onnx", (32, 96))
    with torch.no_grad():
        k = model.fc(model.features(torch.tensor(x)).mean(2).permute(0, 2, 1)).numpy().argmax(2)
    weights = torch.tensor(np.eye(6)[k] * (k != 0)[:, :, None])
    assert 0 < (k != 0).sum() < k.size
    model.double()
    logits_of = lambda t: model.fc(model.features(t).mean(2).permute(0, 2, 1))  # noqa: E731 (behind LogSoftmax)
    check(path, tensor_of(path, "features.3"), x, logits_of, model.features[3], lambda o: (o * weights).sum((1, 2)),
          "sequence")


class ChannelsLast(nn.Module):
    """An NHWC-input model (a Transpose after the input, as Keras/TF converters make)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.permute(0, 3, 1, 2))


def test_nhwc_input(tmp_path):
    torch.manual_seed(0)
    inner = randomise_batchnorm(TinyResNet()).eval()
    model = ChannelsLast(inner).eval()
    path = str(tmp_path / "nhwc.onnx")
    torch.onnx.export(model, torch.randn(2, 64, 64, 3), path, opset_version=13, input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "N"}, "output": {0: "N"}}, dynamo=False)
    x = images(2, (64, 64), 7)
    methods = ["gradient", "guided-gradcam", "integrated-gradients"]
    result = onnxcam.Explainer(path, method=methods, layer="/inner/layer3/relu_1/Relu_output_0",
                               method_options={"integrated-gradients": {"steps": STEPS}})(x.transpose(0, 2, 3, 1))
    inner.double()
    classes = torch.as_tensor(result.class_index).view(-1, 1)
    g = grads(inner, inner.layer3, x.astype(np.float64), lambda o: o.gather(1, classes)[:, 0])[0]
    attribution = result.extras["onnxcam_attribution__gradient"]
    assert attribution.shape == (2, 64, 64, 3)  # the input's layout
    from test_input_space import signed_map
    compare("nhwc gradient", attribution.transpose(0, 3, 1, 2), result.cams["gradient"], g, signed_map(g))
    alphas, weights = gausslegendre(STEPS)
    x64 = x.astype(np.float64)
    ig = x64 * sum(w * grads(inner, inner.layer3, a * x64, lambda o: o.gather(1, classes)[:, 0])[0]
                   for a, w in zip(alphas, weights))
    compare("nhwc ig", result.extras["onnxcam_attribution__integrated-gradients"].transpose(0, 3, 1, 2),
            result.cams["integrated-gradients"], ig, signed_map(ig))


def test_fp16_model_matches_its_float32_twin(tmp_path):
    """A half-precision export: samples are made in float32 and fed in float16; backward in float32."""
    torch.manual_seed(0)
    model = randomise_batchnorm(TinyResNet()).eval()
    path32 = export_square(model, tmp_path / "r32.onnx", 64)
    path16 = str(tmp_path / "r16.onnx")
    torch.onnx.export(model.half(), torch.randn(2, 3, 64, 64).half(), path16, opset_version=13,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "N"}, "output": {0: "N"}}, dynamo=False)
    x = images(2, (64, 64), 8).astype(np.float16)
    methods = ["guided-gradcam", "integrated-gradients", "smoothgrad", "smooth-gradcam++"]
    noise = np.random.default_rng(1).standard_normal((SAMPLES, 2, 3, 64, 64)).astype(np.float32)
    opts = {"integrated-gradients": {"steps": STEPS}, "smoothgrad": {"samples": SAMPLES, "noise": "input"},
            "smooth-gradcam++": {"samples": SAMPLES, "noise": "input"}}
    feeds = {"onnxcam_noise": noise, "onnxcam_noise__smooth-gradcam++": noise}
    layer = "/layer3/relu_1/Relu_output_0"
    r16 = onnxcam.Explainer(path16, layer=layer, method=methods, method_options=opts)(x, inputs=feeds)
    r32 = onnxcam.Explainer(path32, layer=layer, method=methods, method_options=opts)(x.astype(np.float32),
                                                                                    inputs=feeds)
    np.testing.assert_array_equal(r16.class_index, r32.class_index)
    tolerance = {"guided-gradcam": 2e-2, "smooth-gradcam++": 2e-2, "integrated-gradients": 0.1, "smoothgrad": 0.2}
    for method in methods:
        assert r16.cams[method].dtype == np.float32 and r32.cams[method].std() > 0.01
        # pixel-level maps see the samples rounded to float16 (x + noise, path points): looser
        assert np.abs(r16.cams[method] - r32.cams[method]).max() <= tolerance[method], method
        assert np.corrcoef(r16.cams[method].ravel(), r32.cams[method].ravel())[0, 1] > 0.995, method
