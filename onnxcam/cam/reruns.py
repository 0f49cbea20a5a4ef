"""Re-running (part of) the model inside the graph, on masked copies folded into the batch axis.

Score-CAM, Group-CAM and Ablation-CAM weigh channels by what happens to the score when the input
(or a feature map) is masked. Here the augmented model does it itself in one ``session.run``:
K variants of a tensor (K masks of the input, K ablated feature maps) per image, and the nodes
between that tensor and the score copied (autodiff/clone.py: the copies read the same weights,
the file holds no second copy of any weight) to run on many rows at once.

Rows: the pairs (variant k, image n), numbered r = k * N + n. Those whose score is known without
a run are skipped (Score-CAM: an all-zero channel masks the input to zeros, one shared run of
the zero image scores all of them; Ablation-CAM: ablating an all-zero channel changes nothing).
The others run ``chunk_size`` rows at a time (default 32, pytorch-grad-cam's batch size for one
image) as the body of an ONNX ``Loop`` (the last chunk runs only the rows left), so peak memory
grows with `chunk_size`, not with K * N; batches of several images share the chunks. A model
whose batch axis is a fixed number N0 runs N0 rows at a time (its last chunk padded by repeating
the last row).

The score of a variant is the target's score, read the way the target defines it: for the
targets whose score is linear in the differentiated tensor T (class, segmentation, sequence:
score = sum(seed * T) + a constant such as the classifier's bias), ``sum(seed * T') + (score -
sum(seed * T))`` on the copy T', exact. Detection and embedding scores are not linear: refused.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np
from onnx import TensorProto, helper

from ..autodiff.clone import clone_forward, fixed_batch
from ..errors import UsageError
from .spatial import activation_layout

LINEAR_TARGETS = ("class", "segmentation", "sequence")
DEFAULT_CHUNK = 32  # rows per run (pytorch-grad-cam's AblationCAM batch_size)
RERUN_BATCH = "onnxcam_rerun_rows"


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

    def scores(self, replaced: str, count: int, make: Callable[[str, str], str], chunk_size: Optional[int] = None,
               probabilities: bool = False, skip: Optional[str] = None, skip_score: Optional[str] = None,
               same_as: Optional[str] = None, tag: str = "rerun") -> str:
        """float32 [count, N]: the score of each of `count` variants of `replaced` per image.

        `make(variants, images)` emits, for int64 [R] variant and image indices, a tensor shaped
        like `replaced` with R rows: row r is variant variants[r] of image images[r]. `skip`
        (bool [count, N]) marks variants whose score is known without a run: `skip_score` (float32
        [N]). `same_as` (int64 [count, N]) names, per variant, a variant of the same image that
        `make` builds identically (itself when none; it must name one that runs and names itself):
        it takes that one's score. Only the others are run, packed `chunk_size` rows per run. With
        `probabilities`, the score is the softmax probability of the explained class (class
        target: Group-CAM's)."""
        e = self.emit
        if probabilities and self.spec.target != "class":
            raise UsageError("this method scores by class probabilities: it needs the class target")
        chunk = DEFAULT_CHUNK if chunk_size is None else chunk_size
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise UsageError(f"chunk_size must be a positive number of masked copies per run; got {chunk_size}")
        chunk = int(chunk) if self.fixed is None else self.fixed  # a fixed batch axis holds exactly its N rows
        n = _scalar(e, e.dims(self.image.name)[0])
        total = e.op("Mul", n, _i64(e, count))
        if skip is None and same_as is None:
            rows = e.op("Range", _i64(e, 0), total, _i64(e, 1))  # r = variant * N + image, all of them
            return e.op("Reshape", self._run_rows(replaced, rows, n, chunk, make, probabilities, tag),
                        e.ints([count, -1]))
        needed = None if skip is None else e.op("Not", e.reshape(skip, [-1]))  # [count * N]: score not known
        if same_as is not None:
            first = e.reshape(e.op("Equal", same_as, e.const(np.arange(count, dtype=np.int64).reshape(count, 1),
                                                              TensorProto.INT64)), [-1])
            keep = first if needed is None else e.op("And", needed, first)
        else:
            keep = needed
        rows = e.squeeze(e.op("NonZero", keep), [0])  # the rows to run, in order
        compact = self._run_rows(replaced, rows, n, chunk, make, probabilities, tag)  # float32 [M]
        # back to every row: the score of the run it shares (its own, or same_as's), no scatter
        position = e.op("Sub", e.op("CumSum", e.cast(keep, TensorProto.INT64), _i64(e, 0)), _i64(e, 1))
        if same_as is not None:  # row r = variant * N + image takes row same_as[variant, image] * N + image
            image = e.op("Mod", e.op("Range", _i64(e, 0), total, _i64(e, 1)), n)
            position = e.op("Gather", position, e.op("Add", e.op("Mul", e.reshape(same_as, [-1]), n), image), axis=0)
        position = e.op("Where", e.op("Less", position, _i64(e, 0)), _i64(e, 0), position)
        padded = e.op("Concat", compact, e.const(np.zeros(1, np.float32), TensorProto.FLOAT), axis=0)
        ran = e.op("Gather", padded, position, axis=0)
        if skip is not None:  # skip_score where the score is known without a run
            given = _float32(e, e.op("Expand", e.unsqueeze(skip_score, [0]), e.op("Shape", skip)))
            ran = e.op("Where", needed, ran, e.reshape(given, [-1]))
        return e.op("Reshape", ran, e.ints([count, -1]))

    # ------------------------------------------------------------------ pieces
    def _run_rows(self, replaced, rows, n, chunk, make, probabilities, tag) -> str:
        """Scores of the variant/image pairs `rows` (int64 [M], r = variant * N + image): an ONNX
        Loop over chunks of `chunk` rows, [M]. The last chunk runs only the rows that are left (a
        fixed batch axis: padded by repeating row M-1, its extra scores dropped); the scores are
        carried from iteration to iteration and concatenated, so no run is spent on padding."""
        e = self.emit
        sides = self._side_inputs(replaced, probabilities)
        m = e.op("Shape", rows)  # [1]
        runs = e.squeeze(e.op("Div", e.op("Add", m, e.ints([chunk - 1])), e.ints([chunk])), [0])
        outer_nodes, outer_shapes = e.nodes, e._shape_cache
        e.nodes, e._shape_cache = [], {}  # nodes (and cached Shape nodes) of the body
        try:
            step, condition, done = e.fresh("iteration"), e.fresh("condition"), e.fresh(f"{tag}_done")
            e.set_info(step, TensorProto.INT64, ())
            e.set_info(done, TensorProto.FLOAT, (None,))
            start = e.op("Mul", step, _i64(e, chunk))
            end = e.op("Min", e.op("Add", start, _i64(e, chunk)), e.squeeze(m, [0]))
            if self.fixed is None:
                picked = e.op("Gather", rows, e.op("Range", start, end, _i64(e, 1)), axis=0)
            else:  # exactly `chunk` rows per run: the last one repeated
                span = e.op("Range", start, e.op("Add", start, _i64(e, chunk)), _i64(e, 1))
                last = e.op("Sub", e.squeeze(m, [0]), _i64(e, 1))
                picked = e.op("Gather", rows, e.op("Min", span, last), axis=0)
            variants, images = e.op("Div", picked, n), e.op("Mod", picked, n)
            scores = self._chunk_scores(replaced, variants, images, chunk, make, sides, probabilities, tag)
            if self.fixed is not None:
                scores = e.op("Slice", scores, e.ints([0]), e.unsqueeze(e.op("Sub", end, start), [0]), e.ints([0]))
            scores = e.op("Concat", done, scores, axis=0)
            keep_going = e.op("Identity", condition)
            body_nodes = e.nodes
        finally:
            e.nodes, e._shape_cache = outer_nodes, outer_shapes
        body = helper.make_graph(
            body_nodes, e.fresh(f"{tag}_body"),
            [helper.make_tensor_value_info(step, TensorProto.INT64, []),
             helper.make_tensor_value_info(condition, TensorProto.BOOL, []),
             helper.make_tensor_value_info(done, TensorProto.FLOAT, [None])],
            [helper.make_tensor_value_info(keep_going, TensorProto.BOOL, []),
             helper.make_tensor_value_info(scores, TensorProto.FLOAT, [None])])
        scored = e.fresh(f"{tag}_scores")  # Loop needs its (empty) condition input: not through e.op
        none_yet = e.const(np.zeros(0, np.float32), TensorProto.FLOAT)
        e.nodes.append(helper.make_node("Loop", [runs, "", none_yet], [scored], name=e.fresh(f"{tag}_loop"),
                                        body=body))
        return e.set_info(scored, TensorProto.FLOAT, (None,))

    def _outputs(self, probabilities) -> List[str]:
        return [self.seeded] + ([self.score_tensor] if probabilities and self.score_tensor != self.seeded else [])

    def _side_inputs(self, replaced, probabilities) -> List[str]:
        """Batch-carrying tensors the copied nodes read but do not recompute (clone_forward shares
        everything upstream of the replaced tensor; each run's rows pick theirs by image)."""
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
        read = [i for node in a.nodes if any(o in affected and o in wanted for o in node.output)
                for i in node.input if i and i not in affected and i not in constants]
        # An integer tensor read there (a Reshape's [N, -1] from Shape(input)) is recomputed on
        # the copy: its float sources become side inputs too, so it counts the copy's rows.
        sources, stack, seen = [], list(dict.fromkeys(read)), set()
        while stack:
            name = stack.pop()
            if name in seen or name in constants or name in affected:
                continue
            seen.add(name)
            info = self.emit.info(name)
            if info.dtype in _FLOATS or name in (i.name for i in a.model.graph.input):
                sources.append(name)
            elif a.producers.get(name) is not None:
                stack.extend(i for i in a.producers[name].input if i)
        a.probe([i for i in sources if self.emit.info(i).shape is None])  # shapes inference lost
        batch = self.image.shape[0]
        return [i for i in dict.fromkeys(sources) if self.emit.info(i).dtype in _FLOATS and self.emit.info(i).shape
                and self.emit.info(i).shape[0] == batch]

    def _chunk_scores(self, replaced, variants, images, chunk, make, sides, probabilities, tag) -> str:
        """float32 [chunk]: the scores of one run's rows (emitted where the caller is emitting)."""
        e = self.emit
        rows = make(variants, images)
        shape = e.info(replaced).shape
        e.set_info(rows, e.dtype(replaced), None if shape is None else (RERUN_BATCH,) + tuple(shape[1:]))
        replacements = {replaced: rows}
        for side in sides:
            replacements[side] = e.set_info(e.op("Gather", side, images, axis=0), e.dtype(side),
                                            (RERUN_BATCH,) + tuple(e.info(side).shape[1:]))
        rename = {self._batch_symbol: RERUN_BATCH} if self._batch_symbol else None
        copy = clone_forward(self.analysis, e, replacements, self._outputs(probabilities), tag=tag, rename_dims=rename)
        if probabilities:
            logits = e.op("Reshape", _float32(e, copy[self.score_tensor]), e.ints([0, -1]))
            p = e.op("Softmax", logits, axis=1) if e.opset >= 13 else _softmax(e, logits)
            classes = e.op("Gather", self.class_index, images, axis=0)
            return e.squeeze(e.op("GatherElements", p, e.unsqueeze(classes, [1]), axis=1), [1])
        seed = e.op("Gather", self.seed, images, axis=0)
        axes = list(range(1, e.rank(self.seeded)))
        linear = e.reduce("ReduceSum", e.op("Mul", seed, copy[self.seeded]), axes, keepdims=False)
        return e.op("Add", _float32(e, linear), e.op("Gather", self.offset, images, axis=0))


_FLOATS = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def _i64(emit, value: int) -> str:
    return emit.const(np.array(value, np.int64), TensorProto.INT64)


def _scalar(emit, d) -> str:
    """A dim (int, or a run-time int64 [1]) as an int64 scalar."""
    return _i64(emit, d) if isinstance(d, int) else emit.squeeze(d, [0])


def _float32(emit, x: str) -> str:
    return x if emit.dtype(x) == TensorProto.FLOAT else emit.cast(x, TensorProto.FLOAT)


def _softmax(emit, z):
    e = emit.op("Exp", emit.op("Sub", z, emit.reduce("ReduceMax", z, [1], keepdims=True)))
    return emit.op("Div", e, emit.reduce("ReduceSum", e, [1], keepdims=True))


__all__ = ["Reruns", "LINEAR_TARGETS", "DEFAULT_CHUNK"]
