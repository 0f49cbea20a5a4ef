"""Which ONNX Runtime distributions are installed: two side by side (onnxruntime and
onnxruntime-gpu) write one `onnxruntime` package over each other and break when either is
upgraded or removed. setup.py never asks for a second one; this finds an environment where it
happened anyway, so `onnxcam explain` can say how to repair it."""

from __future__ import annotations

from typing import List, Optional

ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-qnn", "onnxruntime-rocm", "onnxruntime-silicon", "onnxruntime-cann",
                     "onnxruntime-training")


def ort_distributions() -> List[str]:
    """The installed ONNX Runtime distributions, as "name version"."""
    import importlib.metadata as metadata

    found = []
    for name in ORT_DISTRIBUTIONS:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return found


def duplicate_ort_message() -> Optional[str]:
    """A warning naming the distributions and the repair when more than one is installed."""
    found = ort_distributions()
    if len(found) < 2:
        return None
    names = [f.split()[0] for f in found]
    keep = next((n for n in names if n != "onnxruntime"), names[0])
    return (f"{len(found)} ONNX Runtime distributions are installed side by side ({', '.join(found)}); they "
            f"overwrite one package and break on upgrade. Keep one: pip uninstall -y {' '.join(names)} && "
            f"pip install {keep}")
