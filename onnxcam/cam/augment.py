"""The augmenter: adds the explanation to a model as new outputs, read top to bottom:
load -> analyse -> choose output, score and layers -> plan the methods -> build the target ->
differentiate (one backward pass per rule mode) -> methods -> expose -> prune -> record.

Contract of the augmented model (an API; see the README):
  inputs  = the original inputs + the run-time choices of the target (``onnxcam_class`` int64
            [N], -1 = top class; ``onnxcam_box``, ``onnxcam_step``, ``onnxcam_mask``,
            ``onnxcam_reference`` per target): plain graph inputs, automatic values in the metadata
  outputs = the original outputs, untouched
          + ``onnxcam_cam`` (float32 [N, H, W] at the input's resolution: the first method's map)
          + ``onnxcam_class_index`` (int64 [N]) + ``onnxcam_score`` (float32 [N])
          + ``onnxcam_layer_cams`` (float32 [N, L, H, W]) when several layers are explained
          + with several methods, ``onnxcam_cam__<method>`` for each (and
            ``onnxcam_layer_cams__<method>`` for layer methods over several layers).
In vjp mode: input ``onnxcam_seed`` (cotangent of the named tensor), outputs
``onnxcam_activation`` and ``onnxcam_gradient`` of one target tensor.
"""

from __future__ import annotations

import copy
import os
from typing import Dict, List, Optional, Sequence, Union

import onnx
from onnx import TensorProto, helper

from .._version import __version__
from ..autodiff.analysis import GraphAnalysis, merged
from ..autodiff.gradients import add_gradients, check_opset, default_opset, flush, new_emitter, prune_unused
from ..autodiff.registry import STANDARD
from ..autodiff.graph import ancestors, share_duplicate_captures
from ..autodiff.schedule import order_for_depth_first
from ..autodiff.shapes import TensorInfo, make_value_info
from ..errors import UsageError
from ..modelio import check_graph_structure, graph_errors, load_model
from ..spec import ExplainSpec
from .inputs import ImageInput, image_input
from .layers import candidate_layers, choose_output, logits_for, resolve_layers
from .methods import LAYER, METHODS, MethodContext, get_method  # noqa: F401  (METHODS: public)
from .methods.maps import layer_maps, normalise
from .biases import bias_tensors
from .gradient_mean import mean_gradient, one_by_one_consumers
from .plan import BIASES, Plan, plan
from .reruns import Reruns
from .seeds import build_seed
from .spatial import activation_layout, to_nchw
from .targets import CLASS_INPUT, TARGETS, TargetInput, choices_metadata  # noqa: F401  (CLASS_INPUT: public)

CAM_OUTPUT = "onnxcam_cam"
LAYER_CAMS_OUTPUT = "onnxcam_layer_cams"
CLASS_OUTPUT = "onnxcam_class_index"
SCORE_OUTPUT = "onnxcam_score"
ACTIVATION_OUTPUT = "onnxcam_activation"
GRADIENT_OUTPUT = "onnxcam_gradient"
METHOD_SEPARATOR = "__"  # onnxcam_cam__<method>


def method_output(base: str, method: str) -> str:
    """The output name of one method's map (or per-layer maps) in a several-method model."""
    return f"{base}{METHOD_SEPARATOR}{method}"


