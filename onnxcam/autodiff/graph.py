"""Facts about a graph's wiring that the walker and the augmenter both need: a topological order,
the outer-scope names that control-flow bodies read, and the initializers a graph input overrides.

A node with subgraphs (If, Loop, Scan) depends not only on its declared inputs but on every
outer name its bodies read: a branch may use a tensor of the main graph without declaring it.
Missing those reads loses gradient contributions silently, so every dependency question asks
`node_reads` here rather than `node.input`.
"""

from __future__ import annotations

import heapq
from typing import Dict, Iterable, List, Set

import onnx


def subgraphs(node: onnx.NodeProto) -> List[onnx.GraphProto]:
    """The bodies of a control-flow node (If's branches, Loop's and Scan's body), in attribute order."""
    found = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found.extend(attr.graphs)
    return found


def outer_reads(graph: onnx.GraphProto) -> Set[str]:
    """Names `graph` (a subgraph) reads from enclosing scopes: read by a node, at any nesting
    depth, or listed as an output, and not defined inside it."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    reads: Set[str] = set()
    for node in graph.node:
        defined.update(o for o in node.output if o)
        reads.update(i for i in node.input if i)
        for body in subgraphs(node):
            reads |= outer_reads(body)
    reads.update(o.name for o in graph.output)
    return reads - defined


def captures(node: onnx.NodeProto) -> Set[str]:
    """Outer-scope names the subgraphs of `node` read (empty for ordinary nodes)."""
    names: Set[str] = set()
    for body in subgraphs(node):
        names |= outer_reads(body)
    return names


def node_reads(node: onnx.NodeProto) -> List[str]:
    """Every tensor `node` depends on: its inputs, then (sorted) its bodies' outer-scope captures."""
    declared = [i for i in node.input if i]
    extra = sorted(captures(node) - set(declared))
    return declared + extra


def topological(graph: onnx.GraphProto) -> List[onnx.NodeProto]:
    """The graph's nodes in a topological order (ONNX requires one; some exporters don't honour it).

    Kahn's algorithm with a count of unmet producers per node: linear in the graph's size (a
    heap keeps the file's order among the nodes that are ready, so an ordered file comes back
    unchanged). Dependencies include outer names read by subgraphs. Names nothing in the graph
    produces (graph inputs, initializers, or a malformed reference) are not waited for; nodes
    caught in a cycle are appended in the file's order."""
    ordered, cyclic = _kahn(graph)
    return ordered + cyclic  # a cycle: keep the file's order for what is left


def nodes_in_cycles(graph: onnx.GraphProto) -> List[onnx.NodeProto]:
    """The nodes on a cycle (or between two), in file order: what no topological order can place,
    less the nodes merely fed by a cycle (peeled off from the sinks up, linearly)."""
    stuck = _kahn(graph)[1]
    producer = {out: i for i, node in enumerate(stuck) for out in node.output if out}
    readers = [0] * len(stuck)  # how many stuck nodes read each stuck node's outputs
    feeds: List[List[int]] = [[] for _ in stuck]
    for i, node in enumerate(stuck):
        for name in set(node_reads(node)):
            j = producer.get(name)
            if j is not None:
                readers[j] += 1
                feeds[i].append(j)
    sinks = [i for i, count in enumerate(readers) if count == 0]
    removed = [False] * len(stuck)
    while sinks:
        i = sinks.pop()
        removed[i] = True
        for j in feeds[i]:
            readers[j] -= 1
            if readers[j] == 0:
                sinks.append(j)
    return [node for i, node in enumerate(stuck) if not removed[i]]


def _kahn(graph: onnx.GraphProto):
    nodes = list(graph.node)
    producer: Dict[str, int] = {}
    for index, node in enumerate(nodes):
        for out in node.output:
            if out:
                producer.setdefault(out, index)
    waiting = [0] * len(nodes)
    consumers: List[List[int]] = [[] for _ in nodes]
    for index, node in enumerate(nodes):
        for name in set(node_reads(node)):
            source = producer.get(name)
            if source is not None and source != index:
                waiting[index] += 1
                consumers[source].append(index)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    ordered, placed = [], [False] * len(nodes)
    while ready:
        index = heapq.heappop(ready)
        ordered.append(nodes[index])
        placed[index] = True
        for consumer in consumers[index]:
            waiting[consumer] -= 1
            if waiting[consumer] == 0:
                heapq.heappush(ready, consumer)
    return ordered, [node for index, node in enumerate(nodes) if not placed[index]]


