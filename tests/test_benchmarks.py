"""The benchmark scripts still run (their timings are read by people, never asserted here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_smoke_runs_on_cpu():
    """`gpu_suite.py --smoke` builds the same workloads on a 2-layer Qwen2 config on the CPU: every row is printed
    with a ratio, so the script is ready for a GPU machine."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--lengths", "200"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ},
        check=True,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and " s |" in line]
    assert len(rows) == 6, out  # scan, knockout, dose × (corpus, 200-token input)
    for row in rows:
        ratio = float(row.split("|")[4])
        assert ratio > 0


def test_gpu_suite_skips_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the suite would run for minutes")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert "skipped, no CUDA device" in out
