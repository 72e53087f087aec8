"""Tokens/s of tensor parallel (tp=2) against one process, side by side in one run, one thread per process.

    python benchmarks/tp_speed.py            # the issue's nanoGPT-like shape
    python benchmarks/tp_speed.py --smoke    # tiny shape, 2 steps: checks the script still runs
    python benchmarks/tp_speed.py --model llama --variants tp1,tp2   # Llama of the same size

Every variant trains the same GPT through ``lightning.Trainer`` (AdamW, no clipping) on random tokens:

* ``tp1``: one process, Lightning's default strategy (the baseline);
* ``tp2``: ``TensorParallelStrategy`` (hand-written Megatron TP; backward all-reduce overlapped with the
  weight-gradient matmul);
* ``tp2_chunk2``: the same with ``tp_comm_chunks=2`` (the batch split in two inside the blocks, so one
  half's forward all-reduce runs while the other half computes), to show what that overlap buys here;
* ``tp2_sp``: the same with sequence parallel;
* ``<variant>_pinned`` (e.g. ``tp2_pinned``): the variant with each rank pinned to its own core
  (``os.sched_setaffinity``, what ``torch.backends.xeon.run_cpu`` does for CPU processes), so gloo's
  threads share their own rank's core rather than stealing the other's;
* ``<variant>_nocomm`` (e.g. ``tp2_nocomm``): the same step with tensor parallel's collectives replaced
  by no-ops of the right shapes (the numbers are wrong; the work per rank is the same): the ceiling tp2
  can reach on this machine, two ranks computing side by side with nothing to wait for;
* ``tp2_nonfinite_off``: ``tp2`` without the per-step NaN/Inf check (``nonfinite="off"``): what it costs;
* ``lightning_mp``: Lightning's own ``ModelParallelStrategy`` with torch's DTensor ``ColwiseParallel`` /
  ``RowwiseParallel`` on the attention and MLP linears (embedding and head replicated).

For ``tp2`` the time spent blocked in collectives (synchronous calls and ``wait()`` on async ones) is
measured: that is the exposed communication; the rest of the step is compute and framework overhead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(vocab_size=4096, n_layer=4, n_head=8, n_embd=512, block_size=256)
# ``--model llama``: the same size as Llama (8 query heads over 4 kv heads, SwiGLU of width 1408 = 2.75 h)
LLAMA = dict(
    vocab_size=4096,
    n_layer=4,
    n_head=8,
    n_kv_head=4,
    n_embd=512,
    intermediate_size=1408,
    max_position_embeddings=256,
)
LLAMA_SMOKE = dict(
    vocab_size=256,
    n_layer=1,
    n_head=2,
    n_kv_head=1,
    n_embd=32,
    intermediate_size=64,
    max_position_embeddings=16,
)
SMOKE = dict(vocab_size=256, n_layer=1, n_head=2, n_embd=32, block_size=16)


def _variant(rank: int, world: int, name: str, shape: dict, batch: int, warmup: int, steps: int) -> dict:
    import lightning as L
    import torch
    from lightning_par.models import GPT
    from torch.utils.data import DataLoader

    import lightning_par
    import lightning_par.tensor_parallel.comm as tpmod
    from tests.parity import quiet_trainer

    torch.set_num_threads(1)
    if name.endswith("_pinned"):  # each rank on its own core, as torch.backends.xeon.run_cpu launches
        import os

        os.sched_setaffinity(0, {rank % os.cpu_count()})
        name = name.removesuffix("_pinned")
    seq = shape.get("block_size") or shape["max_position_embeddings"]

    class RandomTokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return batch * (warmup + steps + 2) * 2

        def __getitem__(self, i: int) -> dict:
            g = torch.Generator().manual_seed(i)
            ids = torch.randint(0, shape["vocab_size"], (seq,), generator=g)
            return {"input_ids": ids, "labels": ids}

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.comm: list[float] = []
            self._t0 = 0.0

        def on_train_batch_start(self, trainer, pl_module, b, i) -> None:
            COMM[0] = 0.0
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, out, b, i) -> None:
            self.times.append(time.perf_counter() - self._t0)
            self.comm.append(COMM[0])

    COMM = [0.0]

    def timed(fn):
        def call(*args, **kwargs):
            t = time.perf_counter()
            res = fn(*args, **kwargs)
            COMM[0] += time.perf_counter() - t
            work = res[1] if isinstance(res, tuple) else res
            if work is None:
                return res

            class TimedWork:
                def wait(self_inner):
                    t1 = time.perf_counter()
                    work.wait()
                    COMM[0] += time.perf_counter() - t1

            return (res[0], TimedWork()) if isinstance(res, tuple) else TimedWork()

        return call

    # ``_nocomm``: the same work without tensor parallel's communication, what tp2 could reach at most.
    if name.endswith("_nocomm"):
        name = name.removesuffix("_nocomm")

        class Done:
            def wait(self) -> None:
                pass

        def no_all_reduce(tensor, group, async_op=False):
            return Done() if async_op else None

        def no_all_gather(tensor, group, async_op=False):  # the right shape (every rank's part = ours)
            return torch.cat([tensor] * world), (Done() if async_op else None)

        def no_reduce_scatter(tensor, group, async_op=False):
            return tensor.chunk(world)[rank].clone(), (Done() if async_op else None)

        tpmod.all_reduce, tpmod.all_gather_dim0 = no_all_reduce, no_all_gather
        tpmod.reduce_scatter_dim0 = no_reduce_scatter
    for fn_name in ("all_reduce", "all_gather_dim0", "reduce_scatter_dim0"):
        setattr(tpmod, fn_name, timed(getattr(tpmod, fn_name)))

    class TorchTPGPT(GPT):
        """Our GPT with torch's DTensor styles applied by the model, as Lightning's docs do it."""

        def configure_model(self) -> None:
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            super().configure_model()
            plan = {}
            for i in range(shape["n_layer"]):
                plan.update(
                    {
                        f"layers.{i}.attn.qkv": ColwiseParallel(),
                        f"layers.{i}.attn.proj": RowwiseParallel(),
                        f"layers.{i}.mlp.fc": ColwiseParallel(),
                        f"layers.{i}.mlp.proj": RowwiseParallel(),
                    }
                )
            parallelize_module(self.model, self.device_mesh["tensor_parallel"], plan)

        def configure_optimizers(self) -> dict:
            # DTensor (sharded linears) and plain (replicated) parameters cannot share one foreach kernel.
            cfg = super().configure_optimizers()
            cfg["optimizer"].defaults["foreach"] = False
            for group in cfg["optimizer"].param_groups:
                group["foreach"] = False
            return cfg

    model_cls, devices = GPT, world
    if "n_kv_head" in shape:
        from lightning_par.models import Llama

        model_cls = Llama
    if name == "tp1":
        strategy = "auto"
    elif name == "tp2":
        strategy = lightning_par.TensorParallelStrategy(tensor_parallel_size=2)
    elif name == "tp2_nonfinite_off":  # what the per-step NaN/Inf check costs, side by side with tp2
        strategy = lightning_par.TensorParallelStrategy(tensor_parallel_size=2, nonfinite="off")
    elif name == "tp2_chunk2":
        strategy = lightning_par.TensorParallelStrategy(tensor_parallel_size=2, tp_comm_chunks=2)
    elif name == "tp2_sp":
        strategy = lightning_par.TensorParallelStrategy(tensor_parallel_size=2, sequence_parallel=True)
    elif name == "lightning_mp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy, model_cls = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2), TorchTPGPT
    else:
        raise ValueError(f"unknown variant {name!r}")

    L.seed_everything(0, verbose=False)
    timer = StepTimer()
    trainer = quiet_trainer(
        strategy,
        devices,
        max_steps=warmup + steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(model_cls(**shape, warmup_steps=2), DataLoader(RandomTokens(), batch_size=batch))
    times, comm = timer.times[warmup:], timer.comm[warmup:]
    return {"step_s": sum(times) / len(times), "comm_s": sum(comm) / len(comm), "steps": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 2 steps")
    parser.add_argument("--model", choices=("gpt", "llama"), default="gpt", help="GPT or Llama of that size")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds over all variants; medians are reported"
    )
    parser.add_argument("--variants", default="tp1,tp2,tp2_chunk2,tp2_sp,lightning_mp")
    args = parser.parse_args()
    from tests.harness import run_distributed

    shapes = {"gpt": (SMOKE, SHAPE), "llama": (LLAMA_SMOKE, LLAMA)}[args.model]
    shape, batch = (shapes[0], 2) if args.smoke else (shapes[1], 8)
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    tokens = batch * (shape.get("block_size") or shape["max_position_embeddings"])
    names = args.variants.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.repeat):
        for name in names:  # variants alternate, so a slow spell of the machine hits them all
            world = 1 if name == "tp1" else 2
            r = run_distributed(
                _variant, world, name, shape, batch, warmup, steps, init_process_group=False, timeout=900
            )[0]
            runs[name].append(r)
            print(
                f"round {round_}: {name:13s} step {r['step_s'] * 1000:8.1f} ms  tokens/s {tokens / r['step_s']:9.1f}  "
                f"blocked in collectives {r['comm_s'] * 1000:7.1f} ms",
                flush=True,
            )
    for name, rs in runs.items():
        print(
            f"{name:13s} steps (ms): {' | '.join(' '.join(f'{t * 1e3:.0f}' for t in r['steps']) for r in rs)}"
        )
    results = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "steps"}
        for name, rs in runs.items()
    }
    print(f"\nmedians over {args.repeat} round(s):")
    for name, r in results.items():
        print(f"{name:13s} step {r['step_s'] * 1000:8.1f} ms  tokens/s {tokens / r['step_s']:9.1f}")
    base = results.get("tp1")
    if base:
        print("\nspeed-up over tp1 (tokens/s ratio, same run):")
        for name, r in results.items():
            if name != "tp1":
                print(f"  {name:13s} {base['step_s'] / r['step_s']:.3f}x")
    if "tp2" in results and "lightning_mp" in results:
        print(f"  tp2 / lightning_mp: {results['lightning_mp']['step_s'] / results['tp2']['step_s']:.3f}x")
    if "tp2" in results:
        r = results["tp2"]
        print(
            f"\ntp2 time split: {r['step_s'] * 1000:.1f} ms/step = {(r['step_s'] - r['comm_s']) * 1000:.1f} ms compute "
            f"+ {r['comm_s'] * 1000:.1f} ms exposed communication"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
