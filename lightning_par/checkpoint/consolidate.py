"""One ordinary Lightning checkpoint file from a sharded checkpoint directory (``lightning-par consolidate``).

Why: plain Lightning tools (``Trainer(strategy="auto").fit(..., ckpt_path=...)``, ``load_from_checkpoint``,
``torch.load``) read one file of whole tensors; a sharded checkpoint is a directory of DCP shards.

How: one process, no process group. The LightningModule is built on the meta device as a one-process run
builds it (``configure_model`` without a strategy, as ``load_from_checkpoint`` does), which gives the
parameter names, shapes, tied weights and ``configure_optimizers``' parameter groups; every tensor is then
read whole through the safe DCP reader (nothing stored in the files is run). What comes out does not
depend on the layout that wrote the checkpoint:

* **Vocabulary padding** (GPT pads to a multiple that depends on tp, ``GPTConfig.padded_vocab_size``):
  weights and their optimizer state are cut to the one-process module's shapes; the rows cut off must be
  zero (padding never trains), otherwise the checkpoint does not fit the module and nothing is written.
* **Tied weights**: one tensor under every tied name, as Lightning saves them. Under pipeline parallel the
  last stage's copy of the tied head is checked equal to the embedding and dropped.
* **Pipeline stages and experts**: every parameter is saved under its global name by whichever rank held
  it, so all of them are found; the optimizer state follows the one-process parameter order.
* **Data position**: the strategy's resumable loader records how far into the epoch training got; plain
  Lightning has no such loader and refuses the state, so it is left out. After a checkpoint from the middle
  of an epoch, the rest of that epoch then trains on its first batches again (Lightning's rule for plain
  loaders, with its warning); later epochs are as usual.

``optimizer=False`` writes what Lightning's ``save_weights_only=True`` writes: no optimizer, LR-scheduler
or callback state. ``Model.load_from_checkpoint`` reads the weights; ``fit(ckpt_path=...)`` refuses such a
file (Lightning's "checkpoint contains only the model"): to go on training, load the weights and start a
new fit, which begins with fresh optimizer moments, the LR schedule from its first step and step 0.

Cost: the whole model and its optimizer state are in this one process's CPU memory at once (that is what
one file of whole tensors means), about what a one-process run's checkpoint takes on disk.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from lightning_par.checkpoint.safe import OPTIM_PREFIX, SafeFileSystemReader, read_meta, resolve
from lightning_par.checkpoint.sharded import _dcp_load

_META_ONLY = ("optimizer_hparams", "parallel_layout")  # the sharded format's own keys
_WEIGHTS_ONLY_DROPS = ("optimizer_states", "lr_schedulers", "callbacks")  # as save_weights_only
_LOADER_STATE = {"batches_done_in_epoch"}  # lightning_par.data.loader.ResumableLoader.state_dict()
_CLI_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


def consolidate(
    checkpoint_dir: str | Path,
    out_file: str | Path,
    optimizer: bool = True,
    module: type[L.LightningModule] | str | None = None,
) -> Path:
    """Write ``out_file``, an ordinary Lightning checkpoint, from a sharded checkpoint of any layout.

    Args:
        checkpoint_dir: a directory written by the strategy (``last.ckpt``, ``step=100.ckpt``).
        out_file: the new file; an existing one is refused (nothing is overwritten).
        optimizer: include optimizer, LR-scheduler and callback state (resumable by ``fit``); ``False``:
            weights and loop counters only (see the module docstring).
        module: the LightningModule class (or ``"package.module.Class"``) that wrote the checkpoint.
            Default: the class LightningCLI recorded (``hyper_parameters["_class_path"]``), if already
            imported: a checkpoint never makes this function import code.

    Returns:
        ``out_file`` as a ``Path``.
    """
    if not isinstance(optimizer, bool):
        raise TypeError(f"optimizer={optimizer!r} is not valid: it must be True or False.")
    out = Path(out_file)
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"out_file={str(out)!r} exists; nothing was overwritten: choose a new file.")
    path = _checkpoint_path(checkpoint_dir)
    meta = read_meta(path)
    reader = SafeFileSystemReader(path)
    saved = reader.read_metadata().state_dict_metadata
    cls = _module_class(module, meta, path)
    net, optimizers = _one_process_module(cls, meta, optimizer)
    hparams = meta.get("optimizer_hparams") or []
    _check_groups(optimizers, hparams, cls)

    request: dict[str, Any] = {}
    state_plan = _plan_state_dict(net, saved, request, path)
    optim_plan = [_plan_optimizer(i, opt, net, saved, request) for i, opt in enumerate(optimizers)]
    with warnings.catch_warnings():  # DCP's notice that no process group exists: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _dcp_load(request, reader, path, no_dist=True)

    checkpoint = {k: v for k, v in meta.items() if k not in _META_ONLY}
    checkpoint["state_dict"] = _state_dict(state_plan, request, cls)
    if optimizer:
        checkpoint["optimizer_states"] = [
            _optimizer_state(plan, request, saved_groups, cls)
            for plan, saved_groups in zip(optim_plan, hparams, strict=True)
        ]
    else:
        for key in _WEIGHTS_ONLY_DROPS:
            checkpoint.pop(key, None)
    if "loops" in checkpoint:
        checkpoint["loops"] = _without_loader_position(checkpoint["loops"])
    checkpoint["lightning_par_consolidated_from"] = {
        "checkpoint": str(path),
        "parallel_layout": meta.get("parallel_layout"),
    }
    _write_new(out, checkpoint)
    return out


# ---- what to read --------------------------------------------------------------------------------
def _checkpoint_path(checkpoint_dir: str | Path) -> Path:
    given = Path(checkpoint_dir)
    if given.is_file():
        raise ValueError(
            f"checkpoint_dir={str(given)!r} is a file, not a sharded checkpoint directory (if it is an "
            f"ordinary Lightning checkpoint already, load it as it is)."
        )
    try:
        return resolve(given)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(
            f"checkpoint_dir={str(given)!r} is not a sharded checkpoint of lightning-par (a directory with "
            f".metadata and meta.pt, as ShardedCheckpoint or trainer.save_checkpoint write under the strategy)."
        ) from None


def _module_class(module: Any, meta: dict[str, Any], path: Path) -> type[L.LightningModule]:
    if module is None:
        name = (meta.get("hyper_parameters") or {}).get("_class_path")
        if not isinstance(name, str):
            raise ValueError(
                f"the checkpoint in {str(path)!r} does not name its LightningModule class (LightningCLI "
                f"records it, other runs do not): pass module= (the class or 'package.module.Class'; "
                f"command line: --model package.module.Class)."
            )
        what = f"the checkpoint's LightningModule class {name!r}"
        owner, _, attr = name.rpartition(".")
        target = getattr(sys.modules.get(owner), attr, None)
        if target is None:
            raise ValueError(
                f"{what} is not imported (a checkpoint never makes this function import code): import it "
                f"first or pass module={name!r} (--model {name})."
            )
    elif isinstance(module, str):
        what = f"module={module!r}"
        owner, _, attr = module.rpartition(".")
        try:
            target = getattr(importlib.import_module(owner), attr) if owner else None
        except (ImportError, AttributeError) as err:
            raise ValueError(f"{what} cannot be imported: {err}") from None
    else:
        what, target = f"module={module!r}", module
    if not (isinstance(target, type) and issubclass(target, L.LightningModule)):
        raise ValueError(f"{what} is not valid: it must be a LightningModule class (or its import path).")
    return target


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's info lines ("GPU available: ...") are noise for a helper Trainer that never runs."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _one_process_module(
    cls: type[L.LightningModule], meta: dict[str, Any], with_optimizers: bool
) -> tuple[L.LightningModule, list[torch.optim.Optimizer]]:
    """The module as ``cls.load_from_checkpoint`` builds it (on meta), and its optimizers, Lightning's order."""
    from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers

    # The arguments as Lightning's load_from_checkpoint passes them (lightning.pytorch.core.saving).
    sig = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    named = {p.name for p in sig if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    kwargs = dict(meta.get("hyper_parameters") or {})
    if meta.get("hparams_name") in named:
        kwargs = {meta["hparams_name"]: kwargs}
    instantiator = kwargs.pop("_instantiator", None)
    if instantiator is not None and instantiator != _CLI_INSTANTIATOR:
        raise ValueError(
            f"the checkpoint's hyper_parameters name the instantiator {instantiator!r}; only LightningCLI's "
            f"({_CLI_INSTANTIATOR!r}) is trusted, as in Lightning's load_from_checkpoint."
        )
    if not any(p.kind is p.VAR_KEYWORD for p in sig):
        kwargs = {k: v for k, v in kwargs.items() if k in named}
    with torch.device("meta"):
        if instantiator is not None:
            from lightning.pytorch.cli import instantiate_module

            net = instantiate_module(cls, kwargs)
        else:
            net = cls(**kwargs)
        net.configure_model()
    if not with_optimizers:
        return net, []
    # configure_optimizers may read the trainer (GPT: estimated_stepping_batches): a Trainer that never
    # runs, sized like the run; the schedulers it builds are discarded (their state comes from meta.pt).
    with _quiet_lightning():
        steps = max(1, int(meta.get("global_step") or 1))
        net.trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=-1,
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        with torch.device("meta"):
            optimizers, _ = _init_optimizers_and_lr_schedulers(net)
    net.trainer = None
    return net, optimizers


def _check_groups(optimizers: list[torch.optim.Optimizer], saved: list[list[dict]], cls: type) -> None:
    """The module's optimizers and parameter groups must be the checkpoint's (raised before any read)."""
    if optimizers and len(saved) != len(optimizers):
        raise ValueError(
            f"a one-process {cls.__name__} has {len(optimizers)} optimizers but the checkpoint has "
            f"{len(saved)}: configure_optimizers must build the optimizers of the run that wrote it."
        )
    for i, (opt, groups) in enumerate(zip(optimizers, saved, strict=False)):  # (none: weights only)
        if len(groups) != len(opt.param_groups):
            raise ValueError(
                f"optimizer {i} of a one-process {cls.__name__} has {len(opt.param_groups)} parameter groups "
                f"but the checkpoint has {len(groups)}: configure_optimizers must build the same groups."
            )


def _request(key: str, saved: Any, request: dict[str, Any]) -> None:
    md = saved[key]
    if isinstance(md, BytesStorageMetadata):
        request[key] = None  # a non-tensor item (a module's extra state): DCP puts the object here
    else:
        request[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)


def _plan_state_dict(
    net: L.LightningModule, saved: Any, request: dict[str, Any], path: Path
) -> list[tuple[list[str], Any, list[str]]]:
    """Per tensor of the one-process state dict (tied names together): its names, target, saved keys."""
    target = net.state_dict(keep_vars=True)  # Parameters themselves: tied names share one object
    groups: dict[int, list[str]] = {}
    for name, value in target.items():
        groups.setdefault(id(value), []).append(name)
    plan, missing = [], []
    for names in groups.values():
        sources = [n for n in names if n in saved]
        if not sources:
            missing.append(names[0])
        for key in sources:
            _request(key, saved, request)
        plan.append((names, target[names[0]], sources))
    model_keys = {k for k in saved if not k.startswith((f"{OPTIM_PREFIX}.", "rng."))}
    extra = sorted(model_keys - set(target))
    cls = type(net).__name__
    if missing or extra:
        raise ValueError(
            f"the checkpoint in {str(path)!r} does not fit a one-process {cls}: it lacks {len(missing)} of "
            f"its tensors (e.g. {missing[:3]}) and has {len(extra)} it does not know (e.g. {extra[:3]}); "
            f"is module the class (and are the hyper-parameters those) that wrote it?"
        )
    return plan


def _plan_optimizer(
    i: int, opt: torch.optim.Optimizer, net: L.LightningModule, saved: Any, request: dict[str, Any]
) -> dict[str, Any]:
    """Optimizer ``i``'s fresh ``state_dict()`` (parameter ids) and, per id, the saved state keys."""
    from lightning.pytorch.core.optimizer import _MockOptimizer

    if isinstance(opt, _MockOptimizer):
        return {"mock": True}
    names: dict[int, list[str]] = {}
    for name, p in net.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    fresh = opt.state_dict()
    keys = [k for k in saved if k.startswith(f"{OPTIM_PREFIX}.{i}.state.")]
    fields: dict[int, tuple[Tensor, dict[str, str]]] = {}
    for group, fresh_group in zip(opt.param_groups, fresh["param_groups"], strict=True):
        for p, pid in zip(group["params"], fresh_group["params"], strict=True):
            for name in names.get(id(p), []):  # the canonical name first, then tied aliases
                prefix = f"{OPTIM_PREFIX}.{i}.state.{name}."
                found = {k[len(prefix) :]: k for k in keys if k.startswith(prefix)}
                if found:
                    fields[pid] = (p, found)
                    for key in found.values():
                        _request(key, saved, request)
                    break
    return {"fresh": fresh, "fields": fields}


# ---- what to write ------------------------------------------------------------------------------
def _fit(value: Any, target: Any, what: str, cls: type) -> Any:
    """``value`` cut to ``target``'s shape; the part cut off must be zero (vocabulary padding)."""
    if not isinstance(value, Tensor) or value.shape == target.shape:
        return value
    shape = tuple(target.shape)
    if value.ndim != len(shape) or any(v < t for v, t in zip(value.shape, shape, strict=True)):
        raise ValueError(
            f"{what} is {tuple(value.shape)} in the checkpoint but {shape} in a one-process {cls.__name__}: "
            f"the checkpoint does not fit the module."
        )
    index = tuple(slice(0, t) for t in shape)
    rest = value.clone()
    rest[index] = 0
    if rest.any():
        raise ValueError(
            f"{what} is {tuple(value.shape)} in the checkpoint but {shape} in a one-process {cls.__name__}, "
            f"and the part beyond {shape} is not zero, so it is not vocabulary padding: the checkpoint does "
            f"not fit the module."
        )
    return value[index].clone()  # a copy: a view would save the whole padded storage


def _state_dict(plan: list[tuple[list[str], Any, list[str]]], request: dict[str, Any], cls: type) -> dict:
    out: dict[str, Any] = {}
    for names, target, sources in plan:
        value = request[sources[0]]
        for other in sources[1:]:
            if isinstance(value, Tensor) and not torch.equal(request[other], value):
                raise ValueError(
                    f"{other} and {sources[0]} are one tied tensor in {cls.__name__} but differ in the "
                    f"checkpoint: it was not written by this module's tied training."
                )
        value = _fit(value, target, sources[0], cls)
        for name in names:
            out[name] = value
    return out


def _optimizer_state(
    plan: dict[str, Any], request: dict[str, Any], saved_groups: list[dict], cls: type
) -> dict[str, Any]:
    """One optimizer's ``state_dict()`` as the one-process run would have it."""
    if plan.get("mock"):
        return {}  # Lightning's stand-in when configure_optimizers returns None
    # The saved hyper-parameters (lr after the schedule, ...); the parameter lists are the one-process ones.
    drop = {"params", "param_names"}
    groups = [
        {**g, **{k: v for k, v in s.items() if k not in drop}, "params": g["params"]}
        for g, s in zip(plan["fresh"]["param_groups"], saved_groups, strict=True)
    ]
    state = {}
    for pid, (p, fields) in plan["fields"].items():
        state[pid] = {
            field: _fit(request[key], p, key, cls) if request[key].ndim == p.ndim else request[key]
            for field, key in fields.items()
        }
    return {"state": state, "param_groups": groups}


def _without_loader_position(loops: Any) -> Any:
    """``loops`` without the strategy's resumable-loader state (plain Lightning refuses it, see above)."""
    try:
        states = loops["fit_loop"]["state_dict"]["combined_loader"]
    except (KeyError, TypeError):
        return loops
    kept = [s for s in states if not (isinstance(s, dict) and set(s) == _LOADER_STATE)]
    loop_state = {k: v for k, v in loops["fit_loop"]["state_dict"].items() if k != "combined_loader"}
    if kept:
        loop_state["combined_loader"] = kept  # (Lightning leaves the key out when no loader has state)
    return {**loops, "fit_loop": {**loops["fit_loop"], "state_dict": loop_state}}


def _write_new(out: Path, checkpoint: dict[str, Any]) -> None:
    """Write beside ``out`` and link into place: a crash leaves no half file, an existing one stays."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        torch.save(checkpoint, partial)
        try:
            os.link(partial, out)  # fails if out appeared meanwhile: never overwrites
        except FileExistsError:
            raise FileExistsError(
                f"out_file={str(out)!r} exists; nothing was overwritten: choose a new file."
            ) from None
        except OSError:  # a file system without hard links: check, then rename
            if out.exists():
                raise FileExistsError(
                    f"out_file={str(out)!r} exists; nothing was overwritten: choose a new file."
                ) from None
            os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
