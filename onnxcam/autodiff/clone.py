"""Copies of part of the forward graph, reading other tensors: the forward pass on noisy or
path samples of the input (SmoothGrad, Integrated Gradients) or on masked copies of an input or
a feature map (Score-CAM, Ablation-CAM), folded into the batch axis.

Only the nodes between the replaced tensors and the wanted outputs are copied; weights, constants
and everything upstream are shared with the original graph, so the file holds no second copy of
any weight. The copy comes with a GraphAnalysis of its own, so the walker can differentiate it
(and only it) with ``add_gradients(..., analysis=copy.analysis)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import onnx

from ..errors import UnsupportedModelError
from .analysis import GraphAnalysis
from .graph import ancestors, node_reads
from .shapes import TensorInfo


@dataclass
class ForwardCopy:
    names: Dict[str, str]  # original tensor -> its copy (every copied node output)
    analysis: GraphAnalysis  # of the copied nodes only
    replacements: Dict[str, str] = field(default_factory=dict)  # replaced tensor -> what the copy reads

    def __getitem__(self, original: str) -> str:
        """The copy of `original`: a copied node's output, the replacement of a replaced tensor
        (a target layer that is the image input itself is the sample), or `original` itself when
        the copy reads it unchanged."""
        return self.names.get(original) or self.replacements.get(original, original)


def clone_forward(analysis: GraphAnalysis, emit, replacements: Mapping[str, str], outputs: Sequence[str],
                  tag: str = "copy", rename_dims: Optional[Mapping[str, str]] = None) -> ForwardCopy:
    """Emit (through `emit`) copies of the forward nodes that depend on a replaced tensor and feed
    one of `outputs`, each reading `replacements[t]` in place of t. The replacements must already
    have infos in `emit` (their shapes may differ in the batch axis: S*N samples, K masks).

    `rename_dims` maps symbolic dims of the original infos to the copy's (the batch symbol "N" of
    the original becomes "N_samples" in the copy, so rules that compare symbols never equate the
    two batches). A model whose batch dim is a fixed number cannot hold a bigger batch: refused."""
    rename_dims = dict(rename_dims or {})
    affected = set(replacements)
    for node in analysis.nodes:
        if any(i in affected for i in node_reads(node)):
            affected.update(o for o in node.output if o)
    feeding = ancestors(outputs, analysis.producers, stop=set(replacements))
    missing = [o for o in outputs if o not in affected]
    if missing:
        raise UnsupportedModelError(f"tensor(s) {', '.join(map(repr, missing))} do not depend on "
                                    f"{', '.join(map(repr, replacements))}: nothing to re-run")
    names: Dict[str, str] = dict(replacements)
    copied: List[onnx.NodeProto] = []
    for node in analysis.nodes:
        if not any(o in affected and o in feeding for o in node.output):
            continue
        if all(o in replacements for o in node.output if o):
            continue  # the producer of a replaced tensor: the replacement stands for its output
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise UnsupportedModelError(f"node {node.name or node.op_type!r} ({node.op_type}) has a subgraph; "
                                        "onnxcam cannot re-run control flow on sampled or masked copies")
        outs = []
        for o in node.output:
            if o:
                names[o] = emit.fresh(f"{tag}/{o.split('/')[-1] or o}")
                emit.infos[names[o]] = _renamed(analysis.infos.get(o), rename_dims)
            outs.append(names.get(o, ""))
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        del copy.input[:]
        copy.input.extend(names.get(i, i) for i in node.input)
        del copy.output[:]
        copy.output.extend(outs)
        copy.name = emit.fresh(f"{tag}/{node.name or node.op_type}")
        emit.nodes.append(copy)
        copied.append(copy)
    sub = _sub_analysis(analysis, copied, names, rename_dims)
    return ForwardCopy({k: v for k, v in names.items() if k not in replacements}, sub, dict(replacements))


def _renamed(info: Optional[TensorInfo], rename_dims) -> TensorInfo:
    if info is None or info.shape is None:
        return TensorInfo(info.dtype if info else None, None)
    return TensorInfo(info.dtype, tuple(rename_dims.get(d, d) if isinstance(d, str) else d for d in info.shape))


class _CopyAnalysis(GraphAnalysis):
    """A GraphAnalysis of copied nodes: shares the original's infos and constants, and measures
    a copied tensor's shape by probing its original."""

    def __init__(self, parent: GraphAnalysis, nodes, names, rename_dims):
        self.model = parent.model
        self._index(nodes)
        self.known = parent.known | set(names.values())
        self.initializers = parent.initializers
        self.infos = parent.infos
        self._constants = parent.constants
        self._probe_failed = set()
        self._parent = parent
        self.copied_from = {copy: original for original, copy in names.items()}  # read by _measure_fixed_sizes too
        self._rename_dims = rename_dims

    def probe(self, names, required: bool = False):
        originals = {n: self.copied_from[n] for n in names if n in self.copied_from}
        found = self._parent.probe(list(originals.values()), required=required)
        result = {}
        for copy, original in originals.items():
            if original in found:
                result[copy] = _renamed(found[original], self._rename_dims)
        self.infos.update(result)
        return result


def _sub_analysis(parent, nodes, names, rename_dims) -> GraphAnalysis:
    return _CopyAnalysis(parent, nodes, names, rename_dims)


def fixed_batch(image_shape) -> Optional[int]:
    """The image input's batch size when it is a fixed number (such models cannot be tiled)."""
    first = image_shape[0] if image_shape else None
    return first if isinstance(first, int) and first > 0 else None


def tile_batch(emit, x: str, times: int) -> str:
    """[N, ...] -> [times*N, ...] ordered sample-major (all N images of sample 0, then sample 1...)."""
    rank = emit.rank(x)
    return emit.op("Tile", x, emit.ints([times] + [1] * (rank - 1)))


