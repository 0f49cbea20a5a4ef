"""LSTM, GRU and RNN: backpropagation through time, unrolled over a static sequence length.

The ops expose neither their gates nor their cell states, so the rule recomputes the recurrence
from the node's inputs, one time step at a time in standard ops (MatMul, Split, activations),
keeping every intermediate, then walks the steps backwards. The input projection X·Wᵀ and its
gradient dA·W are one MatMul each over all steps; only the recurrent part is unrolled. The
sequence length must therefore be known when the graph is built (a fixed input width for OCR
models); a dynamic one is refused naming the node.

Equations and gate orders are ONNX's (LSTM iofc, GRU zrh; exporters reorder torch's ifgo/rzn
weights themselves): see onnx.defs.get_schema("LSTM").doc. Gradients flow to X, initial_h and
initial_c; the weights W, R, B, P are treated as constants. `sequence_lens` shorter than the
sequence freezes the state and zeroes Y past each sequence's end, as ONNX Runtime does.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
from onnx import TensorProto

from ..registry import vjp

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
# Which of alpha/beta each activation consumes from activation_alpha/beta, and their defaults
# (those of the ONNX op of the same name; ONNX Runtime's rnn helpers use the same values).
_PARAMS = {
    "relu": (), "tanh": (), "sigmoid": (), "softsign": (), "softplus": (),
    "affine": (("alpha", 1.0), ("beta", 0.0)),
    "leakyrelu": (("alpha", 0.01),),
    "thresholdedrelu": (("alpha", 1.0),),
    "scaledtanh": (("alpha", 1.0), ("beta", 1.0)),
    "hardsigmoid": (("alpha", 0.2), ("beta", 0.5)),
    "elu": (("alpha", 1.0),),
}


class _Activation:
    """One activation function of the recurrence: emits f(x) and g·f'(x) (x = its input)."""

    def __init__(self, name: str, alpha: float, beta: float):
        self.name, self.alpha, self.beta = name, alpha, beta

    def forward(self, e, x):
        n, a, b = self.name, self.alpha, self.beta
        if n == "sigmoid":
            return e.op("Sigmoid", x)
        if n == "tanh":
            return e.op("Tanh", x)
        if n == "relu":
            return e.op("Relu", x)
        if n == "affine":
            return e.op("Add", e.op("Mul", x, e.scalar(a, x)), e.scalar(b, x))
        # LeakyRelu, HardSigmoid and Elu are written out: ONNX Runtime has no float64 kernels for them
        if n == "leakyrelu":
            return e.op("Where", e.op("Less", x, e.scalar(0.0, x)), e.op("Mul", x, e.scalar(a, x)), x)
        if n == "thresholdedrelu":
            return e.op("Where", e.op("Greater", x, e.scalar(a, x)), x, e.scalar(0.0, x))
        if n == "scaledtanh":
            return e.op("Mul", e.op("Tanh", e.op("Mul", x, e.scalar(b, x))), e.scalar(a, x))
        if n == "hardsigmoid":
            return e.clip(e.op("Add", e.op("Mul", x, e.scalar(a, x)), e.scalar(b, x)), 0.0, 1.0)
        if n == "elu":
            below = e.op("Mul", e.op("Sub", e.op("Exp", x), e.scalar(1.0, x)), e.scalar(a, x))
            return e.op("Where", e.op("Less", x, e.scalar(0.0, x)), below, x)
        if n == "softsign":  # (Softsign and Softplus have no float64 kernels in ONNX Runtime either)
            return e.op("Div", x, e.op("Add", e.scalar(1.0, x), e.op("Abs", x)))
        if n == "softplus":  # log(1 + eˣ) = relu(x) + log(1 + e^-|x|), without overflow
            return e.op("Add", e.op("Relu", x), e.op("Log", e.op("Add", e.scalar(1.0, x),
                                                                    e.op("Exp", e.op("Neg", e.op("Abs", x))))))
        raise AssertionError(n)

    def backward(self, e, x, y, g):
        """g · f'(x), given the input x and the output y = f(x)."""
        n, a, b = self.name, self.alpha, self.beta
        zero, one = e.scalar(0.0, x), e.scalar(1.0, x)
        if n == "sigmoid":
            return e.op("Mul", g, e.op("Mul", y, e.op("Sub", one, y)))
        if n == "tanh":
            return e.op("Mul", g, e.op("Sub", one, e.op("Mul", y, y)))
        if n == "relu":  # torch's gradient at 0 is 0
            return e.op("Where", e.op("Greater", x, zero), g, zero)
        if n == "affine":
            return e.op("Mul", g, e.scalar(a, x))
        if n == "leakyrelu":
            return e.op("Where", e.op("Greater", x, zero), g, e.op("Mul", g, e.scalar(a, x)))
        if n == "thresholdedrelu":
            return e.op("Where", e.op("Greater", x, e.scalar(a, x)), g, zero)
        if n == "scaledtanh":  # a·tanh(b·x): a·b·(1 - tanh²) = b·(a - y²/a)
            t = e.op("Div", y, e.scalar(a, x))
            return e.op("Mul", g, e.op("Mul", e.op("Sub", one, e.op("Mul", t, t)), e.scalar(a * b, x)))
        if n == "hardsigmoid":
            lin = e.op("Add", e.op("Mul", x, e.scalar(a, x)), e.scalar(b, x))
            inside = e.op("And", e.op("Greater", lin, zero), e.op("Less", lin, one))
            return e.op("Where", inside, e.op("Mul", g, e.scalar(a, x)), zero)
        if n == "elu":  # 1 for x > 0, a·eˣ = y + a below
            return e.op("Where", e.op("Greater", x, zero), g, e.op("Mul", g, e.op("Add", y, e.scalar(a, x))))
        if n == "softsign":
            d = e.op("Add", one, e.op("Abs", x))
            return e.op("Div", g, e.op("Mul", d, d))
        if n == "softplus":
            return e.op("Mul", g, e.op("Sigmoid", x))
        raise AssertionError(n)


