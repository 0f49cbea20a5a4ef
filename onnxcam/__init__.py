"""onnxcam: Grad-CAM and its relatives computed inside ONNX graphs by ONNX Runtime itself."""

from ._version import __version__  # noqa: F401

from .errors import OnnxcamError  # noqa: E402,F401


def __getattr__(name):
    # Lazy imports keep `import onnxcam` (and `onnxcam --version`) fast.
    if name in ("augment", "METHODS"):
        from .cam import augment as _augment
        return getattr(_augment, name)
    if name == "layers":
        from .cam.layers import layers
        return layers
    if name == "preprocess":
        from .io.prepare import preprocess
        return preprocess
    if name == "evaluate":  # the package onnxcam.evaluate, callable as onnxcam.evaluate(...)
        import importlib
        return importlib.import_module(__name__ + ".evaluate")
    if name == "Explainer":
        from .runtime import Explainer
        return Explainer
    raise AttributeError(name)
