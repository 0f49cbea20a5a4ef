"""One analysis of a graph, built once per augment and handed down.

Everything the augmenter and the walker ask of the *original* graph lives here: nodes in a
topological order, producers and consumers, tensor infos (shape inference, then probing with
ONNX Runtime for what inference lost, each tensor probed at most once), and the values known
before run time. Nodes onnxcam adds later are not part of it: the walker must never differentiate
its own backward nodes, and the CAM code reads forward tensors only.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import overridable_initializers, producers_of, topological
from .shapes import TensorInfo, infer_infos, probe_infos


class GraphAnalysis:
    """Producers, consumers, order, infos and constants of one model's graph."""

    def __init__(self, model: onnx.ModelProto, infos: Optional[Dict[str, TensorInfo]] = None):
        self.model = model
        graph = model.graph
        self._index(topological(graph))
        self.known: set = known_tensors(graph, self.nodes)
        self.initializers = {i.name for i in graph.initializer}
        self.infos: Dict[str, TensorInfo] = infos if infos is not None else infer_infos(model)
        self._constants = None
        self._probe_failed: set = set()

    def _index(self, nodes: List[onnx.NodeProto]) -> None:
        """`nodes` (in order) and who produces and consumes each tensor."""
        self.nodes = nodes
        self.producers: Dict[str, onnx.NodeProto] = producers_of(nodes)
        self.consumers: Dict[str, List[onnx.NodeProto]] = {}
        for node in nodes:
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.order: Dict[str, int] = {o: i for i, n in enumerate(nodes) for o in n.output if o}

    @property
    def constants(self) -> Dict[str, np.ndarray]:
        """Values known before run time (decoded lazily: see _Constants)."""
        if self._constants is None:
            self._constants = constant_values(self.model.graph, self.nodes, self.model.opset_import)
        return self._constants

    def constant_names(self) -> set:
        """Initializers and Constant-node outputs (without decoding any value). An initializer
        that is also a graph input is not one: a caller may feed another value at run time."""
        inputs = {i.name for i in self.model.graph.input}
        return (self.initializers - inputs) | {n.output[0] for n in self.nodes if n.op_type == "Constant"}

    def probe(self, names: Iterable[str], required: bool = False) -> Dict[str, TensorInfo]:
        """Measure the shapes of `names` by running the model (see shapes.probe_infos); results go
        into `infos`. Each tensor is probed at most once per analysis. With `required`, a model
        ONNX Runtime cannot run raises; otherwise what cannot be measured stays unknown."""
        wanted = [n for n in dict.fromkeys(names) if n not in self._probe_failed]
        if not wanted:
            return {}
        try:
            found = probe_infos(self.model, wanted)
        except Exception:
            self._probe_failed.update(wanted)
            if required:
                raise
            return {}
        self.infos.update(found)
        return found


def merged(known: Optional[TensorInfo], probed: TensorInfo) -> TensorInfo:
    """Probed sizes where they are numbers; where the probe saw a size vary (the batch), the symbol
    shape inference gave, so that this tensor keeps sharing it with tensors that were not probed."""
    if known is None or known.shape is None or probed.shape is None or len(known.shape) != len(probed.shape):
        return probed
    shape = tuple(p if isinstance(p, int) else (k if k is not None else p) for p, k in zip(probed.shape, known.shape))
    return TensorInfo(probed.dtype or known.dtype, shape)


# ---------------------------------------------------------------------- pieces
def known_tensors(graph, nodes) -> set:
    names = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for node in nodes:
        names.update(o for o in node.output if o)
    return names


class _Constants(dict):
    """Tensor name -> numpy value for everything known before run time. Initializers are decoded
    only when a rule asks (decoding every weight of VGG16 takes most of a second). Initializers
    that a graph input overrides are left out: the value fed at run time wins over the default."""

    def __init__(self, initializers, overridable=frozenset()):
        super().__init__()
        self._protos = {i.name: i for i in initializers
                        if i.data_location != TensorProto.EXTERNAL and i.name not in overridable}

    def __contains__(self, name):
        return dict.__contains__(self, name) or name in self._protos

    def __getitem__(self, name):
        if not dict.__contains__(self, name) and name in self._protos:
            self[name] = numpy_helper.to_array(self._protos[name])
        return dict.__getitem__(self, name)

    def get(self, name, default=None):
        return self[name] if name in self else default

    def size(self, name) -> int:
        proto = self._protos.get(name)
        if proto is not None and not dict.__contains__(self, name):
            return int(np.prod(proto.dims, dtype=np.int64))
        return int(np.asarray(self[name]).size)


def constant_values(graph, nodes, opset_imports=()) -> Dict[str, np.ndarray]:
    """Values known before run time: initializers, Constant nodes, and small integer arithmetic on
    them (Paddle and TF converters compute Slice/Reshape parameters with Constant nodes)."""
    values = _Constants(graph.initializer, overridable_initializers(graph))
    for node in nodes:
        if node.op_type == "Constant":
            attrs = {a.name: a for a in node.attribute}
            if "value" in attrs:
                values[node.output[0]] = numpy_helper.to_array(attrs["value"].t)
            elif "value_ints" in attrs:
                values[node.output[0]] = np.asarray(attrs["value_ints"].ints, np.int64)
            elif "value_int" in attrs:
                values[node.output[0]] = np.asarray(attrs["value_int"].i, np.int64)
            elif "value_floats" in attrs:
                values[node.output[0]] = np.asarray(attrs["value_floats"].floats, np.float32)
            elif "value_float" in attrs:
                values[node.output[0]] = np.asarray(attrs["value_float"].f, np.float32)
        elif node.op_type in _FOLDABLE and node.input and all(i in values for i in node.input if i):
            small = all(values.size(i) <= 64 for i in node.input if i)
            if small and node.op_type == "ConstantOfShape":  # small shape, but maybe a large tensor
                small = int(np.prod(values[node.input[0]])) <= 64
            if small:
                folded = _fold(node, values, opset_imports)
                if folded is not None:
                    values[node.output[0]] = folded
    return values


# (ConstantOfShape, Reshape, Slice, Transpose: torch's F.pad with pads computed in Python exports
# them around the pads of every TF-style "same" padding, as in EfficientNet-Lite.)
_FOLDABLE = {"Cast", "Concat", "Unsqueeze", "Squeeze", "Gather", "Add", "Sub", "Mul", "Div", "Neg", "Identity",
             "ConstantOfShape", "Reshape", "Slice", "Transpose"}


def _fold(node, values, opset_imports=()):
    """The node evaluated by onnx's reference evaluator at the model's opset (Slice, Reshape...
    changed signatures across opsets); None when it cannot be."""
    try:
        from onnx.reference import ReferenceEvaluator
        ins = [i for i in node.input]
        graph = helper.make_graph(
            [node], "fold", [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(values[i].dtype), None)
                             for i in ins if i],
            [helper.make_tensor_value_info(node.output[0], TensorProto.UNDEFINED, None)])
        opsets = {imp.domain or "": imp.version for imp in opset_imports} or {"": 13}
        evaluator = ReferenceEvaluator(graph, opsets=opsets)
        return np.asarray(evaluator.run(None, {i: values[i] for i in ins if i})[0])
    except Exception:
        return None
