"""A few training steps under torchrun, one JSON file per rank and layout: what the rank saw and computed.

Launched by tests/fault_tolerance/test_multinode.py as
``torchrun --nnodes N --nproc-per-node D ... multinode_fit.py OUT tp2_pp2,dp4_ep2`` on one node of 4
processes and on two nodes (two torchrun agents on loopback) of 2 each. The layouts are trained one after
the other in the same processes (one process group; each fit builds its own mesh), which spares a second
start of 4 interpreters on 2 cores. The Trainer takes ``num_nodes`` and ``devices`` from torchrun's
variables, as a user's script would be told them; Lightning's TorchElasticEnvironment reads the ranks.
Each rank writes ``<layout>_rank_<global rank>.json`` with its ranks as Lightning sees them, its per-step
losses, a hash of its local parameter shards and whether the strategy made the process group on the
agent's store (a store of the attempt's own): the same layout over the same global ranks must give equal numbers whatever
the launch shape.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning_par.models import GPT  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import lightning_par  # noqa: E402
import lightning_par.strategies.guards as guards  # noqa: E402
from tests.parity import OPTIM, SEED, TINY, FixedBatches, quiet_trainer  # noqa: E402

STEPS = 3
LAYOUTS = {
    "tp2_pp2": (dict(tensor_parallel_size=2, pipeline_parallel_size=2, num_microbatches=2), {}),
    "dp4_ep2": (
        dict(data_parallel_size=4, expert_parallel_size=2, tensor_parallel_size=1),
        dict(num_experts=4, moe_top_k=2),
    ),
}


def record_elastic_group(seen: dict[str, bool]) -> None:
    """Note whether the strategy made the default process group on the attempt's own store."""
    init = guards.init_elastic_process_group

    def recording(*args, **kwargs) -> bool:
        made = init(*args, **kwargs)
        seen.setdefault("elastic_store", made)  # the first fit makes the group, a later one reuses it
        return made

    guards.init_elastic_process_group = recording


class StepLosses(L.Callback):
    """This rank's loss after every optimizer step, as its ``training_step`` returned it (no collective)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"].detach()))


def params_hash(module: torch.nn.Module) -> str:
    """SHA-256 over this rank's local shards (pipeline and expert ranks hold different parameters)."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        t = p.to_local() if isinstance(p, DTensor) else p
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def fit(out: Path, layout: str, num_nodes: int, devices: int, seen: dict[str, bool]) -> None:
    strategy_kw, model_kw = LAYOUTS[layout]
    L.seed_everything(SEED, verbose=False)
    model = GPT(**{**TINY, **model_kw}, **OPTIM)
    losses = StepLosses()
    trainer = quiet_trainer(
        lightning_par.HybridParallelStrategy(**strategy_kw),
        devices,
        num_nodes=num_nodes,
        max_steps=STEPS,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[losses],
    )
    data = DataLoader(FixedBatches(64, 16, TINY["vocab_size"]), batch_size=4, shuffle=False)
    trainer.fit(model, data)
    strategy = trainer.strategy
    result = {
        "environment": type(strategy.cluster_environment).__name__,
        "global_rank": trainer.global_rank,
        "local_rank": trainer.local_rank,
        "node_rank": trainer.node_rank,
        "world_size": trainer.world_size,
        "layout": strategy.describe_layout(),
        "losses": losses.losses,
        "params": params_hash(model),
        "step": trainer.global_step,
        "elastic_store": seen.get("elastic_store"),
        "store": [os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])],
    }
    (out / f"{layout}_rank_{trainer.global_rank}.json").write_text(json.dumps(result))


def main(out: Path, layouts: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    num_nodes = int(os.environ["GROUP_WORLD_SIZE"])  # torchrun: the number of agents (nodes)
    devices = int(os.environ["LOCAL_WORLD_SIZE"])
    seen: dict[str, bool] = {}
    record_elastic_group(seen)
    for layout in layouts:
        fit(out, layout, num_nodes, devices, seen)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","))
