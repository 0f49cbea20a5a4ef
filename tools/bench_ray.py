"""Throughput of `onnxcam explain` on 200 images: the single-process run against Ray with 1 and 2
actors, on the real EfficientNet-Lite0 (the demo model) and real photos (scikit-image's, cropped
and resized into 200 distinct images). One run, one table.

    python tools/bench_ray.py [--images 200] [--out docs/bench-ray.txt]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def make_images(folder: Path, count: int) -> None:
    import cv2
    import numpy as np
    from skimage import data

    photos = [getattr(data, n)() for n in ("chelsea", "coffee", "astronaut", "rocket", "colorwheel",
                                           "immunohistochemistry", "hubble_deep_field", "retina")]
    rng = np.random.default_rng(0)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = photo[y:y + ch, x:x + cw]
        side = int(rng.integers(240, 480))
        cv2.imwrite(str(folder / f"img{i:04d}.jpg"), cv2.resize(crop, (side, side * ch // cw))[:, :, ::-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import ray

    from onnxcam import demo_export
    from onnxcam import ray as on_ray
    from onnxcam.io.images import list_images
    from onnxcam.io.pipeline import Source, explain_sources
    from onnxcam.runtime import Explainer

    model = demo_export.ensure_model(demo_export.default_model_path())
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxcam-bench-ray-") as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        make_images(tmp / "images", args.images)
        sources = [Source.from_path(p) for p in list_images([tmp / "images"]).images]

        start = time.perf_counter()
        explainer = Explainer(model)
        setup = time.perf_counter() - start
        (tmp / "local").mkdir()
        start = time.perf_counter()
        explain_sources(explainer, sources, tmp / "local", preset=demo_export.PRESET, batch_size=args.batch_size)
        rows.append(("single process (the CLI's loop)", 1, setup, time.perf_counter() - start))
        del explainer

        for actors in (1, 2):
            start = time.perf_counter()
            ray.init(num_cpus=actors, include_dashboard=False, log_to_driver=False)
            init = time.perf_counter() - start
            start = time.perf_counter()
            on_ray.explain(model, tmp / "images", tmp / f"ray{actors}", actors=actors, preset=demo_export.PRESET,
                           batch_size=args.batch_size)
            rows.append((f"Ray Data, {actors} actor(s)", actors, init, time.perf_counter() - start))
            ray.shutdown()

    base = rows[0][3]
    lines = [f"onnxcam explain throughput, {args.images} images, EfficientNet-Lite0 (real ImageNet weights), "
             f"Grad-CAM, batch {args.batch_size}; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, Python {platform.python_version()}, ray {ray.__version__}",
             "",
             f"{'engine':34} {'setup s':>8} {'run s':>8} {'images/s':>9} {'vs single':>9}"]
    for name, _, setup, run in rows:
        lines.append(f"{name:34} {setup:8.1f} {run:8.1f} {args.images / run:9.1f} {base / run:9.2f}")
    lines.append("")
    lines.append("setup: building the Explainer (single process) or starting Ray (Ray; actors build their "
                 "Explainers inside the run time).")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
