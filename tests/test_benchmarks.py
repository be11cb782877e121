"""Smoke test of the benchmark suite: it runs, prints the table and writes the JSON (no timing assertions)."""

import json
import os
import subprocess
import sys

import pytest
from optional import need

from benchmarks.suite import forward_flops, train_flops, TUTORIAL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flops_formula_counts_every_matmul():
    # by hand for one layer, C=2, F=3, V=5, B=1, T=4: weights 4*4 + 2*2*3 = 28 per layer, output 10
    model = dict(num_layers=1, d_model=2, d_ff=3, vocab_size=5)
    assert forward_flops(model, 1, 4) == 2 * 4 * (28 + 10) + 4 * 1 * 16 * 2
    # the tutorial model at (8, 128): 6 FLOPs per weight per token, plus attention; a 179 ms GEMM floor at 205 GF/s
    assert 36.5e9 < train_flops(TUTORIAL, 8, 128) < 37.0e9


def test_quick_suite_runs_and_writes_json(tmp_path):
    need("torch", "torch")      # the benchmark suite compares against PyTorch
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "| train step (8, 128) |" in proc.stdout and "| generate" in proc.stdout
    assert "kernel" in proc.stdout          # the BLAS kernel NumPy ran is printed
    report = json.loads(out.read_text())
    case = report["speed"]["cases"][0]
    assert case["train_ms"]["npgpt"] > 0 and case["train_ms"]["torch"] > 0
    assert case["train_ratio"] == pytest.approx(case["train_ms"]["npgpt"] / case["train_ms"]["torch"])
    assert report["speed"]["sgemm_peak_gflops"] > 0
    assert report["machine"]["cores"] >= 1
