"""Multi-node launches: two torchrun agents on loopback equal one node, and SLURM's variables give the ranks.

torchrun: ``--nnodes 2 --nproc-per-node 2`` (two agents on this machine, c10d rendezvous on a free port)
against ``--nproc-per-node 4``, each job training tp2 x pp2 and then dp4 x ep2 (a MoE GPT) for a few
steps in the same processes (``scripts/multinode_fit.py``). Same seed and the same layout over the same
global ranks: every rank's losses and parameter shards must be equal, bit for bit. On two nodes the tp
pairs of tp2 x pp2 and the ep pairs of dp4 x ep2 lie inside a node, pipeline stages and expert replicas
across the two.

SLURM: its variables set by hand (no srun), ``Trainer(...)`` in this process must read the ranks from
them and resolve the layout without starting a process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch.distributed as dist
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

import lightning_par
from tests.parity import quiet_trainer

SCRIPT = Path(__file__).parent / "scripts" / "multinode_fit.py"
LAYOUTS = {"tp2_pp2": dict(tp=2, pp=2, dp=1, ep=1), "dp4_ep2": dict(tp=1, pp=1, dp=4, ep=2)}
WORLD = 4
STEPS = 3  # multinode_fit.STEPS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, nnodes: int, nproc: int) -> None:
    """One torchrun agent per node, all on this machine; every agent must exit with status 0."""
    rdzv = ["--standalone"]
    if nnodes > 1:
        endpoint = f"127.0.0.1:{free_port()}"
        rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", uuid.uuid4().hex]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes)]
    cmd += ["--nproc-per-node", str(nproc), "--monitor-interval", "0.2", *rdzv]
    cmd += [str(SCRIPT), str(out), ",".join(LAYOUTS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    logs = [out.parent / f"{out.name}_agent{i}.log" for i in range(nnodes)]
    agents = []
    for log in logs:
        with log.open("w") as f:
            agents.append(
                subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            )
    try:
        codes = [a.wait(timeout=240) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
                a.wait()
    for log, code in zip(logs, codes, strict=True):
        assert code == 0, f"{log.name} exited with {code}:\n{log.read_text()[-6000:]}"


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> dict[str, dict[str, list[dict]]]:
    """``{"1x4" | "2x2": {layout: [rank 0's record, ..., rank 3's]}}``."""
    root = tmp_path_factory.mktemp("multinode")
    runs = {}
    for name, nnodes, nproc in (("1x4", 1, 4), ("2x2", 2, 2)):
        launch(root / name, nnodes, nproc)
        runs[name] = {
            layout: [json.loads((root / name / f"{layout}_rank_{r}.json").read_text()) for r in range(WORLD)]
            for layout in LAYOUTS
        }
    return runs


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_nodes_train_exactly_as_one_node(launches, layout):
    one, two = launches["1x4"][layout], launches["2x2"][layout]
    for r in range(WORLD):
        assert two[r]["losses"] == one[r]["losses"], f"rank {r}: losses differ between 2x2 and 1x4"
        assert two[r]["params"] == one[r]["params"], f"rank {r}: parameters differ between 2x2 and 1x4"
        assert len(one[r]["losses"]) == STEPS and one[r]["step"] == STEPS
    # The comparison is rank by rank and sees each rank's own work: stages and expert shards differ.
    hashes = [rec["params"] for rec in one]
    if layout == "tp2_pp2":
        assert len(set(hashes)) == WORLD  # two stages x two tp shards
        assert all(
            rec["losses"] == one[0]["losses"] for rec in one
        )  # the loss is broadcast from the last stage
    else:
        # ep pairs {0, 1}, {2, 3} split the experts; 0 and 2 (1 and 3) hold the same ones. Each replica
        # reads its own batches, so the losses differ.
        assert hashes[0] == hashes[2] != hashes[1] == hashes[3]
        assert len({tuple(rec["losses"]) for rec in one}) == WORLD


def test_ranks_and_layout_come_from_torchrun(launches):
    for name, devices in (("1x4", 4), ("2x2", 2)):
        for layout, sizes in LAYOUTS.items():
            for r, rec in enumerate(launches[name][layout]):
                assert rec["environment"] == "TorchElasticEnvironment"
                assert (rec["global_rank"], rec["world_size"]) == (r, WORLD)
                assert (rec["node_rank"], rec["local_rank"]) == divmod(r, devices), (name, layout, rec)
                assert {k: rec["layout"][k] for k in sizes} == sizes


def test_process_group_on_the_agents_store_with_two_agents(launches):
    """Under torchrun the default group is made on a store of this attempt's own, found through the agent's
    store (``fault_tolerance/restart.py``): with two agents every rank must reach the one agent store."""
    for name in launches:
        recs = [rec for layout in LAYOUTS for rec in launches[name][layout]]
        assert all(rec["elastic_store"] is True for rec in recs), name
        assert len({tuple(rec["store"]) for rec in recs}) == 1, name


# ---- SLURM ----------------------------------------------------------------------------------------------
def slurm_variables(procid: int, nodelist: str = "gpu-[017-018]", **over: str) -> dict[str, str]:
    """What srun sets for task ``procid`` of ``--nodes=2 --ntasks-per-node=2`` (the ones Lightning reads)."""
    env = {
        "SLURM_NTASKS": "4",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid % 2),
        "SLURM_NODEID": str(procid // 2),
        "SLURM_NNODES": "2",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_NODELIST": nodelist,  # SLURM sets both; Lightning reads this one
        "SLURM_JOB_ID": "4711042",
        "SLURM_JOB_NAME": "gpt_tp_pp",
    }
    return {**env, **over}


@pytest.fixture
def slurm(monkeypatch):
    """Set SLURM's variables; undo them, the MASTER_* Lightning writes and its rank-zero rank afterwards."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "TORCHELASTIC_")) or name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            monkeypatch.delenv(name)
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK"):
        monkeypatch.setenv(name, "")  # recorded, so the deletion below is undone to the original state
        monkeypatch.delenv(name)
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)

    def apply(variables: dict[str, str]) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    return apply


