"""Re-running (part of) the model inside the graph, on masked copies folded into the batch axis.

Score-CAM, Group-CAM and Ablation-CAM weigh channels by what happens to the score when the input
(or a feature map) is masked. Here the augmented model does it itself in one ``session.run``:
K variants of a tensor (K masks of the input, K ablated feature maps) are built per image and
the nodes between that tensor and the score are copied (autodiff/clone.py: the copies read the
same weights, the file holds no second copy of any weight) to run on ``chunk * N`` rows at once.

Chunks: K variants in ``ceil(K / chunk_size)`` chunks. One chunk runs inline; more run as the
body of an ONNX ``Loop`` whose iteration i builds variants ``i*chunk .. i*chunk+chunk-1`` (the
last chunk padded by repeating variant K-1, its scores dropped), so peak memory grows with
`chunk_size`, not with K. A model whose batch axis is a fixed number cannot hold chunk * N rows:
it runs one variant per iteration (chunk 1).

The score of a variant is the target's score, read the way the target defines it: for the
targets whose score is linear in the differentiated tensor T (class, segmentation, sequence:
score = sum(seed * T) + a constant such as the classifier's bias), ``sum(seed * T') + (score -
sum(seed * T))`` on the copy T', exact. Detection and embedding scores are not linear: refused.

Row order: variant-major, row ``k * N + n`` is variant k of image n (as clone.tile_batch).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import numpy as np
from onnx import TensorProto, helper

from ..autodiff.clone import clone_forward, fixed_batch
from ..errors import UsageError
from .spatial import activation_layout

LINEAR_TARGETS = ("class", "segmentation", "sequence")
DEFAULT_CHUNK = 32  # variants per run (pytorch-grad-cam's AblationCAM batch_size)
RERUN_BATCH = "onnxcam_rerun_rows"
SEED, OFFSET, CLASS, SIDES = "seed", "offset", "class", "sides"  # what _tiled_constants tiles


class Reruns:
    """Scores of K variants of one tensor per image, in chunks. Built once per augment."""

    def __init__(self, emit, analysis, image, chosen, seeded: str, score_tensor: str, spec):
        if spec.target not in LINEAR_TARGETS:
            raise UsageError(f"methods that re-run the model (Score-CAM, Group-CAM, Ablation-CAM) need a score "
                             f"that is linear in the model's output; the {spec.target!r} target's is not. Use one "
                             f"of the targets {', '.join(LINEAR_TARGETS)}, or a gradient method")
        if spec.counterfactual:
            raise UsageError("counterfactual maps negate gradients; the methods that re-run the model weigh "
                             "score changes and have no counterfactual form: drop --counterfactual")
        self.emit, self.analysis, self.image, self.spec = emit, analysis, image, spec
        self.seed, self.seeded, self.score_tensor = chosen.seed, seeded, score_tensor
        self.class_index = chosen.class_index
        self.fixed = fixed_batch(image.shape)
        axes = list(range(1, emit.rank(seeded)))
        linear = emit.reduce("ReduceSum", emit.op("Mul", self.seed, seeded), axes, keepdims=False)
        self.offset = _float32(emit, emit.op("Sub", chosen.score, linear))  # [N]: bias and the like
        self.score = _float32(emit, chosen.score)  # [N]: the un-masked run's score
        self._batch_symbol = image.shape[0] if isinstance(image.shape[0], str) else None

    # ------------------------------------------------------------------ what methods call
    def channel_axis(self, layer: str) -> int:
        layout = activation_layout(self.emit, layer, self.image, self.spec.layout, self.analysis.producers)
        return 1 if layout == "NCHW" else self.emit.rank(layer) - 1

    def image_dims(self) -> list:
        """[C, H, W] of the input image (dims: ints or run-time [1] tensors)."""
        dims = self.emit.dims(self.image.name)
        return [dims[1], dims[2], dims[3]] if self.image.layout == "NCHW" else [dims[3], dims[1], dims[2]]

    def as_input(self, x_nchw: str) -> str:
        """A float32 NCHW image batch in the model input's layout and type."""
        e = self.emit
        x = x_nchw if self.image.layout == "NCHW" else e.op("Transpose", x_nchw, perm=[0, 2, 3, 1])
        return x if self.image.dtype == TensorProto.FLOAT else e.cast(x, self.image.dtype)

    def scores(self, replaced: str, count: int, make: Callable[[str, int], str], chunk_size: Optional[int] = None,
               probabilities: bool = False, tag: str = "rerun") -> str:
        """float32 [count, N]: the score of each variant of `replaced` per image.

        `make(indices, chunk)` emits the variants numbered by int64 `indices` [chunk] of every image,
        as a tensor shaped like `replaced` with chunk * N rows (variant-major). With
        `probabilities`, the score is the softmax probability of the explained class (class
        target only: Group-CAM's)."""
        e = self.emit
        if probabilities and self.spec.target != "class":
            raise UsageError("this method scores by class probabilities: it needs the class target")
        chunk = DEFAULT_CHUNK if chunk_size is None else chunk_size
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise UsageError(f"chunk_size must be a positive number of variants per run; got {chunk_size}")
        if self.fixed is not None:
            chunk = 1  # a fixed batch axis holds N rows: one variant per run
        chunk = min(int(chunk), count)
        runs = -(-count // chunk)
        tiled = self._tiled_constants(replaced, chunk, probabilities)
        if runs == 1:
            return self._chunk_scores(replaced, e.op("Range", _i64(e, 0), _i64(e, count), _i64(e, 1)), chunk, make,
                                      tiled, probabilities, tag)
        return self._loop(replaced, count, chunk, runs, make, tiled, probabilities, tag)

    # ------------------------------------------------------------------ pieces
    def _tiled_constants(self, replaced, chunk, probabilities) -> Dict[str, object]:
        """What every chunk reads, tiled to chunk * N rows once, outside any loop: the seed, the
        offset, the class index and the tensors the copied nodes read from the original graph
        with a batch axis (a residual branch beside an ablated feature map)."""
        e = self.emit
        tiled = {SEED: _tile(e, self.seed, chunk, e.rank(self.seeded)), OFFSET: _tile(e, self.offset, chunk, 1)}
        if probabilities:
            tiled[CLASS] = _tile(e, self.class_index, chunk, 1)
        sides = {side: _tile(e, side, chunk, e.rank(side)) for side in self._side_inputs(replaced, probabilities)}
        return {**tiled, SIDES: sides}

    def _outputs(self, probabilities) -> List[str]:
        return [self.seeded] + ([self.score_tensor] if probabilities and self.score_tensor != self.seeded else [])

    def _side_inputs(self, replaced, probabilities) -> List[str]:
        """Batch-carrying tensors the copied nodes read but do not recompute (clone_forward shares
        everything upstream of the replaced tensor; rows must match, so these are tiled)."""
        a = self.analysis
        affected = {replaced}
        for node in a.nodes:
            if any(i in affected for i in node.input):
                affected.update(o for o in node.output if o)
        wanted, stack = set(self._outputs(probabilities)), list(self._outputs(probabilities))
        while stack:
            node = a.producers.get(stack.pop())
            for i in (node.input if node is not None else ()):
                if i and i not in wanted:
                    wanted.add(i)
                    stack.append(i)
        constants = a.constant_names()
        batch = self.image.shape[0]
        sides = []
        for node in a.nodes:
            if not any(o in affected and o in wanted for o in node.output):
                continue
            for i in node.input:
                if not i or i in affected or i in constants or i in sides:
                    continue
                info = self.emit.info(i)
                if info.shape and len(info.shape) >= 1 and info.shape[0] == batch and info.dtype in _FLOATS:
                    sides.append(i)
        return sides

    def _chunk_scores(self, replaced, indices, chunk, make, tiled, probabilities, tag) -> str:
        """float32 [chunk, N] for the variants `indices` (emitted where the caller is emitting)."""
        e = self.emit
        rows = make(indices, chunk)
        shape = e.info(replaced).shape
        e.set_info(rows, e.dtype(replaced), None if shape is None else (RERUN_BATCH,) + tuple(shape[1:]))
        replacements = {replaced: rows}
        replacements.update(tiled[SIDES])
        rename = {self._batch_symbol: RERUN_BATCH} if self._batch_symbol else None
        copy = clone_forward(self.analysis, e, replacements, self._outputs(probabilities), tag=tag, rename_dims=rename)
        if probabilities:
            logits = _float32(e, copy[self.score_tensor])
            logits = e.op("Reshape", logits, e.ints([0, -1]))
            p = e.op("Softmax", logits, axis=1) if e.opset >= 13 else _softmax(e, logits)
            score = e.squeeze(e.op("GatherElements", p, e.unsqueeze(tiled[CLASS], [1]), axis=1), [1])
        else:
            seeded = copy[self.seeded]
            axes = list(range(1, e.rank(self.seeded)))
            linear = e.reduce("ReduceSum", e.op("Mul", tiled[SEED], seeded), axes, keepdims=False)
            score = e.op("Add", _float32(e, linear), tiled[OFFSET])
        return e.op("Reshape", score, e.ints([chunk, -1]))

    def _loop(self, replaced, count, chunk, runs, make, tiled, probabilities, tag) -> str:
        """An ONNX Loop of `runs` iterations, each scoring one chunk; [count, N]."""
        e = self.emit
        outer_nodes, outer_shapes = e.nodes, e._shape_cache
        e.nodes, e._shape_cache = [], {}  # nodes (and cached Shape nodes) of the body
        try:
            step, condition = e.fresh("iteration"), e.fresh("condition")
            e.set_info(step, TensorProto.INT64, ())
            start = e.op("Mul", step, _i64(e, chunk))
            span = e.op("Range", _i64(e, 0), _i64(e, chunk), _i64(e, 1))
            wanted, last = e.op("Add", span, start), _i64(e, count - 1)
            indices = e.op("Where", e.op("Greater", wanted, last), last, wanted)  # the last chunk repeats K-1
            scores = self._chunk_scores(replaced, indices, chunk, make, tiled, probabilities, tag)
            keep_going = e.op("Identity", condition)
            body_nodes = e.nodes
        finally:
            e.nodes, e._shape_cache = outer_nodes, outer_shapes
        body = helper.make_graph(
            body_nodes, e.fresh(f"{tag}_body"),
            [helper.make_tensor_value_info(step, TensorProto.INT64, []),
             helper.make_tensor_value_info(condition, TensorProto.BOOL, [])],
            [helper.make_tensor_value_info(keep_going, TensorProto.BOOL, []),
             helper.make_tensor_value_info(scores, TensorProto.FLOAT, [chunk, None])])
        stacked = e.fresh(f"{tag}_scores")  # Loop needs its (empty) condition input: not through e.op
        e.nodes.append(helper.make_node("Loop", [e.const(np.array(runs, np.int64), TensorProto.INT64), ""], [stacked],
                                        name=e.fresh(f"{tag}_loop"), body=body))
        flat = e.op("Reshape", stacked, e.ints([runs * chunk, -1]))  # Loop stacks: [runs, chunk, N]
        return flat if runs * chunk == count else e.slice(flat, [0], [count], [0])


_FLOATS = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def _i64(emit, value: int) -> str:
    return emit.const(np.array(value, np.int64), TensorProto.INT64)


def _tile(emit, x: str, times: int, rank: int) -> str:
    """[N, ...] -> [times * N, ...], variant-major."""
    if times == 1:
        return x
    return emit.op("Tile", x, emit.ints([times] + [1] * (rank - 1)))


def _float32(emit, x: str) -> str:
    return x if emit.dtype(x) == TensorProto.FLOAT else emit.cast(x, TensorProto.FLOAT)


def _softmax(emit, z):
    e = emit.op("Exp", emit.op("Sub", z, emit.reduce("ReduceMax", z, [1], keepdims=True)))
    return emit.op("Div", e, emit.reduce("ReduceSum", e, [1], keepdims=True))


__all__ = ["Reruns", "LINEAR_TARGETS", "DEFAULT_CHUNK"]
