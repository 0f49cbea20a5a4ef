"""Which axis of a tensor holds channels: axes followed through the ops that made it.

A 4-D target can be NCHW (convolutions), NHWC (Keras/TF exports, timm's Swin after
PatchMerging) or something else; reading the layout off the nearest Transpose is wrong as soon as
the exporter goes through 5-D or 6-D tensors (PatchMerging: [N, H, W, C] -> [N, H/2, 2, W/2, 2, C]
-> Transpose -> [N, H/2, W/2, 2, 2, C] -> [N, H/2, W/2, 4C]). Instead every axis is described by
its *atoms*: (size, kind) pieces, kind "B" (batch), "C" (channels) or "S" (spatial / tokens).
Anchors give the kinds (a Conv's output is [B, C, S, S], a LayerNorm's last axis is C, the image
has its own layout), Transposes permute the axes, Reshapes split and merge atoms by their sizes
(static shapes from the analysis, measured by a probe where inference lost them), and ops that keep
axes keep them. An axis made of several atoms is channels if any atom is.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

Size = Optional[Tuple[int, int]]  # (size at probe run 0, at probe run 1); static dims repeat
Atom = Tuple[Size, str]
Axis = Tuple[Atom, ...]

# A 4-D (or 3-D, 5-D) tensor these ops make is channels-first.
CHANNELS_FIRST_OPS = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                      "LpPool", "BatchNormalization", "InstanceNormalization", "Resize", "DepthToSpace",
                      "SpaceToDepth", "GroupNormalization", "ConvInteger", "QLinearConv"}
# Ops whose output axes are their (first non-constant, same-rank) input's axes.
AXIS_KEEPING_OPS = {"Identity", "Cast", "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu",
                    "HardSigmoid", "HardSwish", "Gelu", "Erf", "Softplus", "Softsign", "Mish", "Clip", "Abs", "Neg",
                    "Exp", "Log", "Sqrt", "Reciprocal", "Dropout", "Softmax", "LogSoftmax", "Slice", "Pad", "Concat",
                    "Split", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Sum", "Mean", "Expand",
                    "Tile", "Round", "Floor", "Ceil", "Sign", "Sin", "Cos", "ThresholdedRelu", "Shrink"}
RESHAPING_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
_MAX_DEPTH = 400  # a chain longer than this is given up (the caller falls back)


class AxisTracker:
    """Axis kinds of tensors of one analysed graph (memoised; probes missing shapes once)."""

    def __init__(self, analysis, image=None):
        self.analysis = analysis
        self.image = image
        self._memo: Dict[str, Optional[List[Axis]]] = {}
        self._missing: set = set()
        self._probed: set = set()
        self._constants = None

    @property
    def constant_names(self) -> set:
        if self._constants is None:
            self._constants = self.analysis.constant_names()
        return self._constants

    def kinds(self, tensor: str) -> Optional[List[str]]:
        """Per-axis "B", "C", "S" or "1" (an empty axis), or None when the chain cannot be followed."""
        axes = self._axes(tensor, 0)
        if axes is None and self._missing and tensor not in self._probed:
            self._probed.add(tensor)  # shape inference lost sizes on the way: measure them all, once
            self.analysis.probe(self._unmeasured_upstream(tensor))
            self._memo.clear()
            axes = self._axes(tensor, 0)
        return None if axes is None else [summary(axis) for axis in axes]

    def layout(self, tensor: str) -> Optional[str]:
        """"NCHW" or "NHWC" for a 4-D tensor whose channel axis is found, else None."""
        kinds = self.kinds(tensor)
        if kinds is None or len(kinds) != 4:
            return None
        spatial = {"S", "1"}
        if kinds[1] == "C" and kinds[2] in spatial and kinds[3] in spatial:
            return "NCHW"
        if kinds[3] == "C" and kinds[1] in spatial and kinds[2] in spatial:
            return "NHWC"
        return None

    # ------------------------------------------------------------------ the walk
    def _axes(self, tensor: str, depth: int) -> Optional[List[Axis]]:
        if tensor in self._memo:
            return self._memo[tensor]
        self._memo[tensor] = None  # cycles and re-entry: unknown
        found = self._compute(tensor, depth) if depth < _MAX_DEPTH else None
        self._memo[tensor] = found
        return found

    def _compute(self, tensor: str, depth: int) -> Optional[List[Axis]]:
        image = self.image
        if image is not None and tensor == image.name:
            letters = {"NCHW": "BCSS", "NHWC": "BSSC"}.get(image.layout)
            return None if letters is None else [((None, k),) for k in letters]
        node = self.analysis.producers.get(tensor)
        rank = self._rank(tensor)
        if node is None or rank is None:
            return None
        op = node.op_type
        if op in CHANNELS_FIRST_OPS:
            return [((None, "B"),), ((None, "C"),)] + [((None, "S"),)] * (rank - 2)
        if op == "LayerNormalization":
            axis = _attr(node, "axis", -1)
            if axis not in (-1, rank - 1):
                return None
            inner = self._axes(node.input[0], depth + 1)
            base = inner[:-1] if inner is not None and len(inner) == rank else default_token_axes(rank)[:-1]
            return list(base) + [((None, "C"),)]
        if op in ("MatMul", "Gemm"):
            return self._matmul(node, rank, depth)
        if op == "Transpose":
            inner = self._axes(node.input[0], depth + 1)
            perm = _attr(node, "perm", None) or list(reversed(range(rank)))
            return None if inner is None or len(inner) != len(perm) else [inner[p] for p in perm]
        if op in RESHAPING_OPS:
            inner = self._axes(node.input[0], depth + 1)
            if inner is None:
                return None
            before, after = self._sizes(node.input[0]), self._sizes(tensor)
            if before is None or after is None:
                return None
            return regroup(inner, before, after)
        if op == "Gather":
            return self._gather(node, rank, depth)
        if op in AXIS_KEEPING_OPS or (op.startswith("Reduce") and _attr(node, "keepdims", 1) == 1):
            source = self._main_input(node, rank)
            return None if source is None else self._axes(source, depth + 1)
        return None

    def _matmul(self, node, rank, depth):
        """Linear layers (a constant weight): the last axis is channels, the rest is the input's.
        Two activations (attention): rows from the first, columns from the second."""
        constants = self.constant_names
        a, b = node.input[0], node.input[1]
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            return None
        left = self._axes(a, depth + 1) if a not in constants else None
        if b in constants:
            if left is None or len(left) != rank:
                return None
            return list(left[:-1]) + [((None, "C"),)]
        right = self._axes(b, depth + 1)
        if left is None or right is None or len(left) != rank or len(right) != rank:
            return None
        return list(left[:-1]) + [right[-1]]

    def _gather(self, node, rank, depth):
        """A constant index picks along one axis: a scalar index drops it (q, k, v = qkv[0], ...)."""
        constants = self.analysis.constants
        if node.input[1] not in constants:
            return None
        inner = self._axes(node.input[0], depth + 1)
        if inner is None:
            return None
        axis = _attr(node, "axis", 0) % len(inner)
        index_rank = constants[node.input[1]].ndim
        kept = list(inner[:axis]) + [((None, summary(inner[axis])),)] * index_rank + list(inner[axis + 1:])
        return kept if len(kept) == rank else None

    def _main_input(self, node, rank) -> Optional[str]:
        """The input whose axes the output keeps: a non-constant one of the same rank, the most
        recently computed first (a residual x + f(x) is followed into f, nearer its anchor)."""
        constants = self.constant_names
        order = self.analysis.order
        choices = [i for i in node.input if i and i not in constants and self._rank(i) == rank]
        if not choices:
            return None
        full = [i for i in choices if self._same_shape(i, node.output[0])]
        return max(full or choices, key=lambda i: order.get(i, -1))

    # ------------------------------------------------------------------ shapes
    def _rank(self, tensor) -> Optional[int]:
        info = self.analysis.infos.get(tensor)
        if info is None or info.shape is None:
            self._missing.add(tensor)
            return None
        return len(info.shape)

    def _unmeasured_upstream(self, tensor) -> List[str]:
        """Every activation upstream of `tensor` whose sizes are not all known (one probe run)."""
        producers, constants = self.analysis.producers, self.constant_names
        seen, stack, found = {tensor}, [tensor], []
        while stack:
            name = stack.pop()
            info = self.analysis.infos.get(name)
            if info is None or info.shape is None or not all(
                    isinstance(d, int) or (isinstance(d, str) and d.startswith("probe_")) for d in info.shape):
                found.append(name)
            node = producers.get(name)
            for i in node.input if node is not None else ():
                if i and i not in seen and i not in constants and i in producers:
                    seen.add(i)
                    stack.append(i)
        return found

    def _same_shape(self, a, b) -> bool:
        sa, sb = self.analysis.infos.get(a), self.analysis.infos.get(b)
        return sa is not None and sb is not None and sa.shape is not None and sa.shape == sb.shape

    def _sizes(self, tensor) -> Optional[List[Tuple[int, int]]]:
        """Sizes at the two probe runs: a static dim repeats, a probed one reads its symbol."""
        info = self.analysis.infos.get(tensor)
        out = []
        for d in (info.shape if info is not None and info.shape is not None else [None]):
            if isinstance(d, int) and d >= 0:
                out.append((d, d))
            elif isinstance(d, str) and d.startswith("probe_"):
                parts = d.split("_")[1:]
                out.append((int(parts[0]), int(parts[-1])))
            else:
                self._missing.add(tensor)
                return None
        return out


def default_token_axes(rank: int) -> List[Axis]:
    """[B, S..., C]: what a norm over the last axis of a token tensor is taken to have."""
    return [((None, "B"),)] + [((None, "S"),)] * (rank - 2) + [((None, "C"),)]


def summary(axis: Axis) -> str:
    kinds = {kind for _, kind in axis}
    for kind in ("C", "B", "S"):
        if kind in kinds:
            return kind
    return "1"


def regroup(axes: Sequence[Axis], before, after) -> Optional[List[Axis]]:
    """Axes after a Reshape from sizes `before` to `after`: the input's atoms (sizes reconciled
    with the real ones) are dealt out to the output axes, split where an output axis takes part
    of one; None when the sizes do not line up."""
    if len(axes) != len(before):
        return None
    atoms: List[list] = []
    for axis, size in zip(axes, before):
        if size == (1, 1):
            continue
        pieces = [a for a in axis if a[0] != (1, 1)]
        if not pieces or any(a[0] is None for a in pieces) or _product([a[0] for a in pieces]) != size:
            pieces = [(size, summary(axis) if axis else "S")]
        atoms.extend([list(a) for a in pieces])
    out: List[Axis] = []
    i = 0
    for size in after:
        group = []
        need = size
        while need != (1, 1):
            if i >= len(atoms):
                return None
            have, kind = atoms[i]
            if _divides(have, need):
                group.append((have, kind))
                need = (need[0] // have[0], need[1] // have[1])
                i += 1
            elif _divides(need, have):
                group.append((need, kind))
                atoms[i] = [(have[0] // need[0], have[1] // need[1]), kind]
                need = (1, 1)
            else:
                return None
        out.append(tuple(group))
    return out if i == len(atoms) else None


def _divides(a, b) -> bool:
    return a[0] > 0 and a[1] > 0 and b[0] % a[0] == 0 and b[1] % a[1] == 0


def _product(sizes):
    p0 = p1 = 1
    for s0, s1 in sizes:
        p0, p1 = p0 * s0, p1 * s1
    return (p0, p1)


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            if a.type == a.INTS:
                return list(a.ints)
            if a.type == a.INT:
                return a.i
    return default
