"""Test harness for VJP rules: one-node models, gradients through ONNX Runtime, references from
torch autograd (float64) and a dot-product finite-difference check for ops without a torch twin."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxcam.autodiff import add_gradients
from onnxcam.autodiff.shapes import infer_infos, make_value_info

NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE,
              np.dtype(np.int64): TensorProto.INT64, np.dtype(np.bool_): TensorProto.BOOL,
              np.dtype(np.float16): TensorProto.FLOAT16, np.dtype(np.int32): TensorProto.INT32}


def make_model(nodes, inputs, outputs, initializers=None, opset=13, dynamic_batch=False):
    """A model from nodes; `inputs` maps name -> example array (its dtype and shape are declared;
    the first axis is symbolic when dynamic_batch); `outputs` lists output names (shapes left
    to inference); `initializers` maps name -> array."""
    vis = []
    for name, arr in inputs.items():
        shape = list(arr.shape)
        if dynamic_batch and shape:
            shape[0] = "N"
        vis.append(helper.make_tensor_value_info(name, NP_TO_ONNX[np.asarray(arr).dtype], shape))
    first_dtype = NP_TO_ONNX[np.asarray(next(iter(inputs.values()))).dtype]
    outs = [helper.make_tensor_value_info(o, first_dtype, None) if isinstance(o, str) else o for o in outputs]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(nodes, "test", vis, outs, inits)
    opset_ids = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opset_ids)
    model.ir_version = min(helper.find_min_ir_version_for(opset_ids), 10)
    infos = infer_infos(model)  # declare output types/ranks so the full checker accepts the model
    for out in model.graph.output:
        if out.name in infos and infos[out.name].dtype:
            out.CopyFrom(make_value_info(out.name, infos[out.name]))
    return model


def session(model, optimize=False):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def cut_at(model, target):
    """`model` with the node producing `target` removed and `target` a graph input: f(x, target),
    the function a dot-product check perturbs at an intermediate tensor."""
    model = copy.deepcopy(model)
    keep = [n for n in model.graph.node if target not in n.output]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    model.graph.input.append(helper.make_tensor_value_info(target, TensorProto.FLOAT, None))
    return model


def run(model, feeds, names=None):
    sess = session(model)
    names = names or [o.name for o in model.graph.output]
    return dict(zip(names, sess.run(names, feeds)))


def gradient_model(model, wrt, score):
    """A copy of `model` that also outputs d(sum(seed*score))/d(w) for w in `wrt`; seed is an input."""
    model = copy.deepcopy(model)
    built = add_gradients(model, list(wrt), score)
    for w in wrt:
        model.graph.output.append(make_value_info(built.gradients[w], built.emitter.info(w)))
    return model, built


def ort_vjp(model, feeds, wrt, score, seed):
    """Gradients of sum(seed * score) with respect to `wrt`, computed by the augmented model in ORT."""
    gmodel, built = gradient_model(model, wrt, score)
    onnx.checker.check_model(gmodel, full_check=True)
    feeds = dict(feeds)
    feeds[built.seed] = seed
    out = run(gmodel, feeds, [built.gradients[w] for w in wrt] + [score])
    return [out[built.gradients[w]] for w in wrt], out[score]


def torch_vjp(fn, arrays, seed):
    """torch float64 reference: gradients of sum(seed * fn(*arrays)) for every array."""
    import torch
    tensors = [torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True) for a in arrays]
    y = fn(*tensors)
    y.backward(torch.tensor(np.asarray(seed, dtype=np.float64)))
    return [t.grad.numpy() if t.grad is not None else np.zeros(t.shape) for t in tensors], y.detach().numpy()


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


def dot_product_check(model, feeds, wrt_name, score, eps=1e-3, seed_rng=0):
    """<v, (f(x+eps u) - f(x-eps u)) / 2eps> vs <VJP(v), u>; returns the relative mismatch."""
    rng = np.random.default_rng(seed_rng)
    base = run(model, feeds, [score])[score]
    v = rng.standard_normal(base.shape).astype(base.dtype)
    (grad,), _ = ort_vjp(model, feeds, [wrt_name], score, v)
    x = feeds[wrt_name]
    u = rng.standard_normal(x.shape).astype(x.dtype)
    plus = dict(feeds, **{wrt_name: (x.astype(np.float64) + eps * u).astype(x.dtype)})
    minus = dict(feeds, **{wrt_name: (x.astype(np.float64) - eps * u).astype(x.dtype)})
    fd = (run(model, plus, [score])[score].astype(np.float64) - run(model, minus, [score])[score].astype(np.float64)) / (2 * eps)
    lhs = float(np.sum(v.astype(np.float64) * fd))
    rhs = float(np.sum(grad.astype(np.float64) * u.astype(np.float64)))
    return abs(lhs - rhs) / (abs(lhs) + abs(rhs) + 1e-12)