def overridable_initializers(graph: onnx.GraphProto) -> Set[str]:
    """Initializers that are also graph inputs (torch's keep_initializers_as_inputs): their stored
    value is only a default, a caller may feed another at run time, so they are no constants."""
    inputs = {i.name for i in graph.input}
    return {t.name for t in graph.initializer if t.name in inputs}


def ancestors(outputs, producers: Dict[str, onnx.NodeProto], stop=frozenset()) -> Set[str]:
    """The tensors `outputs` depend on (themselves included), through what nodes and their bodies
    read; not looking past the `stop` tensors."""
    seen, stack = set(outputs), list(outputs)
    while stack:
        name = stack.pop()
        node = None if name in stop else producers.get(name)
        if node is None:
            continue
        for i in node_reads(node):
            if i not in seen:
                seen.add(i)
                stack.append(i)
    return seen


def producers_of(nodes: Iterable[onnx.NodeProto]) -> Dict[str, onnx.NodeProto]:
    return {out: node for node in nodes for out in node.output if out}


def share_duplicate_captures(graph: onnx.GraphProto) -> int:
    """Give constants that a subgraph reads from the outer scope one name per value.

    ONNX Runtime's constant sharing merges equal constants (initializers, and Constant nodes,
    which it turns into initializers) when a session starts, but it cannot rename a name that a
    Loop/If body captures: it skips the merge and warns ("Implicit input name ... cannot be safely
    updated") on every session. Our sampling and re-run Loops capture the weights, and torch's
    exporter reads shared weights (e.g. equal zero biases) through Identity nodes: the readers of
    such an Identity read the constant itself here. (Merging equal-valued constants too made a
    Loop-based model on EfficientNet-Lite0 unloadable; not done.)
    Graph inputs (overridable initializers) and outputs keep their names. Returns how many names
    were merged away."""
    captured = set()
    for node in graph.node:
        if node.attribute:
            captured |= captures(node)
    fixed = {i.name for i in graph.input} | {o.name for o in graph.output}
    values = constant_tensors(graph)
    renames: Dict[str, str] = {}
    for alias, source in _constant_aliases(graph, values, fixed).items():
        if alias in captured:
            renames[alias] = renames.get(source, source)
    if not renames:
        return 0
    _rename_reads(graph, renames)
    kept = [init for init in graph.initializer if init.name not in renames]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = [n for n in graph.node if not (n.op_type in ("Constant", "Identity") and n.output[0] in renames)]
    # A kept Constant node may now be read by nodes before it: it has no inputs, so it goes first.
    targets = set(renames.values())
    nodes = ([n for n in nodes if n.op_type == "Constant" and n.output[0] in targets]
             + [n for n in nodes if not (n.op_type == "Constant" and n.output[0] in targets)])
    del graph.node[:]
    graph.node.extend(nodes)
    infos = [info for info in graph.value_info if info.name not in renames]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return len(renames)


def _constant_aliases(graph: onnx.GraphProto, values, fixed: Set[str]) -> Dict[str, str]:
    """Outputs of Identity nodes (chains included) whose input is a constant: output -> constant."""
    aliases: Dict[str, str] = {}
    for node in topological(graph):
        if node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.output[0] not in fixed:
            source = aliases.get(node.input[0], node.input[0])
            if source in values:
                aliases[node.output[0]] = source
    return aliases


def constant_tensors(graph: onnx.GraphProto) -> Dict[str, onnx.TensorProto]:
    """The graph's constant tensors by name: initializers and Constant nodes' tensor values, minus
    graph inputs (an overridable initializer may change at run time: not a constant)."""
    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    constants[node.output[0]] = attr.t
    inputs = {i.name for i in graph.input}
    return {name: t for name, t in constants.items() if name not in inputs}


def _rename_reads(graph: onnx.GraphProto, renames: Dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for body in subgraphs(node):
            _rename_reads(body, renames)
