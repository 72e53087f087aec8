"""The strategy's side of a step's gradients: reduction (bucketed, overlapped, compressed), norm, step.

A mixin of :class:`~lightning_par.strategies.hybrid.HybridParallelStrategy`:

* at setup, the data-parallel buckets (:class:`~lightning_par.optim.buckets.GradientBuckets`) or, with
  ``distributed_optimizer=True``, the distributed optimizers, which own reduce-scatter buckets;
* in ``training_step``, the buckets are armed for the backward that ends the step (the last micro-batch
  of an accumulation; under pipeline parallel, each parameter's last microbatch of the schedule), so each
  leaves as soon as backward finished it;
* in the optimizer's closure, :meth:`reduce_gradients` waits for them, applies the step's scale and the
  other reductions (sequence-parallel partial sums, tied copies), then the NaN/Inf check; after the step,
  the distributed optimizer gathers the updated parameters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_par.optim.buckets import Compression, GradientBuckets
from lightning_par.optim.distributed import DistributedOptimizer
from lightning_par.optim.gradients import optimizer_params
from lightning_par.strategies.lightning_patches import accumulates_further


def check_gradient_options(
    compression: str | None,
    distributed_optimizer: bool,
    bucket_mb: float,
    rank: int,
    start_step: int,
    overlap_param_gather: bool,
    compress_embeddings: bool = False,
) -> None:
    """Refuse bad gradient-communication settings by name (at ``Trainer(...)``, before any process)."""
    Compression(compression)  # (validates the name)
    if overlap_param_gather and not distributed_optimizer:
        raise ValueError(
            "overlap_param_gather=True overlaps the distributed optimizer's all-gather of parameters with the "
            "next forward; it needs distributed_optimizer=True."
        )
    if compression == "powersgd" and distributed_optimizer:
        raise ValueError(
            "gradient_compression='powersgd' needs whole gradients on every replica and "
            "distributed_optimizer=True reduce-scatters them: use gradient_compression='bf16' or 'fp16' "
            "with the distributed optimizer, or distributed_optimizer=False with PowerSGD."
        )
    if not isinstance(compress_embeddings, bool):
        raise ValueError(f"powersgd_compress_embeddings={compress_embeddings!r} is not valid: True or False.")
    if isinstance(bucket_mb, bool) or not bucket_mb > 0:
        raise ValueError(f"gradient_bucket_mb={bucket_mb!r} is not valid: it must be megabytes > 0.")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"powersgd_rank={rank!r} is not valid: it must be an integer >= 1.")
    if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 2:
        raise ValueError(
            f"powersgd_start_step={start_step!r} is not valid: it must be an integer >= 2 (torch's "
            f"PowerSGDState, with error feedback and warm start, starts after two plain steps at the earliest)."
        )


class GradientHandling:
    """Gradient reduction, norm and step of the hybrid strategy (see the module docstring)."""

    distributed_optimizers: dict[int, DistributedOptimizer]
    grad_buckets: GradientBuckets | None

    def _setup_gradients(self) -> None:
        """Buckets (or distributed optimizers) for the optimizers ``setup_optimizers`` made."""
        module, sync = self.lightning_module, self.parallelized.grad_sync
        groups = (sync.dp, sync.edp)
        rank, start, compress_embeddings = self.powersgd
        whole = () if compress_embeddings else _embedding_ids(module, sync.tied)
        compression = Compression(self.gradient_compression, groups, rank, start, whole)
        if self.distributed_optimizer:
            dist_opts = [
                DistributedOptimizer(o, module, sync, self.gradient_bucket_mb, compression)
                for o in self._raw_optimizers()
            ]
            self.distributed_optimizers = {id(d.optimizer): d for d in dist_opts}
            all_buckets = [d.grad_buckets for d in dist_opts]
            if self.overlap_param_gather:
                for d in dist_opts:
                    d.install_gather_hooks(*_forward_units(module, self.pipeline))
        else:
            # Only what has replicas: a parameter whose group has size 1 is just scaled.
            named = [
                (n, p)
                for n, p in module.named_parameters()
                if (sync.edp if id(p) in sync.expert_ids else sync.dp) is not None
            ]
            self.grad_buckets = (
                GradientBuckets(
                    named, sync.dp, sync.edp, sync.expert_ids, self.gradient_bucket_mb, False, compression
                )
                if named
                else None
            )
            all_buckets = [self.grad_buckets] if self.grad_buckets is not None else []
        if self.overlap_grad_reduce:
            # Under the distributed optimizer a weight tied across pipeline ranks must take the sum of
            # its copies before its reduce-scatter (the copies' shards differ): its bucket waits.
            named = dict(module.named_parameters())
            tied = {id(named[n]) for names, _ in sync.tied for n in names if n in named}
            for b in all_buckets:
                b.install_hooks(tied if self.distributed_optimizer else frozenset())
        self._all_buckets = all_buckets
        # How many times backward accumulates into each parameter in one pipeline run (one per
        # microbatch and per stage of this rank that holds it).
        runner = self.pipeline
        self._accumulations = (
            Counter(id(p) for view in runner.views.values() for p in view.parameters()) if runner else None
        )
        if runner is not None and self.overlap_grad_reduce:
            runner.around_weight_pass = self._weight_pass

    def _weight_pass(self, module: Any, run: Callable[[], Any]) -> Any:
        """A zero-bubble weight pass writes ``.grad`` without the hooks: tell the buckets what it wrote."""
        before = [b.snapshot() for b in self._all_buckets]
        out = run()
        for b, counts in zip(self._all_buckets, before, strict=True):
            b.count_written(module, counts)
        return out

    def _arm_buckets(self, accumulating: bool) -> None:
        """Before a ``training_step``: let the buckets leave during its backward if it ends the step."""
        module = self.lightning_module
        if not self.overlap_grad_reduce or not module.automatic_optimization:
            return
        runner = self.pipeline
        if runner is not None:
            # Several pipeline runs per step (a ramp-up): the earlier runs' gradients wait aside (the
            # stash) until the step's backward, so nothing may leave before.
            counts = (
                None
                if accumulating
                else {k: v * runner.num_microbatches for k, v in self._accumulations.items()}
            )
        else:
            counts = None if accumulates_further(module.trainer) else 1
        for b in self._all_buckets:
            if counts is None:
                b.disarm()
            else:
                b.arm(counts)

    # ---- the step -----------------------------------------------------------------------------------
    def optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        def closure_and_reduce() -> Any:
            result = closure()
            params = list(optimizer_params(optimizer))
            self.reduce_gradients(params, dist_opt)
            self._norm_cache = None
            if not getattr(self.precision_plugin, "scaling", False):  # (fp16 scaling: its own overflow rule)
                norm = lambda: self.global_grad_norm(params)  # noqa: E731  (reused by clipping)
                named = dist_opt.named_gradients() if dist_opt is not None else None
                self._nonfinite.check_step(result, self.lightning_module, norm, named)
            return result

        dist_opt = self.distributed_optimizers.get(id(getattr(optimizer, "_optimizer", optimizer)))
        out = super().optimizer_step(optimizer, closure_and_reduce, model, **kwargs)
        if dist_opt is not None:
            dist_opt.gather_parameters(overlap=self.overlap_param_gather)
        if self._all_buckets:
            self._log_communication()
        self._guards.progress(self.lightning_module.trainer.global_step + 1)  # (about to start the next)
        return out

    @torch.no_grad()
    def reduce_gradients(
        self, params: Iterable[Tensor], dist_opt: DistributedOptimizer | None = None
    ) -> None:
        """Make every gradient that of the token-weighted mean loss of the whole global batch.

        All micro-batches of the step, all replicas: see :class:`~lightning_par.optim.gradients.GradientSync`
        for which group each kind of parameter is reduced over. The replicas' sum comes from the buckets
        (all-reduce), or the distributed optimizer's (reduce-scatter).
        """
        assert self.groups is not None
        scale = self._tokens.gradient_scale(self.groups.dp, pipelined=self.pipeline is not None)
        sync = self.parallelized.grad_sync
        named = dict(self.lightning_module.named_parameters()) if sync.tied else {}
        if dist_opt is not None:
            sync.sum_ties(named)  # (before the buckets holding them leave: see _setup_gradients)
            dist_opt.reduce_scatter(scale)
            sync.sum_sequence_parallel(dist_opt.tp_partial_grads())
            return
        if self.grad_buckets is not None and scale is not None:
            self.grad_buckets.finish_into_grads(scale)
        sync.reduce(params, named, scale, replicas_done=self.grad_buckets is not None)

    def global_grad_norm(self, params: Iterable[Tensor], norm_type: float = 2.0) -> Tensor:
        """The gradient norm of the whole (unsharded) model, each parameter counted once (computed once a step)."""
        if norm_type != 2.0:
            raise ValueError(f"norm_type={norm_type} is not supported: only the L2 norm (2.0) is.")
        params = [p for p in params if p.grad is not None]
        key = tuple(map(id, params))
        if self._norm_cache is None or self._norm_cache[0] != key:
            dist_opt = next((d for d in self.distributed_optimizers.values() if d.owns(params)), None)
            sync = self.parallelized.grad_sync
            norm = dist_opt.norm(self.root_device) if dist_opt else sync.norm(params, self.root_device)
            self._norm_cache = (key, norm)
        return self._norm_cache[1]

    def wait_parameter_gathers(self) -> None:
        """Parameters complete on every replica (before a checkpoint, at the end of fit)."""
        for d in self.distributed_optimizers.values():
            d.wait_gathers()

    def on_train_end(self) -> None:
        self.wait_parameter_gathers()
        super().on_train_end()

    def teardown(self) -> None:
        # (a later Trainer over the same module installs its own)
        for b in self._all_buckets:
            b.remove_hooks()
        for d in self.distributed_optimizers.values():
            d.remove_gather_hooks()
        super().teardown()

    def _log_communication(self) -> None:
        """``comm/grad_bytes`` (what this rank handed to the step's gradient collectives, compressed),
        ``comm/grad_bytes_uncompressed`` and ``comm/grad_exposed_s`` (the wait backward did not hide)."""
        sent = raw = 0
        for b in self._all_buckets:
            s, u = b.counter.take()
            sent, raw = sent + s, raw + u
        self.last_communication = {
            "comm/grad_bytes": float(sent),
            "comm/grad_bytes_uncompressed": float(raw),
            "comm/grad_exposed_s": sum(b.exposed_seconds for b in self._all_buckets),
        }
        module = self.lightning_module
        if module._current_fx_name is not None:  # (inside a hook Lightning logs from)
            module.log_dict(self.last_communication, on_step=True, on_epoch=False)


def _forward_units(module: Any, runner: Any) -> tuple[list[Any], Any]:
    """What the parameter all-gathers wait for, in forward order, and the module that waits for the rest:
    the network's parts and layers (the protocol's ``embed``, ``layers``, ``norm``, ``head``) and the
    network (a pooler, say); under pipeline parallel the stages (a stage may run copies of half blocks,
    whose hooks the originals' would not see)."""
    if runner is not None:
        return list(runner.views.values()), None
    network = getattr(module, "model", None)
    layers = getattr(network, "layers", None)
    if network is None or layers is None:
        return [network if network is not None else module], None
    parts = [getattr(network, "embed", None), *layers.values(), getattr(network, "norm", None)]
    return [p for p in (*parts, getattr(network, "head", None)) if p is not None], network


def _embedding_ids(module: torch.nn.Module, tied: list[tuple[list[str], Any]]) -> set[int]:
    """Ids of the token embedding tables' weights (``ParallelEmbedding``: the vocabulary, whose gradient
    is row-sparse; position tables use every row each step and are compressed like any matrix), and of
    the copies tied to one across pipeline ranks."""
    from lightning_par.tensor_parallel.layers import ParallelEmbedding

    names = {
        f"{prefix}.{n}" if prefix else n
        for prefix, m in module.named_modules()
        if isinstance(m, ParallelEmbedding)
        for n, _ in m.named_parameters(recurse=False)
    }
    for group, _ in tied:
        if names.intersection(group):
            names.update(group)
    return {id(p) for n, p in module.named_parameters(remove_duplicate=False) if n in names}
