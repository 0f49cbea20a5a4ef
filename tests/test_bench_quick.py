"""tools/bench.py --quick runs end to end and writes its table, CSV and JSON (no timing asserted)."""

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "tools", "bench.py")


def test_bench_quick(tmp_path):
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "x plain" in proc.stdout  # the table was printed

    with open(tmp_path / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    methods = {(r["engine"], r["method"]) for r in rows}
    assert ("onnxruntime", "plain") in methods and ("onnxcam", "gradcam") in methods
    assert not [r for r in rows if r["error"]], rows
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["rss_mb"]) > 0

    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["machine"]["nproc"] >= 1
    # The torch module and the exported ONNX model hold the same weights.
    for check in report["same_weights"].values():
        assert check["max_abs_logit_diff"] <= 1e-3 * max(1.0, check["max_abs_logit"])
