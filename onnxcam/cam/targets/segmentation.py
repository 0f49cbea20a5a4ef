"""The segmentation target: the sum of one class's logits over a region."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .base import Target, TargetInput, arange, filled, masked_score, one_hot, target

MASK_INPUT = "onnxcam_mask"


@target("segmentation", rank=4, expects="an [N, classes, H, W] output", like_output=True, known_shape=True)
def segmentation(t: TargetInput, threshold=0.3, background=0):
    """The sum of one class's logits over a region (pytorch-grad-cam's SemanticSegmentationTarget).

    Output [N, K, H, W]: score = sum_{h,w} M[h, w] * y[c, h, w], seed = onehot(c) x M, with the
    region M the pixels whose arg-max class is c. The class is `onnxcam_class`, or else the
    *dominant* class: the one predicted on the most pixels, the `background` class (default 0;
    None to treat all alike) counting only when no other class is predicted anywhere.
    Output [N, 1, H, W] (binary segmenters, DBNet-like text maps): M = the pixels where the
    output exceeds `threshold`, class 0. In both cases a non-empty float mask given as input
    `onnxcam_mask` [N or 1, H, W] replaces M (all-zero, the automatic value, keeps M).
    """
    emit, out, score_tensor = t.emit, t.out, t.score
    dtype, dims = t.dtype, emit.dims(out)
    user = t.choice_input(MASK_INPUT, 0.0, [None, None, None], TensorProto.FLOAT, fill_shape=(1, 1, 1))
    user = user if dtype == TensorProto.FLOAT else emit.cast(user, dtype)
    use_user = emit.op("Greater", emit.reduce("ReduceSum", emit.op("Abs", user), [1, 2], keepdims=True),
                       emit.scalar(0.0, user))  # [N|1, 1, 1]
    if dims[1] == 1:
        region = emit.cast(emit.op("Greater", emit.squeeze(out, [1]), emit.scalar(float(threshold), out)), dtype)
        mask = emit.op("Where", use_user, user, region)  # [N, H, W]
        seed = emit.unsqueeze(mask, [1])
        class_index = filled(emit, [dims[0]], 0)
        return Target(seed, masked_score(emit, seed, score_tensor, [1, 2, 3]), class_index)
    predicted = emit.op("ArgMax", out, axis=1, keepdims=0)  # [N, H, W]
    classes = arange(emit, dims[1])
    counts = emit.reduce("ReduceSum", emit.cast(emit.op("Equal", emit.unsqueeze(predicted, [1]),
                                                         emit.unsqueeze(classes, [0, 2, 3])), TensorProto.FLOAT),
                         [2, 3], keepdims=False)  # [N, K] pixels per class
    if background is not None:  # 0.5: below any class present, above any class absent
        counts = emit.op("Where", emit.op("Equal", classes, emit.ints([int(background)])),
                         emit.const(np.array(0.5, np.float32), TensorProto.FLOAT), counts)
    class_index = t.class_choice(counts)
    region = emit.cast(emit.op("Equal", predicted, emit.unsqueeze(class_index, [1, 2])), dtype)
    mask = emit.op("Where", use_user, user, region)  # [N, H, W]
    seed = emit.op("Mul", emit.unsqueeze(one_hot(emit, class_index, dims[1], dtype), [2, 3]),
                   emit.unsqueeze(mask, [1]))
    return Target(seed, masked_score(emit, seed, score_tensor, [1, 2, 3]), class_index)
