"""Why float32 and float64 disagree on the random-weight ResNet-50: ReLU units on the other side of 0.

    /work/main/.venv-reference/bin/python tools/relu_flips.py [--model resnet50]

Reference venv (torchvision), the model and photos of tools/compare_pytorch_grad_cam.py. The input
gradient of the top class in torch float32, in torch float64, and in float64 with every ReLU's
mask (and every max-pool's winner) taken from the float32 forward. If the last agrees with
float32 to rounding, the float32-vs-float64 difference is entirely those flipped units (the kinks
that also make onnxcam's float32 results differ from captum's: README, footnote 8 of Coverage).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from compare_pytorch_grad_cam import build  # noqa: E402


def input_gradient(net, x, target=None, relu_masks=None, pool_winners=None, record=None):
    """dS/dx of the class `target` (top class when None); with `relu_masks` / `pool_winners` (lists
    in call order) those replace the net's own; `record` collects this pass's (masks, winners)."""
    calls = {"relu": 0, "pool": 0}

    def relu_hook(module, inputs, output):
        k = calls["relu"]
        calls["relu"] += 1
        if record is not None:
            record[0].append((inputs[0] > 0).detach())
        if relu_masks is not None:
            return inputs[0] * relu_masks[k].to(inputs[0].dtype)

    def pool_hook(module, inputs, output):
        k = calls["pool"]
        calls["pool"] += 1
        _, winners = F.max_pool2d(inputs[0], module.kernel_size, module.stride, module.padding, return_indices=True)
        if record is not None:
            record[1].append(winners)
        if pool_winners is not None:
            return inputs[0].flatten(2).gather(2, pool_winners[k].flatten(2)).view_as(output)

    hooks = [m.register_forward_hook(relu_hook) for m in net.modules() if isinstance(m, torch.nn.ReLU)]
    hooks += [m.register_forward_hook(pool_hook) for m in net.modules() if isinstance(m, torch.nn.MaxPool2d)]
    try:
        x = x.clone().requires_grad_(True)
        out = net(x)
        target = out.argmax(1) if target is None else target
        out.gather(1, target[:, None]).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return x.grad.detach().numpy().astype(np.float64), target


def relative(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, _, batches = build(args.model)
    for m in model.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False  # the hooks read each ReLU's input
    x = torch.from_numpy(batches[0][1])
    model64 = copy.deepcopy(model).double()
    seen32, seen64 = ([], []), ([], [])
    g32, target = input_gradient(model, x, record=seen32)
    g64, _ = input_gradient(model64, x.double(), target, record=seen64)
    g64_relu = input_gradient(model64, x.double(), target, relu_masks=seen32[0])[0]
    g64_both = input_gradient(model64, x.double(), target, relu_masks=seen32[0], pool_winners=seen32[1])[0]
    flips = sum(int((a != b).sum()) for a, b in zip(seen32[0], seen64[0]))
    units = sum(a.numel() for a in seen32[0])
    moved = sum(int((a != b).sum()) for a, b in zip(seen32[1], seen64[1]))
    print(f"{args.model}, {len(x)} photos: ReLU units whose mask differs float32 vs float64: {flips} of {units} "
          f"({len(seen32[0])} ReLU calls); max-pool winners that differ: {moved}")
    print(f"input gradient, max |diff| / max |float32|: float32 vs float64 {relative(g64, g32):.2e}; vs float64 "
          f"with float32's ReLU masks {relative(g64_relu, g32):.2e}; with its ReLU masks and pool winners "
          f"{relative(g64_both, g32):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
