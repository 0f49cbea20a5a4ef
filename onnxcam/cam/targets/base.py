"""What every target shares: the Target result, the registration with its preamble, run-time
choice inputs, and small scatter-free building blocks (one-hot by Equal against a Range...).

A target builder returns the seed (the cotangent of the score tensor: the gradient of the scalar
score per image with respect to that tensor), the explained score per image and the explained
class per image, plus any extra outputs (selected boxes...). Builders are small functions
registered by name, like methods; the augmenter owns the rest.

Every builder follows one convention: the *selection* (which class, box, pixels, steps) is read
from the model's output `out`, and the differentiated value is the score tensor (the logits
behind a final Softmax/Sigmoid, or `out` itself with keep_probabilities). Selections are masks
built scatter-free (Equal against a Range, Where), so the seed is the mask itself, or a closed-form
derivative when the score is not linear in the tensor (YOLOv5's objectness x class, the cosine).

Run-time choices are plain graph inputs, never backed by an initializer (ONNX Runtime's bindings
other than Python ignore or refuse such "overridable initializers"): every binding sees them in
its input list and a caller feeds the documented automatic value to let the model choose
(``-1`` for the int64 [N] choices, an all-zero mask). The automatic values are recorded in the
model's metadata (``onnxcam.input.<name>``) so the Explainer fills in what a caller leaves out.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import numpy as np
from onnx import TensorProto, helper

from ...errors import UsageError

CLASS_INPUT = "onnxcam_class"
INPUT_METADATA_PREFIX = "onnxcam.input."
BATCH = "batch"  # in a recorded automatic value's shape: the batch size of the call
INT64_MAX = np.iinfo(np.int64).max
TARGETS: Dict[str, Callable] = {}


@dataclass
class Target:
    seed: str  # cotangent of the score tensor, same shape and type
    score: str  # float [N]: the explained score per image
    class_index: str  # int64 [N]
    extra_outputs: Dict[str, Tuple[str, int, tuple]] = field(default_factory=dict)  # name -> (tensor, dtype, shape)
    # The tensor `seed` is the cotangent of, when not the score tensor itself (a layer already
    # differentiated in closed form, like the classifier's last Linear).
    seed_tensor: Optional[str] = None
    # For sampled methods (cam/sampling.py): fn(emit, view) -> (seed view, score [k, N]) applying this
    # selection to other evaluations `view` [k, N, ...] of the seeded tensor. None: the score is
    # linear in that tensor (sum of seed * tensor), so the seed is reused as it is.
    at: Optional[Callable] = None


@dataclass
class TargetInput:
    """What a builder works on: the model, the emitter, the explained output `out` and the
    differentiated score tensor, the image input, and the choice inputs added so far."""

    proto: object
    emit: object
    out: str
    score: str
    image: object
    analysis: object
    choices: Dict[str, dict] = field(default_factory=dict)  # input name -> {"fill", "shape", "dtype"}

    @property
    def dtype(self) -> int:
        return self.emit.dtype(self.score)

    @property
    def batch(self):
        """The batch dim for new per-image inputs: the image's when fixed, else a symbol of their
        own (a caller may give one value, [1], for the whole batch: the graph broadcasts it)."""
        return self.image.shape[0] if isinstance(self.image.shape[0], int) else "onnxcam_choice_n"

    def dims(self, name=None):
        return self.emit.dims(name or self.out)

    def shape(self, name=None):
        return self.emit.info(name or self.out).shape

    def choice_input(self, name: str, fill, shape, dtype=TensorProto.INT64, fill_shape=(BATCH,)) -> str:
        """A required graph input for a run-time choice; `fill` is its automatic value, recorded
        in the metadata with `fill_shape` (BATCH = the call's batch size)."""
        if name in self.choices:
            return name
        self.proto.graph.input.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        self.emit.set_info(name, dtype, shape)
        self.choices[name] = {"fill": fill, "shape": list(fill_shape),
                              "dtype": helper.tensor_dtype_to_np_dtype(dtype).name}
        return name

    def class_choice(self, scores_2d: str) -> str:
        """int64 [N]: the `onnxcam_class` input where >= 0, else the arg-max of `scores_2d` [N, K]."""
        emit = self.emit
        self.choice_input(CLASS_INPUT, -1, [self.batch])
        top = emit.op("ArgMax", scores_2d, axis=1, keepdims=0)
        return emit.op("Where", emit.op("Less", CLASS_INPUT, emit.ints([0])), top, CLASS_INPUT)

    def known_shape(self, tensor=None) -> tuple:
        """The shape of `tensor` (default `out`) with non-batch dims that shape inference lost
        measured by running the model (the analysis probes each tensor once); recorded in `emit`."""
        tensor = tensor or self.out
        emit = self.emit
        info = emit.info(tensor)
        if info.shape is not None and all(isinstance(d, int) for d in info.shape[1:]):
            return info.shape
        probed = self.analysis.probe([tensor]).get(tensor)
        if probed is None or probed.shape is None:
            return info.shape
        shape = tuple(p if isinstance(p, int) else s for p, s in zip(probed.shape, info.shape or probed.shape))
        if info.shape is None or len(shape) == len(info.shape):
            emit.set_info(tensor, info.dtype or probed.dtype, shape)
        return shape


def choices_metadata(choices: Dict[str, dict]) -> Dict[str, str]:
    return {INPUT_METADATA_PREFIX + name: json.dumps(value) for name, value in choices.items()}


def target(name: str, rank: Optional[int] = None, expects: str = "", like_output: bool = False,
           known_shape: bool = False):
    """Register a builder ``fn(t: TargetInput, **options)``. The preamble every structured
    target shares runs here: `like_output` (the score tensor must be shaped like `out`),
    `known_shape` (measure what shape inference lost), and a `rank` check naming `expects`."""
    def register(fn):
        params = list(inspect.signature(fn).parameters.values())[1:]
        open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        allowed = [p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]

        @functools.wraps(fn)
        def checked(t: TargetInput, **options):
            unknown = sorted(set(options) - set(allowed))
            if unknown and not open_ended:
                raise UsageError(f"target {name!r} has no option {unknown[0]!r}; its options are "
                                 f"{', '.join(allowed) or 'none'}")
            if like_output:
                _differentiated_like_output(t, name)
            if known_shape:
                t.known_shape()
            if rank is not None and t.emit.rank(t.out) != rank:
                raise UsageError(f"output {t.out!r} has shape {t.shape()}; the {name} target needs {expects}")
            return fn(t, **options)

        checked.options = allowed
        TARGETS[name] = checked
        return checked
    return register


def _differentiated_like_output(t: TargetInput, kind: str) -> None:
    """The structured targets index the score tensor with positions read from `out`: their
    shapes must agree (the class target alone sees through a Flatten/Reshape)."""
    a, b = t.shape(t.out), t.shape(t.score)
    same = (t.score == t.out or (a is not None and b is not None and len(a) == len(b) and all(
        not (isinstance(x, int) and isinstance(y, int)) or x == y for x, y in zip(a, b))))
    if not same:
        raise UsageError(f"the {kind} target needs the score tensor shaped like output {t.out!r} "
                         f"({b} vs {a}); explain the output itself with keep_probabilities=True "
                         "(--keep-probabilities)")


# ---------------------------------------------------------------------- building blocks
def arange(emit, depth) -> str:
    """int64 [depth]: 0, 1, ..., depth-1 (depth an int or a run-time [1] dim)."""
    zero = emit.const(np.array(0, np.int64), TensorProto.INT64)
    depth_t = (emit.const(np.array(depth, np.int64), TensorProto.INT64) if isinstance(depth, int)
               else emit.op("Squeeze", depth))
    return emit.op("Range", zero, depth_t, emit.const(np.array(1, np.int64), TensorProto.INT64))


def one_hot(emit, index: str, depth, dtype: int) -> str:
    """[N, depth] one-hot of int64 [N] indices (Equal against a Range: no OneHot/scatter)."""
    return emit.cast(emit.op("Equal", emit.unsqueeze(index, [1]), emit.unsqueeze(arange(emit, depth), [0])), dtype)


def filled(emit, dims, value: int) -> str:
    """int64 tensor of `dims` filled with `value`."""
    return emit.op("ConstantOfShape", emit.shape_of(dims),
                   value=helper.make_tensor("value", TensorProto.INT64, [1], [int(value)]))


def choose_bool(emit, condition, if_true, if_false) -> str:
    """Where for booleans (ONNX Runtime has no bool Where kernel): (c and a) or (not c and b)."""
    return emit.op("Or", emit.op("And", condition, if_true), emit.op("And", emit.op("Not", condition), if_false))


def masked_score(emit, seed, tensor, axes) -> str:
    """float [N]: the sum of seed * tensor over `axes` (the score when it is linear in tensor)."""
    return emit.reduce("ReduceSum", emit.op("Mul", seed, tensor), axes, keepdims=False)
