import numpy as np
import torch
import torch.nn.functional as F
from onnx import helper

from harness import make_model, ort_vjp, rel_err, torch_vjp


def test_conv_relu_gap_gemm_chain_matches_torch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    fc = rng.standard_normal((5, 4)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    model = make_model(nodes, {"x": x}, ["y"], {"w": w, "fc": fc}, opset=13, dynamic_batch=True)
    seed = rng.standard_normal((2, 5)).astype(np.float32)
    (gx,), _ = ort_vjp(model, {"x": x}, ["x"], "y", seed)

    def fn(x_):
        c = F.relu(F.conv2d(x_, torch.tensor(w, dtype=torch.float64), stride=2, padding=1))
        return c.mean((2, 3)) @ torch.tensor(fc, dtype=torch.float64).T
    (ref,), _ = torch_vjp(fn, [x], seed)
    assert rel_err(gx, ref) < 1e-5