def augment(model, layer: Union[str, Sequence[str], None] = None, method: Union[str, Sequence[str], None] = None,
            output: Optional[str] = None, vjp: Optional[bool] = None, keep_probabilities: Optional[bool] = None,
            counterfactual: Optional[bool] = None, target: Optional[str] = None,
            target_options: Optional[dict] = None, activation_layout_hint: Optional[str] = None,
            token_grid=None, method_options: Optional[dict] = None, spec: Optional[ExplainSpec] = None,
            name: Optional[str] = None, inplace: bool = False, portable: bool = False) -> onnx.ModelProto:
    """Return a copy of `model` (path or ModelProto) that also computes its explanation.

    The explanation is an ExplainSpec (`spec`), or built from the keyword arguments (which
    override a given spec's fields): layer ("auto", a tensor name, or several), method (a name,
    "a,b", or a list: one model computing all of them, sharing their work), output, vjp,
    keep_probabilities, counterfactual, target and target_options, activation_layout_hint,
    token_grid, method_options. Unset ones take ExplainSpec's defaults.
    name: how error messages call the model (default: its path).
    inplace: edit a given ModelProto instead of a copy (saves a copy of the weights).
    portable: give backward convolutions their own copy of weights they share with forward ones
    (OpenVINO computes that pattern wrongly; see onnxcam/portable.py): correct everywhere, at the
    memory cost of those weights; ONNX Runtime's results are unchanged.
    """
    spec = ExplainSpec.build(spec, methods=method, layers=layer, output=output, vjp=vjp,
                             keep_probabilities=keep_probabilities, counterfactual=counterfactual, target=target,
                             target_options=target_options, layout=activation_layout_hint, token_grid=token_grid,
                             method_options=method_options)
    for method_name in spec.methods:
        get_method(method_name)  # an unknown name fails before any work
    if spec.target not in TARGETS:
        raise UsageError(f"unknown target {spec.target!r}; choose one of {', '.join(TARGETS)}")
    label = name or (os.fspath(model) if isinstance(model, (str, os.PathLike)) else "model")
    proto = load_model(model)
    if isinstance(model, onnx.ModelProto) and not inplace:
        proto = copy.deepcopy(proto)  # never edit the caller's model
    check_reserved_names(proto, str(label))
    check_opset(default_opset(proto), str(label))
    check_graph_structure(proto, label)
    with graph_errors(proto, label):
        first_node, first_initializer = len(proto.graph.node), len(proto.graph.initializer)
        infos: Dict[str, TensorInfo] = {}
        build(proto, spec, str(label), infos)
        prune_unused(proto.graph, first_node, first_initializer)
        order_for_depth_first(proto.graph, first_node, lambda t: _rank(infos, t))
        if portable:
            from ..portable import separate_conv_weights
            separate_conv_weights(proto, inplace=True)
        return proto


def _rank(infos, tensor: str) -> Optional[int]:
    info = infos.get(tensor)
    return None if info is None or info.shape is None else len(info.shape)


RESERVED_PREFIX = "onnxcam_"  # the contract's inputs and outputs; onnxcam's own nodes use "onnxcam/"


def check_reserved_names(proto: onnx.ModelProto, label: str) -> None:
    """Refuse, up front, a model onnxcam already augmented, or one whose own tensors use a name the
    contract reserves: either would give ONNX Runtime two definitions of onnxcam_cam (or
    onnxcam_class...) and fail late, or silently mean something else."""
    graph = proto.graph
    names = ({v.name for v in list(graph.input) + list(graph.output)} | {t.name for t in graph.initializer}
             | {o for node in graph.node for o in node.output})
    taken = sorted(n for n in names if n.startswith(RESERVED_PREFIX))
    recorded = {p.key for p in proto.metadata_props} & {"onnxcam.version", "onnxcam.methods", "onnxcam.layers"}
    if recorded and taken:
        raise UsageError(f"{label} is already augmented by onnxcam (its metadata says so; tensors "
                         f"{', '.join(taken[:3]) or 'onnxcam_*'}): augment or explain the original model instead "
                         "(an augmented model already returns its maps: run it with ONNX Runtime)")
    if taken:
        raise UsageError(f"{label}: the model has tensor(s) named {', '.join(map(repr, taken[:3]))}, and onnxcam "
                         f"reserves names starting with {RESERVED_PREFIX!r} for the augmented model's inputs and "
                         "outputs; rename them in the model (e.g. onnx.compose.add_prefix) and try again")


