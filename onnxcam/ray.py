"""onnxcam on Ray Data: explain a data set beyond one machine.

The single-machine pipeline (io/pipeline.ExplainRun: read, preprocess, explain, write overlays and
maps) runs inside Ray actors, one Explainer per actor (the augmented model and its ONNX Runtime
session are built once per actor, not per batch); Ray Data streams the images to them in batches.
The driver collects the summary records and writes summary.jsonl (and summary.parquet), exactly
as `onnxcam explain` does on one machine.

On a cluster: the output folder must be a path every node can write (a shared filesystem);
images are given as paths every node can read, or as a Parquet table holding the encoded bytes
(column `image`, plus `name`). The model travels through Ray's object store, so it need not be on
every node (models over 2 GB must be a path every node can read).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from .errors import ImageError, UsageError
from .io.pipeline import PartialRunError, Record, Source, file_sha256, refuse_earlier_run, write_summary
from .spec import ExplainSpec

PARQUET_SUMMARY = "summary.parquet"
_OBJECT_STORE_LIMIT = 2 * 2**30


def explain(model, images: Union[str, os.PathLike, Sequence], out_dir, *, spec: Optional[ExplainSpec] = None,
            actors: int = 1, cpus_per_actor: float = 1, gpus_per_actor: float = 0, address: Optional[str] = None,
            providers=None, threads: Optional[int] = None, batch_size: int = 8, preset=None, size=None,
            resize="direct", bgr=None, labels_path=None, class_index=None, top_k=None, alpha=0.5,
            colormap="jet", max_pixels=None, inputs=None, on_warning: Callable[[str], None] = lambda m: None,
            save_npy: str = "float32", overwrite: bool = False, report: bool = False,
            **spec_arguments) -> List[Record]:
    """Explain `images` (a folder, a list of paths, or a .parquet table) on Ray; returns the
    summary records in input order. `address`: a Ray cluster ("auto", "ray://host:10001"); None
    starts (or joins) a local instance. `actors` Explainers run at once, each with
    `cpus_per_actor` CPUs and `gpus_per_actor` GPUs (GPU actors use CUDA through ONNX Runtime).
    The remaining options are `onnxcam explain`'s; method/layer/target... build the ExplainSpec."""
    ray = _ray()
    if actors < 1:
        raise UsageError(f"--actors must be at least 1, got {actors}")
    spec = ExplainSpec.build(spec, **spec_arguments)
    table = _source_rows(images)
    if not table:
        raise UsageError(f"no images found in {images}")
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": max(int(actors * cpus_per_actor), 1)}))
    model_ref = _model_reference(ray, model)
    out_dir = Path(os.fspath(out_dir)).resolve()
    refuse_earlier_run(out_dir, overwrite, report)
    out_dir.mkdir(parents=True, exist_ok=True)
    import onnx

    label = "model" if isinstance(model, onnx.ModelProto) else str(model)
    options = dict(preset=preset, size=size, resize=resize, bgr=bgr, labels_path=labels_path,
                   class_index=class_index, top_k=top_k, alpha=alpha, colormap=colormap, max_pixels=max_pixels,
                   inputs=inputs, batch_size=batch_size, save_npy=save_npy, overwrite=overwrite, report=report,
                   model_label=label, model_sha256=file_sha256(label) if os.path.isfile(label) else None)
    if gpus_per_actor and providers is None:
        providers = ["cuda"]
    dataset = _dataset(ray, images, table)
    rows = dataset.map_batches(
        _ExplainActor, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor,
        fn_constructor_kwargs=dict(model=model_ref, spec=spec, providers=providers, threads=threads,
                                   out_dir=str(out_dir), options=options),
        batch_format="numpy").take_all()
    records, failures = [], []
    for row in sorted(rows, key=lambda r: int(r["index"])):
        for line in json.loads(str(row["records"])):
            records.append(Record(**line))
        if str(row["error"]):
            failures.append(str(row["error"]))
            on_warning(str(row["error"]))
    if records:
        write_summary(out_dir, records)
        _write_parquet(out_dir / PARQUET_SUMMARY, records)
        if report:
            from .io.report import write_report

            write_report(out_dir, records, records[0].options)
    if failures:
        if len(table) == 1:
            raise ImageError(failures[0])
        raise PartialRunError(f"{len(failures)} of {len(table)} images could not be read (see the warnings above); "
                              f"explained the other {len(table) - len(failures)}", records)
    return records


