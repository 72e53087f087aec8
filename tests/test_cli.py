"""The shipped YAML runs through `lightning-par fit` in a subprocess (2 processes, gloo, W&B offline)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "lightning_par"]


def _run(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "LIGHTNING_PAR_CACHE": str(cwd / "cache"),
    }
    return subprocess.run(CLI + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


SHORT_FIT = [
    "--trainer.max_steps",
    "4",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.val_check_interval",
    "2",
    "--trainer.limit_val_batches",
    "2",
]
"""Four steps with validation every second one: enough for every logged key and a checkpoint."""


def fit_shipped_config(config: str, extra: list[str], cwd: Path) -> tuple[str, bytes]:
    """Run ``configs/<config>`` for :data:`SHORT_FIT`; return its output and rank 0's W&B offline log."""
    proc = _run(["fit", "--config", str(ROOT / "configs" / config), *SHORT_FIT, *extra], cwd)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "`Trainer.fit` stopped: `max_steps=4` reached." in out
    runs = list((cwd / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected exactly one W&B run (rank 0 only), found {runs}"
    # wandb 0.31 has no Python reader for its offline log; the keys are stored as plain strings in it.
    return out, next(runs[0].glob("run-*.wandb")).read_bytes()


@pytest.mark.parametrize(
    ("config", "n_layer"),
    [
        ("gpt_tp.yaml", 1),
        ("gpt_tp_pp.yaml", 2),
        ("gpt_moe_ep.yaml", 2),
        ("gpt_moe_tp_pp_ep.yaml", 2),
        ("llama_tp_pp.yaml", 2),
        ("mixtral_ep.yaml", 2),
    ],
)
def test_cli_fit_runs_config(tmp_path, config, n_layer):
    small = ["--model.n_layer", str(n_layer), "--model.n_embd", "64", "--data.init_args.max_tokens", "40000"]
    out, log = fit_shipped_config(config, small, tmp_path)
    assert "--- sample after 4 steps ---" in out
    for key in (
        b"train/loss",
        b"val/loss",
        b"val/ppl",
        b"train/tokens_per_sec",
        b"train/lengths",  # ParallelThroughputMonitor (rates appear once its window of 10 steps is full)
        b"train/consumed_samples",
        b"train/consumed_tokens",
        b"lr-AdamW",
        b"world_size",
        b"backend",
        b"gloo",
        b"model_config",
        b"n_layer",
    ):
        assert key in log, f"{key!r} not recorded in the W&B run"
    ckpt = tmp_path / "runs" / "checkpoints" / config.removesuffix(".yaml") / "last.ckpt"
    assert ckpt.is_dir() and any(ckpt.iterdir()), "no sharded checkpoint written"
    if "moe" in config or "mixtral" in config:  # routing statistics of layer 1, summed over the replicas
        for key in (b"moe/layer1/aux_loss", b"moe/layer1/dropped_fraction", b"moe/layer1/tokens_expert7"):
            assert key in log, f"{key!r} not recorded in the W&B run"
    if "lightning_par.callbacks.PipelineTimeline" in (ROOT / "configs" / config).read_text():
        # The pipeline timeline of step 2, drawn and logged with its bubble.
        assert (tmp_path / "runs" / "pipeline_timeline.png").stat().st_size > 1000
        assert b"pipeline/bubble_measured" in log and b"pipeline_schedule" in log


def test_every_shipped_config_is_tested():
    tested = {"gpt_tp.yaml", "gpt_tp_pp.yaml", "gpt_moe_ep.yaml", "gpt_moe_tp_pp_ep.yaml"}
    tested |= {"llama_tp_pp.yaml", "mixtral_ep.yaml"}
    # (the BERT configs run in tests/data/test_bert_data.py, with BERT checks)
    tested |= {"bert_mlm_tp.yaml", "bert_cls_tp_pp.yaml"}
    assert {p.name for p in (ROOT / "configs").glob("*.yaml")} == tested


def test_cli_print_config_is_complete_and_rerunnable(tmp_path):
    proc = _run(
        ["fit", "--config", str(ROOT / "configs" / "gpt_tp.yaml"), "--model.n_layer", "3", "--print_config"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    for key in (
        "strategy: tp",
        "n_layer: 3",
        "class_path: lightning_par.models.GPT",
        "learning_rate:",
        "block_size:",
    ):
        assert key in text, f"{key!r} missing from --print_config output"
    (tmp_path / "printed.yaml").write_text(text)
    again = _run(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout == text