def build(proto: onnx.ModelProto, spec: ExplainSpec, label: str,
          infos: Optional[Dict[str, TensorInfo]] = None) -> onnx.ModelProto:
    """Edit `proto` in place: the explanation described by `spec` as new graph outputs.
    `infos`, when given, receives what is known of every tensor's type and shape (the pass that
    orders nodes for ONNX Runtime, after pruning, reads ranks from it)."""
    image = None if spec.vjp else image_input(proto, label)  # first: is this an image model at all?
    analysis = GraphAnalysis(proto)
    emit = new_emitter(proto, analysis.infos)
    known = infos if infos is not None else {}
    out = choose_output(proto, spec.output, analysis.infos)
    # Detection heads end in a Sigmoid over boxes and scores alike: their scores are the target.
    keep = spec.keep_probabilities or spec.vjp or spec.target == "detection"
    score = out if keep else logits_for(analysis, out)[0]
    if spec.vjp:
        _augment_vjp(proto, analysis, emit, _layers(proto, analysis, score, spec, label), out)
        known.update(emit.infos)
        return proto

    the_plan = plan(spec.methods)
    layers = _layers(proto, analysis, score, spec, label, image) if the_plan.needs_layers else []
    t = TargetInput(proto, emit, out, score, image, analysis)
    chosen = TARGETS[spec.target](t, **spec.target_options)
    seed = emit.op("Neg", chosen.seed) if spec.counterfactual else chosen.seed
    seeded = chosen.seed_tensor or score  # what the seed is the cotangent of
    if seeded != score and seeded in layers:
        raise UsageError(f"layer {seeded!r} is the classifier's input, not a feature map; pick another layer")
    emit.set_info(seed, emit.dtype(seeded), emit.info(seeded).shape)

    ctx = MethodContext(emit, image, layers, proto=proto, analysis=analysis, target=chosen, seeded=seeded, seed=seed,
                        spec=spec)
    _differentiate(proto, analysis, emit, the_plan, ctx, seeded, seed, score, spec)
    _seeded_passes(proto, analysis, emit, the_plan, ctx, chosen, score, spec)
    if the_plan.reruns:
        ctx.reruns = Reruns(emit, analysis, image, chosen, seeded, score, spec)
    _run_methods(emit, the_plan, ctx, spec)

    first = spec.methods[0]
    several = len(spec.methods) > 1
    _expose(proto, emit, emit.squeeze(ctx.maps[first], [1]), CAM_OUTPUT, TensorProto.FLOAT, _image_dims(image))
    if first in ctx.layer_maps:
        _expose(proto, emit, ctx.layer_maps[first], LAYER_CAMS_OUTPUT, TensorProto.FLOAT, _layer_dims(image, layers))
    for name in spec.methods if several else ():
        _expose(proto, emit, emit.squeeze(ctx.maps[name], [1]), method_output(CAM_OUTPUT, name), TensorProto.FLOAT,
                _image_dims(image))
        if name in ctx.layer_maps:
            _expose(proto, emit, ctx.layer_maps[name], method_output(LAYER_CAMS_OUTPUT, name), TensorProto.FLOAT,
                    _layer_dims(image, layers))
    for name, (tensor, dtype, shape) in ctx.outputs.items():  # attributions and residuals of map methods
        _expose(proto, emit, tensor, name, dtype, shape)
    _expose(proto, emit, chosen.class_index, CLASS_OUTPUT, TensorProto.INT64, (image.shape[0],))
    _expose(proto, emit, emit.as_float32(chosen.score), SCORE_OUTPUT, TensorProto.FLOAT, (image.shape[0],))
    for name, (tensor, dtype, shape) in chosen.extra_outputs.items():
        _expose(proto, emit, tensor, name, dtype, shape)
    for name, per_layer in ctx.diagnostics.items():  # a method's checks (Eigen-CAM's residual): [N, layers]
        stacked = emit.op("Concat", *[emit.unsqueeze(t, [1]) for t in per_layer], axis=1)
        _expose(proto, emit, stacked, name, TensorProto.FLOAT, (image.shape[0], len(per_layer)))
    flush(emit, proto.graph)
    share_duplicate_captures(proto.graph)  # keeps ONNX Runtime from warning about our Loops
    _record(proto, spec.methods, layers, out, score, choices_metadata(t.choices))
    known.update(emit.infos)
    return proto


# ---------------------------------------------------------------------- steps
def _layers(proto, analysis, score, spec, label, image=None) -> List[str]:
    candidates = candidate_layers(analysis, score)
    all_tensors = {t for n in proto.graph.node for t in n.output} | {i.name for i in proto.graph.input}
    layers = resolve_layers(spec.layers, candidates, all_tensors, label)
    if image is not None and all(isinstance(image.shape[a], int) for a in image.spatial_axes):
        # A fixed input size fixes every feature map's size, but shape inference loses it behind
        # padding computed at run time (TF-style "same" exports): measured once, the sizes make
        # the backward pass and the CAM static (no Shape/Gather arithmetic per run).
        unknown = [l for l in layers if (analysis.infos.get(l) is None or analysis.infos[l].shape is None
                                         or not all(isinstance(d, int) for d in analysis.infos[l].shape[1:]))]
        if unknown:
            before = {l: analysis.infos.get(l) for l in unknown}
            for name, probed in analysis.probe(unknown).items():
                analysis.infos[name] = merged(before[name], probed)  # keeps the batch symbol it shares
    return layers


