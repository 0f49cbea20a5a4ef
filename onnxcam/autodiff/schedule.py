"""Node-order hints that let ONNX Runtime free forward activations early (issue 10: peak memory).

The backward pass keeps from the forward pass what its rules read: Relu's and Clip's masks
(`Y > 0`, 1 byte per element), Shape(X) for a pooling adjoint, MaxPool's window masks. Computed
right after their forward tensor, those are small and the float tensor dies with its forward
consumers; computed late, inside the backward pass, they keep every float activation alive
through the forward pass: at batch 8 that was most of the memory above plain inference.

When they run is ONNX Runtime's choice, and its default execution order (every binding uses it:
C++, Python, Node, web) is a reverse depth-first search from the graph's leaf nodes that enters
a node's input producers highest node index first (GraphViewer: Graph::ReverseDFSFrom with
NodeCompare), after graph transformations that give the nodes they create (NCHWc convolutions,
layout reorders) new, higher indices. The first input explored is laid out first, whole. The
backward pass of a chain then reaches the forward pass's end through its gradient input before
any mask: every mask came after the whole forward pass.

So this pass gives each backward node's inputs the order of their earliest forward-computable
work: an input whose subtree holds a mask for an earlier forward tensor is explored first. A
node's order among its inputs is set with a pin per input: `Reshape(t, [0, ..., 0])` (a view of
`t`, no copy in ONNX Runtime: the kernel aliases its input; 0 keeps a dimension), placed just
before the node, in the order wanted, so that the pin of the input to explore first has the
highest index whatever the transformations did to the producers. Leaf nodes (no consumers) are
moved to the end of the list the same way, the one whose work starts earliest last. Values are
unchanged; a runtime that orders nodes otherwise ignores the hints.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import captures

PIN_PREFIX = "onnxcam/pin"


def order_for_depth_first(graph: onnx.GraphProto, first_new: int, rank_of: Callable[[str], Optional[int]]) -> int:
    """Pin the inputs of onnxcam's nodes (from index `first_new` on) so that ONNX Runtime's
    default order computes forward-only work (masks, shapes) right after the forward tensors it
    reads. `rank_of(tensor)` gives a tensor's rank or None (then the pin reads Shape(t) instead
    of a constant). Returns the number of pins added."""
    nodes = list(graph.node)
    constant = {t.name for t in graph.initializer}
    position: Dict[str, float] = {i.name: -1 for i in graph.input}
    for i, node in enumerate(nodes[:first_new]):
        for name in node.output:
            position[name] = i
    # at[t]: the forward position after which t can be computed; key[t]: the earliest such
    # position among the nodes t's computation needs that read a forward tensor (inf: none).
    at: Dict[str, float] = dict(position)
    key: Dict[str, float] = {}
    for node in nodes[first_new:]:
        reads = [r for r in list(node.input) + sorted(captures(node)) if r and r not in constant]
        if not reads:
            constant.update(o for o in node.output if o)
            continue
        ready = max(at.get(r, -1) for r in reads)
        earliest = ready if any(position.get(r, -1) >= 0 for r in reads) else math.inf
        earliest = min([earliest] + [key.get(r, math.inf) for r in reads])
        for name in node.output:
            at[name], key[name] = ready, earliest

    rank = _ranks(nodes[first_new:], rank_of)
    producer = {name: node for node in nodes for name in node.output}

    def pinnable(tensor: str) -> bool:  # Reshape takes tensors: not sequences, maps or optionals
        made_by = producer.get(tensor)
        return rank(tensor) is not None or made_by is None or not made_by.op_type.startswith(_MAYBE_NOT_A_TENSOR)

    zeros: Dict[int, str] = {}
    pins = 0
    reordered: List[onnx.NodeProto] = nodes[:first_new]
    for node in nodes[first_new:]:
        if node.output:
            wanted = _exploration_order(node, constant, key, at)
            if wanted and all(pinnable(t) for t in wanted):
                for tensor in reversed(wanted):  # the input to explore first gets the highest index
                    pin = f"{tensor}__pin{pins}"
                    if rank(tensor) is None:
                        shape = f"{pin}_shape"
                        reordered.append(helper.make_node("Shape", [tensor], [shape], name=f"{PIN_PREFIX}_shape_{pins}"))
                    else:
                        shape = zeros.get(rank(tensor))
                        if shape is None:
                            shape = zeros[rank(tensor)] = f"{PIN_PREFIX}_zeros_{rank(tensor)}"
                            graph.initializer.append(numpy_helper.from_array(np.zeros(rank(tensor), np.int64), shape))
                    reordered.append(helper.make_node("Reshape", [tensor, shape], [pin], name=f"{PIN_PREFIX}_{pins}"))
                    for i, name in enumerate(node.input):
                        if name == tensor:
                            node.input[i] = pin
                    pins += 1
        reordered.append(node)
    # Leaves: the one whose work starts earliest goes last (explored first).
    consumed = {r for node in reordered for r in list(node.input) + sorted(captures(node)) if r}
    leaves = [n for n in reordered[first_new:] if n.output and not any(o in consumed for o in n.output)]
    leaf_ids = {id(n) for n in leaves}
    leaves.sort(key=lambda n: -min(key.get(o, math.inf) for o in n.output))  # stable: ties keep their order
    reordered = [n for n in reordered if id(n) not in leaf_ids] + leaves
    del graph.node[:]
    graph.node.extend(reordered)
    return pins


def _exploration_order(node: onnx.NodeProto, constant, key, at) -> List[str]:
    """The non-constant inputs of `node`, earliest work first, then (ties) the one that can be
    finished earliest (Shape(X) before a gradient whose subtree also starts at X), when that order
    matters (they differ); [] otherwise."""
    seen: List[str] = []
    for name in node.input:
        if name and name not in constant and name not in seen:
            seen.append(name)
    def earliest(t):
        return key.get(t, math.inf), at.get(t, math.inf)
    if len({earliest(t) for t in seen}) < 2 or min(key.get(t, math.inf) for t in seen) == math.inf:
        return []
    return sorted(seen, key=earliest)


_MAYBE_NOT_A_TENSOR = ("Sequence", "SplitToSequence", "Optional", "Loop", "If", "Scan", "ZipMap")

# Ops whose output has the rank of their broadcast inputs (the emitter records no shape for most
# of the masks and gradients it makes).
_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Where", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal",
                 "And", "Or", "Not", "Xor", "Sum", "Max", "Min", "Relu", "Abs", "Neg", "Sigmoid", "Tanh", "Exp",
                 "Cast", "Identity", "Clip", "Sqrt", "Reciprocal", "Pow"}


def _ranks(nodes, rank_of) -> Callable[[str], Optional[int]]:
    """rank_of, completed along broadcasting ops."""
    known: Dict[str, Optional[int]] = {}

    def rank(tensor: str) -> Optional[int]:
        if tensor not in known:
            known[tensor] = rank_of(tensor)
        return known[tensor]

    for node in nodes:
        if node.op_type in _BROADCASTING and node.output and rank(node.output[0]) is None:
            inputs = [rank(i) for i in node.input if i]
            if inputs and None not in inputs:
                known[node.output[0]] = max(inputs)
        elif node.op_type == "Shape" and node.output:
            known[node.output[0]] = 1
    return rank
