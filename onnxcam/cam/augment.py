"""The augmenter: adds the gradient subgraph and the CAM computation to a model as new outputs.

Contract of the augmented model (an API; see the README):
  inputs  = the original inputs + optional ``onnxcam_class`` (int64 [N]; -1 or omitted: top class)
  outputs = the original outputs, untouched
          + ``onnxcam_cam`` (float32 [N, H, W] in [0, 1] at the input's resolution)
          + ``onnxcam_class_index`` (int64 [N]) + ``onnxcam_score`` (float32 [N])
          + ``onnxcam_layer_cams`` (float32 [N, L, H, W]) when several layers are explained.
In vjp mode: input ``onnxcam_seed`` (cotangent of the named tensor), outputs
``onnxcam_activation`` and ``onnxcam_gradient`` of one target tensor.
"""

from __future__ import annotations

import copy
import os
from typing import List, Optional, Sequence, Union

import onnx
from onnx import TensorProto, helper

from ..autodiff.gradients import (SEED_INPUT, add_gradients, check_opset, default_opset, flush, new_emitter,
                                  prune_unused)
from ..autodiff.shapes import TensorInfo, make_value_info
from ..errors import UsageError
from ..modelio import check_graph_structure, graph_errors, load_model
from .inputs import image_input
from .layers import candidate_layers, choose_output, logits_for, resolve_layers
from .methods import METHODS, METHODS_REGISTRY
from .spatial import activation_layout, to_nchw
from .targets import CLASS_INPUT, TARGETS

CAM_OUTPUT = "onnxcam_cam"
LAYER_CAMS_OUTPUT = "onnxcam_layer_cams"
CLASS_OUTPUT = "onnxcam_class_index"
SCORE_OUTPUT = "onnxcam_score"
ACTIVATION_OUTPUT = "onnxcam_activation"
GRADIENT_OUTPUT = "onnxcam_gradient"
NORMALISE_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image


def augment(model, layer: Union[str, Sequence[str]] = "auto", method: str = "gradcam", output: Optional[str] = None,
            vjp: bool = False, keep_probabilities: bool = False, counterfactual: bool = False,
            target: str = "class", target_options: Optional[dict] = None,
            activation_layout_hint: str = "auto", token_grid=None, name: Optional[str] = None,
            inplace: bool = False) -> onnx.ModelProto:
    """Return a copy of `model` (path or ModelProto) that also computes its explanation.

    layer: "auto", a tensor name, or several (one map each, plus their fused mean).
    method: one of METHODS. output: the graph output (or tensor) to explain.
    keep_probabilities: differentiate the Softmax/Sigmoid output itself instead of its logits.
    counterfactual: negate the gradients (regions that argue against the class).
    vjp: expose the raw engine instead of a CAM (see the module docstring).
    target: the score definition (see cam/targets.py), with `target_options` for it.
    activation_layout_hint: "auto", "NCHW", "NHWC" or "tokens" for the target tensors;
    token_grid: (extra_tokens, h, w) for token targets when it cannot be inferred.
    name: how error messages call the model (default: its path).
    inplace: edit a given ModelProto instead of a copy (saves a copy of the weights).
    """
    if method not in METHODS_REGISTRY:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    label = name or (os.fspath(model) if isinstance(model, (str, os.PathLike)) else "model")
    proto = load_model(model)
    if isinstance(model, onnx.ModelProto) and not inplace:
        proto = copy.deepcopy(proto)  # never edit the caller's model
    check_opset(default_opset(proto), str(label))
    check_graph_structure(proto, label)
    with graph_errors(proto, label):
        return _augment(proto, label, layer, method, output, vjp, keep_probabilities, counterfactual, target,
                        target_options, activation_layout_hint, token_grid)


def _augment(proto, label, layer, method, output, vjp, keep_probabilities, counterfactual, target,
             target_options, activation_layout_hint, token_grid):
    first_new, first_new_initializer = len(proto.graph.node), len(proto.graph.initializer)
    result = _build(proto, label, layer, method, output, vjp, keep_probabilities, counterfactual, target,
                    target_options, activation_layout_hint, token_grid)
    prune_unused(result.graph, first_new, first_new_initializer)
    return result


