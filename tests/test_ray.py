"""`onnxcam explain --engine ray`: the same files and records as the single-process run, on a
local Ray instance (one Explainer per actor)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from onnxcam.cli import main
from onnxcam.io.images import list_images
from onnxcam.io.pipeline import Source, explain_sources
from onnxcam.runtime import Explainer
from torch_nets import TinyResNet, export, randomise_batchnorm

ray = pytest.importorskip("ray", reason="Ray Data is part of the dev install (onnxcam[ray]); CI installs it")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    torch.manual_seed(0)
    model = export(randomise_batchnorm(TinyResNet()), root / "tiny.onnx", 64)
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):  # smooth random photos of different sizes
        small = rng.integers(0, 255, (6 + i, 8, 3), dtype=np.uint8)
        cv2.imwrite(str(photos / f"p{i}.png"), cv2.resize(small, (80 + 10 * i, 60 + 7 * i)))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield model, photos, root
    ray.shutdown()


def _single_process(model, photos, out, **options):
    out.mkdir()
    explainer = Explainer(model, method="gradcam,layercam")
    return explain_sources(explainer, [Source.from_path(p) for p in list_images([photos]).images], out,
                           size=(64, 64), **options)


@pytest.mark.parametrize("actors", [1, 2])
def test_ray_writes_what_the_single_process_run_writes(setup, actors, tmp_path):
    from onnxcam import ray as on_ray

    model, photos, _ = setup
    local = _single_process(model, photos, tmp_path / "local", batch_size=2)
    distributed = on_ray.explain(model, photos, tmp_path / "ray", actors=actors, batch_size=2,
                                 method="gradcam,layercam", size=(64, 64))
    assert len(distributed) == len(local) == 10
    for a, b in zip(distributed, local):
        assert (a.image, a.class_index, a.method, a.rank) == (b.image, b.class_index, b.method, b.rank)
        map_a, map_b = np.load(a.npy), np.load(b.npy)
        assert map_b.max() > 0.5  # a real map, not an empty one
        np.testing.assert_array_equal(map_a, map_b)
    lines = [json.loads(line) for line in (tmp_path / "ray" / "summary.jsonl").read_text().splitlines()]
    assert [l["image"] for l in lines] == [r.image for r in local]
    import pyarrow.parquet as pq
    assert pq.read_table(tmp_path / "ray" / "summary.parquet").num_rows == 10


def test_ray_reads_a_parquet_table_of_encoded_images(setup, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    model, photos, _ = setup
    files = list_images([photos]).images
    table = pa.table({"name": [p.name for p in files], "image": [p.read_bytes() for p in files]})
    pq.write_table(table, tmp_path / "images.parquet")
    result = CliRunner().invoke(main, ["explain", str(model), str(tmp_path / "images.parquet"), "-o",
                                       str(tmp_path / "out"), "--engine", "ray", "--actors", "2", "--size", "64", "64",
                                       "--batch-size", "3", "--method", "gradcam,layercam"])
    assert result.exit_code == 0, result.output
    local = _single_process(model, photos, tmp_path / "local", batch_size=3)
    lines = [json.loads(line) for line in (tmp_path / "out" / "summary.jsonl").read_text().splitlines()]
    assert len(lines) == len(local) == 10
    for line, record in zip(lines, local):
        assert line["image"] == record.image.rsplit("/", 1)[-1] and line["class_index"] == record.class_index
        np.testing.assert_array_equal(np.load(line["npy"]), np.load(record.npy))


def test_a_broken_image_is_reported_and_the_others_explained(setup, tmp_path):
    from onnxcam import ray as on_ray
    from onnxcam.errors import ImageError

    model, photos, root = setup
    mixed = root / "mixed"
    mixed.mkdir(exist_ok=True)
    (mixed / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = list_images([photos]).images[0]
    (mixed / good.name).write_bytes(good.read_bytes())
    warnings = []
    with pytest.raises(ImageError, match="1 of 2 images"):
        on_ray.explain(model, mixed, tmp_path / "out", size=(64, 64), on_warning=warnings.append)
    assert len(warnings) == 1 and "broken.png" in warnings[0]
    lines = (tmp_path / "out" / "summary.jsonl").read_text().splitlines()
    assert len(lines) == 1 and good.name in lines[0]


def test_parquet_without_the_ray_engine_is_a_usage_error(setup, tmp_path):
    model, _, _ = setup
    result = CliRunner().invoke(main, ["explain", str(model), str(tmp_path / "x.parquet"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--engine ray" in result.output
