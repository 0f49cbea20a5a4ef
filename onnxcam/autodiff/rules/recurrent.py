"""LSTM, GRU and RNN: backpropagation through time, as two ONNX Scans per direction.

The ops expose neither their gates nor their cell states, so the rule recomputes the recurrence
from the node's inputs in a Scan whose body is one time step in standard ops (MatMul, Split,
activations) and which stacks every step's intermediates; a second Scan walks the steps the other
way with the gradient states (dH, dC). The input projection X·Wᵀ and its gradient dA·W are one
MatMul each over all steps. The graph does not grow with the sequence length, and the length may
be dynamic (text recognisers exported with a free input width).

Equations and gate orders are ONNX's (LSTM iofc, GRU zrh; exporters reorder torch's ifgo/rzn
weights themselves): see onnx.defs.get_schema("LSTM").doc. Gradients flow to X, initial_h and
initial_c; the weights W, R, B, P are treated as constants. `sequence_lens` shorter than the
sequence freezes the state and zeroes Y past each sequence's end, as ONNX Runtime does.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
from onnx import TensorProto, helper

from ..emitter import Emitter
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
        self.w, self.hidden, self.clip = w, hidden, clip
        self.f, self.g, self.h = acts
        self.coupled = bool(node.attr("input_forget", 0))
        self.rt = e.op("Transpose", w.r, perm=[1, 0])

    def step(self, e, xw, h, c):
        w, clip = self.w, self.clip
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

    def back(self, e, s, dh, dc):
        """Gradients of the pre-activations [N, 4H] (iofc), of H_t-1 and of C_t-1."""
        w = self.w
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
        self.w, self.hidden, self.clip = w, hidden, clip
        self.f, self.g = acts
        self.lbr = bool(node.attr("linear_before_reset", 0))
        self.r_zr, self.r_h = e.split(w.r, 0, [2 * hidden, hidden])
        self.r_zr_t = e.op("Transpose", self.r_zr, perm=[1, 0])
        self.r_h_t = e.op("Transpose", self.r_h, perm=[1, 0])
        self.rbh = e.split(w.rb, 0, [2 * hidden, hidden])[1] if (self.lbr and w.rb is not None) else None

    def step(self, e, xw, h, c):
        clip = self.clip
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

    def back(self, e, s, dh, dc):
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
        self.w, self.clip = w, clip
        (self.f,) = acts
        self.rt = e.op("Transpose", w.r, perm=[1, 0])

    def step(self, e, xw, h, c):
        a = _act(e, self.f, e.op("Add", xw, e.op("MatMul", h, self.rt)), self.clip)
        return a["y"], None, dict(a=a)

    def back(self, e, s, dh, dc):
        da = _act_grad(e, s["a"], dh)
        return da, e.op("MatMul", da, self.w.r), None


_CELLS = {"LSTM": _LSTMCell, "GRU": _GRUCell, "RNN": _RNNCell}


# ---------------------------------------------------------------------- Scan bodies
def _flatten(tree, names: List[str]):
    """The distinct tensor names (str leaves) of a nested dict, in a fixed order."""
    if isinstance(tree, str):
        if tree not in names:
            names.append(tree)
    elif isinstance(tree, dict):
        for key in sorted(tree):
            _flatten(tree[key], names)
    return names


def _rebuild(tree, renamed: Dict[str, str]):
    """`tree` with its str leaves renamed; other leaves (activation functions, None) kept."""
    if isinstance(tree, str):
        return renamed[tree]
    if isinstance(tree, dict):
        return {key: _rebuild(value, renamed) for key, value in tree.items()}
    return tree


def _scan(e, name: str, states: List[str], inputs: List[str], reverse: bool, body_fn):
    """One Scan over axis 0 of `inputs` carrying `states`. body_fn(body_emitter, states, slices)
    returns (new states, per-step outputs); the per-step outputs come back stacked in time order
    whichever the direction. Returns (final states, stacked outputs).

    The body reads the outer graph's tensors (weights, constants) by name, as ONNX subgraphs may;
    its own constants are moved to the outer graph for the same reason."""
    body = Emitter(e.opset, e.infos, e.taken, prefix=e.prefix)
    state_in = [body.set_info(body.fresh(f"{name}_state"), e.dtype(s)) for s in states]
    step_in = [body.set_info(body.fresh(f"{name}_step"), e.dtype(x)) for x in inputs]
    new_states, step_out = body_fn(body, state_in, step_in)
    produced = {o for n in body.nodes for o in n.output}
    outs = []
    for o in list(new_states) + list(step_out):  # each output its own body tensor
        outs.append(o if o in produced and o not in outs else body.op("Identity", o))

    def matrix(n):
        """Every state and step here is a [batch, size] matrix; ONNX Runtime's Scan (before
        opset 16) wants the body's outputs shaped, which it infers from ranked inputs."""
        return helper.make_tensor_value_info(n, body.dtype(n), [None, None])
    graph = helper.make_graph(body.nodes, body.fresh(f"{name}_body"), [matrix(n) for n in state_in + step_in],
                              [matrix(n) for n in outs])
    e.initializers.extend(body.initializers)
    attrs = {}
    if reverse:
        attrs = dict(scan_input_directions=[1] * len(inputs), scan_output_directions=[1] * len(step_out))
    results = e.op("Scan", *states, *inputs, outputs=len(outs), body=graph, num_scan_inputs=len(inputs),
                   hint=name, **attrs)
    results = results if isinstance(results, list) else [results]
    for r, o in zip(results, outs):
        e.set_info(r, body.dtype(o))
    return results[:len(states)], results[len(states):]


