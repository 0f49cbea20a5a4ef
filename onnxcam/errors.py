"""The errors onnxcam raises on purpose: library users catch these, the CLI maps them to exit codes.

Every message is one line that names the file, node or op at fault and says what to do.
"""


class OnnxcamError(Exception):
    """Base class of every error onnxcam raises deliberately."""

    exit_code = 1


class UsageError(OnnxcamError):
    """The request itself is wrong (bad option, unknown layer, bad class index). CLI exit code 2."""

    exit_code = 2


class ModelLoadError(OnnxcamError):
    """The model file is missing, unreadable, not ONNX, or unsafe to load."""


class UnsupportedModelError(OnnxcamError):
    """The model loads but onnxcam cannot explain it as asked (opset, quantized path, no 4-D tensor...)."""


class NotDifferentiableError(UnsupportedModelError):
    """The path from the target to the score holds ops without a gradient rule. Lists all of them."""

    def __init__(self, problems, hint=""):
        self.problems = list(problems)
        lines = "; ".join(self.problems)
        msg = f"cannot differentiate {len(self.problems)} node(s) on the path to the score: {lines}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)


class NonFiniteError(UnsupportedModelError):
    """The model's own outputs (or the explanation) are NaN/Inf for a finite input: its weights or its
    arithmetic are broken. Reported instead of returning a NaN map."""


class LayerNotFoundError(UsageError):
    """A named target layer or output does not exist; the message suggests close matches."""


class ImageError(OnnxcamError):
    """An image could not be read or is unusable."""


class InputError(UsageError):
    """A run-time input is wrong: shape, dtype, class index, NaN/Inf."""


class OutputError(OnnxcamError):
    """An output cannot be written (unwritable directory, would overwrite the input model)."""