def _build(proto, label, layer, method, output, vjp, keep_probabilities, counterfactual, target,
           target_options, activation_layout_hint, token_grid):
    if not vjp:
        image_input(proto, label)  # the first thing a user must know: is this an image model at all?
    emit = new_emitter(proto)
    infos = emit.infos
    out = choose_output(proto, output, infos)
    # Detection heads end in a Sigmoid over boxes and scores alike: their scores are the target.
    keep = keep_probabilities or vjp or target == "detection"
    score = out if keep else logits_for(proto, out)[0]
    candidates = candidate_layers(proto, score, infos)
    all_tensors = {t for n in proto.graph.node for t in n.output} | {i.name for i in proto.graph.input}
    targets = resolve_layers(layer, candidates, all_tensors, str(label))
    if vjp:
        return _augment_vjp(proto, targets, out, emit)

    image = image_input(proto)
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    spec = TARGETS[target](proto, emit, out, score, image, **(target_options or {}))
    seed = emit.op("Neg", spec.seed) if counterfactual else spec.seed
    seeded = spec.seed_tensor or score  # what the seed is the cotangent of
    if seeded != score and seeded in targets:
        raise UsageError(f"layer {seeded!r} is the classifier's input, not a feature map; pick another layer")
    emit.set_info(seed, emit.dtype(seeded), emit.info(seeded).shape)
    built = add_gradients(proto, targets, seeded, seed=seed, emitter=emit, score_name=score)

    cams = []
    producers = {o: n for n in proto.graph.node for o in n.output}
    for name in targets:
        layout = activation_layout(emit, name, image, activation_layout_hint, producers)
        activation = to_nchw(emit, _as_float32(emit, name), image, layout, token_grid)
        gradient = to_nchw(emit, _as_float32(emit, built.gradients[name]), image, layout, token_grid)
        raw = METHODS_REGISTRY[method](emit, activation, gradient)
        cams.append(_upsample(emit, _normalise(emit, emit.op("Relu", raw)), image))
    stacked = cams[0] if len(cams) == 1 else emit.op("Concat", *cams, axis=1)
    # pytorch-grad-cam's multi-layer aggregation, also applied to one layer: relu, mean, rescale.
    # The resized maps are already >= 0, and the mean of one map is itself: only the rescale is left.
    mean = stacked if len(cams) == 1 else emit.reduce("ReduceMean", stacked, [1], keepdims=True)
    fused = _normalise(emit, mean)
    cam = emit.squeeze(fused, [1])
    _expose(proto, emit, cam, CAM_OUTPUT, TensorProto.FLOAT, _image_dims(image))
    if len(cams) > 1:
        n, h, w = _image_dims(image)
        _expose(proto, emit, stacked, LAYER_CAMS_OUTPUT, TensorProto.FLOAT, (n, len(cams), h, w))
    _expose(proto, emit, spec.class_index, CLASS_OUTPUT, TensorProto.INT64, (image.shape[0],))
    _expose(proto, emit, _as_float32(emit, spec.score), SCORE_OUTPUT, TensorProto.FLOAT, (image.shape[0],))
    for name, (tensor, dtype, shape) in spec.extra_outputs.items():
        _expose(proto, emit, tensor, name, dtype, shape)
    flush(emit, proto.graph)
    _record(proto, method, targets, out, score)
    return proto


# ---------------------------------------------------------------------- pieces
def _as_float32(emit, name):
    return name if emit.dtype(name) == TensorProto.FLOAT else emit.cast(name, TensorProto.FLOAT)


def _normalise(emit, cam):
    """Per-image min-max to [0, 1] as pytorch-grad-cam: (x - min) / (max(x - min) + 1e-7)."""
    shifted = emit.op("Sub", cam, emit.reduce("ReduceMin", cam, [1, 2, 3], keepdims=True))
    top = emit.reduce("ReduceMax", shifted, [1, 2, 3], keepdims=True)
    return emit.op("Div", shifted, emit.op("Add", top, emit.scalar(NORMALISE_EPS, cam)))


def _upsample(emit, cam, image):
    """Bilinear resize to the input's spatial size with half-pixel centres (cv2.INTER_LINEAR)."""
    h_axis, w_axis = image.spatial_axes
    image_dims = emit.dims(image.name)
    cam_dims = emit.dims(emit.set_info(cam, TensorProto.FLOAT, [None, 1, None, None]))
    sizes = emit.shape_of([cam_dims[0], 1, image_dims[h_axis], image_dims[w_axis]])
    return emit.resize(cam, sizes, mode="linear", coordinate_transformation_mode="half_pixel")


def _image_dims(image):
    h_axis, w_axis = image.spatial_axes
    return (image.shape[0], image.shape[h_axis], image.shape[w_axis])


def _expose(proto, emit, tensor, name, dtype, shape):
    """Make `tensor` a graph output called `name` (through an Identity: names are an API)."""
    emit.nodes.append(helper.make_node("Identity", [tensor], [name], name=emit.fresh(f"{name}_node")))
    shape = None if shape is None else tuple(shape)
    proto.graph.output.append(make_value_info(name, TensorInfo(dtype, shape), symbol_prefix=name))


def _augment_vjp(proto, targets, out, emit):
    if len(targets) != 1:
        raise UsageError("vjp mode exposes one target tensor; name exactly one layer")
    target = targets[0]
    built = add_gradients(proto, [target], out, emitter=emit)
    info = emit.info(target)
    _expose(proto, emit, target, ACTIVATION_OUTPUT, info.dtype or TensorProto.FLOAT, info.shape)
    gradient = built.gradients[target]
    _expose(proto, emit, gradient, GRADIENT_OUTPUT, emit.info(gradient).dtype or TensorProto.FLOAT, info.shape)
    flush(emit, proto.graph)
    _record(proto, "vjp", [target], out, out)
    return proto


def _record(proto, method, targets, output, score):
    """Leave what was done in the model's metadata (readable by any runtime)."""
    entries = {"onnxcam.method": method, "onnxcam.layers": ",".join(targets), "onnxcam.output": output,
               "onnxcam.score_tensor": score}
    from .. import __version__
    entries["onnxcam.version"] = __version__
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in entries.items():
        if key in existing:
            existing[key].value = value
        else:
            proto.metadata_props.add(key=key, value=value)