def _activations(node, directions: int) -> List[List[_Activation]]:
    """The activation functions of each direction, alpha/beta consumed in order as the spec says."""
    names = node.attr("activations")
    default = _DEFAULT_ACTIVATIONS[node.op]
    names = [n.decode() if isinstance(n, bytes) else n for n in names] if names else default * directions
    per_direction = len(default)
    if len(names) == per_direction and directions == 2:
        names = names * 2
    if len(names) != per_direction * directions:
        raise NotImplementedError(f"{len(names)} activations given, {node.op} needs {per_direction} per direction")
    alphas = list(node.attr("activation_alpha") or [])
    betas = list(node.attr("activation_beta") or [])
    out = []
    for name in names:
        key = name.lower()
        if key not in _PARAMS:
            raise NotImplementedError(f"activation {name!r} is not one ONNX defines for {node.op}")
        params = dict(_PARAMS[key])
        alpha = alphas.pop(0) if "alpha" in params and alphas else params.get("alpha", 0.0)
        beta = betas.pop(0) if "beta" in params and betas else params.get("beta", 0.0)
        out.append(_Activation(key, float(alpha), float(beta)))
    return [out[d * per_direction:(d + 1) * per_direction] for d in range(directions)]


# ---------------------------------------------------------------------- small helpers
def _add(e, a: Optional[str], b: Optional[str]) -> Optional[str]:
    """a + b where None stands for a zero gradient."""
    if a is None:
        return b
    if b is None:
        return a
    return e.op("Add", a, b)


def _at(e, x: str, index: int, axis: int = 0) -> str:
    """x[index] along `axis` (the axis is dropped)."""
    return e.op("Gather", x, e.const(np.asarray(index, np.int64), TensorProto.INT64), axis=axis)


def _stack(e, parts: List[str]) -> str:
    return e.op("Concat", *[e.unsqueeze(p, [0]) for p in parts], axis=0)


