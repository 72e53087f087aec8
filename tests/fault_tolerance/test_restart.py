"""torchrun restarts that resume bitwise: a rank killed at a step start, between checkpoints and inside a
save (and under the asynchronous saver); the run ends with every rank's parameters and optimizer state
bitwise those of an uninterrupted run.

Each scenario is one torchrun job (the uninterrupted reference another). Dropout is on and the data are
shuffled, so any difference in the restored RNG, data position or state shows in the hashes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "resumable_fit.py"


def torchrun(out: Path, layout: str, nproc: int, kills: str | None = None, restarts: int = 0) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        str(restarts),
        "--monitor-interval",
        "0.2",
        str(SCRIPT),
        str(out),
        layout,
    ] + ([kills] if kills else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    read = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    return read


def hashes(files: dict, nproc: int) -> list[str]:
    return [files[f"hash_{r}"]["hash"] for r in range(nproc)]


def restart_seconds(files: dict, attempt: int) -> float:
    killed = next(v for k, v in files.items() if k.startswith(f"killed_{attempt - 1}_"))
    first = min(v["time"] for k, v in files.items() if k.startswith(f"first_step_{attempt}_"))
    return first - killed["time"]


@pytest.mark.parametrize(
    "layout, nproc, kills, restarts, resumed",
    [
        # Killed while writing its shards of the save after step 4: attempt 1 resumes from step 2.
        ("tp2_pp2", 4, "save:2:4@0", 1, {1: 2}),
        # Asynchronous saves: a checkpoint becomes visible (renamed into place) when the next save starts.
        # Killed at step 5, between the checkpoints of steps 4 and 6, while last.ckpt of step 4 is still
        # being written: it never appears, and the job resumes from the last of step 2.
        ("dp2_ep2", 2, "start:0:5@0", 1, {1: 2}),
    ],
)
def test_killed_rank_restarts_and_resumes_bitwise(tmp_path, layout, nproc, kills, restarts, resumed):
    ref = torchrun(tmp_path / "ref", layout, nproc)
    got = torchrun(tmp_path / "killed", layout, nproc, kills, restarts)
    assert hashes(got, nproc) == hashes(ref, nproc), "resumed state differs from the uninterrupted run"
    for r in range(nproc):
        assert (
            got[f"hash_{r}"]["attempt"] == restarts and got[f"hash_{r}"]["step"] == ref[f"hash_{r}"]["step"]
        )
    for attempt, step in resumed.items():
        firsts = [got[f"first_step_{attempt}_{r}"] for r in range(nproc)]
        assert {f["step"] for f in firsts} == {step}, f"attempt {attempt} resumed at {firsts}"
        print(f"{layout}: restart {attempt} took {restart_seconds(got, attempt):.1f} s (kill to first step)")
    if "save:" in kills:
        # The save killed half-way left only a hidden partial directory; last was step 2's.
        listing = got["first_step_1_0"]["ckpts"]
        assert "epoch=0-step=4.ckpt" not in listing
        assert any(n.startswith(".epoch=0-step=4.ckpt.partial-") for n in listing), listing
