"""Hugging Face export of sharded checkpoints, through adapters that model families register.

``lightning-par export-hf CKPT_DIR OUT_DIR`` (and :func:`export_hf`) reads a checkpoint of any layout in
one process: no process group, DCP reads every shard into whole tensors. Which Hugging Face class comes
out is the model family's business: each family registers an :class:`HFExporter` (``lightning_par.models``
registers GPT-2 and BERT on import), so this package imports no model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_par.checkpoint.safe import SafeFileSystemReader, read_meta, resolve
from lightning_par.checkpoint.sharded import _dcp_load


@dataclass(frozen=True)
class HFExporter:
    """How one model family turns a checkpoint into a Hugging Face directory.

    Attributes:
        name: the family, for messages (``"gpt2"``).
        matches: ``matches(saved_tensor_names)``: whether a checkpoint is of this family.
        export: ``export(hyper_parameters, saved_metadata, load, out_dir) -> out_dir``, where
            ``load(state_dict)`` fills a state dict of whole tensors from the checkpoint.
    """

    name: str
    matches: Callable[[set[str]], bool]
    export: Callable[[dict[str, Any], Any, Callable[[dict[str, Tensor]], None], Path], Path]


_EXPORTERS: list[HFExporter] = []


def register_hf_exporter(exporter: HFExporter) -> None:
    """Add (or replace, by name) a family's exporter; the first registered that matches is used."""
    _EXPORTERS[:] = [e for e in _EXPORTERS if e.name != exporter.name] + [exporter]


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face directory from a sharded checkpoint of a registered model family."""
    path = resolve(checkpoint_dir)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out_dir={str(out)!r} exists and is not empty; choose a new directory.")
    meta = read_meta(path)
    hparams = dict(meta.get("hyper_parameters") or {})
    reader = SafeFileSystemReader(path)
    saved = reader.read_metadata().state_dict_metadata
    names = set(saved)
    for exporter in _EXPORTERS:
        if exporter.matches(names):
            return exporter.export(hparams, saved, lambda s: _dcp_load(s, reader, path, no_dist=True), out)
    known = [e.name for e in _EXPORTERS] or "none (import lightning_par.models to register GPT-2 and BERT)"
    raise ValueError(
        f"the checkpoint in {str(path)!r} is of no model family with a Hugging Face exporter; registered: "
        f"{known}."
    )
