"""The model protocol: what a LightningModule gives the strategy, as ``typing.Protocol`` classes.

Which members a layout needs (everything else is optional and has a default):

========================  ========================================================================
every layout              ``configure_model()`` builds the network (idempotent: the strategy may
                          build a throw-away copy first, for this check); with ``init_weights()`` it
                          is built on the meta device and filled after sharding
tensor parallel (tp > 1)  ``tensor_parallel_plan(sequence_parallel) -> {fqn pattern: ParallelStyle}``
pipeline (pp > 1)         ``self.model`` (:class:`PipelineNetwork`): ``embed``, ``layers`` (an
                          ``nn.ModuleDict`` keyed by global layer index), ``norm``, ``head``, a
                          ``forward`` that skips the parts that are ``None``, and
                          ``loss_fn(output, labels) -> (loss_sum, num_tokens)``
========================  ========================================================================

Optional: ``check_layout(tp, sequence_parallel)`` (raise early), ``post_parallelize()`` (re-tie weights
``parallelize_module`` replaced), ``network.count_loss_tokens(labels)`` and ``network.output_batch_dim``
(pipeline), a block's ``PARTS`` (:class:`HalvedBlock`: stages may cut between its halves).

:func:`check_protocol` names every missing or wrong member, with the layout that needs it, in one error,
before any process group is made; the rest of the package can then rely on what the layout needs.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import suppress
from dataclasses import replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lightning_par.distributed.layout import ParallelLayout


@runtime_checkable
class ParallelModel(Protocol):
    """The LightningModule: builds its network in ``configure_model``."""

    def configure_model(self) -> None: ...


@runtime_checkable
class MetaInitModel(Protocol):
    """A module built on the meta device and filled after sharding (same numbers on every layout)."""

    def init_weights(self) -> None: ...


@runtime_checkable
class TensorParallelModel(Protocol):
    """A module that says how tensor parallel splits it (``lightning_par.tensor_parallel`` styles)."""

    def tensor_parallel_plan(self, sequence_parallel: bool) -> dict[str, Any]: ...


@runtime_checkable
class PipelineNetwork(Protocol):
    """``module.model`` under pipeline parallel: stages are cut by deleting what a stage does not own."""

    embed: nn.Module | None
    layers: nn.ModuleDict
    norm: nn.Module | None
    head: nn.Module | None

    def loss_fn(self, output: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class HalvedBlock(Protocol):
    """A block whose halves a pipeline stage may hold apart: ``{"attn": ("ln_1", "attn"), ...}``."""

    PARTS: dict[str, tuple[str, ...]]


@runtime_checkable
class AuxLossLayer(Protocol):
    """A layer with an auxiliary loss (MoE): the pipeline runner scales and collects it."""

    aux_grad_scale: Tensor | None
    record: bool

    def pop_aux(self) -> Tensor | None: ...


class ProtocolError(TypeError):
    """A LightningModule lacks what its layout needs (every problem listed)."""


def protocol_problems(module: Any, layout: ParallelLayout, network: Any = None) -> list[str]:
    """Every member ``module`` (and its ``network``, if built) lacks for ``layout``, as messages."""
    problems = []
    if layout.tp > 1:
        plan = getattr(module, "tensor_parallel_plan", None)
        need = f"tensor_parallel_size={layout.tp} needs"
        if not callable(plan):
            problems.append(f"{need} `tensor_parallel_plan(sequence_parallel) -> dict[str, ParallelStyle]`.")
        else:
            extra = _required_params(plan)[1:]
            if extra:
                problems.append(
                    f"{need} `tensor_parallel_plan(sequence_parallel)`, but it also requires {extra} (the "
                    f"communication chunks are the strategy's `tp_comm_chunks`, not the plan's)."
                )
    if layout.pp > 1:
        need = f"pipeline_parallel_size={layout.pp} needs"
        if network is None:
            problems.append(f"{need} the network in `self.model` (built by `configure_model()`).")
        elif not isinstance(network, nn.Module):
            problems.append(f"{need} `self.model` to be an nn.Module, not {type(network).__name__}.")
        else:
            name = type(network).__name__
            if not isinstance(getattr(network, "layers", None), nn.ModuleDict):
                problems.append(f"{need} `{name}.layers`: an nn.ModuleDict keyed by global layer index.")
            for part in ("embed", "norm", "head"):
                if not hasattr(network, part):
                    problems.append(f"{need} `{name}.{part}` (a module, or None where the model has none).")
            if not callable(getattr(network, "loss_fn", None)):
                problems.append(f"{need} `{name}.loss_fn(output, labels) -> (loss_sum, num_tokens)`.")
    return problems


def check_protocol(module: Any, layout: ParallelLayout) -> None:
    """Raise :class:`ProtocolError` naming every missing member for ``layout``; no process group needed.

    Under pipeline parallel the network is inspected on a throw-away copy of the module whose
    ``configure_model`` runs on the meta device (the module itself is untouched); a module that cannot
    build its network this early (it needs a data module's setup, say) is checked by the pipeline split.
    """
    network = getattr(module, "model", None)
    if layout.pp > 1 and network is None:
        network = _network_of_copy(module)
    checked = layout
    if layout.pp > 1 and network is None:
        checked = replace(layout, pipeline_parallel_size=1)  # could not build early: the split checks it
    problems = protocol_problems(module, checked, network)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ProtocolError(
            f"{type(module).__name__} does not follow the model protocol for dp={layout.dp}, tp={layout.tp}, "
            f"pp={layout.pp}, ep={layout.ep}:\n{lines}\nSee 'Bring your own model' in the README."
        )


def _network_of_copy(module: Any) -> Any:
    trainer = getattr(module, "_trainer", None)
    module._trainer = None  # not deep-copied: the copy shares the trainer
    try:
        twin = copy.deepcopy(module)
    except Exception:  # noqa: BLE001 - an uncopyable module is checked later, by the split
        return None
    finally:
        module._trainer = trainer
    twin._trainer = trainer
    with suppress(Exception), torch.device("meta"):
        twin.configure_model()
    return getattr(twin, "model", None)


def _required_params(fn: Any) -> list[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
