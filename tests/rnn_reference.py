"""The ONNX LSTM/GRU/RNN equations in torch float64, written from onnx.defs' documentation, for
one-node models whose attributes torch's own modules do not export (layout 1, sequence_lens,
other activations, clip, peepholes, input_forget, linear_before_reset 0). Tests first check this
reference against ONNX Runtime's kernels on the forward outputs, then use its autograd as the
gradient reference."""

from __future__ import annotations

import torch

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
# alpha/beta each activation consumes, with the defaults of the ONNX ops of the same name
PARAMS = {"affine": (1.0, 0.0), "leakyrelu": (0.01, None), "thresholdedrelu": (1.0, None),
          "scaledtanh": (1.0, 1.0), "hardsigmoid": (0.2, 0.5), "elu": (1.0, None)}


def activation(name, alpha, beta):
    n = name.lower()
    return {
        "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu,
        "affine": lambda x: alpha * x + beta,
        "leakyrelu": lambda x: torch.where(x >= 0, x, alpha * x),
        "thresholdedrelu": lambda x: torch.where(x > alpha, x, torch.zeros_like(x)),
        "scaledtanh": lambda x: alpha * torch.tanh(beta * x),
        "hardsigmoid": lambda x: torch.clamp(alpha * x + beta, 0, 1),
        "elu": lambda x: torch.where(x >= 0, x, alpha * (torch.exp(x) - 1)),
        "softsign": lambda x: x / (1 + x.abs()),
        "softplus": lambda x: torch.log1p(torch.exp(x)),
    }[n]


def activation_functions(op, attrs, directions):
    names = attrs.get("activations") or DEFAULT_ACTIVATIONS[op] * directions
    alphas, betas = list(attrs.get("activation_alpha", [])), list(attrs.get("activation_beta", []))
    fns = []
    for name in names:
        default_alpha, default_beta = PARAMS.get(name.lower(), (None, None))
        alpha = alphas.pop(0) if default_alpha is not None and alphas else default_alpha
        beta = betas.pop(0) if default_beta is not None and betas else default_beta
        fns.append(activation(name, alpha, beta))
    per = len(DEFAULT_ACTIVATIONS[op])
    return [fns[d * per:(d + 1) * per] for d in range(directions)]


def forward(op, attrs, X, W, R, B=None, lens=None, h0=None, c0=None, P=None):
    """(Y, Y_h, Y_c) of one ONNX recurrent node; Y_c is None except for LSTM."""
    layout = attrs.get("layout", 0)
    direction = attrs.get("direction", "forward")
    hidden = attrs["hidden_size"]
    clip = attrs.get("clip")
    directions = 2 if direction == "bidirectional" else 1
    if layout:
        X = X.transpose(0, 1)
        h0 = None if h0 is None else h0.transpose(0, 1)
        c0 = None if c0 is None else c0.transpose(0, 1)
    T, N = X.shape[0], X.shape[1]
    G = GATES[op]
    acts = activation_functions(op, attrs, directions)

    def clipped(x):
        return x if clip is None else torch.clamp(x, -clip, clip)

    ys, yhs, ycs = [], [], []
    for d in range(directions):
        f = acts[d]
        w, r = W[d], R[d]
        wb, rb = (B[d][:G * hidden], B[d][G * hidden:]) if B is not None else (torch.zeros(G * hidden, dtype=X.dtype),) * 2
        h = h0[d] if h0 is not None else torch.zeros(N, hidden, dtype=X.dtype)
        c = c0[d] if c0 is not None else torch.zeros(N, hidden, dtype=X.dtype)
        out = [None] * T
        steps = range(T - 1, -1, -1) if (direction == "reverse" or d == 1) else range(T)
        for t in steps:
            x = X[t]
            if op == "RNN":
                h_new = f[0](clipped(x @ w.T + h @ r.T + wb + rb))
                c_new = c
            elif op == "GRU":
                wz, wr, wh = w.split(hidden)
                rz, rr, rh = r.split(hidden)
                wbz, wbr, wbh = wb.split(hidden)
                rbz, rbr, rbh = rb.split(hidden)
                z = f[0](clipped(x @ wz.T + h @ rz.T + wbz + rbz))
                rt = f[0](clipped(x @ wr.T + h @ rr.T + wbr + rbr))
                if attrs.get("linear_before_reset", 0):
                    hh = f[1](clipped(x @ wh.T + rt * (h @ rh.T + rbh) + wbh))
                else:
                    hh = f[1](clipped(x @ wh.T + (rt * h) @ rh.T + rbh + wbh))
                h_new = (1 - z) * hh + z * h
                c_new = c
            else:
                pre = x @ w.T + h @ r.T + wb + rb
                pi, po, pf, pc = pre.split(hidden, dim=1)
                if P is not None:
                    p_i, p_o, p_f = P[d].split(hidden)
                    pi, pf = pi + p_i * c, pf + p_f * c
                i = f[0](clipped(pi))
                fg = 1 - i if attrs.get("input_forget", 0) else f[0](clipped(pf))
                c_new = fg * c + i * f[1](clipped(pc))
                if P is not None:
                    po = po + p_o * c_new
                o = f[0](clipped(po))
                h_new = o * f[2](c_new)
            if lens is not None:
                inside = (t < lens)[:, None]
                h_new, c_new = torch.where(inside, h_new, h), torch.where(inside, c_new, c)
                out[t] = torch.where(inside, h_new, torch.zeros_like(h_new))
            else:
                out[t] = h_new
            h, c = h_new, c_new
        ys.append(torch.stack(out))
        yhs.append(h)
        ycs.append(c)
    Y, Yh, Yc = torch.stack(ys, 1), torch.stack(yhs), torch.stack(ycs)
    if layout:
        Y, Yh, Yc = Y.permute(2, 0, 1, 3), Yh.transpose(0, 1), Yc.transpose(0, 1)
    return Y, Yh, (Yc if op == "LSTM" else None)