class _ExplainActor:
    """One Explainer per actor; each call explains one batch of images and writes their files."""

    def __init__(self, model, spec, providers, threads, out_dir, options):
        import onnx

        from .io.pipeline import ExplainRun, run_setup
        from .runtime import Explainer

        ray = _ray()
        if isinstance(model, ray.ObjectRef):
            model = onnx.load_from_string(ray.get(model))
        self.explainer = Explainer(model, spec=spec, providers=providers, threads=threads)
        e = self.explainer
        pre, labels, run = run_setup(e, options["preset"], options["size"], options["resize"], options["bgr"],
                                     options["labels_path"])
        run = replace(run, model=options["model_label"], model_sha256=options["model_sha256"])
        self.max_pixels = options["max_pixels"]
        self.run = ExplainRun(e, pre, out_dir, labels=labels, class_index=options["class_index"],
                              top_k=options["top_k"], batch_size=options["batch_size"], alpha=options["alpha"],
                              colormap=options["colormap"], max_pixels=self.max_pixels, inputs=options["inputs"],
                              options=run, save_npy=options["save_npy"], overwrite=options["overwrite"],
                              thumbnails=options["report"])

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Explain one batch as the single-machine run does (one Explainer call per batch)."""
        from .io.images import decode_image

        indices = [int(i) for i in batch["index"]]
        errors = {i: "" for i in indices}
        sources, source_index = [], []
        for row, index in enumerate(indices):
            name, stem = str(batch["name"][row]), str(batch["stem"][row])
            try:
                image = (decode_image(bytes(batch["image"][row]), name, self.max_pixels) if "image" in batch
                         else str(batch["path"][row]))
            except ImageError as exc:
                errors[index] = str(exc)
                continue
            sources.append(Source(name, stem, image))
            source_index.append(index)
        records = {i: [] for i in indices}
        if sources:
            result = self.run.run(sources)
            failed = iter(result.failures)
            failure = next(failed, None)
            pending = list(zip(sources, source_index))
            for source, index in pending:  # failures come in source order, named by their source
                if failure is not None and str(failure).startswith(f"{source.image}:"):
                    errors[index], failure = str(failure), next(failed, None)
            done = [index for source, index in pending if not errors[index]]
            # Records follow the sources' order, the same number for each explained image.
            per_source = len(result.records) // max(len(done), 1)
            for n, index in enumerate(done):
                records[index] = [asdict(r) for r in result.records[n * per_source:(n + 1) * per_source]]
        return {"index": np.asarray(indices), "records": np.asarray([json.dumps(records[i]) for i in indices]),
                "error": np.asarray([errors[i] for i in indices])}


def _ray():
    try:
        import ray
    except ImportError:
        raise UsageError('the Ray engine needs Ray Data: pip install "onnxcam[ray]"') from None
    return ray


def _source_rows(images) -> List[dict]:
    """One row per image: index, display name, unique stem, and the path (or nothing for Parquet)."""
    if isinstance(images, (str, os.PathLike)) and str(images).endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(os.fspath(images))
        columns = set(table.column_names)
        if "image" not in columns and "path" not in columns:
            raise UsageError(f"{images}: the Parquet table needs a column `path` (image paths) or `image` "
                             "(encoded bytes, with `name`)")
        names = (table.column("name").to_pylist() if "name" in columns else
                 table.column("path").to_pylist() if "path" in columns else [f"row{i}" for i in range(table.num_rows)])
        return _with_stems([{"index": i, "name": str(n)} for i, n in enumerate(names)])
    from .io.images import list_images

    found = list_images([images] if isinstance(images, (str, os.PathLike)) else list(images))
    return _with_stems([{"index": i, "name": str(p), "path": str(p)} for i, p in enumerate(found.images)])


def _with_stems(rows: List[dict]) -> List[dict]:
    """The single-machine run's stems: the file stem, with -2, -3... for repeats, in input order."""
    seen = set()
    for row in rows:
        stem = candidate = Path(row["name"]).stem
        n = 1
        while candidate in seen:
            n += 1
            candidate = f"{stem}-{n}"
        seen.add(candidate)
        row["stem"] = candidate
    return rows


def _dataset(ray, images, rows):
    if isinstance(images, (str, os.PathLike)) and str(images).endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(os.fspath(images))
        extra = pa.table({k: [r[k] for r in rows] for k in ("index", "name", "stem")})
        for column in ("image", "path"):
            if column in table.column_names:
                extra = extra.append_column(column, table.column(column))
        return ray.data.from_arrow(extra)
    return ray.data.from_items(rows)


def _model_reference(ray, model):
    """The model's bytes in the object store (any node can read them), or its path for models
    too large for one object (then every node must see the path)."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return ray.put(model.SerializeToString())
    path = Path(os.fspath(model))
    if path.is_file() and path.stat().st_size < _OBJECT_STORE_LIMIT and not _has_external_data(path):
        return ray.put(path.read_bytes())
    return str(path.resolve())


def _has_external_data(path: Path) -> bool:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def _write_parquet(path: Path, records: List[Record]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .io.files import atomic_write_bytes

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist([asdict(r) for r in records]), sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
