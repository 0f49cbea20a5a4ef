"""What is known of each tensor's type and shape, from ONNX shape inference and, where that loses
track (dynamic Reshapes in attention exports), from probing the model with ONNX Runtime.

A dim is an ``int`` only when it is truly fixed; a ``str`` is a symbol (equal symbols are equal
sizes) and ``None`` an unknown size; both are read at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class TensorInfo:
    dtype: Optional[int]
    shape: Optional[Tuple[object, ...]]  # int, symbol str or None per axis; None: rank unknown

    @property
    def rank(self) -> Optional[int]:
        return None if self.shape is None else len(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _info_from_value_info(vi: onnx.ValueInfoProto) -> TensorInfo:
    t = vi.type.tensor_type
    dtype = t.elem_type or None
    if not t.HasField("shape"):
        return TensorInfo(dtype, None)
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
    return TensorInfo(dtype, dims)


def infer_infos(model: onnx.ModelProto) -> Dict[str, TensorInfo]:
    """Static type/shape knowledge of every tensor, from the model plus ONNX shape inference."""
    infos: Dict[str, TensorInfo] = {}
    graph = model.graph
    for init in graph.initializer:
        infos[init.name] = TensorInfo(init.data_type, tuple(init.dims))
    try:
        inferred = onnx.shape_inference.infer_shapes(_without_weights(model), strict_mode=False, data_prop=True)
        value_infos = _value_infos(inferred.graph)
    except Exception:
        value_infos = _value_infos(graph)
    for vi in value_infos:
        info = _info_from_value_info(vi)
        old = infos.get(vi.name)
        if old is None or old.shape is None:
            infos[vi.name] = info
    for node in graph.node:  # Constant nodes: exact shapes from their values
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    infos[node.output[0]] = TensorInfo(attr.t.data_type, tuple(attr.t.dims))
    return infos


def _value_infos(graph) -> list:
    """Value infos of `graph` and of every body nested in it (control-flow rules need the shapes
    of the tensors inside branches; ONNX names are unique across scopes)."""
    from .graph import subgraphs

    found = list(graph.value_info) + list(graph.output) + list(graph.input)
    for node in graph.node:
        for body in subgraphs(node):
            found += _value_infos(body)
    return found


def infer_body_infos(body, model_opsets, infos: Dict[str, TensorInfo], inputs: Dict[str, TensorInfo]) -> Dict[str, TensorInfo]:
    """Shapes inside a control-flow body when its declared inputs say too little (a Loop body's
    carried values are often declared without a shape): shape inference on the body alone, with
    `inputs` standing for its inputs and the outer tensors it reads typed from `infos`."""
    from .graph import outer_reads

    declared = [make_value_info(name, info) for name, info in inputs.items()]
    outer = [make_value_info(name, infos[name]) for name in sorted(outer_reads(body))
             if name not in inputs and infos.get(name) is not None and infos[name].dtype]
    graph = helper.make_graph(list(body.node), "body", declared + outer, list(body.output), list(body.initializer))
    model = helper.make_model(graph, opset_imports=list(model_opsets))
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:
        return {}
    return {vi.name: _info_from_value_info(vi) for vi in _value_infos(inferred.graph)}


_SMALL_TENSOR = 1024  # elements; kept as values: data propagation of shapes may need them


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for shape inference with large floating-point weights turned into typed graph
    inputs: serialising 100 MB of weights costs more than the inference itself, and only their
    shapes matter (small and integer tensors stay, for data propagation)."""
    return _light_copy(model)[0]


