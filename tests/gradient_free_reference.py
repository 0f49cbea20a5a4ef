"""The gradient-free and second-generation methods written out in numpy/torch from their reference
code (pytorch-grad-cam 1.5, the Group-CAM, CF-CAM and NormGrad authors' repositories, TorchRay),
independently of onnxcam: the CI tests compare the augmented models' maps with these.
tools/compare_gradient_free.py checks against the real libraries."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cam_reference import scale


def assert_not_degenerate(maps):
    """A comparison with a flat or all-zero reference could not fail."""
    maps = np.asarray(maps)
    peaks = maps.reshape(len(maps), -1).max(axis=1)
    spread = maps.reshape(len(maps), -1).std(axis=1)
    assert np.all(peaks > 0.5) and np.all(spread > 0.01), f"degenerate reference (peaks {peaks}, std {spread})"
    return maps


def through_pipeline(raw, size):
    """pytorch-grad-cam's BaseCAM after get_cam_image, one layer: relu, scale+resize, scale."""
    return scale(scale(np.maximum(raw, 0), (size, size)))


# ---------------------------------------------------------------------- Eigen-CAM
def projection(X, corrected):
    """get_2d_projection (numpy SVD, float64) for one image's [C, h, w]; sign-corrected if asked."""
    R = X.reshape(X.shape[0], -1).T.astype(np.float64)
    R = R - R.mean(axis=0)
    _, _, vt = np.linalg.svd(R, full_matrices=True)
    p = (R @ vt[0]).reshape(X.shape[1:])
    if corrected and abs(p.min()) > abs(p.max()):
        p = -p
    return p


# ---------------------------------------------------------------------- re-runs
def with_output_replaced(model, module, x, replacement):
    """model(x) with `module`'s output replaced by replacement(output)."""
    handle = module.register_forward_hook(lambda mod, i, o: replacement(o))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        handle.remove()


def scorecam_weights(model, A, x, classes):
    """pytorch-grad-cam's ScoreCAM.get_cam_weights."""
    with torch.no_grad():
        up = F.interpolate(torch.tensor(A), size=x.shape[-2:], mode="bilinear", align_corners=True)
        high, low = up.amax(dim=(2, 3), keepdim=True), up.amin(dim=(2, 3), keepdim=True)
        up = (up - low) / (high - low + 1e-8)
        weights = []
        for n in range(len(x)):
            scores = model(torch.tensor(x[n:n + 1]) * up[n][:, None])[:, classes[n]]
            weights.append(torch.softmax(scores, 0).numpy())
    return np.array(weights)


def ablation_weights(model, module, x, classes, logits, channels):
    """pytorch-grad-cam's AblationCAM.get_cam_weights (AblationLayer: 0, or min - 1e7 when the
    activations' minimum is not 0), one ablated channel per forward."""
    weights = []
    for n in range(len(x)):
        row = []
        for k in range(channels):
            def ablate(o, k=k):
                o = o.clone()
                low = o.min()
                o[:, k] = 0 if low == 0 else low - 1e7
                return o
            out = with_output_replaced(model, module, torch.tensor(x[n:n + 1]), ablate)
            row.append(float(out[0, classes[n]]))
        original = logits[n, classes[n]]
        weights.append((original - np.array(row)) / original)
    return np.array(weights)


def blur(t, kernel=51, sigma=50.0):
    """kornia.filters.gaussian_blur2d(t, (kernel, kernel), (sigma, sigma)), reflected border."""
    r = torch.arange(kernel, dtype=torch.float64) - kernel // 2
    g = torch.exp(-r ** 2 / (2 * sigma * sigma))
    g = (g / g.sum()).float()
    c = t.shape[1]
    t = F.pad(t, (kernel // 2,) * 4, mode="reflect")
    t = F.conv2d(t, g.view(1, 1, kernel, 1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(t, g.view(1, 1, 1, kernel).repeat(c, 1, 1, 1), groups=c)


def groupcam(model, A, G, x, cls, groups):
    """The Group-CAM authors' GroupCAM.forward for one image (x [1, 3, H, W])."""
    inp = torch.tensor(x)
    h, w = x.shape[-2:]
    acts = torch.tensor(G).mean((2, 3), keepdim=True) * torch.tensor(A)
    out = torch.zeros(1, 1, h, w)
    with torch.no_grad():
        base = F.softmax(model(blur(inp)), -1)[0][cls]
        for m in acts.chunk(groups, 1):
            m = F.relu(m.sum(1, keepdim=True))
            m = torch.where(m > float(np.percentile(m.numpy(), 70)), m, torch.zeros_like(m))
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
            if m.max() == m.min():
                continue
            m = (m - m.min()) / (m.max() - m.min())
            out += (F.softmax(model(inp * m + blur(inp) * (1 - m)), -1)[0][cls] - base) * m
    out = F.relu(out)
    return ((out - out.min()) / (out.max() - out.min()))[0, 0].numpy()


# ---------------------------------------------------------------------- second generation
def normgrad(pairs, size, variant):
    """The NormGrad authors' Extract_Aggregate (virtual 1x1 conv, 'norm'; TorchRay's selective
    variant), maps multiplied over layers."""
    final = 1.0
    for A, G in pairs:
        A, G = torch.tensor(A), torch.tensor(G)
        if variant == "norm":
            out = A.norm(dim=1, keepdim=True) * G.norm(dim=1, keepdim=True)
        else:
            out = torch.clamp(A * G, min=0).norm(dim=1, keepdim=True)
        out = F.interpolate(out, size=(size, size), mode="bilinear")
        out = out - out.amin(dim=(1, 2, 3), keepdim=True)
        final = final * (out / out.amax(dim=(1, 2, 3), keepdim=True))[:, 0].numpy()
    return final


def fullgrad(model, x, size):
    """pytorch-grad-cam's FullGrad: Conv2d/BatchNorm2d biases (BN's effective bias)."""
    layers = [m for m in model.modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)) and m.bias is not None]
    store = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: store.__setitem__(k, o)) for k, m in enumerate(layers)]
    try:
        xt = torch.tensor(x, requires_grad=True)
        logits = model(xt)
        for o in store.values():
            o.retain_grad()
        logits.gather(1, logits.argmax(1)[:, None]).sum().backward()
    finally:
        for h in hooks:
            h.remove()

    def per_channel(t):
        n, c = t.shape[:2]
        return scale(t.reshape(n * c, *t.shape[2:]), (size, size)).reshape(n, c, size, size)

    terms = [per_channel(np.abs(xt.grad.numpy() * x))]
    for k, m in enumerate(layers):
        if isinstance(m, torch.nn.BatchNorm2d):
            bias = (m.bias - m.running_mean * m.weight / torch.sqrt(m.running_var + m.eps)).detach().numpy()
        else:
            bias = m.bias.detach().numpy()
        terms.append(per_channel(np.abs(bias[None, :, None, None] * store[k].grad.numpy())).sum(1, keepdims=True))
    return scale(np.concatenate(terms, 1).sum(1)), len(layers)