class _Direction:
    """Weights of one direction: W [G·H, I], R [G·H, H], the two biases [G·H] and peepholes."""

    def __init__(self, e, node, d: int, hidden: int, gates: int):
        self.w = _at(e, node.input(1), d)
        self.r = _at(e, node.input(2), d)
        self.wb = self.rb = self.p = None
        if node.input(3):
            b = _at(e, node.input(3), d)
            self.wb, self.rb = e.split(b, 0, [gates * hidden, gates * hidden])
        if node.op == "LSTM" and node.input(7):
            self.p = e.split(_at(e, node.input(7), d), 0, [hidden] * 3)  # P[iof]


def _clip(e, pre: str, clip: Optional[float]):
    """The spec's cell clip, applied to the input of each activation; returns (value, pass mask)."""
    if clip is None:
        return pre, None
    clipped = e.clip(pre, -clip, clip)
    inside = e.op("And", e.op("Greater", pre, e.scalar(-clip, pre)), e.op("Less", pre, e.scalar(clip, pre)))
    return clipped, inside


def _act(e, f: _Activation, pre: str, clip: Optional[float]) -> Dict[str, str]:
    x, inside = _clip(e, pre, clip)
    return {"x": x, "y": f.forward(e, x), "inside": inside, "f": f}


def _act_grad(e, a: Dict[str, str], g: str) -> str:
    dx = a["f"].backward(e, a["x"], a["y"], g)
    if a["inside"] is not None:
        dx = e.op("Where", a["inside"], dx, e.scalar(0.0, dx))
    return dx


# ---------------------------------------------------------------------- the three cells
class _LSTMCell:
    """it, ot, ft, ct from the pre-activations (iofc); Ct = ft·Ct-1 + it·ct; Ht = ot·h(Ct)."""

    def __init__(self, e, node, w: _Direction, acts, hidden, clip):
        self.e, self.w, self.hidden, self.clip = e, w, hidden, clip
        self.f, self.g, self.h = acts
        self.coupled = bool(node.attr("input_forget", 0))
        self.rt = e.op("Transpose", w.r, perm=[1, 0])

    def step(self, xw, h, c):
        e, w, clip = self.e, self.w, self.clip
        pre = e.op("Add", xw, e.op("MatMul", h, self.rt))
        pi, po, pf, pc = e.split(pre, 1, [self.hidden] * 4)
        if w.p is not None:
            pi = e.op("Add", pi, e.op("Mul", w.p[0], c))
            pf = e.op("Add", pf, e.op("Mul", w.p[2], c))
        i = _act(e, self.f, pi, clip)
        f = None if self.coupled else _act(e, self.f, pf, clip)
        f_val = e.op("Sub", e.scalar(1.0, i["y"]), i["y"]) if self.coupled else f["y"]
        cc = _act(e, self.g, pc, clip)
        c_new = e.op("Add", e.op("Mul", f_val, c), e.op("Mul", i["y"], cc["y"]))
        if w.p is not None:
            po = e.op("Add", po, e.op("Mul", w.p[1], c_new))
        o = _act(e, self.f, po, clip)
        hc = self.h.forward(e, c_new)  # the spec's clip bounds activation inputs; ORT does not clip Ct
        h_new = e.op("Mul", o["y"], hc)
        saved = dict(i=i, f=f, f_val=f_val, cc=cc, o=o, c_prev=c, c_new=c_new, hc=hc)
        return h_new, c_new, saved

    def back(self, s, dh, dc):
        """Gradients of the pre-activations [N, 4H] (iofc), of H_t-1 and of C_t-1."""
        e, w = self.e, self.w
        dh = dh if dh is not None else e.zeros_like(s["hc"])
        do = _act_grad(e, s["o"], e.op("Mul", dh, s["hc"]))
        dct = self.h.backward(e, s["c_new"], s["hc"], e.op("Mul", dh, s["o"]["y"]))
        dct = _add(e, dc, dct)
        if w.p is not None:
            dct = e.op("Add", dct, e.op("Mul", do, w.p[1]))
        dcc = _act_grad(e, s["cc"], e.op("Mul", dct, s["i"]["y"]))
        di_val = e.op("Mul", dct, s["cc"]["y"])
        df_val = e.op("Mul", dct, s["c_prev"])
        dc_prev = e.op("Mul", dct, s["f_val"])
        if self.coupled:  # ft = 1 - it
            di = _act_grad(e, s["i"], e.op("Sub", di_val, df_val))
            df = e.zeros_like(di)
        else:
            di = _act_grad(e, s["i"], di_val)
            df = _act_grad(e, s["f"], df_val)
        if w.p is not None:
            dc_prev = e.op("Add", dc_prev, e.op("Add", e.op("Mul", di, w.p[0]), e.op("Mul", df, w.p[2])))
        da = e.op("Concat", di, do, df, dcc, axis=1)
        return da, e.op("MatMul", da, w.r), dc_prev


