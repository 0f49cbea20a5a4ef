"""Score definitions: what is differentiated, built in the graph.

A target builder returns the seed (the cotangent of the score tensor: the gradient of the
scalar score per image with respect to that tensor), the explained score per image and the
explained class per image, plus any extra outputs (selected boxes...). Builders are small
functions registered by name, like CAM methods; the augmenter owns the rest.

Every builder follows one convention: the *selection* (which class, box, pixels, steps) is read
from the model's output `out`, and the differentiated value is the score tensor (the logits
behind a final Softmax/Sigmoid, or `out` itself with keep_probabilities). Selections are masks
built scatter-free (Equal against a Range, Where), so the seed is the mask itself, or a closed-form
derivative when the score is not linear in the tensor (YOLOv5's objectness x class, the cosine).

Per-image choices are optional int64 [N] graph inputs ("-1" = automatic) with an initializer as
default, so one augmented model serves every choice at run time:
  onnxcam_class (all targets), onnxcam_box (detection), onnxcam_step (sequence),
  onnxcam_mask (float [N|1, H, W], segmentation), onnxcam_reference (float [N|1, D], embedding).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ..errors import UsageError

CLASS_INPUT = "onnxcam_class"
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


def target(name):
    """Register a builder; its keyword arguments after the five fixed ones are its options."""
    def register(fn):
        params = list(inspect.signature(fn).parameters.values())[5:]
        open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        allowed = [p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]

        @functools.wraps(fn)
        def checked(proto, emit, out, score_tensor, image, **options):
            unknown = sorted(set(options) - set(allowed))
            if unknown and not open_ended:
                raise UsageError(f"target {name!r} has no option {unknown[0]!r}; its options are "
                                 f"{', '.join(allowed) or 'none'}")
            return fn(proto, emit, out, score_tensor, image, **options)

        checked.options = allowed
        TARGETS[name] = checked
        return checked
    return register


def add_optional_input(proto, emit, name, default: np.ndarray, shape, dtype=TensorProto.INT64) -> str:
    """A graph input with an initializer of the same name: optional, `default` when omitted."""
    proto.graph.input.append(helper.make_tensor_value_info(name, dtype, list(shape)))
    proto.graph.initializer.append(numpy_helper.from_array(default, name))
    emit.set_info(name, dtype, shape)
    return name


def class_choice(proto, emit, scores_2d: str, batch) -> str:
    """int64 [N]: the `onnxcam_class` input where >= 0, else the arg-max of `scores_2d` [N, K]."""
    add_optional_input(proto, emit, CLASS_INPUT, np.array([-1], np.int64), [batch])
    top = emit.op("ArgMax", scores_2d, axis=1, keepdims=0)
    return emit.op("Where", emit.op("Less", CLASS_INPUT, emit.ints([0])), top, CLASS_INPUT)


def _arange(emit, depth) -> str:
    """int64 [depth]: 0, 1, ..., depth-1 (depth an int or a run-time [1] dim)."""
    zero = emit.const(np.array(0, np.int64), TensorProto.INT64)
    depth_t = (emit.const(np.array(depth, np.int64), TensorProto.INT64) if isinstance(depth, int)
               else emit.op("Squeeze", depth))
    return emit.op("Range", zero, depth_t, emit.const(np.array(1, np.int64), TensorProto.INT64))


def one_hot(emit, index: str, depth, dtype: int) -> str:
    """[N, depth] one-hot of int64 [N] indices (Equal against a Range: no OneHot/scatter)."""
    return emit.cast(emit.op("Equal", emit.unsqueeze(index, [1]), emit.unsqueeze(_arange(emit, depth), [0])), dtype)


@target("class")
def classifier(proto, emit, out, score_tensor, image, **options):
    """The logit (or probability) of one class per image; the output is [N, classes]."""
    if emit.rank(out) != 2:
        raise UsageError(f"output {out!r} has rank {emit.rank(out)}; the class target needs a [N, classes] "
                         "output (use --target detection/segmentation/sequence for other heads)")
    class_index = class_choice(proto, emit, out, image.shape[0] if image.shape[0] is not None else "N")
    same_shape = emit.info(score_tensor).shape == emit.info(out).shape
    logits = score_tensor if same_shape else emit.op("Reshape", score_tensor, emit.shape_of_tensor_or_dims(out))
    score = emit.squeeze(emit.op("GatherElements", logits, emit.unsqueeze(class_index, [1]), axis=1), [1])
    peeled = _peel_linear(proto, emit, score_tensor, class_index) if same_shape else None
    if peeled is not None:
        return Target(peeled[1], score, class_index, seed_tensor=peeled[0])
    seed = one_hot(emit, class_index, emit.dims(out)[1], emit.dtype(score_tensor))
    if not same_shape:  # logits behind a Flatten/Reshape
        seed = emit.op("Reshape", seed, emit.shape_of_tensor_or_dims(score_tensor))
    return Target(seed, score, class_index)


def _peel_linear(proto, emit, logits, class_index):
    """For logits = A @ W (+ b) with a constant W (Gemm, or MatMul then Add), the gradient of
    logit k with respect to A is W's row k: one Gather instead of a one-hot seed pushed back through
    a Gemm (the 1000-class Gemm was the largest node of the backward pass on small models).
    Returns (A, seed for A) or None when the head is not such a layer."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    constants = {i.name for i in proto.graph.initializer} | {n.output[0] for n in proto.graph.node
                                                              if n.op_type == "Constant"}
    node = producers.get(logits)
    if node is None:
        return None
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Gemm":
        if attrs.get("transA") and attrs["transA"].i:
            return None
        a, w = node.input[0], node.input[1]
        rows = bool(attrs["transB"].i) if "transB" in attrs else False  # W is [classes, K]
        alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
    elif node.op_type in ("Add", "MatMul"):
        matmul = node
        if node.op_type == "Add":
            found = [producers.get(i) for i in node.input if i not in constants]
            if len(found) != 1 or found[0] is None or found[0].op_type != "MatMul":
                return None
            matmul = found[0]
        a, w = matmul.input[0], matmul.input[1]
        rows, alpha = False, 1.0
    else:
        return None
    if w not in constants or a in constants or emit.info(a).rank != 2 or emit.info(w).rank != 2:
        return None
    seed = emit.op("Gather", w, class_index, axis=0 if rows else 1)
    if not rows:
        seed = emit.op("Transpose", seed, perm=[1, 0])
    if alpha != 1.0:
        seed = emit.op("Mul", seed, emit.scalar(alpha, w))
    if emit.dtype(w) != emit.dtype(a):
        seed = emit.cast(seed, emit.dtype(a))
    return a, seed


