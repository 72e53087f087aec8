"""The package's shape: no import cycle, no oversized module, the model protocol checked before any
process group, and the Lightning internals the package replaces still there."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch import nn

import lightning_par
from lightning_par.distributed.layout import ParallelLayout
from lightning_par.protocols import ProtocolError, check_protocol

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "lightning_par": ROOT / "lightning_par",
    "lightning_par.models": ROOT / "models",
    "lightning_par.callbacks": ROOT / "callbacks",
}


def _modules() -> dict[str, Path]:
    out = {}
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            if prefix == "lightning_par" and path.relative_to(folder).parts[0] in ("models", "callbacks"):
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def _import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports at module level (imports inside functions are lazy: left out)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def test_no_import_cycle_inside_the_package():
    graph = _import_graph()
    assert len(graph) > 40, "the walk found too few modules"
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycle = path[path.index(node) :] + [node]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        if node in done:
            return
        for dep in sorted(graph[node]):
            # A package's __init__ re-exporting its own submodules is not a cycle through the package.
            if not dep.startswith(node + "."):
                visit(dep, [*path, node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


def test_dependencies_point_one_way():
    """Checkpoint code imports no model; models import no strategy; nothing imports the CLI."""
    graph = _import_graph()
    for name, deps in graph.items():
        if name.startswith("lightning_par.checkpoint"):
            assert not any(d.startswith("lightning_par.models") for d in deps), (name, deps)
        if name.startswith("lightning_par.models"):
            assert not any(d.startswith("lightning_par.strategies") for d in deps), (name, deps)
        assert "lightning_par.cli" not in deps or name == "lightning_par.__main__", name


def test_no_module_longer_than_about_400_lines():
    """About 400: the guide's figure with a few lines of slack (the strategy's hooks and its CLI help)."""
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules().values()
        if (n := len(p.read_text().splitlines())) > 430
    }
    assert not long, f"modules past the ~400-line guide: {long}"


def test_no_code_cites_a_file_outside_the_repository():
    cited = [str(p.relative_to(ROOT)) for p in _modules().values() if "DESIGN" in p.read_text()]
    assert not cited, cited


class _NoPlan(L.LightningModule):
    """A module whose network misses what tp and pp need (no plan, no layers, no loss)."""

    def configure_model(self) -> None:
        if getattr(self, "model", None) is None:
            self.model = nn.Sequential(nn.Linear(4, 4))


def test_missing_protocol_members_are_named_with_the_layout_before_any_process_group():
    layout = ParallelLayout(tensor_parallel_size=2, pipeline_parallel_size=2)
    with pytest.raises(ProtocolError) as err:
        check_protocol(_NoPlan(), layout)
    message = str(err.value)
    for member in ("tensor_parallel_plan", "layers", "loss_fn", "embed", "norm", "head"):
        assert member in message, member
    assert "tensor_parallel_size=2 needs" in message and "pipeline_parallel_size=2 needs" in message
    # The module was inspected on a copy: its own network is still unbuilt.
    module = _NoPlan()
    with pytest.raises(ProtocolError):
        check_protocol(module, layout)
    assert getattr(module, "model", None) is None

    # Through the strategy: the error comes from setup_environment before the process group exists.
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=lightning_par.TensorParallelStrategy(tensor_parallel_size=2),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.strategy.connect(_NoPlan())
    with pytest.raises(ProtocolError, match=r"tensor_parallel_size=2 needs `tensor_parallel_plan"):
        trainer.strategy.setup_environment()
    assert not dist.is_initialized()


def test_an_old_style_plan_signature_is_refused_by_name():
    class OldPlan(_NoPlan):
        def tensor_parallel_plan(self, sequence_parallel: bool, comm_chunks: int) -> dict:
            return {}

    with pytest.raises(ProtocolError, match=r"also requires \['comm_chunks'\]"):
        check_protocol(OldPlan(), ParallelLayout(tensor_parallel_size=2))


def test_the_lightning_internals_the_package_replaces_still_exist():
    """If this fails, Lightning changed what lightning_par.strategies.lightning_patches replaces."""
    from lightning.pytorch.loops.optimization.automatic import _AutomaticOptimization
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    for cls, name in (
        (_TrainingEpochLoop, "_broadcast_sigterm_tensor"),
        (_TrainingEpochLoop, "_accumulated_batches_reached"),
        (_TrainingEpochLoop, "_should_accumulate"),
        (_AutomaticOptimization, "_make_zero_grad_fn"),
        (_AutomaticOptimization, "_on_before_zero_grad"),
        (_AutomaticOptimization, "_optimizer_zero_grad"),
        (_AutomaticOptimization, "_skip_backward"),
    ):
        assert (
            hasattr(cls, name) or name in getattr(cls, "__annotations__", {}) or name == "_skip_backward"
        ), (
            cls.__name__,
            name,
        )
    assert "_skip_backward" in _AutomaticOptimization.__init__.__code__.co_names


def test_exact_clipping_plugins_keep_lightning_s_state():
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    from lightning_par.strategies.precision import ExactClipping, with_exact_clipping

    plain = with_exact_clipping(Precision())
    assert isinstance(plain, ExactClipping) and isinstance(plain, Precision)
    amp = with_exact_clipping(MixedPrecision("bf16-mixed", "cpu"))
    assert isinstance(amp, ExactClipping) and isinstance(amp, MixedPrecision)
    assert amp.precision == "bf16-mixed" and amp.device == "cpu"
    with torch.no_grad(), amp.forward_context():
        assert torch.is_autocast_enabled("cpu")