def tp2_pp2(**trainer_kw):
    strategy = lightning_par.HybridParallelStrategy(tensor_parallel_size=2, pipeline_parallel_size=2)
    return quiet_trainer(strategy, 2, num_nodes=2, **trainer_kw)


@pytest.mark.parametrize(
    "procid, nodelist, head, plugins",
    [
        (0, "gpu-[017-018]", "gpu-017", None),
        (1, "node7,node9", "node7", None),
        (2, "a100-[3,5]", "a100-3", None),
        (3, "gpu-[017-018]", "gpu-017", "no_requeue"),  # the README's SLURMEnvironment(auto_requeue=False)
    ],
)
def test_slurm_variables_give_ranks_layout_and_main_address(slurm, procid, nodelist, head, plugins):
    slurm(slurm_variables(procid, nodelist))
    kw = {"plugins": [SLURMEnvironment(auto_requeue=False)]} if plugins else {}
    trainer = tp2_pp2(**kw)
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is (plugins is None)
    assert trainer.global_rank == procid
    assert (trainer.node_rank, trainer.local_rank) == divmod(procid, 2)
    assert trainer.world_size == 4 and trainer.num_nodes == 2 and trainer.num_devices == 2
    layout = trainer.strategy.layout
    assert (layout.tp, layout.pp, layout.dp, layout.ep) == (2, 2, 1, 1)
    assert trainer.strategy.launcher is None  # srun started the processes: Lightning starts none
    assert not dist.is_initialized()
    assert env.main_address == head  # the first node of the list, where rank 0 runs
    assert env.main_port == 15000 + 1042  # the job id's last four digits + 15000


def test_slurm_reads_the_node_list_from_slurm_nodelist(slurm):
    """Lightning derives the main address from ``SLURM_NODELIST`` only: ``SLURM_JOB_NODELIST`` alone (a
    hand-made environment; srun sets both) falls back to 127.0.0.1."""
    variables = slurm_variables(2)
    del variables["SLURM_NODELIST"]
    slurm(variables)
    assert tp2_pp2().strategy.cluster_environment.main_address == "127.0.0.1"


def test_interactive_slurm_job_is_not_a_slurm_launch(slurm):
    """``SLURM_JOB_NAME=bash`` (an interactive allocation): Lightning ignores SLURM and starts the
    processes itself, as on a workstation."""
    slurm(slurm_variables(3, SLURM_JOB_NAME="bash"))
    trainer = tp2_pp2()
    assert isinstance(trainer.strategy.cluster_environment, LightningEnvironment)
    assert isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher)
    assert trainer.global_rank == 0 and trainer.node_rank == 0
    assert not dist.is_initialized()


def test_slurm_ntasks_without_ntasks_per_node_is_refused(slurm, monkeypatch):
    """``--ntasks=4`` without ``--ntasks-per-node``: Lightning's SLURMEnvironment refuses it when it is made."""
    slurm(slurm_variables(1))
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    with pytest.raises(RuntimeError, match="--ntasks-per-node"):
        tp2_pp2()


def test_slurm_tasks_per_node_must_match_devices(slurm):
    """Lightning checks SLURM's task counts only in its own launcher; the strategy checks them always."""
    slurm(slurm_variables(1, SLURM_NTASKS_PER_NODE="4", SLURM_NTASKS="8"))
    with pytest.raises(ValueError, match="devices=2"):
        tp2_pp2()