def _differentiate(proto, analysis, emit, the_plan: Plan, ctx: MethodContext, seeded, seed, score, spec) -> None:
    """One backward pass per rule mode over every tensor any method asked for; activations and
    gradients at the layers brought to float32 NCHW, once."""
    image = ctx.image
    biases = bias_tensors(analysis) if the_plan.wants(BIASES) else []
    for mode in the_plan.gradients:
        targets = the_plan.targets(mode, ctx.layers, image.name, [b.output for b in biases])
        shortcuts = _mean_shortcuts(analysis, emit, the_plan, ctx, targets, seeded, spec) if mode == STANDARD else {}
        if shortcuts:  # stop the backward pass at those layers' 1x1 convolutions (cam/gradient_mean.py)
            targets = [t for t in targets if t not in shortcuts]
            targets += list(dict.fromkeys(z for consumers in shortcuts.values() for z, _ in consumers))
        built = add_gradients(proto, targets, seeded, seed=seed, emitter=emit, score_name=score, analysis=analysis,
                              mode=mode)
        for name, consumers in shortcuts.items():
            ctx.gradients[name] = mean_gradient(emit, name, consumers, built.gradients)
        if image.name in targets:
            ctx.input_gradients[mode] = _image_nchw(emit, built.gradients[image.name], image)
        if mode == STANDARD:
            ctx.bias_gradients = [(emit.as_float32(built.gradients[b.output]), b.bias) for b in biases
                                  if b.output in built.gradients]
            for name in ctx.layers:
                if name in built.gradients:
                    layout = _layout(emit, name, image, spec, analysis)
                    ctx.gradients[name] = to_nchw(emit, emit.as_float32(built.gradients[name]), image, layout,
                                                  spec.token_grid, analysis, like=name)
    if the_plan.needs_activations:
        for name in ctx.layers:
            layout = _layout(emit, name, image, spec, analysis)
            ctx.activations[name] = to_nchw(emit, emit.as_float32(name), image, layout, spec.token_grid, analysis,
                                            like=name)
    ctx.image_nchw = _image_nchw(emit, image.name, image)  # pruned when no method reads it


def _mean_shortcuts(analysis, emit, the_plan: Plan, ctx: MethodContext, targets, seeded, spec) -> dict:
    """layer -> its 1x1 convolutions, for the layers whose gradient every method reads only as a
    spatial mean, when this pass does not differentiate the image or biases through them anyway."""
    if not the_plan.gradient_means_only or any(t not in ctx.layers for t in targets):
        return {}
    found, feeding = {}, ancestors([seeded], analysis.producers)
    for name in ctx.layers:
        if _layout(emit, name, ctx.image, spec, analysis) != "NCHW":
            continue
        consumers = one_by_one_consumers(analysis, emit, name, feeding)
        if consumers and not any(z in ctx.layers for z, _ in consumers):
            found[name] = consumers
    return found


def _seeded_passes(proto, analysis, emit, the_plan: Plan, ctx: MethodContext, chosen, score, spec) -> None:
    """One backward pass per score of a method's own (Finer-CAM's comparison score...), at the layers."""
    for name in the_plan.seeded:
        owner = next(m for m in the_plan.methods if m.needs.seed == name)
        seed = build_seed(name, emit, score, chosen, _options(owner, spec))
        if spec.counterfactual:
            seed = emit.op("Neg", seed)
        built = add_gradients(proto, list(ctx.layers), score, seed=seed, emitter=emit, analysis=analysis)
        for layer in ctx.layers:
            layout = _layout(emit, layer, ctx.image, spec, analysis)
            ctx.seeded_gradients[(name, layer)] = to_nchw(emit, emit.as_float32(built.gradients[layer]), ctx.image,
                                                          layout, spec.token_grid)


def _run_methods(emit, the_plan: Plan, ctx: MethodContext, spec: ExplainSpec) -> None:
    for method in the_plan.methods:
        options = _options(method, spec)
        if method.kind == LAYER:
            needs = method.needs
            raw = []
            for name in ctx.layers:
                A = ctx.activation(name) if needs.activation else None
                G = ctx.gradient(name, needs.seed) if needs.gradient else None
                if method.with_context:
                    raw.append(method.fn(ctx, name, A, G, **options))
                    continue
                # A pure (A, G) formula reads a gradient constant over space (global pooling's
                # backward) in compact form: the broadcast is never materialised.
                emit.fold_expands = True
                try:
                    raw.append(method.fn(emit, A, G, **options))
                finally:
                    emit.fold_expands = False
            ctx.maps[method.name], stacked = layer_maps(emit, raw, ctx.image)
            if stacked is not None:
                ctx.layer_maps[method.name] = stacked
        else:
            ctx.maps[method.name] = method.fn(ctx, **options)


