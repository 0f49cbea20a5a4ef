"""OpenVINO against the ONNX reference evaluator and ONNX Runtime on onnxcam-augmented models.

    python tools/check_openvino.py [--models resnet50,effnet-mid,effnet] [--runs 10]

Needs openvino, torch and torchvision (the reference venv, tools/make_reference_venv.sh), and
onnxcam importable (run from the repository root with PYTHONPATH=$PWD). Prints:
1. the two-node reproduction of OpenVINO's shared-weight bug: Conv(x, W) -> ConvTranspose(., W),
   with W shared and with onnxcam.portable.separate_conv_weights applied;
2. per model (ResNet-50, torchvision architecture with seeded random weights, Grad-CAM at layer3's
   output; the real EfficientNet-Lite0 at a middle block, through depthwise convolutions, and at
   its last feature map), per runtime: the largest map difference from the reference evaluator
   (onnx.reference.ReferenceEvaluator, numpy), whether the explained classes agree, and the
   median run time over that runtime's plain inference of the original model.
OpenVINO runs on its CPU plugin, reading the ONNX file directly, with INFERENCE_PRECISION_HINT
f32, and once with the plugin's default precision (bf16 where the CPU has it) to show why f32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxcam
from onnxcam.portable import separate_conv_weights, shared_conv_weights

F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def openvino_compile(model: onnx.ModelProto, config):
    import openvino as ov

    core = ov.Core()
    return core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU", config)


def openvino_run(compiled, feeds, names):
    # Only the inputs the compiled model has: OpenVINO, too, folds an input backed by an
    # initializer (models augmented before the run-time choices became plain inputs).
    inputs = {name for port in compiled.inputs for name in port.get_names()}
    result = compiled({k: v for k, v in feeds.items() if k in inputs})
    by_name = {name: result[out] for out in compiled.outputs for name in out.get_names()}
    return [by_name[n] for n in names]


def two_node_reproduction():
    print("1. Conv(x, W) -> ConvTranspose(., W), x 1xCx8x8; max |z - reference| / max |reference|, OpenVINO f32:")
    rng = np.random.default_rng(0)
    for c_out, c_in in ((4, 4), (8, 4)):
        w = rng.normal(size=(c_out, c_in, 3, 3)).astype(np.float32)
        x = rng.normal(size=(1, c_in, 8, 8)).astype(np.float32)
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["y", "W"], ["z"], pads=[1, 1, 1, 1])], "two_nodes",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 8, 8])],
            [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "W")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
        reference = ReferenceEvaluator(model).run(None, {"x": x})[0]
        for label, candidate in (("W shared", model), ("portable (own copy)", separate_conv_weights(model))):
            z = openvino_run(openvino_compile(candidate, F32), {"x": x}, ["z"])[0]
            error = np.abs(z - reference).max() / np.abs(reference).max()
            print(f"   W {c_out}x{c_in}x3x3, {label:22s} {error:.2g}")


def photo(size=224, preset="imagenet"):
    import cv2
    from skimage import data

    from onnxcam.io.preprocess import Preprocessor

    rgb = cv2.resize(data.chelsea(), (size, size), interpolation=cv2.INTER_AREA)
    return Preprocessor(size=(size, size), preset=preset)(rgb)[0][None]


def export_resnet50(path):
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():
        torch.onnx.export(net, (torch.zeros(1, 3, 224, 224),), path, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                          opset_version=13, dynamo=False)
    model = onnx.load(path)
    model.ir_version = 8
    onnx.save(model, path)
    return path


def layer_named(path, prefix):
    """The last candidate layer whose tensor name starts with `prefix` (a block's output)."""
    names = [info.name for info in onnxcam.layers(path) if info.name.startswith(prefix)]
    if not names:
        raise SystemExit(f"no candidate layer starting with {prefix!r} in {path}")
    return names[-1]


def median_seconds(run, runs):
    run()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_model(label, original_path, layer, x, runs, methods=("gradcam",)):
    import onnxruntime as ort

    original = onnx.load(original_path)
    names = ["onnxcam_cam", "onnxcam_class_index"]
    print(f"\n{label}: layer {layer}")
    ort_plain = ort.InferenceSession(original_path, providers=["CPUExecutionProvider"])
    plain_feeds = {"input": x}
    ort_plain_s = median_seconds(lambda: ort_plain.run(None, plain_feeds), runs)
    ov_plain = openvino_compile(original, F32)
    ov_plain_s = median_seconds(lambda: ov_plain(plain_feeds), runs)
    for method in methods:
        augmented = onnxcam.augment(original_path, layer=layer, method=method)
        portable = separate_conv_weights(augmented)
        shared = shared_conv_weights(augmented)
        extra_mb = sum(w.nbytes for w in shared) / 2**20
        feeds = {"input": x, "onnxcam_class": np.full(len(x), -1, np.int64)}
        start = time.perf_counter()
        reference = ReferenceEvaluator(augmented).run(names, feeds)
        reference_s = time.perf_counter() - start
        assert reference[0].max() > 0.9 and reference[0].std() > 0.05, "the reference map must not be flat"
        print(f"  {method}: {len(shared)} weights shared by Conv and ConvTranspose; portable copy +{extra_mb:.1f} MB; "
              f"reference evaluator {reference_s:.0f} s, class {reference[1].tolist()}")
        session = ort.InferenceSession(augmented.SerializeToString(), providers=["CPUExecutionProvider"])
        rows = [("ONNX Runtime CPU", lambda: session.run(names, feeds), ort_plain_s)]
        for precision, config in (("f32", F32), ("default", {})):
            for kind, model in (("as augmented", augmented), ("portable", portable)):
                if precision == "default" and kind == "as augmented":
                    continue
                compiled = openvino_compile(model, config)
                rows.append((f"OpenVINO CPU {precision}, {kind}",
                             (lambda c: lambda: openvino_run(c, feeds, names))(compiled), ov_plain_s))
        print(f"    {'runtime':34s} {'max |map - reference|':>22s} {'classes agree':>14s} {'x plain':>8s}")
        for name, run, plain_s in rows:
            cam, classes = run()
            seconds = median_seconds(run, runs)
            print(f"    {name:34s} {np.abs(cam - reference[0]).max():22.3g} "
                  f"{str(np.array_equal(classes, reference[1])):>14s} {seconds / plain_s:8.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,effnet-mid,effnet")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--workdir", default="/tmp/onnxcam-check-openvino")
    args = parser.parse_args()

    import onnxruntime as ort
    import openvino as ov
    from pathlib import Path

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"OpenVINO {ov.__version__}, ONNX Runtime {ort.__version__}, onnx {onnx.__version__}, "
          f"CPU precision by default: {ov.Core().get_property('CPU', 'INFERENCE_PRECISION_HINT')}\n")
    two_node_reproduction()
    wanted = args.models.split(",")
    if "resnet50" in wanted:
        path = str(workdir / "resnet50.onnx")
        export_resnet50(path)
        check_model("2. ResNet-50 (torchvision, seeded random weights), chelsea", path,
                    layer_named(path, "/layer3/"), photo(), args.runs)
    if "effnet-mid" in wanted or "effnet" in wanted:
        from onnxcam import demo_export

        path = str(demo_export.export(workdir / "efficientnet-lite0.onnx"))
        x = photo(preset="symmetric")
        if "effnet-mid" in wanted:
            check_model("3. EfficientNet-Lite0 (real weights), chelsea, middle block", path,
                        layer_named(path, "/_blocks.10/"), x, args.runs)
        if "effnet" in wanted:
            check_model("4. EfficientNet-Lite0 (real weights), chelsea, last feature map", path, "auto", x,
                        args.runs, methods=("gradcam", "gradcam++"))


if __name__ == "__main__":
    main()