def finer_gradients(model, module, x, alpha=1.0, positions=(1, 2, 3)):
    """A and G at `module` for pytorch-grad-cam's FinerWeightedTarget (prob not detached)."""
    store = {}
    handle = module.register_forward_hook(lambda mod, i, o: store.__setitem__(0, o))
    try:
        out = model(torch.tensor(x))
        store[0].retain_grad()
    finally:
        handle.remove()
    data = out.detach().numpy()
    order = np.argsort(np.abs(data - data.max(1, keepdims=True)), axis=1)
    loss = 0
    for i in range(len(x)):
        main, compared = order[i, 0], order[i, list(positions)]
        prob = torch.softmax(out[i], -1)
        numerator = sum(prob[c] * (out[i, main] - alpha * out[i, c]) for c in compared)
        loss = loss + numerator / (sum(prob[c] for c in compared) + 1e-9)
    loss.backward()
    return store[0].detach().numpy(), store[0].grad.numpy()


def dbscan_labels(X, eps, min_samples):
    """scikit-learn's DBSCAN (dbscan_inner's expansion order) written out; -1 for noise."""
    d = np.linalg.norm(X[:, None] - X[None, :], axis=2)
    neighbours = [np.where(d[i] <= eps)[0] for i in range(len(X))]
    core = np.array([len(nb) >= min_samples for nb in neighbours])
    labels = np.full(len(X), -1)
    label = 0
    for i in range(len(X)):
        if labels[i] != -1 or not core[i]:
            continue
        stack = [i]
        while stack:
            j = stack.pop()
            if labels[j] != -1:
                continue
            labels[j] = label
            if core[j]:
                stack.extend(k for k in neighbours[j] if labels[k] == -1)
        label += 1
    return labels


def cfcam(A, G, size, dbscan=None):
    """The CF-CAM authors' CFCAM.__call__ after the backward pass, one image (A, G [C, h, w]);
    `dbscan(X, eps, min_samples) -> labels` (default: dbscan_labels; the tool passes scikit-learn's).
    Returns (map, number of clusters, number of noise channels)."""
    A, G = torch.tensor(A), torch.tensor(G)
    C, h, w = A.shape
    features = A.view(C, -1).numpy()
    norms = np.linalg.norm(features, ord=2, axis=1)
    cut = np.percentile(norms, 75)
    important, rest = np.where(norms >= cut)[0], np.where(norms < cut)[0]
    labels = np.full(C, -2)
    distances = np.linalg.norm(features[rest][:, None] - features[rest][None, :], axis=2)
    np.fill_diagonal(distances, np.inf)
    flat = distances.flatten()
    eps = max(np.percentile(flat[flat != np.inf], 25), 1e-5)
    found = (dbscan or dbscan_labels)(features[rest], eps, max(2, int(len(rest) * 0.05)))
    labels[rest] = found
    clusters = len(np.unique(found)) - (1 if -1 in found else 0)
    weights = torch.zeros(C)
    valid = torch.zeros(C, dtype=torch.bool)
    valid[np.concatenate([important, np.where(labels >= 0)[0]])] = True
    for i in important:
        weights[i] = G[i].mean()

    def bilateral(g, sigma_spatial=5.0, sigma_range=0.1):
        g = g[None, None]
        xs, ys = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        xs, ys = xs.float() - h / 2, ys.float() - w / 2
        spatial = torch.exp(-(xs ** 2 + ys ** 2) / (2 * sigma_spatial ** 2))[None, None]
        k = spatial * torch.exp(-((g - g.mean()) ** 2) / (2 * sigma_range ** 2))
        k = k / (k.sum(dim=(-1, -2), keepdim=True) + 1e-6)
        return F.conv2d(g, k, padding="same").squeeze()

    for cid in range(clusters):
        idx = np.where(labels == cid)[0]
        filtered = bilateral(G[idx].mean(0))
        for i in idx:
            weights[i] = filtered.mean()
    soft = torch.softmax(weights[valid], 0).reshape(-1, 1, 1)
    cam = torch.relu((soft * A[valid]).sum(0))
    cam = F.interpolate(cam[None, None], size=(size, size), mode="bilinear", align_corners=False).squeeze()
    if cam.max() > 0:
        cam = cam / cam.max()
    return cam.numpy(), clusters, int((labels == -1).sum())
