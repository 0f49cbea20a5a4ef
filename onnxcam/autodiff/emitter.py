"""An opset-aware node emitter: rules say what to compute, this says how at the model's opset.

Rules call ``emit.op("Mul", a, b)`` for ops whose signature never changed, and the helpers below
(``reduce``, ``squeeze``, ``split``, ``pad``, ``slice``...) for the ones that did, so no rule
branches on the opset. Shapes are handled as lists of *dims*: a Python ``int`` where the size is
truly known, the name of a run-time int64 tensor of shape [1] otherwise. Dim arithmetic folds
ints and emits tiny integer nodes only for what is dynamic.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .shapes import TensorInfo

Dim = Union[int, str]

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
INT64_MAX = np.iinfo(np.int64).max


# Elementwise ops with numpy broadcasting: an operand that is Expand(v) may be replaced by v (see
# Emitter.fold_expands) without changing what they compute.
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Equal", "Less", "Greater", "LessOrEqual",
                "GreaterOrEqual", "And", "Or", "Xor", "Not", "Neg", "Abs", "Relu", "Sqrt", "Exp", "Log", "Reciprocal",
                "Sigmoid", "Tanh", "Cast", "Sign", "Erf", "Identity"}
_COMPACT_REDUCTIONS = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum"}

_BOOL_OPS = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Not", "Xor", "IsNaN", "IsInf"}
_INT64_OPS = {"Shape", "Size", "ArgMax", "ArgMin", "NonZero"}


def _output_dtype(op_type, inputs, attrs, emit):
    """The element type of an emitted node's output, so later helpers know what they hold."""
    if op_type == "Cast":
        return attrs["to"]
    if op_type in _BOOL_OPS:
        return TensorProto.BOOL
    if op_type in _INT64_OPS:
        return TensorProto.INT64
    if op_type == "ConstantOfShape":
        return attrs["value"].data_type if "value" in attrs else TensorProto.FLOAT
    if op_type == "Where" and len(inputs) > 1:
        return emit.info(inputs[1]).dtype
    return emit.info(inputs[0]).dtype if inputs and inputs[0] else None


