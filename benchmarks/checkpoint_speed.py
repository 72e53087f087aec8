"""Checkpoint save and load times for the main job's model (configs/gpt_tp_pp.yaml) under tp2 x pp2.

    python benchmarks/checkpoint_speed.py --repeat 3     # medians over 3 saves and loads

Each rank writes its own shards (DCP) and rank 0 ``meta.pt``; a load reads every shard a rank needs through
the safe reader. The model has been trained one step, so the optimizer state (AdamW moments) is saved too.
Times are the slowest rank's, in seconds; absolute numbers of this 2-core machine, for the closing note.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAIN_JOB = dict(vocab_size=4096, n_layer=4, n_head=4, n_embd=256, block_size=128, dropout=0.0)
SMOKE = dict(vocab_size=128, n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0)


def _run(rank: int, world: int, shape: dict, repeat: int, directory: str) -> dict:
    import torch
    import torch.distributed as dist
    from lightning_par.models import GPT
    from torch.utils.data import DataLoader

    import lightning_par
    from tests.parity import FixedBatches, quiet_trainer

    torch.set_num_threads(1)
    strategy = lightning_par.HybridParallelStrategy(
        tensor_parallel_size=2, pipeline_parallel_size=2, num_microbatches=2
    )
    trainer = quiet_trainer(strategy, world, max_steps=1)
    trainer.fit(
        GPT(**shape), DataLoader(FixedBatches(8, shape["block_size"], shape["vocab_size"]), batch_size=4)
    )
    saves, loads = [], []
    for i in range(repeat):
        path = f"{directory}/ckpt-{i}.ckpt"
        dist.barrier()
        start = time.perf_counter()
        trainer.save_checkpoint(path)
        saves.append(time.perf_counter() - start)
        dist.barrier()
        start = time.perf_counter()
        trainer.strategy.load_checkpoint(path)
        loads.append(time.perf_counter() - start)
    times = torch.tensor([saves, loads], dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slowest rank's time is the checkpoint's
    size = sum(f.stat().st_size for f in Path(f"{directory}/ckpt-0.ckpt").iterdir())
    return {"save": times[0].tolist(), "load": times[1].tolist(), "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, one save and load")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from tests.harness import run_distributed

    shape, repeat = (SMOKE, 1) if args.smoke else (MAIN_JOB, args.repeat)
    with tempfile.TemporaryDirectory() as directory:
        r = run_distributed(_run, 4, shape, repeat, directory, init_process_group=False, timeout=600)[0]
    print(f"checkpoint of {r['bytes'] / 2**20:.1f} MiB (model + AdamW state, 4 ranks), {repeat} round(s):")
    print(f"  save: median {statistics.median(r['save']):.3f} s  (all: {[round(x, 3) for x in r['save']]})")
    print(f"  load: median {statistics.median(r['load']):.3f} s  (all: {[round(x, 3) for x in r['load']]})")


if __name__ == "__main__":
    main()