# ---------------------------------------------------------------------- shared pieces
BOX_INPUT = "onnxcam_box"
STEP_INPUT = "onnxcam_step"
MASK_INPUT = "onnxcam_mask"
REFERENCE_INPUT = "onnxcam_reference"
BOX_INDEX_OUTPUT = "onnxcam_box_index"
BOX_COORDS_OUTPUT = "onnxcam_box_coords"
PATH_OUTPUT = "onnxcam_path"
INT64_MAX = np.iinfo(np.int64).max


def _batch(image):
    return image.shape[0] if image.shape[0] is not None else "N"


def _filled(emit, dims, value: int) -> str:
    """int64 tensor of `dims` filled with `value`."""
    return emit.op("ConstantOfShape", emit.shape_of(dims),
                   value=helper.make_tensor("value", TensorProto.INT64, [1], [int(value)]))


def _known_shape(proto, emit, tensor) -> tuple:
    """The shape of `tensor` with non-batch dims that shape inference lost filled by running the
    model twice (probe_infos keeps the dims that agree); the result is also recorded in `emit`."""
    info = emit.info(tensor)
    if info.shape is not None and all(isinstance(d, int) for d in info.shape[1:]):
        return info.shape
    from ..autodiff.shapes import probe_infos
    try:
        probed = probe_infos(proto, [tensor]).get(tensor)
    except Exception:  # a model we cannot run with dummy inputs: keep what inference knew
        probed = None
    if probed is None or probed.shape is None:
        return info.shape
    shape = tuple(p if isinstance(p, int) else s for p, s in zip(probed.shape, info.shape or probed.shape))
    if info.shape is None or len(shape) == len(info.shape):
        emit.set_info(tensor, info.dtype or probed.dtype, shape)
    return shape


