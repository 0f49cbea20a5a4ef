"""Choosing ONNX Runtime execution providers that actually load, quietly.

onnxruntime-gpu lists CUDA/TensorRT as *available* even on machines without CUDA libraries, and
asking for them there prints a loud error before falling back to CPU. We check for the driver
library first and try a tiny session with logging silenced; the answer is cached.
"""

from __future__ import annotations

import ctypes
import functools
from typing import List, Optional, Sequence

from .errors import UsageError

_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "gpu": "CUDAExecutionProvider",
            "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider"}


def _has_cuda_driver() -> bool:
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(lib)
            return True
        except OSError:
            continue
    return False


@functools.lru_cache(maxsize=None)
def provider_loads(provider: str) -> bool:
    """Whether `provider` really runs a session here (CPU always does)."""
    import onnxruntime as ort

    if provider == "CPUExecutionProvider":
        return True
    if provider not in ort.get_available_providers():
        return False
    if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") and not _has_cuda_driver():
        return False
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    options = ort.SessionOptions()
    options.log_severity_level = 4
    previous = 2
    try:
        ort.set_default_logger_severity(4)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=[provider, "CPUExecutionProvider"])
        return provider in session.get_providers()
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(previous)


def choose_providers(requested: Optional[Sequence[str]] = None) -> List[str]:
    """The providers to use: the requested ones (aliases like 'cuda' accepted) that load, else the
    best that loads (TensorRT, CUDA), always ending with CPU."""
    if requested:
        names = []
        for p in ([requested] if isinstance(requested, str) else requested):
            name = _ALIASES.get(str(p).lower(), p)
            if not name.endswith("ExecutionProvider"):
                raise UsageError(f"unknown execution provider {p!r}; use one of cpu, cuda, tensorrt")
            names.append(name)
    else:
        names = ["CUDAExecutionProvider"]  # TensorRT only on request: its engine build takes minutes
    chosen = [n for n in names if provider_loads(n) and n != "CPUExecutionProvider"]
    if requested:
        missing = [n for n in names if n not in chosen and n != "CPUExecutionProvider"]
        if missing:
            import warnings
            warnings.warn(f"{', '.join(missing)} cannot run on this machine (no CUDA libraries or device); "
                          "using CPUExecutionProvider", RuntimeWarning, stacklevel=2)
    return chosen + ["CPUExecutionProvider"]
