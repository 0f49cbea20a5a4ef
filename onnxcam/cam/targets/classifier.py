"""The class target: one class's logit (or probability) per image, from an [N, classes] output."""

from __future__ import annotations

from .base import Target, TargetInput, one_hot, target


@target("class", rank=2, expects="a [N, classes] output (use --target detection/segmentation/sequence for other heads)")
def classifier(t: TargetInput, **options):
    """The logit (or probability) of one class per image; the output is [N, classes]."""
    emit, out, score_tensor = t.emit, t.out, t.score
    class_index = t.class_choice(out)
    same_shape = emit.info(score_tensor).shape == emit.info(out).shape
    logits = score_tensor if same_shape else emit.op("Reshape", score_tensor, emit.shape_of_tensor_or_dims(out))
    score = emit.squeeze(emit.op("GatherElements", logits, emit.unsqueeze(class_index, [1]), axis=1), [1])
    peeled = _peel_linear(t, class_index) if same_shape else None
    if peeled is not None:
        return Target(peeled[1], score, class_index, seed_tensor=peeled[0])
    seed = one_hot(emit, class_index, emit.dims(out)[1], emit.dtype(score_tensor))
    if not same_shape:  # logits behind a Flatten/Reshape
        seed = emit.op("Reshape", seed, emit.shape_of_tensor_or_dims(score_tensor))
    return Target(seed, score, class_index)


def _peel_linear(t: TargetInput, class_index):
    """For logits = A @ W (+ b) with a constant W (Gemm, or MatMul then Add), the gradient of
    logit k with respect to A is W's row k: one Gather instead of a one-hot seed pushed back through
    a Gemm (the 1000-class Gemm was the largest node of the backward pass on small models).
    Returns (A, seed for A) or None when the head is not such a layer."""
    emit, producers = t.emit, t.analysis.producers
    constants = t.analysis.constant_names()
    node = producers.get(t.score)
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