def _differentiated_like_output(emit, out, score_tensor, kind: str) -> None:
    """The structured targets index the score tensor with positions read from `out`: their
    shapes must agree (the class target alone sees through a Flatten/Reshape)."""
    a, b = emit.info(out).shape, emit.info(score_tensor).shape
    same = (score_tensor == out or (a is not None and b is not None and len(a) == len(b) and all(
        not (isinstance(x, int) and isinstance(y, int)) or x == y for x, y in zip(a, b))))
    if not same:
        raise UsageError(f"the {kind} target needs the score tensor shaped like output {out!r} "
                         f"({b} vs {a}); explain the output itself with keep_probabilities=True "
                         "(--keep-probabilities)")


def _choose_bool(emit, condition, if_true, if_false) -> str:
    """Where for booleans (ONNX Runtime has no bool Where kernel): (c and a) or (not c and b)."""
    return emit.op("Or", emit.op("And", condition, if_true), emit.op("And", emit.op("Not", condition), if_false))


def _masked_score(emit, seed, tensor, axes) -> str:
    """float [N]: the sum of seed * tensor over `axes` (the score when it is linear in tensor)."""
    return emit.reduce("ReduceSum", emit.op("Mul", seed, tensor), axes, keepdims=False)


# ---------------------------------------------------------------------- detection
def _detection_layout(layout, shape) -> str:
    if layout in ("v8", "v5"):
        return layout
    if layout != "auto":
        raise UsageError(f"detection layout {layout!r}: use 'v8' ([N, 4+C, anchors]), 'v5' "
                         "([N, anchors, 5+C]) or 'auto'")
    d1, d2 = shape[1], shape[2]
    if not (isinstance(d1, int) and isinstance(d2, int)):
        raise UsageError(f"cannot tell the detection layout from shape {shape}; give layout='v8' or 'v5' "
                         "(--target-layout)")
    return "v8" if d1 < d2 else "v5"


