"""The benchmark scripts still run (tiny shape, two steps); their figures are taken by hand, not in CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tp_speed_smoke():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "tp_speed.py"),
            "--smoke",
            "--variants",
            "tp1,tp2,lightning_mp",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tp2 time split:" in proc.stdout
    assert "tp2 / lightning_mp:" in proc.stdout


def test_pp_speed_smoke():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "pp_speed.py"), "--smoke", "--schedules", "1f1b,zbv"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pp=2 1f1b" in proc.stdout and "pp=2 zbv" in proc.stdout


def test_ep_speed_smoke():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ep_speed.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lightning  ep2 / ep1 tokens/s:" in proc.stdout
    # Dropless routing sends every assignment there and back, forward and backward: the count is exact.
    assert "ratio 1.0000" in proc.stdout