class _GRUCell:
    """zt, rt from the pre-activations; ht from (rt·Ht-1)·Rhᵀ (linear_before_reset=0) or
    rt·(Ht-1·Rhᵀ + Rbh) (=1, torch's form); Ht = (1 - zt)·ht + zt·Ht-1."""

    def __init__(self, e, node, w: _Direction, acts, hidden, clip):
        self.e, self.w, self.hidden, self.clip = e, w, hidden, clip
        self.f, self.g = acts
        self.lbr = bool(node.attr("linear_before_reset", 0))
        self.r_zr, self.r_h = e.split(w.r, 0, [2 * hidden, hidden])
        self.r_zr_t = e.op("Transpose", self.r_zr, perm=[1, 0])
        self.r_h_t = e.op("Transpose", self.r_h, perm=[1, 0])
        self.rbh = e.split(w.rb, 0, [2 * hidden, hidden])[1] if (self.lbr and w.rb is not None) else None

    def step(self, xw, h, c):
        e, clip = self.e, self.clip
        xz, xr, xh = e.split(xw, 1, [self.hidden] * 3)
        hz, hr = e.split(e.op("MatMul", h, self.r_zr_t), 1, [self.hidden] * 2)
        z = _act(e, self.f, e.op("Add", xz, hz), clip)
        r = _act(e, self.f, e.op("Add", xr, hr), clip)
        if self.lbr:
            lin = e.op("MatMul", h, self.r_h_t)
            if self.rbh is not None:
                lin = e.op("Add", lin, self.rbh)
            hh = _act(e, self.g, e.op("Add", xh, e.op("Mul", r["y"], lin)), clip)
        else:
            lin = None
            hh = _act(e, self.g, e.op("Add", xh, e.op("MatMul", e.op("Mul", r["y"], h), self.r_h_t)), clip)
        h_new = e.op("Add", hh["y"], e.op("Mul", z["y"], e.op("Sub", h, hh["y"])))
        return h_new, None, dict(z=z, r=r, hh=hh, lin=lin, h_prev=h)

    def back(self, s, dh, dc):
        e = self.e
        h_prev, z = s["h_prev"], s["z"]["y"]
        dz = _act_grad(e, s["z"], e.op("Mul", dh, e.op("Sub", h_prev, s["hh"]["y"])))
        dhh = _act_grad(e, s["hh"], e.op("Mul", dh, e.op("Sub", e.scalar(1.0, z), z)))
        dh_prev = e.op("Mul", dh, z)
        if self.lbr:
            dr = e.op("Mul", dhh, s["lin"])
            dh_prev = e.op("Add", dh_prev, e.op("MatMul", e.op("Mul", dhh, s["r"]["y"]), self.r_h))
        else:
            drh = e.op("MatMul", dhh, self.r_h)
            dr = e.op("Mul", drh, h_prev)
            dh_prev = e.op("Add", dh_prev, e.op("Mul", drh, s["r"]["y"]))
        dr = _act_grad(e, s["r"], dr)
        dh_prev = e.op("Add", dh_prev, e.op("MatMul", e.op("Concat", dz, dr, axis=1), self.r_zr))
        return e.op("Concat", dz, dr, dhh, axis=1), dh_prev, None