# ---------------------------------------------------------------------- the rule
def _step_masks(ctx, node, length) -> Optional[str]:
    """[T, N, 1] bool 'step t is inside sequence n', or None when no sequence_lens is given or
    every length is known to be the full sequence `length` (an int or a run-time dim)."""
    e, lens = ctx.emit, node.input(4)
    if lens is None:
        return None
    value = ctx.value(lens)
    if value is not None and isinstance(length, int) and np.all(np.asarray(value) == length):
        return None

    def scalar(v):
        return e.const(np.asarray(v, np.int64), TensorProto.INT64)
    limit = scalar(length) if isinstance(length, int) else e.op("Reshape", length, e.ints([]))
    steps = e.op("Range", scalar(0), limit, scalar(1))
    lens = e.cast(lens, TensorProto.INT64)
    return e.op("Less", e.unsqueeze(steps, [1, 2]), e.unsqueeze(lens, [0, 2]))


def _to_time_major(e, t: Optional[str], layout: int, perm) -> Optional[str]:
    return t if t is None or layout == 0 else e.op("Transpose", t, perm=perm)


_WEIGHTS = {1: "W", 2: "R", 3: "B", 7: "P"}


@vjp("LSTM", "GRU", "RNN")
def recurrent(ctx, node, grads):
    """Backpropagation through time for one LSTM/GRU/RNN layer, each direction two Scans: the
    forward recurrence recomputed (keeping every step's gates), then the gradient recurrence run
    the other way. X·Wᵀ and dA·W are one MatMul each over all steps."""
    e, op = ctx.emit, node.op
    computed = [name for i, name in _WEIGHTS.items() if ctx.needs(node, i)]
    if computed:  # a partial gradient would be a wrong answer: refuse
        raise NotImplementedError(f"its weights {'/'.join(computed)} depend on the target; gradients are built "
                                  "for X, initial_h and initial_c only (weights as constants)")
    layout = int(node.attr("layout", 0))
    direction = node.attr("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise NotImplementedError(f"direction {direction!r}")
    directions = 2 if direction == "bidirectional" else 1
    x = node.input(0)
    if e.info(x).shape is None or len(e.info(x).shape) != 3:
        raise KeyError(f"rank of {x!r} unknown")
    hidden = node.attr("hidden_size")
    if hidden is None:
        r_shape = e.info(node.input(2)).shape
        if r_shape is None or not isinstance(r_shape[-1], int):
            raise NotImplementedError("hidden_size is not given and R's shape is unknown")
        hidden = r_shape[-1]
    clip = node.attr("clip")
    clip = None if clip is None else float(clip)
    acts = _activations(node, directions)
    lstm = op == "LSTM"

    # Everything in time-major form: X [T, N, I], Y [T, D, N, H], states [D, N, H].
    xs = _to_time_major(e, x, layout, [1, 0, 2])
    g_y = _to_time_major(e, grads[0] if grads else None, layout, [1, 2, 0, 3])
    g_yh = _to_time_major(e, grads[1] if len(grads) > 1 else None, layout, [1, 0, 2])
    g_yc = _to_time_major(e, grads[2] if len(grads) > 2 else None, layout, [1, 0, 2])
    h0 = _to_time_major(e, node.input(5), layout, [1, 0, 2])
    c0 = _to_time_major(e, node.input(6) if lstm else None, layout, [1, 0, 2])
    length, batch = e.dims(x)[layout], e.dims(x)[1 - layout]
    masks = _step_masks(ctx, node, length)
    zeros = e.zeros([batch, hidden], e.dtype(xs))

    dx, dh0, dc0 = None, [], []
    for d in range(directions):
        w = _Direction(e, node, d, hidden, _GATES[op])
        cell = _CELLS[op](e, node, w, acts[d], hidden, clip)
        xw = e.op("MatMul", xs, e.op("Transpose", w.w, perm=[1, 0]))  # [T, N, G·H]
        bias = _input_bias(e, op, w, hidden, cell)
        if bias is not None:
            xw = e.op("Add", xw, bias)
        reverse = direction == "reverse" or d == 1
        states = [_at(e, h0, d) if h0 is not None else zeros]
        if lstm:
            states.append(_at(e, c0, d) if c0 is not None else zeros)
        step_inputs = [xw] + ([masks] if masks is not None else [])
        template = {}

        def forward_step(b, state, step):
            h, c = state[0], (state[1] if lstm else None)
            h_new, c_new, saved = cell.step(b, step[0], h, c)
            if masks is not None:  # past a sequence's end the state is frozen
                h_new = b.op("Where", step[1], h_new, h)
                c_new = b.op("Where", step[1], c_new, c) if lstm else None
            template.update(saved)
            return [h_new] + ([c_new] if lstm else []), _flatten(saved, [])

        _, stacked = _scan(e, "rnn_forward", states, step_inputs, reverse, forward_step)

        g_yd = _at(e, g_y, d, axis=1) if g_y is not None else None  # [T, N, H]
        back_states = [_at(e, g_yh, d) if g_yh is not None else zeros]
        if lstm:
            back_states.append(_at(e, g_yc, d) if g_yc is not None else zeros)
        back_inputs = stacked + ([g_yd] if g_yd is not None else []) + ([masks] if masks is not None else [])

        def backward_step(b, state, step):
            dh, dc = state[0], (state[1] if lstm else None)
            step = list(step)
            saved = _rebuild(template, dict(zip(_flatten(template, []), step[:len(stacked)])))
            rest = step[len(stacked):]
            g_t = rest.pop(0) if g_yd is not None else None
            mask = rest.pop(0) if masks is not None else None
            dh_step = _add(b, dh, g_t)
            dc_step = dc
            if mask is not None:  # inside: the step's gradient; outside: passes to the previous state
                zero = b.scalar(0.0, dh)
                keep_h, dh_step = b.op("Where", mask, zero, dh), b.op("Where", mask, dh_step, zero)
                if lstm:
                    keep_c, dc_step = b.op("Where", mask, zero, dc), b.op("Where", mask, dc, zero)
            da, dh_prev, dc_prev = cell.back(b, saved, dh_step, dc_step)
            if mask is not None:
                dh_prev = b.op("Add", dh_prev, keep_h)
                dc_prev = b.op("Add", dc_prev, keep_c) if lstm else None
            return [dh_prev] + ([dc_prev] if lstm else []), [da]

        final, (dpre,) = _scan(e, "rnn_backward", back_states, back_inputs, not reverse, backward_step)
        if ctx.needs(node, 0):
            dx = _add(e, dx, e.op("MatMul", dpre, w.w))  # [T, N, I]
        dh0.append(final[0])
        if lstm:
            dc0.append(final[1])

    out: Dict[int, str] = {}
    if dx is not None:
        out[0] = _to_time_major(e, dx, layout, [1, 0, 2])
    if ctx.needs(node, 5):
        out[5] = _to_time_major(e, _stack(e, dh0), layout, [1, 0, 2])
    if lstm and ctx.needs(node, 6):
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