def _options(method, spec: ExplainSpec) -> dict:
    options = dict(spec.method_options.get(method.name, {}))
    unknown = sorted(set(options) - set(method.options))
    if unknown:
        raise UsageError(f"method {method.name!r} has no option {unknown[0]!r}; its options are "
                         f"{', '.join(method.options) or 'none'}")
    return options


# ---------------------------------------------------------------------- pieces
def _layout(emit, name, image, spec, analysis) -> str:
    return activation_layout(emit, name, image, spec.layout, analysis=analysis)



def _image_nchw(emit, name: str, image: ImageInput) -> str:
    """A tensor shaped like the image input, as float32 NCHW."""
    wide = emit.as_float32(name)
    return wide if image.layout == "NCHW" else emit.op("Transpose", wide, perm=[0, 3, 1, 2])


def _image_dims(image):
    h_axis, w_axis = image.spatial_axes
    return (image.shape[0], image.shape[h_axis], image.shape[w_axis])


def _layer_dims(image, layers):
    n, h, w = _image_dims(image)
    return (n, len(layers), h, w)


def _expose(proto, emit, tensor, name, dtype, shape):
    """Make `tensor` a graph output called `name` (names are an API): onnxcam's own tensors are
    renamed where they are made (an Identity per output is a node ONNX Runtime dispatches on
    every run); the model's own tensors, or one exposed twice, go through an Identity."""
    renamed = emit.__dict__.setdefault("exposed_as", {})  # a tensor exposed before under another name
    tensor = renamed.get(tensor, tensor)
    if _rename(proto, emit, tensor, name):
        renamed[tensor] = name
    else:
        emit.nodes.append(helper.make_node("Identity", [tensor], [name], name=emit.fresh(f"{name}_node")))
    shape = None if shape is None else tuple(shape)
    proto.graph.output.append(make_value_info(name, TensorInfo(dtype, shape), symbol_prefix=name))


def _rename(proto, emit, tensor, name) -> bool:
    producer_prefix = emit.prefix + "/"
    nodes = list(emit.nodes) + list(proto.graph.node)
    producer = next((n for n in reversed(nodes) if tensor in n.output), None)
    if producer is None or not producer.name.startswith(producer_prefix) or not tensor.startswith(producer_prefix):
        return False
    if any(o.name == tensor for o in proto.graph.output):
        return False
    for node in nodes:
        for i, value in enumerate(node.input):
            if value == tensor:
                node.input[i] = name
        for i, value in enumerate(node.output):
            if value == tensor:
                node.output[i] = name
        for attr in node.attribute:  # subgraphs of onnxcam's own control flow may read it
            if attr.type == onnx.AttributeProto.GRAPH:
                for inner in attr.g.node:
                    for i, value in enumerate(inner.input):
                        if value == tensor:
                            inner.input[i] = name
    if tensor in emit.infos:
        emit.infos[name] = emit.infos[tensor]
    return True


def _augment_vjp(proto, analysis, emit, targets, out):
    if len(targets) != 1:
        raise UsageError("vjp mode exposes one target tensor; name exactly one layer")
    target = targets[0]
    built = add_gradients(proto, [target], out, emitter=emit, analysis=analysis)
    info = emit.info(target)
    _expose(proto, emit, target, ACTIVATION_OUTPUT, info.dtype or TensorProto.FLOAT, info.shape)
    gradient = built.gradients[target]
    _expose(proto, emit, gradient, GRADIENT_OUTPUT, emit.info(gradient).dtype or TensorProto.FLOAT, info.shape)
    flush(emit, proto.graph)
    _record(proto, ("vjp",), [target], out, out, {})
    return proto


def _record(proto, methods, targets, output, score, extra: Dict[str, str]):
    """Leave what was done in the model's metadata (readable by any runtime)."""
    entries = {"onnxcam.method": methods[0], "onnxcam.methods": ",".join(methods),
               "onnxcam.layers": ",".join(targets), "onnxcam.output": output, "onnxcam.score_tensor": score,
               "onnxcam.version": __version__}
    entries.update(extra)
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in entries.items():
        if key in existing:
            existing[key].value = value
        else:
            proto.metadata_props.add(key=key, value=value)
