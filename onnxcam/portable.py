"""Portable augmented models: a graph pattern that runtimes other than ONNX Runtime get wrong,
rewritten into an equivalent graph they get right.

The pattern: one constant weight read by both a Conv and a ConvTranspose. onnxcam writes it for
the strided convolutions between the explained layer and the score, since the gradient of
Y = Conv(X, W) with respect to X is ConvTranspose(dY, W) with the same W (stride-1 convolutions
are differentiated by a Conv of a transposed, flipped copy of W that the graph computes, which
OpenVINO computes correctly: tools/check_openvino.py); ONNX Runtime and the
ONNX reference evaluator compute it exactly. OpenVINO 2026.4's CPU plugin (reading the ONNX file
directly; ONNX Runtime's OpenVINO execution provider is built on it) computes one of the two nodes with a
wrong weight when the weight is square (as many output as input channels, group 1; any kernel
size): a two-node Conv -> ConvTranspose model on one 4x4x3x3 weight is off by 86 % of its largest
output, in either order, with an initializer or a Constant node, with an Identity between (it is
folded away); Grad-CAM at layer3 of a ResNet-50 moves by 0.29. With its own copy of the weight the
ConvTranspose agrees to 2e-7. Non-square and depthwise weights (EfficientNet's 1x1 and depthwise
convolutions), two Convs or two ConvTransposes sharing a weight were computed correctly; since
the cause is OpenVINO's, every shared weight is separated, not only the square ones.

`separate_conv_weights` gives the ConvTranspose nodes one copy of each such weight. The cost is
memory: one more copy of every convolution weight between the explained layer and the score
(`shared_conv_weights` lists them with their sizes; nothing when the layer is the last feature
map, as in the default Grad-CAM of a classifier). ONNX Runtime's results are unchanged, bit for bit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import onnx
from onnx import helper

from .autodiff.graph import constant_tensors

COPY_SUFFIX = "/portable_copy"
_FORWARD, _TRANSPOSED = "Conv", "ConvTranspose"


@dataclass(frozen=True)
class SharedWeight:
    """A constant read as the weight of both Conv and ConvTranspose nodes."""

    name: str
    nbytes: int
    conv_nodes: Tuple[str, ...]
    conv_transpose_nodes: Tuple[str, ...]


def _nbytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        for entry in tensor.external_data:
            if entry.key == "length":
                return int(entry.value)
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def shared_conv_weights(model: onnx.ModelProto) -> List[SharedWeight]:
    """The constants the main graph reads as weight (input 1) of a Conv and of a ConvTranspose."""
    constants = constant_tensors(model.graph)
    readers: Dict[str, Dict[str, List[str]]] = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type in (_FORWARD, _TRANSPOSED) and node.domain in ("", "ai.onnx") and len(node.input) > 1:
            if node.input[1] in constants:
                by_op = readers.setdefault(node.input[1], {_FORWARD: [], _TRANSPOSED: []})
                by_op[node.op_type].append(node.name or f"#{index} {node.op_type}")
    return [SharedWeight(name, _nbytes(constants[name]), tuple(ops[_FORWARD]), tuple(ops[_TRANSPOSED]))
            for name, ops in readers.items() if ops[_FORWARD] and ops[_TRANSPOSED]]


def separate_conv_weights(model: onnx.ModelProto, inplace: bool = False) -> onnx.ModelProto:
    """`model` with every ConvTranspose reading its own copy of a weight it shared with a Conv
    (one copy per weight, shared by those ConvTransposes). Outputs, opset and IR version unchanged."""
    if not inplace:
        model = copy.deepcopy(model)
    shared = {weight.name for weight in shared_conv_weights(model)}
    if not shared:
        return model
    graph = model.graph
    taken = {init.name for init in graph.initializer} | {i.name for i in graph.input}
    taken |= {out for node in graph.node for out in node.output}
    copies: Dict[str, str] = {}
    for name in sorted(shared):
        copy_name, k = name + COPY_SUFFIX, 1
        while copy_name in taken:
            k += 1
            copy_name = f"{name}{COPY_SUFFIX}{k}"
        taken.add(copy_name)
        copies[name] = copy_name

    initializers = {init.name: init for init in graph.initializer}
    new_constant_nodes = []
    for name, copy_name in copies.items():
        if name in initializers:
            duplicate = graph.initializer.add()
            duplicate.CopyFrom(initializers[name])
            duplicate.name = copy_name
        else:
            tensor = constant_tensors(graph)[name]
            new_constant_nodes.append(helper.make_node("Constant", [], [copy_name], value=tensor,
                                                      name=copy_name.replace("/", "_")))
    for node in graph.node:
        if node.op_type == _TRANSPOSED and len(node.input) > 1 and node.input[1] in copies:
            node.input[1] = copies[node.input[1]]
    if new_constant_nodes:  # Constant nodes first: the graph stays topologically sorted
        nodes = new_constant_nodes + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return model