def _light_copy(model: onnx.ModelProto):
    """(copy without its large float weights, names of the weights made graph inputs). Nodes come
    in topological order: shape inference gives up on a graph whose file order is not one.
    Initializers that are graph inputs already (overridable) stay inputs, without their default."""
    from .graph import topological

    light = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(light, field, getattr(model, field))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = model.graph
    inputs = {i.name for i in graph.input}
    small, stubs, moved = [], [], []
    for init in graph.initializer:
        count = 1
        for d in init.dims:
            count *= d
        if count <= _SMALL_TENSOR or init.data_type not in _FLOAT_TYPES:
            small.append(init)
            continue
        moved.append(init.name)
        if init.name not in inputs:
            stubs.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    light.graph.CopyFrom(helper.make_graph(topological(graph), graph.name, list(graph.input) + stubs,
                                           list(graph.output), small, value_info=list(graph.value_info)))
    return light, moved


_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def probe_infos(model: onnx.ModelProto, names: Iterable[str], input_shapes=None) -> Dict[str, TensorInfo]:
    """Run the model with `names` exposed at two batch (and, when free, spatial) sizes and keep the
    dims that agree as ints; the rest become None. Used only for tensors shape inference lost."""
    import onnxruntime as ort

    names = list(dict.fromkeys(names))
    if not names:
        return {}
    graph_inputs = _real_inputs(model)
    # The large weights are fed as inputs rather than copied into the probe model and serialised
    # with it: the probe then costs one copy of the weights (the arrays), not three.
    probe, moved = _light_copy(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # a failed probe is expected for fixed-size models: quiet
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del probe
    moved = set(moved)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in moved}
    runs = []
    for variant in (0, 1):
        feeds = dict(weights)
        for vi in graph_inputs:
            feeds[vi.name] = _probe_array(vi, variant, input_shapes)
        try:
            values = session.run(names, feeds)
        except Exception:
            if variant == 1:
                break
            raise
        runs.append(values)
    out = {}
    for i, name in enumerate(names):
        arrays = [r[i] for r in runs]
        first = arrays[0]
        dims = []
        for axis in range(first.ndim):
            sizes = {a.shape[axis] for a in arrays if a.ndim == first.ndim}
            if len(runs) > 1 and len(sizes) == 1:
                dims.append(int(first.shape[axis]))
            elif len(runs) > 1:  # dims that vary together share one symbol
                dims.append("probe_" + "_".join(str(a.shape[axis]) for a in arrays))
            else:
                dims.append(None)
        out[name] = TensorInfo(helper.np_dtype_to_tensor_dtype(first.dtype), tuple(dims))
    return out


def _real_inputs(model):
    inits = {i.name for i in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def _probe_array(vi, variant: int, input_shapes=None):
    info = _info_from_value_info(vi)
    np_dtype = helper.tensor_dtype_to_np_dtype(info.dtype or TensorProto.FLOAT)
    if input_shapes and vi.name in input_shapes:
        shape = list(input_shapes[vi.name])
    else:
        shape = []
        for axis, d in enumerate(info.shape or ()):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif axis == 0:
                shape.append(1 + variant)  # batch
            else:
                shape.append(64 + 32 * variant)  # spatial or sequence
    if variant == 1 and input_shapes and vi.name in input_shapes and shape:
        shape[0] = shape[0] + 1
    rng = np.random.default_rng(variant)
    if np.issubdtype(np_dtype, np.floating):
        return rng.standard_normal(shape).astype(np_dtype)
    if np_dtype == np.bool_:
        return np.ones(shape, dtype=np.bool_)
    return np.zeros(shape, dtype=np_dtype)


def make_value_info(name: str, info: TensorInfo, symbol_prefix: str = None) -> onnx.ValueInfoProto:
    """A typed ValueInfo for a new graph input/output; unknown dims get symbolic names
    (the checker's full check wants a shape field even when nothing is fixed)."""
    dtype = info.dtype or TensorProto.FLOAT
    if info.shape is None:
        return helper.make_tensor_value_info(name, dtype, None)
    prefix = symbol_prefix or name.replace("/", "_")
    dims = [d if isinstance(d, (int, str)) else f"{prefix}_d{i}" for i, d in enumerate(info.shape)]
    return helper.make_tensor_value_info(name, dtype, dims)