@target("detection")
def detection(proto, emit, out, score_tensor, image, layout="auto", box=-1, threshold=None):
    """One detection's class score, or the sum over every confident detection.

    The head is YOLOv8-style [N, 4+C, A] (box, then per-class scores) or YOLOv5-style [N, A, 5+C]
    (box, objectness, class scores; the score of (box a, class c) is obj[a] * cls[a, c], as
    pytorch-grad-cam's YOLO examples and the YOLOv5 NMS use). `layout` is auto-detected (v8 when
    dim 1 < dim 2). With S[n, a, c] those scores and W a 0/1 selection mask, the explained score
    is sum_{a,c} W * S: the seed is W (v8), or for v5 d/dobj[a] = sum_c W*cls and d/dcls = W*obj.

    Selection per image: the box given by input `onnxcam_box` (default option `box`; -1 = none)
    with class `onnxcam_class` or, if -1, that box's best class; otherwise the class from
    `onnxcam_class` or that of the overall best box, and the highest-scoring box for it.
    With `threshold`: every box whose score for that class (for class -1: its own best class)
    exceeds it, plus the box selected as above (so never empty), summed like pytorch-grad-cam's
    box-score target. Extra outputs: `onnxcam_box_index` int64 [N] and `onnxcam_box_coords`
    float32 [N, 4] (the selected box's four coordinates as the model gives them).
    """
    if score_tensor != out:  # e.g. a head ending in one Sigmoid: obj * cls of logits means nothing
        raise UsageError(f"output {out!r} ends in a probability op; the detection target explains the "
                         "detection scores themselves: pass keep_probabilities=True (--keep-probabilities)")
    _known_shape(proto, emit, out)
    if emit.rank(out) != 3:
        raise UsageError(f"output {out!r} has shape {emit.info(out).shape}; the detection target needs a "
                         "YOLO-style [N, 4+C, anchors] or [N, anchors, 5+C] output")
    layout = _detection_layout(layout, emit.info(out).shape)
    dtype, batch = emit.dtype(score_tensor), _batch(image)
    if layout == "v8":
        boxes = emit.op("Transpose", emit.slice(score_tensor, [0], [4], [1]), perm=[0, 2, 1])  # [N, A, 4]
        cls = emit.op("Transpose", emit.slice(score_tensor, [4], [INT64_MAX], [1]), perm=[0, 2, 1])
        scores, anchors_axis = cls, 2
    else:
        boxes = emit.slice(score_tensor, [0], [4], [2])
        obj = emit.slice(score_tensor, [4], [5], [2])  # [N, A, 1]
        cls = emit.slice(score_tensor, [5], [INT64_MAX], [2])  # [N, A, C]
        scores, anchors_axis = emit.op("Mul", obj, cls), 1
    anchors = emit.dims(out)[anchors_axis]
    n_classes = emit.d_sub(emit.dims(out)[1 if layout == "v8" else 2], 4 if layout == "v8" else 5)

    given = add_optional_input(proto, emit, BOX_INPUT, np.array([int(box)], np.int64), [batch])
    box_given = emit.greater_equal(given, emit.ints([0]))  # [N]
    given_hot = one_hot(emit, given, anchors, dtype)  # [N, A] (all zero for -1)
    given_box_scores = emit.reduce("ReduceSum", emit.op("Mul", scores, emit.unsqueeze(given_hot, [2])), [1],
                                   keepdims=False)  # [N, C]
    best_per_class = emit.reduce("ReduceMax", scores, [1], keepdims=False)  # [N, C]
    class_index = class_choice(proto, emit, emit.op("Where", emit.unsqueeze(box_given, [1]), given_box_scores,
                                                    best_per_class), batch)
    class_hot = one_hot(emit, class_index, n_classes, dtype)  # [N, C]
    class_scores = emit.reduce("ReduceSum", emit.op("Mul", scores, emit.unsqueeze(class_hot, [1])), [2],
                               keepdims=False)  # [N, A]
    box_index = emit.op("Where", box_given, given, emit.op("ArgMax", class_scores, axis=1, keepdims=0))
    box_hot = one_hot(emit, box_index, anchors, dtype)  # [N, A]
    weights = emit.op("Mul", emit.unsqueeze(box_hot, [2]), emit.unsqueeze(class_hot, [1]))  # [N, A, C]
    if threshold is not None:
        own_best = emit.op("Equal", emit.unsqueeze(emit.op("ArgMax", scores, axis=2, keepdims=0), [2]),
                           emit.unsqueeze(_arange(emit, n_classes), [0, 1]))  # [N, A, C]
        class_given = emit.unsqueeze(emit.greater_equal(CLASS_INPUT, emit.ints([0])), [1, 2])
        which = _choose_bool(emit, class_given, emit.cast(emit.unsqueeze(class_hot, [1]), TensorProto.BOOL), own_best)
        confident = emit.op("And", which, emit.op("Greater", scores, emit.scalar(float(threshold), scores)))
        weights = emit.cast(emit.op("Or", confident, emit.cast(weights, TensorProto.BOOL)), dtype)

    score = _masked_score(emit, weights, scores, [1, 2])
    if layout == "v8":
        seed = emit.pad(emit.op("Transpose", weights, perm=[0, 2, 1]), [0, 4, 0, 0, 0, 0])
    else:
        d_obj = emit.reduce("ReduceSum", emit.op("Mul", weights, cls), [2], keepdims=True)
        seed = emit.pad(emit.op("Concat", d_obj, emit.op("Mul", weights, obj), axis=2), [0, 0, 4, 0, 0, 0])
    coords = emit.reduce("ReduceSum", emit.op("Mul", boxes, emit.unsqueeze(box_hot, [2])), [1], keepdims=False)
    if dtype != TensorProto.FLOAT:
        coords = emit.cast(coords, TensorProto.FLOAT)
    extra = {BOX_INDEX_OUTPUT: (box_index, TensorProto.INT64, (image.shape[0],)),
             BOX_COORDS_OUTPUT: (coords, TensorProto.FLOAT, (image.shape[0], 4))}
    return Target(seed, score, class_index, extra)


