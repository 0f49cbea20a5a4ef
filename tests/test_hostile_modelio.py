"""Model files written and probed without extra copies of the weights (issue 15): the streaming
writer parses back to exactly the model, and the probe feeds large weights as inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxcam.autodiff.shapes import probe_infos
from onnxcam.modelio import load_model, save_model


def _model_with_every_kind_of_tensor():
    rng = np.random.default_rng(0)
    big = rng.standard_normal((40, 300)).astype(np.float32)  # raw_data, over the probe's small limit
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [300], rng.standard_normal(300).tolist())  # float_data
    ints = helper.make_tensor("shape", TensorProto.INT64, [2], [0, -1])  # int64_data
    half = numpy_helper.from_array(rng.standard_normal((40,)).astype(np.float16), "half")
    empty = numpy_helper.from_array(np.zeros((0, 3), np.float32), "empty")
    nodes = [helper.make_node("Add", ["x", "typed"], ["a"], name="add"),
             helper.make_node("Gemm", ["a", "big"], ["g"], transB=1, name="fc"),
             helper.make_node("Cast", ["half"], ["h32"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Add", ["g", "h32"], ["s"], name="bias"),
             helper.make_node("Reshape", ["s", "shape"], ["y"], name="reshape")]
    graph = helper.make_graph(nodes, "kinds", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 300])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(big, "big"), typed, ints, half, empty],
                              doc_string="a graph doc", value_info=[helper.make_tensor_value_info("a", 1, ["N", 300])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="test",
                              doc_string="model doc")
    model.ir_version = 8
    model.metadata_props.add(key="k", value="v")
    return model


def test_the_streaming_writer_parses_back_to_exactly_the_model(tmp_path):
    model = _model_with_every_kind_of_tensor()
    path = save_model(model, tmp_path / "m.onnx")
    back = onnx.load(str(path))
    assert back == model
    assert back.SerializeToString() == model.SerializeToString()  # canonical order once re-serialised
    x = np.random.default_rng(1).standard_normal((2, 300)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    assert np.array_equal(got, expected) and np.abs(expected).max() > 0
    assert load_model(path) == model


def test_the_probe_feeds_large_weights_and_keeps_the_model_intact():
    model = _model_with_every_kind_of_tensor()
    before = model.SerializeToString()
    infos = probe_infos(model, ["g", "y"])
    assert infos["g"].shape == (infos["g"].shape[0], 40) and isinstance(infos["g"].shape[0], str)  # batch varies
    assert infos["y"].shape[0] == infos["g"].shape[0]
    assert model.SerializeToString() == before


def _pretend_large(monkeypatch):
    """Models over 2 GB are saved with external data: lower the threshold to a few kilobytes."""
    from onnxcam import modelio
    monkeypatch.setattr(modelio, "_PROTOBUF_LIMIT", 2**26 + 1024)


def test_a_large_model_is_saved_with_its_data_file_and_nothing_else(tmp_path, monkeypatch):
    _pretend_large(monkeypatch)
    model = _model_with_every_kind_of_tensor()
    expected = onnx.load_from_string(model.SerializeToString())
    save_model(model, tmp_path / "big.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    back = onnx.load(str(tmp_path / "big.onnx"))  # loads the external data beside it
    assert [numpy_helper.to_array(t).tolist() for t in back.graph.initializer] == \
        [numpy_helper.to_array(t).tolist() for t in expected.graph.initializer]


def test_an_interrupted_large_save_leaves_no_data_file_nor_folder(tmp_path, monkeypatch):
    from onnxcam import modelio
    _pretend_large(monkeypatch)
    real_save = onnx.save_model

    def save_then_interrupt(proto, path, *args, **kwargs):
        real_save(proto, path, *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(modelio.onnx, "save_model", save_then_interrupt)
    (tmp_path / "keep.txt").write_text("mine")
    import pytest
    with pytest.raises(KeyboardInterrupt):
        save_model(_model_with_every_kind_of_tensor(), tmp_path / "big.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_a_large_save_never_replaces_the_input_models_data(tmp_path, monkeypatch):
    from onnxcam.errors import OutputError
    import pytest
    _pretend_large(monkeypatch)
    data = tmp_path / "out.onnx.data"
    data.write_bytes(b"the input model's weights")
    with pytest.raises(OutputError, match="out.onnx.data: refusing to overwrite"):
        save_model(_model_with_every_kind_of_tensor(), tmp_path / "out.onnx", refuse=[data])
    assert data.read_bytes() == b"the input model's weights"


def test_the_streaming_reader_gives_what_onnx_load_gives(tmp_path):
    """read_model walks the file field by field (one weight in memory at a time): same message as
    onnx.load, for onnx's own serialisation (initializers first) and for ours (initializers last)."""
    from onnxcam.modelio import _read_streaming, read_model

    model = _model_with_every_kind_of_tensor()
    model.functions.add().name = "f"  # a top-level field after the graph
    onnx.save(model, str(tmp_path / "onnx.onnx"))
    save_model(model, tmp_path / "ours.onnx")
    for name in ("onnx.onnx", "ours.onnx"):
        assert _read_streaming(tmp_path / name) == read_model(tmp_path / name) == onnx.load(str(tmp_path / name)) == model


def test_the_streaming_reader_hands_damaged_files_to_onnx_load(tmp_path):
    import pytest
    from onnxcam.errors import ModelLoadError

    data = _model_with_every_kind_of_tensor().SerializeToString()
    for cut in (len(data) // 2, len(data) - 3, 5):
        (tmp_path / "cut.onnx").write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match="cut.onnx"):
            load_model(tmp_path / "cut.onnx")
