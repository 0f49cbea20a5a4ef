"""The detection target: one detection's class score, or every confident detection's, from a
YOLO-style head."""

from __future__ import annotations

from onnx import TensorProto

from ...errors import UsageError
from .base import CLASS_INPUT, INT64_MAX, Target, TargetInput, arange, choose_bool, masked_score, one_hot, target

BOX_INPUT = "onnxcam_box"
BOX_INDEX_OUTPUT = "onnxcam_box_index"
BOX_COORDS_OUTPUT = "onnxcam_box_coords"


def _detection_layout(layout, shape) -> str:
    if layout in ("v8", "v5"):
        return layout
    if layout != "auto":
        raise UsageError(f"detection layout {layout!r}: use 'v8' ([N, 4+C, anchors]), 'v5' "
                         "([N, anchors, 5+C]) or 'auto'")
    d1, d2 = shape[1], shape[2]
    if not (isinstance(d1, int) and isinstance(d2, int)):
        raise UsageError(f"cannot tell the detection layout from shape {shape}; give layout='v8' or 'v5' "
                         "(--target-option layout=v8)")
    return "v8" if d1 < d2 else "v5"


@target("detection")
def detection(t: TargetInput, layout="auto", box=-1, threshold=None):
    """One detection's class score, or the sum over every confident detection.

    The head is YOLOv8-style [N, 4+C, A] (box, then per-class scores) or YOLOv5-style [N, A, 5+C]
    (box, objectness, class scores; the score of (box a, class c) is obj[a] * cls[a, c], as
    pytorch-grad-cam's YOLO examples and the YOLOv5 NMS use). `layout` is auto-detected (v8 when
    dim 1 < dim 2). With S[n, a, c] those scores and W a 0/1 selection mask, the explained score
    is sum_{a,c} W * S: the seed is W (v8), or for v5 d/dobj[a] = sum_c W*cls and d/dcls = W*obj.

    Selection per image: the box given by input `onnxcam_box` (automatic value: option `box`;
    -1 = none) with class `onnxcam_class` or, if -1, that box's best class; otherwise the class
    from `onnxcam_class` or that of the overall best box, and the highest-scoring box for it.
    With `threshold`: every box whose score for that class (for class -1: its own best class)
    exceeds it, plus the box selected as above (so never empty), summed like pytorch-grad-cam's
    box-score target. Extra outputs: `onnxcam_box_index` int64 [N] and `onnxcam_box_coords`
    float32 [N, 4] (the selected box's four coordinates as the model gives them).
    """
    emit, out, score_tensor, image = t.emit, t.out, t.score, t.image
    if score_tensor != out:  # e.g. a head ending in one Sigmoid: obj * cls of logits means nothing
        raise UsageError(f"output {out!r} ends in a probability op; the detection target explains the "
                         "detection scores themselves: pass keep_probabilities=True (--keep-probabilities)")
    t.known_shape()
    if emit.rank(out) != 3:
        raise UsageError(f"output {out!r} has shape {emit.info(out).shape}; the detection target needs a "
                         "YOLO-style [N, 4+C, anchors] or [N, anchors, 5+C] output")
    layout = _detection_layout(layout, emit.info(out).shape)
    dtype, batch = t.dtype, t.batch
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

    given = t.choice_input(BOX_INPUT, int(box), [batch])
    box_given = emit.greater_equal(given, emit.ints([0]))  # [N]
    given_hot = one_hot(emit, given, anchors, dtype)  # [N, A] (all zero for -1)
    given_box_scores = emit.reduce("ReduceSum", emit.op("Mul", scores, emit.unsqueeze(given_hot, [2])), [1],
                                   keepdims=False)  # [N, C]
    best_per_class = emit.reduce("ReduceMax", scores, [1], keepdims=False)  # [N, C]
    class_index = t.class_choice(emit.op("Where", emit.unsqueeze(box_given, [1]), given_box_scores, best_per_class))
    class_hot = one_hot(emit, class_index, n_classes, dtype)  # [N, C]
    class_scores = emit.reduce("ReduceSum", emit.op("Mul", scores, emit.unsqueeze(class_hot, [1])), [2],
                               keepdims=False)  # [N, A]
    box_index = emit.op("Where", box_given, given, emit.op("ArgMax", class_scores, axis=1, keepdims=0))
    box_hot = one_hot(emit, box_index, anchors, dtype)  # [N, A]
    weights = emit.op("Mul", emit.unsqueeze(box_hot, [2]), emit.unsqueeze(class_hot, [1]))  # [N, A, C]
    if threshold is not None:
        own_best = emit.op("Equal", emit.unsqueeze(emit.op("ArgMax", scores, axis=2, keepdims=0), [2]),
                           emit.unsqueeze(arange(emit, n_classes), [0, 1]))  # [N, A, C]
        class_given = emit.unsqueeze(emit.greater_equal(CLASS_INPUT, emit.ints([0])), [1, 2])
        which = choose_bool(emit, class_given, emit.cast(emit.unsqueeze(class_hot, [1]), TensorProto.BOOL), own_best)
        confident = emit.op("And", which, emit.op("Greater", scores, emit.scalar(float(threshold), scores)))
        weights = emit.cast(emit.op("Or", confident, emit.cast(weights, TensorProto.BOOL)), dtype)

    score = masked_score(emit, weights, scores, [1, 2])
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
    at = None
    if layout == "v5":  # obj * cls is not linear in the head's output: sampled methods recompute it
        def at(b, view):
            """Score and seed of the same boxes and classes on other evaluations view [k, N, A, 5+C]."""
            v_obj = b.slice(view, [4], [5], [3])
            v_cls = b.slice(view, [5], [INT64_MAX], [3])
            v_score = b.reduce("ReduceSum", b.op("Mul", weights, b.op("Mul", v_obj, v_cls)), [2, 3], keepdims=False)
            v_d_obj = b.reduce("ReduceSum", b.op("Mul", weights, v_cls), [3], keepdims=True)
            v_seed = b.pad(b.op("Concat", v_d_obj, b.op("Mul", weights, v_obj), axis=3), [0, 0, 0, 4, 0, 0, 0, 0])
            return v_seed, v_score
    return Target(seed, score, class_index, extra, at=at)