# ---------------------------------------------------------------------- segmentation
@target("segmentation")
def segmentation(proto, emit, out, score_tensor, image, threshold=0.3, background=0):
    """The sum of one class's logits over a region (pytorch-grad-cam's SemanticSegmentationTarget).

    Output [N, K, H, W]: score = sum_{h,w} M[h, w] * y[c, h, w], seed = onehot(c) x M, with the
    region M the pixels whose arg-max class is c. The class is `onnxcam_class`, or else the
    *dominant* class: the one predicted on the most pixels, the `background` class (default 0;
    None to treat all alike) counting only when no other class is predicted anywhere.
    Output [N, 1, H, W] (binary segmenters, DBNet-like text maps): M = the pixels where the
    output exceeds `threshold`, class 0. In both cases a non-empty float mask given as input
    `onnxcam_mask` [N or 1, H, W] replaces M (all-zero, the default, keeps M).
    """
    _differentiated_like_output(emit, out, score_tensor, "segmentation")
    _known_shape(proto, emit, out)
    if emit.rank(out) != 4:
        raise UsageError(f"output {out!r} has shape {emit.info(out).shape}; the segmentation target needs "
                         "an [N, classes, H, W] output")
    dtype, batch, dims = emit.dtype(score_tensor), _batch(image), emit.dims(out)
    user = add_optional_input(proto, emit, MASK_INPUT, np.zeros([1, 1, 1], np.float32), [None, None, None],
                              TensorProto.FLOAT)
    user = user if dtype == TensorProto.FLOAT else emit.cast(user, dtype)
    use_user = emit.op("Greater", emit.reduce("ReduceSum", emit.op("Abs", user), [1, 2], keepdims=True),
                       emit.scalar(0.0, user))  # [N|1, 1, 1]
    if dims[1] == 1:
        region = emit.cast(emit.op("Greater", emit.squeeze(out, [1]), emit.scalar(float(threshold), out)), dtype)
        mask = emit.op("Where", use_user, user, region)  # [N, H, W]
        seed = emit.unsqueeze(mask, [1])
        class_index = _filled(emit, [dims[0]], 0)
        return Target(seed, _masked_score(emit, seed, score_tensor, [1, 2, 3]), class_index)
    predicted = emit.op("ArgMax", out, axis=1, keepdims=0)  # [N, H, W]
    classes = _arange(emit, dims[1])
    counts = emit.reduce("ReduceSum", emit.cast(emit.op("Equal", emit.unsqueeze(predicted, [1]),
                                                         emit.unsqueeze(classes, [0, 2, 3])), TensorProto.FLOAT),
                         [2, 3], keepdims=False)  # [N, K] pixels per class
    if background is not None:  # 0.5: below any class present, above any class absent
        counts = emit.op("Where", emit.op("Equal", classes, emit.ints([int(background)])),
                         emit.const(np.array(0.5, np.float32), TensorProto.FLOAT), counts)
    class_index = class_choice(proto, emit, counts, batch)
    region = emit.cast(emit.op("Equal", predicted, emit.unsqueeze(class_index, [1, 2])), dtype)
    mask = emit.op("Where", use_user, user, region)  # [N, H, W]
    seed = emit.op("Mul", emit.unsqueeze(one_hot(emit, class_index, dims[1], dtype), [2, 3]),
                   emit.unsqueeze(mask, [1]))
    return Target(seed, _masked_score(emit, seed, score_tensor, [1, 2, 3]), class_index)


