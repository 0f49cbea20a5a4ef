"""Fuzzing the model loader, the augmenter and the image reader: whatever the bytes, the only
exceptions that may come out are onnxcam's own (onnxcam.errors.OnnxcamError subclasses).

The budget here is fixed and small (the whole file runs in well under a minute, derandomized so CI
is reproducible); `python tools/fuzz.py` runs the same properties with a long random budget.
Mutations: byte flips, truncations, insertions and deletions of serialized models and images;
graph edits that keep the protobuf valid but break the graph (dropped nodes, renamed edges,
attributes of the wrong type, unknown ops, bad opsets, shuffled nodes, mangled shapes and weights).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxcam.errors import OnnxcamError
from onnxcam.io.images import read_image
from onnxcam.modelio import load_model
from onnxcam import augment as augment_model

# CI budget: fixed, derandomized. tools/fuzz.py loads the "long" profile instead.
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("long", max_examples=5000, deadline=None, derandomize=False, database=None,
                          suppress_health_check=list(HealthCheck))
PROFILE = os.environ.get("ONNXCAM_FUZZ_PROFILE", "ci")


# ------------------------------------------------------------------------------------ seeds

def tiny_model(classes=4) -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm, opset 13."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((6, 3, 3, 3)) * 0.3).astype(np.float32)
    g = (rng.standard_normal((classes, 6)) * 0.5).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "W"], ["conv"], pads=[1, 1, 1, 1], name="conv0"),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu0"),
             helper.make_node("GlobalAveragePool", ["relu"], ["gap"], name="gap0"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flat0"),
             helper.make_node("Gemm", ["flat", "G"], ["logits"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(g, "G")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


_SEEDS = {}  # model name -> serialized bytes
_IMAGE_SEEDS = {}  # format -> encoded bytes


def seed_models():
    """The tiny hand-built model and, when torch is there, a TinyResNet export (BN folded, MaxPool,
    residual Adds): two byte strings mutated by the fuzzers."""
    if not _SEEDS:
        _SEEDS["tiny"] = tiny_model().SerializeToString()
        try:
            import torch  # noqa: F401
            from torch_nets import TinyResNet, export, randomise_batchnorm
            with tempfile.TemporaryDirectory() as tmp:
                path = export(randomise_batchnorm(TinyResNet(classes=5)), Path(tmp) / "r.onnx", size=32)
                _SEEDS["resnet"] = Path(path).read_bytes()
        except Exception:  # pragma: no cover - torch missing or broken
            pass
    return _SEEDS


def seed_images():
    if not _IMAGE_SEEDS:
        rng = np.random.default_rng(1)
        yy, xx = np.mgrid[0:24, 0:32]
        rgb = np.stack([xx * 8, yy * 10, (xx + yy) * 4], -1).astype(np.uint8)
        rgba = np.dstack([rgb, rng.integers(0, 255, (24, 32), dtype=np.uint8)])
        found = {}
        for ext, img in ((".png", rgb), (".jpg", rgb), (".bmp", rgb), (".ppm", rgb), (".tiff", rgb), (".webp", rgb),
                         (".png", rgba), (".png", rgb[:, :, 0]), (".png", (rgb.astype(np.uint16) * 257))):
            ok, buf = cv2.imencode(ext, img)
            if ok:
                found[f"{ext}-{img.ndim}-{img.dtype}-{img.shape[-1]}"] = buf.tobytes()
        _IMAGE_SEEDS.update(found)
    return _IMAGE_SEEDS


# ------------------------------------------------------------------------------ byte mutations

@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    """`data` with 1-6 random edits: xor a byte, truncate, insert or delete a run, overwrite a varint."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "flip", "truncate", "insert", "delete", "overwrite"]))
        if not out:
            break
        at = draw(st.integers(0, len(out) - 1))
        if kind == "flip":
            out[at] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del out[at:at + draw(st.integers(1, 64))]
        else:
            chunk = draw(st.binary(min_size=1, max_size=8))
            out[at:at + len(chunk)] = chunk
    return bytes(out)


@st.composite
def mutated_model_bytes(draw) -> bytes:
    seeds = seed_models()
    return draw(byte_mutations(seeds[draw(st.sampled_from(sorted(seeds)))]))


@st.composite
def mutated_image_bytes(draw) -> bytes:
    seeds = seed_images()
    return draw(byte_mutations(seeds[draw(st.sampled_from(sorted(seeds)))]))


# ------------------------------------------------------------------------------ graph mutations

_OPS = ["Relu", "Conv", "Gemm", "Add", "Mul", "MaxPool", "Reshape", "Concat", "Softmax", "QLinearConv",
        "ConvInteger", "Loop", "If", "Transpose", "Resize", "Slice", "Gather", "NoSuchOp", "BatchNormalization"]


