"""Convergence of compressed gradient reduction: the main job's GPT, dp=2, the embedded corpus, 300 steps.

    python benchmarks/compression.py               # 300 steps per variant (a few minutes each here)
    python benchmarks/compression.py --smoke       # tiny model, 4 steps: checks the script still runs

Variants: uncompressed, ``gradient_compression="bf16"``, ``"fp16"`` and ``"powersgd"`` (rank 4, from
step 10, the token embedding sent whole as the strategy does by default; ``powersgd_all`` compresses it
too). Each trains the main job's model (``configs/gpt_tp_pp.yaml``: 4 layers, n_embd 256, seq 128,
BPE vocabulary 4096, global batch 16, lr 2e-3, clipping 1.0) under data parallel on 2 processes and
reports the final ``val/loss`` against the uncompressed run and the gradient bytes each rank sent per step
(``comm/grad_bytes``, counted at the collectives) against the uncompressed figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = dict(
    n_layer=4, n_head=4, n_embd=256, block_size=128, dropout=0.0, learning_rate=2e-3, warmup_steps=30
)
SMOKE = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, dropout=0.0, learning_rate=2e-3, warmup_steps=1)
KINDS = {"none": None, "bf16": "bf16", "fp16": "fp16", "powersgd": "powersgd", "powersgd_all": "powersgd"}
"""``powersgd_all``: PowerSGD with the token embedding compressed too (``powersgd_compress_embeddings``)."""


def _train(
    rank: int,
    world: int,
    kind: str | None,
    model_kw: dict,
    steps: int,
    cache: str,
    start: int = 10,
    embeddings: bool = False,
) -> dict:
    import lightning as L
    import torch
    from lightning_par.models import GPT

    import lightning_par
    from lightning_par.data import TextDataModule
    from tests.parity import quiet_trainer

    torch.set_num_threads(1)

    class Bytes(L.Callback):
        def __init__(self) -> None:
            self.sent: list[float] = []
            self.raw: list[float] = []

        def on_train_batch_end(self, trainer, *args) -> None:
            c = trainer.strategy.last_communication
            self.sent.append(c["comm/grad_bytes"])
            self.raw.append(c["comm/grad_bytes_uncompressed"])

    L.seed_everything(1234, verbose=False)
    strategy = lightning_par.HybridParallelStrategy(
        tensor_parallel_size=1,
        data_parallel_size=world,
        gradient_compression=kind,
        powersgd_rank=4,
        powersgd_start_step=start,
        powersgd_compress_embeddings=embeddings,
    )
    counted = Bytes()
    trainer = quiet_trainer(
        strategy,
        world,
        max_steps=steps,
        gradient_clip_val=1.0,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        limit_val_batches=8,
        num_sanity_val_steps=0,
        callbacks=[counted],
    )
    data = TextDataModule(vocab_size=4096, block_size=model_kw["block_size"], batch_size=8, cache_dir=cache)
    trainer.fit(GPT(**model_kw, vocab_size=4096), datamodule=data)
    later = counted.sent[-1], counted.raw[-1]  # (PowerSGD compresses from its start step on)
    return {"val_loss": float(trainer.callback_metrics["val/loss"]), "bytes": later}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", default=",".join(KINDS))
    parser.add_argument(
        "--powersgd-start", type=int, default=10, help="powersgd_start_step (plain steps first)"
    )
    args = parser.parse_args()
    import tempfile

    from tests.harness import run_distributed

    model_kw, steps = (SMOKE, 12) if args.smoke else (MODEL, args.steps)
    cache = tempfile.mkdtemp(prefix="lp-compression-")
    res = {}
    for name in args.variants.split(","):
        res[name] = run_distributed(
            _train,
            2,
            KINDS[name],
            model_kw,
            steps,
            cache,
            args.powersgd_start,
            name == "powersgd_all",
            init_process_group=False,
            timeout=3000,
        )[0]
        print(
            f"{name:9s} val/loss {res[name]['val_loss']:.4f}  bytes/step {res[name]['bytes'][0]:,.0f}",
            flush=True,
        )
    base = res.get("none")
    if base:
        print(
            f"\nafter {steps} steps, dp=2 (val/loss relative to uncompressed; targets: bf16 within 1%, powersgd within 3%):"
        )
        for name, r in res.items():
            rel = r["val_loss"] / base["val_loss"] - 1
            saved = 1 - r["bytes"][0] / r["bytes"][1]
            print(
                f"  {name:9s} val/loss {r['val_loss']:.4f} ({rel:+.2%})  gradient bytes per step {r['bytes'][0]:,.0f} of {r['bytes'][1]:,.0f} ({saved:.1%} saved)"
            )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
