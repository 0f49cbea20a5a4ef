"""Concurrency and long runs: one Explainer shared by 8 threads gives bitwise the sequential maps,
1,000 consecutive explains do not grow the process's memory, repeated runs are bitwise identical."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam.runtime import Explainer

THREADS = 8
RUNS = 1000
RSS_BOUND = 8 * 2**20  # bytes of resident growth allowed over 1,000 explains after the warm-up


def tiny_model(classes=5) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32)
    g = (rng.standard_normal((classes, 8)) * 0.5).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "W1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
             helper.make_node("Gemm", ["flat", "G"], ["logits"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
                              [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"),
                               numpy_helper.from_array(g, "G")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def resnet_explainer(tmp_path_factory):
    """TinyResNet (BN, MaxPool, residual Adds) when torch is there: a realistic session to share."""
    pytest.importorskip("torch")
    from torch_nets import TinyResNet, export, randomise_batchnorm

    path = export(randomise_batchnorm(TinyResNet(classes=7)), tmp_path_factory.mktemp("m") / "r.onnx", size=48)
    return Explainer(path)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _batches(count, shape, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random(shape, dtype=np.float32) for _ in range(count)]


@pytest.mark.parametrize("which", ["tiny", "resnet"])
def test_one_explainer_shared_by_8_threads_equals_sequential(which, request):
    explainer = Explainer(tiny_model()) if which == "tiny" else request.getfixturevalue("resnet_explainer")
    size = 16 if which == "tiny" else 48
    inputs = _batches(4 * THREADS, (2, 3, size, size))
    classes = [None if i % 3 == 0 else np.array([i % 5, (i + 1) % 5]) for i in range(len(inputs))]
    sequential = [explainer(x, class_index=k) for x, k in zip(inputs, classes)]
    start = threading.Barrier(THREADS)

    def work(worker):
        start.wait()  # all threads hit the session at once
        return [(i, explainer(inputs[i], class_index=classes[i])) for i in range(worker, len(inputs), THREADS)]

    with ThreadPoolExecutor(THREADS) as pool:
        results = [r for part in pool.map(work, range(THREADS)) for r in part]
    assert len(results) == len(inputs)
    for i, got in results:
        want = sequential[i]
        assert got.cam.tobytes() == want.cam.tobytes(), f"batch {i}: threaded map differs"
        np.testing.assert_array_equal(got.class_index, want.class_index)
        assert got.score.tobytes() == want.score.tobytes()


def test_1000_consecutive_explains_do_not_grow_memory():
    explainer = Explainer(tiny_model())
    x = _batches(1, (4, 3, 16, 16))[0]
    for _ in range(50):  # warm-up: allocator arenas, ORT's caches
        explainer(x)
    before = rss_bytes()
    first = explainer(x).cam.copy()
    for i in range(RUNS):
        result = explainer(x, class_index=i % 5)
    growth = rss_bytes() - before
    print(f"RSS before {before / 2**20:.1f} MiB, growth over {RUNS} explains: {growth / 2**10:.0f} KiB")
    assert growth < RSS_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB over {RUNS} explains"
    assert explainer(x).cam.tobytes() == first.tobytes()
    assert np.all(np.isfinite(result.cam))


def test_repeated_runs_and_fresh_explainers_are_bitwise_identical():
    model = tiny_model()
    x = _batches(1, (3, 3, 16, 16), seed=5)[0]
    explainer = Explainer(model)
    reference = explainer(x)
    for _ in range(20):
        again = explainer(x)
        assert again.cam.tobytes() == reference.cam.tobytes()
        assert again.score.tobytes() == reference.score.tobytes()
    assert Explainer(model)(x).cam.tobytes() == reference.cam.tobytes()  # a new session too


def test_batch_splitting_is_bitwise_the_same_as_one_batch():
    explainer = Explainer(tiny_model())
    x = _batches(1, (7, 3, 16, 16), seed=9)[0]
    whole = explainer(x)
    split = explainer(x, batch_size=3)
    assert split.cam.shape == whole.cam.shape
    np.testing.assert_allclose(split.cam, whole.cam, atol=1e-6)  # batch size may change ORT's kernels
    np.testing.assert_array_equal(split.class_index, whole.class_index)


def test_atomic_writes_from_8_threads_keep_permissions_and_leave_no_temporaries(tmp_path):
    """The writers query the umask without changing it (os.umask(0) from one thread would let the
    others create world-writable files)."""
    from onnxcam.io.files import atomic_write_bytes

    umask = os.umask(0o022)
    try:
        def write(i):
            for j in range(25):
                atomic_write_bytes(tmp_path / f"f{i}_{j}.bin", bytes([i, j]) * 100)
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(write, range(THREADS)))
    finally:
        os.umask(umask)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == THREADS * 25 and not any(n.startswith(".") for n in names)
    assert {oct(os.stat(tmp_path / n).st_mode & 0o777) for n in names} == {oct(0o644)}
