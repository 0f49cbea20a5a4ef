"""Long fuzzing run: the properties of tests/test_fuzz.py with a large random budget.

    python tools/fuzz.py                    # 2,000 examples per property
    python tools/fuzz.py --examples 20000   # longer
    python tools/fuzz.py --raw-augment      # also tally what onnxcam.augment itself (unguarded) raises

Each property passes when every fuzzed input either succeeds or raises an onnxcam.errors
exception; the first other exception is shrunk by hypothesis and printed with its traceback.
--raw-augment does not fail: it counts the non-onnxcam exceptions the bare augmenter raises on
broken graphs (the ones onnxcam.augment / modelio.graph_errors turn into
UnsupportedModelError), grouped by type and innermost onnxcam frame, for the maintainers.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("ONNXCAM_FUZZ_PROFILE", "long")

from hypothesis import HealthCheck, given, settings  # noqa: E402

import test_fuzz as fz  # noqa: E402  (the generators and checks live with the CI test)


def run_property(name, strategy, check, examples, seed):
    count = 0

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(strategy)
    def prop(value):
        nonlocal count
        count += 1
        check(value)

    if seed is not None:
        prop = __import__("hypothesis").seed(seed)(prop)
    start = time.time()
    try:
        prop()
        status = "ok"
    except Exception:  # the minimal failing example, already shrunk
        traceback.print_exc()
        status = "FAILED"
    print(f"{name:<40} {count:>7} cases  {time.time() - start:7.1f} s  {status}", flush=True)
    return status == "ok"


def raw_augment_tally(examples, seed):
    """What the bare onnxcam.augment raises on broken graphs, grouped (not a failure)."""
    from onnxcam.cam.augment import augment
    from onnxcam.errors import OnnxcamError
    from onnxcam import augment as augment_model

    tally = collections.Counter()
    count = 0

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(fz.graph_mutations())
    def prop(model):
        nonlocal count
        count += 1
        try:
            augment(model)
        except OnnxcamError:
            tally["onnxcam error (fine)"] += 1
        except Exception as exc:
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/onnxcam/" in f.filename]
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
            try:
                augment_model(model)
                guarded = "guarded path: succeeded?!"
            except OnnxcamError as wrapped:
                guarded = f"guarded path: {type(wrapped).__name__}"
            except Exception as other:
                guarded = f"guarded path: UNCAUGHT {type(other).__name__}"
            tally[f"{type(exc).__name__} at {where} -> {guarded}"] += 1
        else:
            tally["augmented"] += 1

    if seed is not None:
        prop = __import__("hypothesis").seed(seed)(prop)
    prop()
    print(f"\nbare onnxcam.augment on {count} broken graphs:")
    for key, n in tally.most_common():
        print(f"  {n:>6}  {key}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="examples per property")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    parser.add_argument("--raw-augment", action="store_true", help="also tally the bare augmenter's exceptions")
    args = parser.parse_args(argv)
    fz.seed_models()
    fz.seed_images()
    ok = True
    with tempfile.TemporaryDirectory(prefix="onnxcam-fuzz-") as tmp:
        folder = Path(tmp)
        ok &= run_property("loader / mutated bytes", fz.mutated_model_bytes(),
                           lambda d: fz.check_load_bytes(d, folder), args.examples, args.seed)
        ok &= run_property("augment / broken graphs", fz.graph_mutations(), fz.check_augment, args.examples, args.seed)
        ok &= run_property("augment / mutated bytes", fz.mutated_model_bytes(), fz.check_augment_bytes,
                           args.examples, args.seed)
        ok &= run_property("image reader / mutated bytes", fz.mutated_image_bytes(),
                           lambda d: fz.check_image_bytes(d, folder), args.examples, args.seed)
    if args.raw_augment:
        raw_augment_tally(args.examples, args.seed)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
