"""LSTM, GRU and RNN VJP rules.

Two kinds of checks:
- One-node models over the attribute grid (directions, layout 0/1, initial states, sequence_lens,
  every activation ONNX allows, clip, peepholes, input_forget, linear_before_reset) against the
  spec equations in torch float64 (rnn_reference.py). The reference is first checked against
  ONNX Runtime's own kernels on the forward outputs (float32: ORT has no float64 LSTM/GRU/RNN).
  The gradient graph never reads the node's outputs (it recomputes the recurrence), so it runs in
  float64 with the recurrent node pruned away: gradients agree with torch autograd to ~1e-12.
- torch nn.LSTM / nn.GRU / nn.RNN exported by torch.onnx.export (legacy at opsets 11/13/17, and
  dynamo), in float32 through ORT's real kernels, against torch float64 autograd on the same
  weights. Tolerance 1e-5 of the largest gradient entry: the ORT forward and our float32 backward
  each round at float32's 6e-8 per operation, and the error grows with the number of steps
  (5 here, 2 layers); measured at most 2.1e-7, so 1e-5 leaves room for other BLAS builds while
  still catching any wrong term (a wrong gate or mask moves the gradient by 1e-2 or more).
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

import rnn_reference
from harness import rel_err, session
from onnxcam.autodiff import add_gradients
from onnxcam.autodiff.shapes import make_value_info

WORST = {}


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    print("\nworst relative error per op/config:")
    for key in sorted(WORST):
        print(f"  {key:44s} {WORST[key]:.2e}")


def _record(key, err):
    WORST[key] = max(WORST.get(key, 0.0), err)


# ---------------------------------------------------------------------- one-node models
T, N, I, H = 4, 3, 2, 3


def node_arrays(op, directions, states, peephole, lens, layout, seed=0):
    rng = np.random.default_rng(seed)
    g = rnn_reference.GATES[op]
    arrays = {
        "x": rng.standard_normal((N, T, I) if layout else (T, N, I)),
        "w": rng.standard_normal((directions, g * H, I)) * 0.8,
        "r": rng.standard_normal((directions, g * H, H)) * 0.6,
        "b": rng.standard_normal((directions, 2 * g * H)) * 0.3,
    }
    if lens is not None:
        arrays["lens"] = np.asarray(lens, np.int32)
    if states:
        state_shape = (N, directions, H) if layout else (directions, N, H)
        arrays["h0"] = rng.standard_normal(state_shape) * 0.5
        if op == "LSTM":
            arrays["c0"] = rng.standard_normal(state_shape) * 0.5
    if peephole:
        arrays["p"] = rng.standard_normal((directions, 3 * H)) * 0.5
    return arrays


GRAPH_INPUTS = ("x", "lens", "h0", "c0")


def node_model(op, attrs, arrays, opset, dtype, constant_lens=False, dynamic_length=False):
    """One recurrent node; x, lens, h0, c0 are graph inputs (lens an initializer if
    constant_lens; x's sequence axis a symbol if dynamic_length), the weights initializers."""
    np_type = np.float64 if dtype == TensorProto.DOUBLE else np.float32
    names = ["x", "w", "r", "b", "lens", "h0", "c0", "p"][:8 if op == "LSTM" else 6]
    inputs = [n if n in arrays else "" for n in names]
    while inputs[-1] == "":
        inputs.pop()
    outputs = ["y", "yh", "yc"] if op == "LSTM" else ["y", "yh"]
    node = helper.make_node(op, inputs, outputs, **attrs)
    fed = [n for n in GRAPH_INPUTS if n in arrays and not (n == "lens" and constant_lens)]
    shapes = {n: list(arrays[n].shape) for n in fed}
    if dynamic_length:
        shapes["x"][attrs.get("layout", 0)] = "T"
    vis = [helper.make_tensor_value_info(n, TensorProto.INT32 if n == "lens" else dtype, shapes[n]) for n in fed]
    inits = [numpy_helper.from_array(arrays[n].astype(np_type), n) for n in ("w", "r", "b", "p") if n in arrays]
    if constant_lens:
        inits.append(numpy_helper.from_array(arrays["lens"], "lens"))
    outs = [helper.make_tensor_value_info(o, dtype, None) for o in outputs]
    model = helper.make_model(helper.make_graph([node], op, vis, outs, inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def run_fed(model, arrays, np_type, outputs=None):
    fed = {i.name for i in model.graph.input}
    feeds = {n: (arrays[n] if n == "lens" else np.asarray(arrays[n]).astype(np_type)) for n in fed if n in arrays}
    return session(model).run(outputs, feeds)


def reference(op, attrs, arrays, requires_grad=()):
    t = {k: torch.tensor(v if k == "lens" else v.astype(np.float64), requires_grad=k in requires_grad)
         for k, v in arrays.items()}
    lens = t["lens"].long() if "lens" in t else None
    outs = rnn_reference.forward(op, attrs, t["x"], t["w"], t["r"], t.get("b"), lens, t.get("h0"), t.get("c0"),
                                 t.get("p"))
    return t, outs


def add_score(model, output_seeds, opset):
    """score = sum_k sum(seed_k * output_k), built in the graph so one seed (1.0) covers all outputs.
    A seed given as None becomes a graph input `seed_<output>` of the output's type."""
    graph, parts = model.graph, []
    types = {o.name: o.type.tensor_type.elem_type for o in graph.output}
    for name, seed in output_seeds.items():
        if seed is None:
            graph.input.append(helper.make_tensor_value_info(f"seed_{name}", types[name], None))
        else:
            graph.initializer.append(numpy_helper.from_array(seed, f"seed_{name}"))
        graph.node.append(helper.make_node("Mul", [name, f"seed_{name}"], [f"weighted_{name}"]))
        graph.node.append(helper.make_node("ReduceSum", [f"weighted_{name}"], [f"sum_{name}"], keepdims=0))
        parts.append(f"sum_{name}")
    graph.node.append(helper.make_node("Sum", parts, ["score"]))


def gradient_only(model, gradients):
    """Keep the nodes the gradient outputs need; fail if that includes a recurrent node."""
    graph = model.graph
    needed, kept = set(gradients), []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # Scan bodies read outer tensors by name
                needed.update(i for n in attr.g.node for i in n.input)
    assert not any(n.op_type in ("LSTM", "GRU", "RNN") for n in kept), "the gradient reads the op's outputs"
    del graph.node[:]
    graph.node.extend(reversed(kept))
    del graph.output[:]
    return model


def check_reference_against_ort(op, attrs, arrays, opset, constant_lens=False):
    """The reference computes what ONNX Runtime's kernel computes (float32 forward outputs). ORT
    refuses layout=1 ("batchwise recurrent operations are not supported"): those are checked as
    the layout-0 node on transposed inputs, which is what the spec defines layout 1 to be."""
    if attrs.get("layout", 0):
        attrs = {k: v for k, v in attrs.items() if k != "layout"}
        arrays = {k: (v.swapaxes(0, 1) if k in ("x", "h0", "c0") else v) for k, v in arrays.items()}
    model32 = node_model(op, attrs, arrays, opset, TensorProto.FLOAT, constant_lens)
    ort_outs = run_fed(model32, arrays, np.float32)
    rounded = {k: (v if k == "lens" else v.astype(np.float32)) for k, v in arrays.items()}
    _, ref32 = reference(op, attrs, rounded)
    for got, want in zip(ort_outs, ref32):
        assert rel_err(got, want.detach().numpy()) < 1e-5, "reference and ONNX Runtime disagree"


def check_node(op, opset, attrs, directions=1, states=False, lens=None, peephole=False, outputs=None, key=None,
               constant_lens=False):
    layout = attrs.get("layout", 0)
    arrays = node_arrays(op, directions, states, peephole, lens, layout)
    check_reference_against_ort(op, attrs, arrays, opset, constant_lens)
    # 2. gradients of a seeded sum of the outputs, float64, against the reference's autograd
    wrt = [n for n in ("x", "h0", "c0") if n in arrays]
    t, outs = reference(op, attrs, arrays, requires_grad=wrt)
    rng = np.random.default_rng(1)
    names = ["y", "yh", "yc"][:len([o for o in outs if o is not None])]
    chosen = outputs or names
    seeds = {n: rng.standard_normal(tuple(o.shape)) for n, o in zip(names, outs) if n in chosen}
    sum(((o * torch.tensor(seeds[n])).sum() for n, o in zip(names, outs) if n in seeds)).backward()
    model = node_model(op, attrs, arrays, opset, TensorProto.DOUBLE, constant_lens)
    add_score(model, seeds, opset)
    built = add_gradients(model, wrt, "score")
    grads = [built.gradients[n] for n in wrt]
    model = gradient_only(model, grads)
    for n, g in zip(wrt, grads):
        model.graph.output.append(make_value_info(g, built.emitter.info(n)))
    onnx.checker.check_model(model, full_check=True)
    got = run_fed(model, dict(arrays, **{built.seed: np.asarray(1.0)}), np.float64, grads)
    for n, g in zip(wrt, got):
        ref = t[n].grad.numpy()
        assert np.max(np.abs(ref)) > 1e-3, f"degenerate reference gradient for {n}"
        err = rel_err(g, ref)
        _record(key or f"{op} node", err)
        assert err < 1e-9, (n, err)


DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("layout,opset", [(0, 11), (0, 13), (1, 14), (1, 21)])
def test_directions_layouts_states(op, direction, layout, opset):
    attrs = dict(hidden_size=H, direction=direction)
    if layout:
        attrs["layout"] = 1
    if op == "GRU":
        attrs["linear_before_reset"] = opset % 2  # both forms over the grid
    states = opset in (13, 14)
    check_node(op, opset, attrs, DIRECTIONS[direction], states=states, key=f"{op} {direction}")


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_sequence_lens(op, direction):
    """Shorter sequences: the state freezes past each end and Y is zero there; a full one too."""
    attrs = dict(hidden_size=H, direction=direction)
    check_node(op, 13, attrs, DIRECTIONS[direction], states=True, lens=[4, 2, 3], key=f"{op} sequence_lens")
    check_node(op, 11, attrs, DIRECTIONS[direction], states=False, lens=[T] * N, key=f"{op} sequence_lens")
    check_node(op, 17, attrs, DIRECTIONS[direction], states=False, lens=[T] * N, constant_lens=True,
               key=f"{op} sequence_lens")
    check_node(op, 14, dict(attrs, layout=1), DIRECTIONS[direction], states=True, lens=[1, 4, 2],
               key=f"{op} sequence_lens")


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_dynamic_sequence_length(op):
    """X declared [T, N, I] with T a symbol: one gradient graph serves two lengths (float32, the
    op's outputs are needed here for the score's shape, so ORT's kernel runs: tolerance 1e-5)."""
    attrs = dict(hidden_size=H, direction="bidirectional")
    arrays = node_arrays(op, 2, True, False, None, 0)
    model = node_model(op, attrs, arrays, 13, TensorProto.FLOAT, dynamic_length=True)
    outputs = [o.name for o in model.graph.output]
    add_score(model, {n: None for n in outputs}, 13)
    built = add_gradients(model, ["x", "h0"], "score")
    grads = [built.gradients["x"], built.gradients["h0"]]
    model.graph.output.extend(make_value_info(g, built.emitter.info(n)) for g, n in zip(grads, ["x", "h0"]))
    for length in (4, 7):
        x = np.random.default_rng(length).standard_normal((length, N, I))
        run_arrays = dict(arrays, x=x)
        t, outs = reference(op, attrs, run_arrays, requires_grad=("x", "h0"))
        rng = np.random.default_rng(length + 1)
        seeds = {f"seed_{n}": rng.standard_normal(tuple(o.shape)) for n, o in zip(outputs, outs) if o is not None}
        sum((o * torch.tensor(seeds[f"seed_{n}"])).sum() for n, o in zip(outputs, outs) if o is not None).backward()
        feeds = dict(run_arrays, **seeds, **{built.seed: np.asarray(1.0)})
        got = run_fed(model, feeds, np.float32, grads)
        for g, n in zip(got, ["x", "h0"]):
            err = rel_err(g, t[n].grad.numpy())
            _record(f"{op} dynamic length (float32)", err)
            assert err < 1e-5, (n, length, err)


@pytest.mark.parametrize("output", ["y", "yh", "yc"])
def test_each_output_alone(output):
    check_node("LSTM", 17, dict(hidden_size=H, direction="bidirectional"), 2, states=True, outputs=[output],
               key="LSTM one output")


# alphas, betas and clips exact in float32 (the attributes' type), so float64 checks stay tight
ACTIVATION_SETS = [
    ("RNN", ["Relu"], [], []),
    ("RNN", ["Affine"], [0.75], [0.25]),
    ("RNN", ["LeakyRelu", "ThresholdedRelu"], [0.125, 0.375], []),
    ("RNN", ["ScaledTanh"], [1.25], [0.625]),
    ("RNN", ["Elu", "Softsign"], [0.875], []),
    ("GRU", ["HardSigmoid", "Softplus"], [0.3125], [0.4375]),
    ("GRU", ["Sigmoid", "Elu"], [], []),
    ("LSTM", ["HardSigmoid", "Softsign", "ScaledTanh"], [0.25, 0.875], [0.5625, 1.1875]),
    ("LSTM", ["Sigmoid", "LeakyRelu", "Softplus"], [], []),
]


@pytest.mark.parametrize("op,names,alphas,betas", ACTIVATION_SETS, ids=lambda v: str(v))
def test_activations(op, names, alphas, betas):
    attrs = dict(hidden_size=H, activations=names)
    directions = 1
    if len(names) == 2 * len(rnn_reference.DEFAULT_ACTIVATIONS[op]):
        attrs["direction"], directions = "bidirectional", 2
    if alphas:
        attrs["activation_alpha"] = alphas
    if betas:
        attrs["activation_beta"] = betas
    check_node(op, 13, attrs, directions, states=True, key=f"{op} activations")


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_clip(op):
    arrays = node_arrays(op, 1, True, False, None, 0)
    _, plain = reference(op, dict(hidden_size=H), arrays)
    _, clipped = reference(op, dict(hidden_size=H, clip=0.875), arrays)
    assert rel_err(clipped[0].detach().numpy(), plain[0].detach().numpy()) > 1e-2  # the clip bites
    check_node(op, 17, dict(hidden_size=H, clip=0.875), 1, states=True, key=f"{op} clip")


def test_lstm_peepholes_and_input_forget():
    check_node("LSTM", 13, dict(hidden_size=H, direction="bidirectional"), 2, states=True, peephole=True,
               key="LSTM peepholes")
    check_node("LSTM", 13, dict(hidden_size=H, input_forget=1), 1, states=True, peephole=True,
               key="LSTM input_forget")


# ---------------------------------------------------------------------- torch modules, exported
class Recurrent(nn.Module):
    """A torch recurrent module returning (output, h_n[, c_n]), with or without given states."""

    def __init__(self, kind, layers, bidirectional, batch_first, states):
        super().__init__()
        cls = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN, "RNN-relu": nn.RNN}[kind]
        extra = {"nonlinearity": "relu"} if kind == "RNN-relu" else {}
        self.rnn = cls(I_TORCH, H_TORCH, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                       **extra)
        self.lstm, self.states = kind == "LSTM", states

    def forward(self, x, *states):
        if not self.states:
            y, h = self.rnn(x)
        elif self.lstm:
            y, h = self.rnn(x, (states[0], states[1]))
        else:
            y, h = self.rnn(x, states[0])
        return (y, *h) if self.lstm else (y, h)


I_TORCH, H_TORCH, T_TORCH, N_TORCH = 3, 4, 5, 2


def torch_inputs(net, kind, layers, bidirectional, batch_first, states, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N_TORCH, T_TORCH, I_TORCH) if batch_first else (T_TORCH, N_TORCH, I_TORCH))
    arrays = {"x": x.astype(np.float32)}
    if states:
        shape = ((2 if bidirectional else 1) * layers, N_TORCH, H_TORCH)
        arrays["h0"] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        if kind == "LSTM":
            arrays["c0"] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
    return arrays


def export_recurrent(net, arrays, opset, dynamo=False, batch_axis=0):
    names = list(arrays)
    outputs = ["y", "hn", "cn"] if net.lstm else ["y", "hn"]
    args = tuple(torch.tensor(arrays[n]) for n in names)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(net, args, buf, opset_version=opset, input_names=names, output_names=outputs,
                              dynamo=True, verbose=False)
        else:
            dynamic = {"x": {batch_axis: "N"}}
            dynamic.update({n: {1: "N"} for n in names if n != "x"})
            torch.onnx.export(net, args, buf, opset_version=opset, input_names=names, output_names=outputs,
                              dynamic_axes=dynamic, dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    model.ir_version = min(model.ir_version, 8)
    return model


def check_exported(net, arrays, model, opset, key):
    """Gradients of a seeded sum of all outputs w.r.t. x (and h0, c0) vs torch float64 autograd."""
    assert any(n.op_type in ("LSTM", "GRU", "RNN") for n in model.graph.node), "no recurrent op exported"
    wrt = [n for n in ("x", "h0", "c0") if n in arrays]
    reference_net = copy.deepcopy(net).double()
    tensors = {n: torch.tensor(arrays[n].astype(np.float64), requires_grad=True) for n in arrays}
    outs = reference_net(*tensors.values())
    rng = np.random.default_rng(3)
    names = [o.name for o in model.graph.output]
    seeds = {n: rng.standard_normal(tuple(o.shape)) for n, o in zip(names, outs)}
    sum((o * torch.tensor(seeds[n])).sum() for n, o in zip(names, outs)).backward()
    add_score(model, {n: s.astype(np.float32) for n, s in seeds.items()}, opset)
    built = add_gradients(model, wrt, "score")
    grads = [built.gradients[n] for n in wrt]
    for n, g in zip(wrt, grads):
        model.graph.output.append(make_value_info(g, built.emitter.info(n)))
    onnx.checker.check_model(model, full_check=True)
    got = run_fed(model, dict(arrays, **{built.seed: np.asarray(1.0, np.float32)}), np.float32, grads + names)
    for name, out, ref in zip(names, got[len(grads):], outs):  # the export computes what torch does
        assert rel_err(out, ref.detach().numpy()) < 1e-5, name
    for n, g in zip(wrt, got):
        ref = tensors[n].grad.numpy()
        assert np.max(np.abs(ref)) > 1e-2, f"degenerate reference gradient for {n}"
        err = rel_err(g, ref)
        _record(key, err)
        assert err < 1e-5, (n, err)


# kind, layers, bidirectional, batch_first, states, opset: each option in both states over each kind
TORCH_GRID = [
    (kind, layers, bidirectional, batch_first, states, opset)
    for kind in ("LSTM", "GRU", "RNN", "RNN-relu")
    for layers, bidirectional, batch_first, states, opset in [
        (1, False, False, False, 11),
        (1, True, True, True, 13),
        (2, True, False, True, 17),
        (2, False, True, False, 13),
        (1, True, False, False, 17),
        (2, True, True, True, 11),
    ]
]


@pytest.mark.parametrize("kind,layers,bidirectional,batch_first,states,opset", TORCH_GRID, ids=str)
def test_torch_export(kind, layers, bidirectional, batch_first, states, opset):
    torch.manual_seed(len(TORCH_GRID) * layers + opset)
    net = Recurrent(kind, layers, bidirectional, batch_first, states).eval()
    arrays = torch_inputs(net, kind, layers, bidirectional, batch_first, states, seed=opset + layers)
    model = export_recurrent(net, arrays, opset, batch_axis=0 if batch_first else 1)
    check_exported(net, arrays, model, opset, f"torch {kind}")


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_torch_dynamo_export(kind):
    """The dynamo exporter also emits LSTM/GRU ops (opset 18, static shapes)."""
    torch.manual_seed(5)
    net = Recurrent(kind, 2, True, True, True).eval()
    arrays = torch_inputs(net, kind, 2, True, True, True, seed=5)
    check_exported(net, arrays, export_recurrent(net, arrays, 18, dynamo=True), 18, f"torch {kind} dynamo")


def test_unknown_activation_is_refused_naming_the_node():
    from onnxcam.errors import UnsupportedModelError
    arrays = node_arrays("RNN", 1, False, False, None, 0)
    model = node_model("RNN", dict(hidden_size=H, activations=["Swish"]), arrays, 13, TensorProto.FLOAT)
    model.graph.node[0].name = "encoder_rnn"
    with pytest.raises(UnsupportedModelError, match=r"'encoder_rnn' \(RNN, opset 13\).*activation 'Swish'"):
        add_gradients(model, ["x"], "y")


def test_weights_computed_from_the_target_are_refused():
    """Only X and the initial states get gradients: a partial answer would be wrong, so say so."""
    from onnxcam.errors import UnsupportedModelError
    arrays = node_arrays("GRU", 1, False, False, None, 0)
    model = node_model("GRU", dict(hidden_size=H), arrays, 13, TensorProto.FLOAT)
    graph = model.graph
    graph.node[0].name = "decoder_gru"
    graph.node[0].input[1] = "w_scaled"
    graph.node.insert(0, helper.make_node("Mul", ["w", "scale"], ["w_scaled"]))
    graph.input.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1]))
    with pytest.raises(UnsupportedModelError, match=r"'decoder_gru' \(GRU, opset 13\).*weights W depend"):
        add_gradients(model, ["x", "scale"], "y")
