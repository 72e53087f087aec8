"""Hang detection: a rank asleep inside a step ends every rank within the time-out plus a few seconds,
with a message naming the stuck rank, its step and its Python stack, and an exit status that torchrun
treats as a failure (so it restarts the job)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_par.fault_tolerance.watchdog import HANG_EXIT_CODE
from lightning_par.strategies.guards import RunGuards

SCRIPT = Path(__file__).parent / "scripts" / "hang.py"


def test_a_rank_asleep_in_a_step_ends_the_run_naming_it():
    timeout = 6.0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(timeout)], capture_output=True, text=True, timeout=200, env=env
    )
    ended = time.time()
    err = proc.stderr
    assert proc.returncode == HANG_EXIT_CODE, err[-3000:]
    asleep = float(re.search(r"rank 1 falls asleep in step 2 at ([0-9.]+)", err).group(1))
    # Within the time-out plus a few seconds (the grace for the other ranks' answers, and process exit).
    assert ended - asleep < timeout + 8, f"the run ended {ended - asleep:.1f} s after the rank fell asleep"
    for rank in (0, 1):
        assert f"[rank{rank}]: hang detected" in err, f"rank {rank} did not report the hang"
    assert "stuck rank(s): [1]" in err
    assert "rank 1, step 2, Python stack" in err
    assert "time.sleep(120)" in err, "the stuck rank's stack is not in the message"


def test_hang_timeout_is_validated_by_name():
    with pytest.raises(ValueError, match=r"hang_timeout=0 is not valid: it must be None or seconds > 0"):
        RunGuards(0)
