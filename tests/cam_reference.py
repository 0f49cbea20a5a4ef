"""pytorch-grad-cam's formulas in numpy, written from its source independently of onnxcam, applied
to activations/gradients taken from torch with hooks. tools/compare_pytorch_grad_cam.py checks
the same against the real library."""

from __future__ import annotations

import cv2
import numpy as np
import torch


GRADIENT_CAMS = ("gradcam", "gradcam++", "xgradcam", "hirescam", "gradcam-elementwise", "layercam")  # written out below
REFERENCE_METHODS = GRADIENT_CAMS  # the layer methods pytorch-grad-cam has; the others have their own tests


def weights_to_cam(weights, A):
    return (weights[:, :, None, None] * A).sum(axis=1)


def reference_raw_cam(method, A, G):
    if method == "gradcam":
        return weights_to_cam(G.mean(axis=(2, 3)), A)
    if method == "gradcam++":
        g2, g3 = G ** 2, G ** 3
        sum_a = A.sum(axis=(2, 3))
        aij = g2 / (2 * g2 + sum_a[:, :, None, None] * g3 + 1e-6)
        aij = np.where(G != 0, aij, 0)
        return weights_to_cam((np.maximum(G, 0) * aij).sum(axis=(2, 3)), A)
    if method == "xgradcam":
        sum_a = A.sum(axis=(2, 3))
        return weights_to_cam((G * A / (sum_a[:, :, None, None] + 1e-7)).sum(axis=(2, 3)), A)
    if method == "hirescam":
        return (G * A).sum(axis=1)
    if method == "gradcam-elementwise":
        return np.maximum(G * A, 0).sum(axis=1)
    if method == "layercam":
        return (np.maximum(G, 0) * A).sum(axis=1)
    raise KeyError(method)


def scale(cams, size=None):
    out = []
    for img in cams:
        img = img - np.min(img)
        img = img / (1e-7 + np.max(img))
        if size is not None:
            img = cv2.resize(np.float32(img), size)
        out.append(img)
    return np.float32(out)


def reference_cam(method, layer_pairs, input_hw):
    """BaseCAM.forward: per layer relu+scale+resize, then relu, mean over layers, scale.

    Refuses to return an all-zero map: comparing against one could not fail (a net whose random
    weights kill every activation would pass any test)."""
    per_layer = [scale(np.maximum(reference_raw_cam(method, A, G), 0), (input_hw[1], input_hw[0]))[:, None]
                 for A, G in layer_pairs]
    stacked = np.maximum(np.concatenate(per_layer, axis=1), 0)
    cams = scale(stacked.mean(axis=1))
    peaks = cams.reshape(len(cams), -1).max(axis=1)
    assert np.all(peaks > 0.5), f"degenerate reference CAM (peaks {peaks}): the comparison could not fail"
    return cams


def activations_and_gradients(model, modules, x, class_index, logits_fn=None, counterfactual=False):
    """Activations and gradients of `modules` for the logit of `class_index` (int or per-image)."""
    store = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: store.__setitem__(k, o)) for k, m in enumerate(modules)]
    try:
        x = torch.tensor(x, requires_grad=False)
        logits = (logits_fn or model)(x)
        for out in store.values():
            out.retain_grad()
        classes = logits.argmax(1) if class_index is None else torch.as_tensor(class_index).expand(x.shape[0])
        score = logits.gather(1, classes[:, None]).sum()
        (-score if counterfactual else score).backward()
    finally:
        for h in hooks:
            h.remove()
    pairs = [(store[k].detach().numpy(), store[k].grad.numpy()) for k in range(len(modules))]
    return pairs, classes.numpy(), logits.detach().numpy()
