"""How augment scales: time on big graphs (node count) and peak memory on big models (weight bytes).

    python tools/bench_augment_scale.py --nodes 5000 10000 20000 --megabytes 200 500

Graphs: a chain of N elementwise nodes between a Conv layer and a classifier head, once in file
order and once reversed (exporters that ignore topological order); the time of `augment` alone.
Models: a small CNN whose classifier holds M megabytes of random weights, augmented by a fresh
`onnxcam augment` process (the CLI, as a user runs it) and by the Python API from a path; peak RSS
(VmHWM) above the process's RSS after imports, in multiples of the model's file size.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def chain_model(n_nodes: int, reverse: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["input", "W"], ["t0"], pads=[1, 1, 1, 1], name="conv")]
    ops = ("Relu", "Sigmoid", "Neg", "Tanh")
    for i in range(n_nodes):
        nodes.append(helper.make_node(ops[i % len(ops)], [f"t{i}"], [f"t{i + 1}"], name=f"n{i}"))
    nodes += [helper.make_node("GlobalAveragePool", [f"t{n_nodes}"], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
              helper.make_node("Gemm", ["flat", "G"], ["logits"], transB=1, name="fc")]
    body = nodes[1:-3]
    if reverse:
        nodes = [nodes[0]] + body[::-1] + nodes[-3:]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W"),
                               numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "G")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def big_model(megabytes: int, pieces: int = 1) -> onnx.ModelProto:
    """input [N,3,32,32] -> Conv(3->32) -> Relu -> Flatten (32768) -> `pieces` Gemms sharing M MB of
    weights -> Concat -> logits. One piece is the worst case for memory (a copy of one weight is a
    copy of the model); real models spread their weights over many tensors."""
    rng = np.random.default_rng(0)
    rows = max(1, int(megabytes * 2**20 / 4 / 32768 / pieces))
    nodes = [helper.make_node("Conv", ["input", "W"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("Flatten", ["relu"], ["flat"], name="flat")]
    weights = [numpy_helper.from_array(rng.standard_normal((32, 3, 3, 3)).astype(np.float32), "W")]
    for i in range(pieces):
        nodes.append(helper.make_node("Gemm", ["flat", f"G{i}"], [f"part{i}"], transB=1, name=f"fc{i}"))
        weights.append(numpy_helper.from_array(rng.standard_normal((rows, 32768), dtype=np.float32) * 0.01, f"G{i}"))
    nodes.append(helper.make_node("Concat", [f"part{i}" for i in range(pieces)], ["logits"], axis=1, name="concat"))
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", rows * pieces])],
                              weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def time_graphs(n_nodes: int) -> None:
    from onnxcam import augment
    for reverse in (False, True):
        model = chain_model(n_nodes, reverse)
        start = time.perf_counter()
        augment(model, layer="t0")
        elapsed = time.perf_counter() - start
        print(f"{n_nodes}-node chain ({'reversed' if reverse else 'in order'}): augment {elapsed:.2f} s")


_MEASURE = r"""
import resource, sys, time
def rss_kb(key="VmRSS:"):
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so it would report the parent's peak at fork.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
import onnx, onnxruntime, numpy, cv2
import onnxcam, onnxcam.cli, onnxcam.cam.augment, onnxcam.modelio
base = rss_kb()
start = time.perf_counter()
mode, model, out = sys.argv[1:4]
if mode == "probe":  # running the model to learn shapes (attention exports lose them to inference)
    from onnxcam.autodiff.shapes import probe_infos
    from onnxcam.modelio import load_model
    probe_infos(load_model(model), ["relu", "flat"])
elif mode == "cli":
    code = onnxcam.cli.main(["augment", model, "-o", out], standalone_mode=False)
    assert code == 0, code
else:
    from onnxcam.modelio import save_model
    save_model(onnxcam.augment(model), out)
elapsed = time.perf_counter() - start
print(base, rss_kb("VmHWM:"), elapsed)
"""


def measure_memory(megabytes: int, folder: Path, pieces: int = 1) -> None:
    path = folder / f"big{megabytes}.onnx"
    onnx.save_model(big_model(megabytes, pieces), str(path))
    size = path.stat().st_size
    for mode in ("cli", "api", "probe"):
        out = folder / f"big{megabytes}.{mode}.cam.onnx"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        result = subprocess.run([sys.executable, "-c", _MEASURE, mode, str(path), str(out)], capture_output=True,
                                text=True, env=env)
        if result.returncode != 0:
            print(result.stderr[-2000:])
            continue
        base_kb, peak_kb, elapsed = result.stdout.strip().splitlines()[-1].split()
        above = (int(peak_kb) - int(base_kb)) * 1024
        print(f"{size / 2**20:.0f} MB model in {pieces} weight(s), {mode}: {'probe_infos' if mode == 'probe' else 'augment'} {float(elapsed):.1f} s, peak RSS {int(peak_kb) / 1024:.0f} MB, "
              f"{above / 2**20:.0f} MB above the {int(base_kb) / 1024:.0f} MB after imports = "
              f"{above / size:.2f}x the model ({int(peak_kb) * 1024 / size:.2f}x with the imports)")
        out.unlink(missing_ok=True)
    path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="*", default=[10000])
    parser.add_argument("--megabytes", type=int, nargs="*", default=[500])
    parser.add_argument("--pieces", type=int, nargs="*", default=[1, 50], help="weights the megabytes are split in")
    args = parser.parse_args()
    for n_nodes in args.nodes:
        time_graphs(n_nodes)
    with tempfile.TemporaryDirectory(prefix="onnxcam-scale-") as tmp:
        for megabytes in args.megabytes:
            for pieces in args.pieces:
                measure_memory(megabytes, Path(tmp), pieces)


if __name__ == "__main__":
    main()
