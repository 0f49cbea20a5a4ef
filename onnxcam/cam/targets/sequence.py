"""The sequence target: CTC-style recognisers, the greedy-decoded sequence or one step."""

from __future__ import annotations

from onnx import TensorProto

from .base import Target, TargetInput, arange, choose_bool, masked_score, target

STEP_INPUT = "onnxcam_step"
PATH_OUTPUT = "onnxcam_path"


@target("sequence", rank=3, expects="a [N, T, classes] output", like_output=True, known_shape=True)
def sequence(t: TargetInput, blank=0, step=-1):
    """CTC-style recogniser output [N, T, C]: the score of the greedy-decoded sequence,
    sum over steps t with k_t = argmax_c y[t, c] != blank of y[t, k_t] (seed: onehot(k_t) on
    those steps), or with input `onnxcam_step` >= 0 (automatic value: option `step`; -1 = whole
    sequence) the score y[t, k] of that one step, k = `onnxcam_class` or k_t (blank included).
    `blank` is the blank class (negative counts from the end). Class: k for one step, -1 for the
    whole sequence. Extra output `onnxcam_path` int64 [N, T]: the arg-max class per step."""
    emit, out, score_tensor, image = t.emit, t.out, t.score, t.image
    dtype, dims = t.dtype, emit.dims(out)
    blank_index = emit.ints([blank]) if blank >= 0 else emit.shape_of([emit.d_add(dims[2], blank)])
    path = emit.op("ArgMax", out, axis=2, keepdims=0)  # [N, T]
    chosen_step = t.choice_input(STEP_INPUT, int(step), [t.batch])
    one_step = emit.unsqueeze(emit.greater_equal(chosen_step, emit.ints([0])), [1])  # [N|1, 1]
    step_hot = emit.op("Equal", emit.unsqueeze(chosen_step, [1]), emit.unsqueeze(arange(emit, dims[1]), [0]))
    step_scores = emit.reduce("ReduceSum", emit.op("Mul", out, emit.unsqueeze(emit.cast(step_hot, dtype), [2])),
                              [1], keepdims=False)  # [N, C]: the chosen step's outputs
    step_class = t.class_choice(step_scores)
    steps = choose_bool(emit, one_step, step_hot, emit.op("Not", emit.op("Equal", path, blank_index)))
    per_step_class = emit.op("Where", one_step, emit.unsqueeze(step_class, [1]), path)  # [N, T]
    hot = emit.op("Equal", emit.unsqueeze(per_step_class, [2]), emit.unsqueeze(arange(emit, dims[2]), [0, 1]))
    seed = emit.cast(emit.op("And", hot, emit.unsqueeze(steps, [2])), dtype)
    class_index = emit.op("Where", emit.squeeze(one_step, [1]), step_class, emit.ints([-1]))
    extra = {PATH_OUTPUT: (path, TensorProto.INT64, (image.shape[0], emit.info(out).shape[1]))}
    return Target(seed, masked_score(emit, seed, score_tensor, [1, 2]), class_index, extra)