class Emitter:
    """Accumulates new nodes and initializers for one graph at one opset."""

    def __init__(self, opset: int, infos: dict, taken_names: set, prefix: str = "onnxcam"):
        self.opset = opset
        self.infos = infos  # tensor name -> TensorInfo (forward tensors and what we emit)
        self.taken = taken_names
        self.prefix = prefix
        self.nodes: List[onnx.NodeProto] = []
        self.initializers: List[onnx.TensorProto] = []
        self._const_cache = {}
        self._shape_cache = {}
        self._counter = 0
        # Expand outputs -> (input, shape tensor), and static shapes of emitted elementwise results
        # and dims, for fold_expands. Kept apart from `infos`, which rules read.
        self._expands = {}
        self._shapes = {}
        # When on, an elementwise op or a reduction reading a broadcast (Expand) works on the
        # compact tensor instead: a gradient that is constant over space (the backward of global
        # pooling) is never materialised for the CAM formulas. The augmenter turns it on for the
        # methods only; the walker's rules always see plain nodes.
        self.fold_expands = False

    @contextlib.contextmanager
    def nested(self):
        """Emit into a fresh node list (a subgraph's body) for the duration of the block; yields
        that list. Cached Shape nodes are scoped with it: a name defined inside a body must not be
        reused outside. Constants still go to the main graph's initializers (bodies read them)."""
        saved = self.nodes, self._shape_cache
        self.nodes, self._shape_cache = [], {}
        try:
            yield self.nodes
        finally:
            self.nodes, self._shape_cache = saved

    # ------------------------------------------------------------------ names and raw nodes
    def fresh(self, hint: str) -> str:
        while True:
            self._counter += 1
            name = f"{self.prefix}/{hint}_{self._counter}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def op(self, op_type: str, *inputs: Optional[str], outputs: int = 1, hint: str = None, **attrs):
        """Emit one default-domain node; returns its output name (or list of names)."""
        if self.fold_expands and outputs == 1 and op_type in _ELEMENTWISE and any(i in self._expands for i in inputs if i):
            folded = self._through_expands(op_type, inputs, hint, attrs)
            if folded is not None:
                return folded
        return self._emit(op_type, inputs, outputs, hint, attrs)

    def _emit(self, op_type, inputs, outputs=1, hint=None, attrs=None):
        attrs = attrs or {}
        hint = hint or op_type
        outs = [self.fresh(hint) for _ in range(outputs)]
        ins = ["" if i is None else i for i in inputs]
        while ins and ins[-1] == "":  # trailing optional inputs may be dropped
            ins.pop()
        node = helper.make_node(op_type, ins, outs, name=self.fresh(f"{hint}_node"), **attrs)
        self.nodes.append(node)
        dtype = _output_dtype(op_type, ins, attrs, self)
        for out in outs:
            self.infos[out] = TensorInfo(dtype, None)
        if op_type == "Expand":
            self._expands[outs[0]] = (ins[0], ins[1])
        elif op_type in _ELEMENTWISE and outputs == 1:
            shape = _broadcast([self.static_shape(i) for i in ins if i])
            if shape is not None:
                self._shapes[outs[0]] = shape
        return outs[0] if outputs == 1 else outs

    def static_shape(self, name: str):
        """The shape of `name` as far as known: infos, else what this emitter derived."""
        shape = self.info(name).shape
        return shape if shape is not None else self._shapes.get(name)

    def _through_expands(self, op_type, inputs, hint, attrs):
        """op(..., Expand(v, s), ...) computed on v: directly when another operand already has the
        full shape (broadcasting gives the same result), else as Expand(op(..., v, ...), s), so
        chains of elementwise ops stay compact until a reduction or a full-size operand."""
        expanded = [i for i in inputs if i in self._expands]
        full = self.static_shape(expanded[0])
        if full is None or any(self.static_shape(e) != full for e in expanded):
            return None
        compact = {e: self._expands[e][0] for e in expanded}
        if any(not _fits(self.static_shape(v), full) for v in compact.values()):
            return None
        others = [i for i in inputs if i and i not in self._expands]
        replaced = [compact.get(i, i) if i else i for i in inputs]
        if any(self.static_shape(o) == full for o in others):
            return self._emit(op_type, replaced, 1, hint, attrs)
        if all(_fits(self.static_shape(o), full) for o in others):
            inner = self._emit(op_type, replaced, 1, hint, attrs)
            out = self._emit("Expand", [inner, self._expands[expanded[0]][1]])
            self._shapes[out] = full
            return out
        return None

    def info(self, name: str) -> TensorInfo:
        return self.infos.get(name) or TensorInfo(None, None)

    def set_info(self, name: str, dtype=None, shape=None) -> str:
        self.infos[name] = TensorInfo(dtype, None if shape is None else tuple(shape))
        return name

    def dtype(self, name: str) -> int:
        dt = self.info(name).dtype
        return TensorProto.FLOAT if dt is None else dt

    def rank(self, name: str) -> int:
        shape = self.info(name).shape
        if shape is None:
            raise KeyError(f"rank of tensor {name!r} is unknown")
        return len(shape)

    # ------------------------------------------------------------------ constants
    def const(self, value, dtype: int) -> str:
        """An initializer holding `value` as `dtype` (cached by content)."""
        array = np.asarray(value, dtype=helper.tensor_dtype_to_np_dtype(dtype))
        key = (dtype, array.shape, array.tobytes())
        if key in self._const_cache:
            return self._const_cache[key]
        name = self.fresh("const")
        self.initializers.append(numpy_helper.from_array(array, name))
        self._const_cache[key] = name
        self.set_info(name, dtype, array.shape)
        return name

    def scalar(self, value: float, like: str) -> str:
        """A scalar constant of the same float type as tensor `like`."""
        return self.const(value, self.dtype(like))

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.asarray(list(values), dtype=np.int64), TensorProto.INT64)

    # ------------------------------------------------------------------ shapes as dims
    def shape(self, x: str) -> str:
        if x not in self._shape_cache:
            self._shape_cache[x] = self.op("Shape", x)
        return self._shape_cache[x]

    def dims(self, x: str) -> List[Dim]:
        """Per-axis sizes of `x`: ints where known, run-time [1] tensors elsewhere."""
        shape = self.info(x).shape
        if shape is None:
            raise KeyError(f"rank of tensor {x!r} is unknown")
        out = []
        for axis, d in enumerate(shape):
            if isinstance(d, int) and d >= 0:
                out.append(int(d))
            else:
                dim = self.op("Gather", self.shape(x), self.ints([axis]), axis=0)
                self._shapes[dim] = (1,)
                out.append(dim)
        return out

    def shape_of(self, dims: Sequence[Dim]) -> str:
        """A 1-D int64 tensor from a list of dims (a constant when every dim is an int)."""
        if all(isinstance(d, int) for d in dims):
            return self.ints(dims)
        parts = [self.ints([d]) if isinstance(d, int) else d for d in dims]
        return self.op("Concat", *parts, axis=0)

    def shape_of_tensor_or_dims(self, x: str) -> str:
        """Shape(x) as a 1-D tensor, constant when fully static."""
        shape = self.info(x).shape
        if shape is not None and all(isinstance(d, int) and d >= 0 for d in shape):
            return self.ints(shape)
        return self.shape(x)

    def shape_for_reshape(self, x: str) -> str:
        """A Reshape target giving `x`'s shape to a tensor with as many elements: a constant when
        at most one size is unknown (it becomes -1, inferred from the element count)."""
        shape = self.info(x).shape
        if shape is not None:
            unknown = [i for i, d in enumerate(shape) if not (isinstance(d, int) and d >= 0)]
            if len(unknown) == 1 and all(d > 0 for d in shape if isinstance(d, int)):
                return self.ints([-1 if i in unknown else d for i, d in enumerate(shape)])
        return self.shape_of_tensor_or_dims(x)

    def _dim_binary(self, op_type, fold, a: Dim, b: Dim) -> Dim:
        if isinstance(a, int) and isinstance(b, int):
            return fold(a, b)
        ta = self.ints([a]) if isinstance(a, int) else a
        tb = self.ints([b]) if isinstance(b, int) else b
        return self.op(op_type, ta, tb)

    def d_add(self, a: Dim, b: Dim) -> Dim:
        if b == 0:
            return a
        if a == 0:
            return b
        return self._dim_binary("Add", lambda x, y: x + y, a, b)

    def d_sub(self, a: Dim, b: Dim) -> Dim:
        if b == 0:
            return a
        return self._dim_binary("Sub", lambda x, y: x - y, a, b)

    def d_mul(self, a: Dim, b: Dim) -> Dim:
        if b == 1:
            return a
        if a == 1:
            return b
        return self._dim_binary("Mul", lambda x, y: x * y, a, b)

    def d_div(self, a: Dim, b: Dim) -> Dim:
        """Floor division of non-negative dims."""
        if b == 1:
            return a
        return self._dim_binary("Div", lambda x, y: x // y, a, b)

    def d_max(self, a: Dim, b: Dim) -> Dim:
        if self.opset < 12 and not (isinstance(a, int) and isinstance(b, int)):
            return self._dim_select_greater(a, b, pick_greater=True)
        return self._dim_binary("Max", max, a, b)

    def d_min(self, a: Dim, b: Dim) -> Dim:
        if self.opset < 12 and not (isinstance(a, int) and isinstance(b, int)):
            return self._dim_select_greater(a, b, pick_greater=False)
        return self._dim_binary("Min", min, a, b)

    def _dim_select_greater(self, a: Dim, b: Dim, pick_greater: bool) -> str:
        """Max/Min of int64 dims before opset 12 (Max/Min accept only floats there)."""
        ta = self.ints([a]) if isinstance(a, int) else a
        tb = self.ints([b]) if isinstance(b, int) else b
        greater = self.op("Greater", ta, tb)
        return self.op("Where", greater, ta, tb) if pick_greater else self.op("Where", greater, tb, ta)

    def d_prod(self, dims: Sequence[Dim]) -> Dim:
        out: Dim = 1
        for d in dims:
            out = self.d_mul(out, d)
        return out

    def d_to_float(self, d: Dim, like: str) -> str:
        """A dim as a scalar-ish float tensor of `like`'s type (shape [] or [1])."""
        if isinstance(d, int):
            return self.scalar(float(d), like)
        return self.op("Cast", d, to=self.dtype(like))

    # ------------------------------------------------------------------ opset-dependent signatures
    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: bool = True) -> str:
        """ReduceSum/ReduceMean/ReduceMax... over constant axes (attribute or input by opset)."""
        axes = [int(a) for a in axes]
        if not axes:
            return x if keepdims else x
        if self.fold_expands and op_type in _COMPACT_REDUCTIONS and x in self._expands:
            compact = self._reduce_expanded(op_type, x, axes, keepdims)
            if compact is not None:
                return compact
        axes_as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes_as_input:
            out = self.op(op_type, x, self.ints(axes), keepdims=int(keepdims))
        else:
            out = self.op(op_type, x, axes=axes, keepdims=int(keepdims))
        shape = self.static_shape(x)
        if shape is not None:
            kept = [a + len(shape) if a < 0 else a for a in axes]
            self._shapes[out] = tuple(1 if i in kept else d for i, d in enumerate(shape) if keepdims or i not in kept)
        return out

    def _reduce_expanded(self, op_type, x, axes, keepdims):
        """A reduction of Expand(v) over axes where v has size 1: v itself (mean, max, min) or v
        times the reduced size (sum, when that size is a known number)."""
        v = self._expands[x][0]
        full, compact = self.static_shape(x), self.static_shape(v)
        if full is None or compact is None or len(compact) != len(full):
            return None
        axes = [a + len(full) if a < 0 else a for a in axes]
        if any(compact[a] != 1 for a in axes) or any(compact[a] != full[a] for a in range(len(full)) if a not in axes):
            return None
        if op_type == "ReduceSum":
            count = 1
            for a in axes:
                if not isinstance(full[a], int):
                    return None
                count *= full[a]
            v = self._emit("Mul", [v, self.scalar(float(count), v)])
            self._shapes[v] = compact
        return v if keepdims else self.squeeze(v, axes)

    def reduce_sum_dynamic_axes(self, x: str, axes_tensor: str) -> str:
        """ReduceSum over run-time axes (keepdims); an empty axes list sums nothing."""
        if self.opset < 13:
            raise NotImplementedError("run-time reduction axes need opset 13 or newer")
        return self.op("ReduceSum", x, axes_tensor, keepdims=1, noop_with_empty_axes=1)

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        axes = [int(a) for a in axes]
        if self.opset >= 13:
            return self.op("Squeeze", x, self.ints(axes))
        return self.op("Squeeze", x, axes=axes)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        axes = [int(a) for a in axes]
        if self.opset >= 13:
            return self.op("Unsqueeze", x, self.ints(axes))
        return self.op("Unsqueeze", x, axes=axes)

    def split(self, x: str, axis: int, sizes: Sequence[Dim]) -> List[str]:
        """Split `x` along `axis` into pieces of the given sizes (ints or run-time dims)."""
        n = len(sizes)
        if n == 1:
            return [self.op("Identity", x)]
        if all(isinstance(s, int) for s in sizes) and self.opset < 13:
            return self.op("Split", x, outputs=n, axis=axis, split=[int(s) for s in sizes])
        if self.opset >= 13:
            return self.op("Split", x, self.shape_of(sizes), outputs=n, axis=axis)
        # Opset 11/12 with run-time sizes: one Slice per piece.
        pieces, start = [], 0
        for s in sizes:
            end = self.d_add(start, s)
            pieces.append(self.slice(x, [start], [end], [axis]))
            start = end
        return pieces

    def slice(self, x: str, starts: Sequence[Dim], ends: Sequence[Dim], axes: Sequence[int],
              steps: Optional[Sequence[int]] = None) -> str:
        inputs = [x, self.shape_of(starts), self.shape_of(ends), self.ints(axes)]
        if steps is not None:
            inputs.append(self.ints(steps))
        return self.op("Slice", *inputs)

    def pad(self, x: str, pads: Sequence[Dim], mode: str = "constant", value: Optional[str] = None) -> str:
        """Pad with ONNX's [begin..., end...] layout; `value` is a scalar tensor name or None (0)."""
        if all(isinstance(p, int) and p == 0 for p in pads):
            return x
        return self.op("Pad", x, self.shape_of(pads), value, mode=mode)

    def clip(self, x: str, lo: Optional[float], hi: Optional[float]) -> str:
        lo_t = None if lo is None else self.scalar(lo, x)
        hi_t = None if hi is None else self.scalar(hi, x)
        return self.op("Clip", x, lo_t, hi_t)

    def greater_equal(self, a: str, b: str) -> str:
        if self.opset >= 12:
            return self.op("GreaterOrEqual", a, b)
        return self.op("Not", self.op("Less", a, b))

    def less_equal(self, a: str, b: str) -> str:
        if self.opset >= 12:
            return self.op("LessOrEqual", a, b)
        return self.op("Not", self.op("Greater", a, b))

    def resize(self, x: str, sizes: str, mode: str = "linear",
               coordinate_transformation_mode: str = "half_pixel", **attrs) -> str:
        """Resize to run-time `sizes` (a 1-D int64 tensor over all axes)."""
        empty = self.const(np.zeros([0], np.float32), TensorProto.FLOAT)
        roi = empty if self.opset < 13 else None
        return self.op("Resize", x, roi if roi else "", empty, sizes, mode=mode,
                       coordinate_transformation_mode=coordinate_transformation_mode, **attrs)

    def zeros_like(self, x: str) -> str:
        value = helper.make_tensor("value", self.dtype(x), [1], [0])
        return self.op("ConstantOfShape", self.shape_of_tensor_or_dims(x), value=value)

    def zeros(self, dims: Sequence[Dim], dtype: int) -> str:
        value = helper.make_tensor("value", dtype, [1], [0])
        return self.op("ConstantOfShape", self.shape_of(dims), value=value)

    def cast(self, x: str, dtype: int) -> str:
        return self.op("Cast", x, to=int(dtype))

    def as_float32(self, x: str) -> str:
        """`x` as float32 (itself when it already is)."""
        return x if self.dtype(x) == TensorProto.FLOAT else self.cast(x, TensorProto.FLOAT)

    # ------------------------------------------------------------------ appended helpers
    def reshape(self, x: str, dims: Sequence[Dim]) -> str:
        """Reshape to exactly `dims`. With run-time dims a size can be 0 at run time (an empty
        slice), which plain Reshape reads as "copy the input's size": from opset 14 on, say
        allowzero=1 (shapes built from dims never use 0 as "copy"). Before 14 that corner stays."""
        shape = self.shape_of(dims)
        if self.opset >= 14 and not all(isinstance(d, int) and d > 0 for d in dims):
            return self.op("Reshape", x, shape, allowzero=1)
        return self.op("Reshape", x, shape)

    def resize_full(self, x: str, roi: Optional[str] = None, scales: Optional[str] = None,
                    sizes: Optional[str] = None, **attrs) -> str:
        """Resize with any of roi/scales/sizes: fills the inputs opset 11/12 require (roi, and an
        empty `scales` when `sizes` is used) with empty constants."""
        empty = self.const(np.zeros([0], np.float32), TensorProto.FLOAT)
        if roi is None and self.opset < 13:
            roi = empty
        if scales is None and sizes is not None:
            scales = empty
        return self.op("Resize", x, roi, scales, sizes, **attrs)


def _broadcast(shapes):
    """The numpy broadcast of static shapes (ints and symbols), or None when it cannot be told."""
    if not shapes or any(s is None for s in shapes):
        return None
    rank = max(len(s) for s in shapes)
    out = []
    for k in range(1, rank + 1):
        dims = {s[-k] for s in shapes if len(s) >= k} - {1}
        if len(dims) > 1 or None in dims:
            return None
        out.append(dims.pop() if dims else 1)
    return tuple(reversed(out))


def _fits(shape, full) -> bool:
    """Does `shape` broadcast into `full` without changing it?"""
    if shape is None or full is None or len(shape) > len(full):
        return False
    return all(d == 1 or d == f for d, f in zip(reversed(shape), reversed(full)))
