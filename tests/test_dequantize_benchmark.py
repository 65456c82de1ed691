"""benchmarks/dequantize.py: both reads of one small expert timed, after checking they agree."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def test_the_benchmark_times_both_reads_of_the_same_values():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dequantize.py"), "--shape", "1024", "512",
                          "--tokens", "8", "--repeats", "1"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["native_kernel"] and result["shape"] == [1024, 512] and result["cpu"]
    assert result["fresh_tensor_ms"] > 0 and result["into_buffer_ms"] > 0 and result["matmul_ms"] > 0
    assert result["fresh_over_buffer"] == pytest.approx(result["fresh_tensor_ms"] / result["into_buffer_ms"], rel=0.05)