class _RNNCell:
    """Ht = f(Xt·Wᵀ + Ht-1·Rᵀ + Wb + Rb)."""

    def __init__(self, e, node, w: _Direction, acts, hidden, clip):
        self.e, self.w, self.clip = e, w, clip
        (self.f,) = acts
        self.rt = e.op("Transpose", w.r, perm=[1, 0])

    def step(self, xw, h, c):
        e = self.e
        a = _act(e, self.f, e.op("Add", xw, e.op("MatMul", h, self.rt)), self.clip)
        return a["y"], None, dict(a=a)

    def back(self, s, dh, dc):
        da = _act_grad(self.e, s["a"], dh)
        return da, self.e.op("MatMul", da, self.w.r), None


_CELLS = {"LSTM": _LSTMCell, "GRU": _GRUCell, "RNN": _RNNCell}


# ---------------------------------------------------------------------- the rule
def _static_length(ctx, node, x: str, layout: int) -> int:
    shape = ctx.emit.info(x).shape
    length = None if shape is None or len(shape) != 3 else shape[layout]
    if not isinstance(length, int) or length < 0:
        raise NotImplementedError(
            f"the sequence length of input {node.inputs[0]!r} is not fixed (shape {shape}); the {node.op} "
            "gradient is unrolled over the time steps, so export the model with a fixed sequence length "
            "(a fixed input width for text recognisers)")
    return length


def _step_masks(ctx, node, length: int):
    """Per step, a [N, 1] bool mask 'this step is inside the sequence', or None when every
    sequence is known to span all `length` steps."""
    e, lens = ctx.emit, node.input(4)
    if lens is None:
        return None
    value = ctx.value(lens)
    if value is not None and np.all(np.asarray(value) == length):
        return None
    lens = e.unsqueeze(e.cast(lens, TensorProto.INT64), [1])  # [N, 1]
    return [e.op("Less", e.ints([t]), lens) for t in range(length)]


def _to_time_major(e, t: Optional[str], layout: int, perm) -> Optional[str]:
    return t if t is None or layout == 0 else e.op("Transpose", t, perm=perm)