# ---------------------------------------------------------------------- embeddings
@target("embedding")
def embedding(proto, emit, out, score_tensor, image, reference=None, eps=1e-8):
    """Cosine similarity of the embedding e [N, D] to a reference r (input `onnxcam_reference`
    [N or 1, D]; option `reference` bakes a default in, else the input is required):
    cos = e.r / (|e| |r|), seed = d cos / d e = r / (|e| |r|) - cos * e / |e|^2.
    As torch.nn.functional.cosine_similarity, |e||r| is clamped below by `eps`. Class: -1."""
    dtype, dims = emit.dtype(score_tensor), emit.dims(score_tensor)
    if len(dims) < 2:
        raise UsageError(f"output {out!r} has shape {emit.info(out).shape}; the embedding target needs [N, D]")
    e = score_tensor if len(dims) == 2 else emit.op("Flatten", score_tensor, axis=1)
    size = emit.d_prod(dims[1:])
    d_static = size if isinstance(size, int) else None
    if reference is None:
        proto.graph.input.append(helper.make_tensor_value_info(REFERENCE_INPUT, TensorProto.FLOAT,
                                                               ["onnxcam_reference_n", d_static]))
        emit.set_info(REFERENCE_INPUT, TensorProto.FLOAT, (None, d_static))
    else:
        default = np.asarray(reference, np.float32)
        add_optional_input(proto, emit, REFERENCE_INPUT, default.reshape(-1, default.shape[-1]), [None, d_static],
                           TensorProto.FLOAT)
    r = REFERENCE_INPUT if dtype == TensorProto.FLOAT else emit.cast(REFERENCE_INPUT, dtype)
    ee = emit.reduce("ReduceSum", emit.op("Mul", e, e), [1], keepdims=True)  # [N, 1]
    rr = emit.reduce("ReduceSum", emit.op("Mul", r, r), [1], keepdims=True)
    dot = emit.reduce("ReduceSum", emit.op("Mul", e, r), [1], keepdims=True)
    inverse = emit.op("Reciprocal", emit.op("Sqrt", emit.op("Max", emit.op("Mul", ee, rr), emit.scalar(eps * eps, e))))
    cos = emit.op("Mul", dot, inverse)
    seed = emit.op("Sub", emit.op("Mul", r, inverse), emit.op("Div", emit.op("Mul", cos, e), ee))
    if len(dims) != 2:
        seed = emit.op("Reshape", seed, emit.shape_of_tensor_or_dims(score_tensor))
    return Target(seed, emit.squeeze(cos, [1]), _filled(emit, [dims[0]], -1))


# ---------------------------------------------------------------------- sequences
@target("sequence")
def sequence(proto, emit, out, score_tensor, image, blank=0, step=-1):
    """CTC-style recogniser output [N, T, C]: the score of the greedy-decoded sequence,
    sum over steps t with k_t = argmax_c y[t, c] != blank of y[t, k_t] (seed: onehot(k_t) on
    those steps), or with input `onnxcam_step` >= 0 (default option `step`; -1 = whole sequence)
    the score y[t, k] of that one step, k = `onnxcam_class` or k_t (blank included).
    `blank` is the blank class (negative counts from the end). Class: k for one step, -1 for the
    whole sequence. Extra output `onnxcam_path` int64 [N, T]: the arg-max class per step."""
    _differentiated_like_output(emit, out, score_tensor, "sequence")
    _known_shape(proto, emit, out)
    if emit.rank(out) != 3:
        raise UsageError(f"output {out!r} has shape {emit.info(out).shape}; the sequence target needs a "
                         "[N, T, classes] output")
    dtype, batch, dims = emit.dtype(score_tensor), _batch(image), emit.dims(out)
    blank_index = emit.ints([blank]) if blank >= 0 else emit.shape_of([emit.d_add(dims[2], blank)])
    path = emit.op("ArgMax", out, axis=2, keepdims=0)  # [N, T]
    chosen_step = add_optional_input(proto, emit, STEP_INPUT, np.array([int(step)], np.int64), [batch])
    one_step = emit.unsqueeze(emit.greater_equal(chosen_step, emit.ints([0])), [1])  # [N|1, 1]
    step_hot = emit.op("Equal", emit.unsqueeze(chosen_step, [1]), emit.unsqueeze(_arange(emit, dims[1]), [0]))
    step_scores = emit.reduce("ReduceSum", emit.op("Mul", out, emit.unsqueeze(emit.cast(step_hot, dtype), [2])),
                              [1], keepdims=False)  # [N, C]: the chosen step's outputs
    step_class = class_choice(proto, emit, step_scores, batch)
    steps = _choose_bool(emit, one_step, step_hot, emit.op("Not", emit.op("Equal", path, blank_index)))
    per_step_class = emit.op("Where", one_step, emit.unsqueeze(step_class, [1]), path)  # [N, T]
    hot = emit.op("Equal", emit.unsqueeze(per_step_class, [2]), emit.unsqueeze(_arange(emit, dims[2]), [0, 1]))
    seed = emit.cast(emit.op("And", hot, emit.unsqueeze(steps, [2])), dtype)
    class_index = emit.op("Where", emit.squeeze(one_step, [1]), step_class, emit.ints([-1]))
    extra = {PATH_OUTPUT: (path, TensorProto.INT64, (image.shape[0], emit.info(out).shape[1]))}
    return Target(seed, _masked_score(emit, seed, score_tensor, [1, 2]), class_index, extra)
