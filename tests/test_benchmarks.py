"""The benchmark scripts still run (tiny shape, two steps); their figures are taken by hand, not in CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _smoke(script: str, *args: str) -> str:
    """Run ``benchmarks/<script> --smoke`` (tiny shapes, 2 steps); return its stdout."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_tp_speed_smoke():
    out = _smoke("tp_speed.py", "--variants", "tp1,tp2,lightning_mp")
    assert "tp2 time split:" in out
    assert "tp2 / lightning_mp:" in out
    out = _smoke("tp_speed.py", "--model", "llama", "--variants", "tp1,tp2,tp2_nocomm")
    assert "tp2 time split:" in out
    nocomm = next(line for line in out.splitlines() if line.startswith("round 0: tp2_nocomm"))
    assert "blocked in collectives" in nocomm  # the no-op collectives still pass through the timer


def test_pp_speed_smoke():
    out = _smoke("pp_speed.py", "--schedules", "zbv")  # (every schedule's numbers: tests/pipeline)
    assert "pp=2 zbv" in out


def test_ep_speed_smoke():
    out = _smoke("ep_speed.py")
    assert "lightning  ep2 / ep1 tokens/s:" in out
    # Dropless routing sends every assignment there and back, forward and backward: the count is exact.
    assert "ratio 1.0000" in out


def test_checkpoint_speed_smoke():
    out = _smoke("checkpoint_speed.py")
    assert "save: median" in out and "load: median" in out


def test_memory_dp_and_compression_smokes():
    out = _smoke("memory.py")
    assert "optimizer distopt / baseline" in out and "activations full / none" in out
    out = _smoke("dp_speed.py")
    assert "ours / ddp tokens/s:" in out
    out = _smoke("compression.py", "--variants", "none,powersgd")
    assert "powersgd" in out and "saved)" in out