@vjp("LSTM", "GRU", "RNN", differentiable=(0, 5, 6))
def recurrent(ctx, node, grads):
    """Backpropagation through time for one LSTM/GRU/RNN layer, all directions."""
    e, op = ctx.emit, node.op
    layout = int(node.attr("layout", 0))
    direction = node.attr("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise NotImplementedError(f"direction {direction!r}")
    directions = 2 if direction == "bidirectional" else 1
    x = node.input(0)
    length = _static_length(ctx, node, x, layout)
    hidden = node.attr("hidden_size")
    if hidden is None:
        r_shape = e.info(node.input(2)).shape
        if r_shape is None or not isinstance(r_shape[-1], int):
            raise NotImplementedError("hidden_size is not given and R's shape is unknown")
        hidden = r_shape[-1]
    gates = _GATES[op]
    clip = node.attr("clip")
    clip = None if clip is None else float(clip)
    acts = _activations(node, directions)
    masks = _step_masks(ctx, node, length)

    # Everything in time-major form: X [T, N, I], Y [T, D, N, H], states [D, N, H].
    xs = _to_time_major(e, x, layout, [1, 0, 2])
    g_y = _to_time_major(e, grads[0] if grads else None, layout, [1, 2, 0, 3])
    g_yh = _to_time_major(e, grads[1] if len(grads) > 1 else None, layout, [1, 0, 2])
    g_yc = _to_time_major(e, grads[2] if len(grads) > 2 else None, layout, [1, 0, 2])
    h0 = _to_time_major(e, node.input(5), layout, [1, 0, 2])
    c0 = _to_time_major(e, node.input(6) if op == "LSTM" else None, layout, [1, 0, 2])
    batch = e.dims(x)[1 - layout]

    dx, dh0, dc0 = None, [], []
    for d in range(directions):
        w = _Direction(e, node, d, hidden, gates)
        cell = _CELLS[op](e, node, w, acts[d], hidden, clip)
        xw = e.op("MatMul", xs, e.op("Transpose", w.w, perm=[1, 0]))  # [T, N, G·H]
        bias = _input_bias(e, op, w, hidden, cell)
        if bias is not None:
            xw = e.op("Add", xw, bias)
        zeros = e.zeros([batch, hidden], e.dtype(xs))
        h = _at(e, h0, d) if h0 is not None else zeros
        c = (_at(e, c0, d) if c0 is not None else zeros) if op == "LSTM" else None
        order = range(length) if (direction == "forward" or (directions == 2 and d == 0)) else range(length - 1, -1, -1)
        saved = {}
        for t in order:  # the forward recurrence, recomputed
            h_new, c_new, saved[t] = cell.step(_at(e, xw, t), h, c)
            saved[t]["h_new"] = h_new
            if masks is not None:  # past a sequence's end the state is frozen
                h_new = e.op("Where", masks[t], h_new, h)
                c_new = e.op("Where", masks[t], c_new, c) if c is not None else None
            h, c = h_new, c_new
        # ... and backwards through it
        dh = _at(e, g_yh, d) if g_yh is not None else None
        dc = _at(e, g_yc, d) if g_yc is not None else None
        g_yd = _at(e, g_y, d, axis=1) if g_y is not None else None  # [T, N, H]
        dpre = {}
        for t in reversed(list(order)):
            dh_step = _add(e, dh, _at(e, g_yd, t) if g_yd is not None else None)
            dc_step = dc
            keep_h = keep_c = None
            if masks is not None:  # inside: the step's gradient; outside: passes to the previous state
                zero = e.scalar(0.0, xs)
                if dh is not None:
                    keep_h = e.op("Where", masks[t], zero, dh)
                if dc is not None:
                    keep_c = e.op("Where", masks[t], zero, dc)
                dh_step = e.op("Where", masks[t], dh_step, zero) if dh_step is not None else None
                dc_step = e.op("Where", masks[t], dc_step, zero) if dc_step is not None else None
            if dh_step is None and dc_step is None:
                dpre[t] = None
                continue
            if dh_step is None:
                dh_step = e.zeros_like(saved[t]["h_new"])
            dpre[t], dh, dc = cell.back(saved[t], dh_step, dc_step)
            dh, dc = _add(e, dh, keep_h), _add(e, dc, keep_c)
        if ctx.needs(node, 0):
            steps = [dpre[t] if dpre[t] is not None else e.zeros_like(_at(e, xw, t)) for t in range(length)]
            dx_d = e.op("MatMul", _stack(e, steps), w.w)  # [T, N, I]
            dx = _add(e, dx, dx_d)
        dh0.append(dh if dh is not None else zeros)
        dc0.append(dc if dc is not None else zeros)

    out: Dict[int, str] = {}
    if dx is not None:
        out[0] = _to_time_major(e, dx, layout, [1, 0, 2])
    if ctx.needs(node, 5):
        out[5] = _to_time_major(e, _stack(e, dh0), layout, [1, 0, 2])
    if op == "LSTM" and ctx.needs(node, 6):
        out[6] = _to_time_major(e, _stack(e, dc0), layout, [1, 0, 2])
    return out


def _input_bias(e, op, w: _Direction, hidden: int, cell) -> Optional[str]:
    """The bias added to X·Wᵀ: Wb + Rb, except GRU's Rbh when linear_before_reset (inside rt·(·))."""
    if w.wb is None:
        return None
    if op == "GRU" and cell.lbr:
        rb_zr = e.split(w.rb, 0, [2 * hidden, hidden])[0]
        rb = e.op("Concat", rb_zr, e.zeros([hidden], e.dtype(w.rb)), axis=0)
        return e.op("Add", w.wb, rb)
    return e.op("Add", w.wb, w.rb)
