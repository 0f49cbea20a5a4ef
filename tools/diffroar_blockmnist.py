"""DiffROAR on BlockMNIST (Shah, Jain & Netrapalli, NeurIPS 2021, section 3): remove and retrain.

    python tools/diffroar_blockmnist.py [--fraction 0.1] [--json OUT.json]

For an attribution method and a model, every training and test image keeps only the top k % of its
pixels by that attribution (the rest set to 0) — or only the bottom k % — and a fresh CNN (the
architecture of models/blockmnist.py, same training recipe) is trained on the masked training set and
tested on the masked test set. DiffROAR = accuracy(top k %) - accuracy(bottom k %): positive when the
attribution ranks discriminative pixels first, negative when it ranks them last (the paper's
"feature inversion" of standard models' input gradients).

Attributions, computed on the committed standard and robust models for the true class:
- saliency: |d logit / d x|, from onnxcam's VJP mode (`augment(..., layer="input", vjp=True)`);
- SmoothGrad (Smilkov et al. 2017): the mean of |d logit / d x| over 16 copies with N(0, 0.15^2)
  noise — a wrapper over the same VJP session;
- Grad-CAM at the last conv block, through `onnxcam.Explainer`;
- occlusion (Zeiler & Fergus 2014), forward-only: the logit drop when a 7x7 patch (stride 7) is set
  to 0, through the plain model;
- random: uniform noise (DiffROAR ~ 0 by construction).
Torch and mlxtend needed; CPU, one thread, a few minutes. Not CI.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("blockmnist", os.path.join(ROOT, "models", "blockmnist.py"))
blockmnist = importlib.util.module_from_spec(spec)
spec.loader.exec_module(blockmnist)


def vjp_session(path):
    import onnxruntime as ort

    import onnxcam

    augmented = onnxcam.augment(str(path), layer="input", vjp=True)
    return ort.InferenceSession(augmented.SerializeToString(), providers=["CPUExecutionProvider"])


def saliency(session, images, labels):
    seed = np.zeros((len(labels), 2), np.float32)
    seed[np.arange(len(labels)), labels] = 1.0
    return np.abs(session.run(["onnxcam_gradient"], {"input": images, "onnxcam_seed": seed})[0][:, 0])


def smoothgrad(session, images, labels, samples=16, sigma=0.15, seed=0):
    rng = np.random.default_rng(seed)
    total = np.zeros(images.shape[:1] + images.shape[2:], np.float64)
    for _ in range(samples):
        noisy = (images + rng.normal(0, sigma, images.shape)).astype(np.float32)
        total += saliency(session, noisy, labels)
    return total / samples


def gradcam(path, images, labels):
    import onnxcam

    return onnxcam.Explainer(str(path), method="gradcam")(images, class_index=labels, batch_size=400).cam


def occlusion(path, images, labels, patch=7):
    from onnxcam.evaluate.scoring import ScoreModel

    scorer = ScoreModel(str(path), score="logit", batch_size=256)
    base = scorer.scores(images, labels)
    h, w = images.shape[2:]
    out = np.zeros((len(images), h, w))
    for r in range(0, h, patch):
        for c in range(0, w, patch):
            hidden = images.copy()
            hidden[:, :, r:r + patch, c:c + patch] = 0
            out[:, r:r + patch, c:c + patch] = (base - scorer.scores(hidden, labels))[:, None, None]
    return out


def keep_mask(maps, fraction, top):
    n, h, w = maps.shape
    k = int(round(fraction * h * w))
    order = np.argsort(-maps.reshape(n, -1) if top else maps.reshape(n, -1), axis=1, kind="stable")[:, :k]
    mask = np.zeros((n, h * w), bool)
    mask[np.arange(n)[:, None], order] = True
    return mask.reshape(n, 1, h, w)


def retrain_accuracy(train_x, train_y, test_x, test_y, epochs=8):
    net = blockmnist.train(train_x, train_y, robust=False, epochs=epochs, seed=1)
    return blockmnist.accuracy(net, test_x, test_y)


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tr_x, tr_y, _, te_x, te_y, _ = blockmnist.load_split()
    results = {}
    for model in blockmnist.MODELS:
        path = blockmnist.model_path(model)
        session = vjp_session(path)
        makers = {
            "saliency": lambda x, y: saliency(session, x, y),
            "smoothgrad": lambda x, y: smoothgrad(session, x, y),
            "gradcam": lambda x, y: gradcam(path, x, y),
            "occlusion": lambda x, y: occlusion(path, x, y),
            "random": lambda x, y: np.random.default_rng(len(x)).random((len(x),) + x.shape[2:]),
        }
        results[model] = {}
        for method, make in makers.items():
            start = time.time()
            train_maps, test_maps = make(tr_x, tr_y), make(te_x, te_y)
            accuracy = {}
            for top in (True, False):
                tr_keep, te_keep = keep_mask(train_maps, args.fraction, top), keep_mask(test_maps, args.fraction, top)
                accuracy["top" if top else "bottom"] = retrain_accuracy(tr_x * tr_keep, tr_y, te_x * te_keep, te_y)
            accuracy["diffroar"] = accuracy["top"] - accuracy["bottom"]
            results[model][method] = accuracy
            print(f"{model} {method}: top {accuracy['top']:.3f}, bottom {accuracy['bottom']:.3f}, DiffROAR "
                  f"{accuracy['diffroar']:+.3f} ({time.time() - start:.0f} s)", flush=True)
    print(f"\n| attribution | DiffROAR standard (top - bottom {100 * args.fraction:g} %) | robust |")
    print("| --- | --- | --- |")
    for method in results["standard"]:
        s, r = results["standard"][method], results["robust"][method]
        print(f"| {method} | {s['diffroar']:+.3f} ({s['top']:.3f} - {s['bottom']:.3f}) | "
              f"{r['diffroar']:+.3f} ({r['top']:.3f} - {r['bottom']:.3f}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"fraction": args.fraction, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