@st.composite
def graph_mutations(draw) -> onnx.ModelProto:
    """A seed model with 1-4 structural edits that keep the protobuf well-formed."""
    seeds = seed_models()
    model = onnx.ModelProto.FromString(seeds[draw(st.sampled_from(sorted(seeds)))])
    graph = model.graph
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["drop_node", "rename_input", "rename_output", "attr_type", "attr_value",
                                     "op_type", "swap_nodes", "drop_initializer", "opset", "input_shape",
                                     "elem_type", "weight_bytes", "drop_output", "domain", "dup_output"]))
        nodes = graph.node
        if not nodes:
            break
        i = draw(st.integers(0, len(nodes) - 1))
        node = nodes[i]
        names = [t for n in nodes for t in list(n.input) + list(n.output)] + ["", "ghost", "input"]
        if kind == "drop_node":
            del nodes[i]
        elif kind == "rename_input" and node.input:
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(names))
        elif kind == "rename_output" and node.output:
            node.output[draw(st.integers(0, len(node.output) - 1))] = draw(st.sampled_from(names))
        elif kind == "attr_type" and node.attribute:
            attr = node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
            value = draw(st.sampled_from([1.5, "s", [1.0, 2.0], [1, 2, 3, 4, 5, 6, 7], 3, -1, []]))
            new = helper.make_attribute(attr.name, value) if value != [] else onnx.AttributeProto(name=attr.name)
            attr.CopyFrom(new)
        elif kind == "attr_value":
            node.attribute.append(helper.make_attribute(
                draw(st.sampled_from(["pads", "strides", "kernel_shape", "axis", "group", "transB", "to", "perm"])),
                draw(st.sampled_from([0, -7, 99, [0, 0], [-1, -1, -1, -1], [100, 100], 2.5]))))
        elif kind == "op_type":
            node.op_type = draw(st.sampled_from(_OPS))
        elif kind == "swap_nodes":
            j = draw(st.integers(0, len(nodes) - 1))
            a, b = onnx.NodeProto(), onnx.NodeProto()
            a.CopyFrom(nodes[i])
            b.CopyFrom(nodes[j])
            nodes[i].CopyFrom(b)
            nodes[j].CopyFrom(a)
        elif kind == "drop_initializer" and graph.initializer:
            del graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
        elif kind == "opset":
            model.opset_import[0].version = draw(st.sampled_from([1, 7, 10, 11, 17, 21, 22, 30, 10**6]))
        elif kind == "input_shape":
            dims = graph.input[0].type.tensor_type.shape.dim
            choice = draw(st.sampled_from(["drop", "zero", "neg", "huge", "param"]))
            d = dims[draw(st.integers(0, len(dims) - 1))] if dims else None
            if d is None:
                continue
            if choice == "drop":
                del dims[len(dims) - 1]
            elif choice == "param":
                d.dim_param = "Q"
            else:
                d.dim_value = {"zero": 0, "neg": -3, "huge": 2**40}[choice]
        elif kind == "elem_type":
            target = draw(st.sampled_from([graph.input[0]] + list(graph.output)))
            target.type.tensor_type.elem_type = draw(st.sampled_from([0, 2, 6, 7, 9, 10, 11, 16, 17, 23, 99]))
        elif kind == "weight_bytes" and graph.initializer:
            init = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
            edit = draw(st.sampled_from(["short", "dims", "nan", "type"]))
            if edit == "short":
                init.raw_data = init.raw_data[: len(init.raw_data) // 2]
            elif edit == "dims" and init.dims:
                init.dims[0] = draw(st.sampled_from([0, 1, 3, 1000]))
            elif edit == "nan":
                init.raw_data = np.full(len(init.raw_data) // 4, np.nan, np.float32).tobytes()
            else:
                init.data_type = draw(st.sampled_from([6, 7, 10, 11]))
        elif kind == "drop_output" and graph.output:
            del graph.output[draw(st.integers(0, len(graph.output) - 1))]
        elif kind == "domain":
            node.domain = draw(st.sampled_from(["com.acme", "com.microsoft", "ai.onnx.ml"]))
        elif kind == "dup_output" and node.output:
            graph.output.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None))
    return model


# ------------------------------------------------------------------------------ the properties

def _only_onnxcam_errors(call):
    try:
        call()
    except OnnxcamError as exc:
        message = str(exc)
        assert message and "\n" not in message.strip(), f"error message is not one line: {message!r}"
        return exc
    return None


def check_load_bytes(data: bytes, folder: Path) -> None:
    path = folder / "fuzzed.onnx"
    path.write_bytes(data)
    _only_onnxcam_errors(lambda: load_model(path))


def check_augment(model: onnx.ModelProto) -> None:
    _only_onnxcam_errors(lambda: augment_model(model))


def check_augment_bytes(data: bytes) -> None:
    try:
        model = onnx.ModelProto.FromString(data)
    except Exception:
        return  # the loader's business (check_load_bytes)
    _only_onnxcam_errors(lambda: augment_model(model))


def check_image_bytes(data: bytes, folder: Path) -> None:
    path = folder / "fuzzed.img"
    path.write_bytes(data)
    _only_onnxcam_errors(lambda: read_image(path, max_pixels=4_000_000))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(settings.get_profile(PROFILE))
@given(data=mutated_model_bytes())
def test_loader_raises_only_onnxcam_errors_on_mutated_bytes(data, folder):
    check_load_bytes(data, folder)


@settings(settings.get_profile(PROFILE))
@given(model=graph_mutations())
def test_augment_raises_only_onnxcam_errors_on_broken_graphs(model):
    check_augment(model)


@settings(settings.get_profile(PROFILE), max_examples=settings.get_profile(PROFILE).max_examples // 2)
@given(data=mutated_model_bytes())
def test_augment_raises_only_onnxcam_errors_on_mutated_bytes(data):
    check_augment_bytes(data)


@settings(settings.get_profile(PROFILE))
@given(data=mutated_image_bytes())
def test_image_reader_raises_only_onnxcam_errors(data, folder):
    check_image_bytes(data, folder)
