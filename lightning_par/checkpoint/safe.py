"""Reading checkpoints without running code: DCP metadata through an allow-list unpickler, non-tensor
items and ``meta.pt`` with ``weights_only=True``.

Why not DCP's own reader: ``FileSystemReader`` reads ``.metadata`` with plain ``pickle.load`` and the
default planner reads non-tensor items with ``torch.load(weights_only=False)`` (torch 2.13/2.14), so a
crafted checkpoint runs code inside ``dcp.load`` before any error.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata

META_FILE = "meta.pt"
OPTIM_PREFIX = "optim"


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds something other than the data this package writes; nothing was run."""


# ---- reading without running code -------------------------------------------------------------------
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata dataclasses, ``torch.Size`` and dtypes; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"the checkpoint's .metadata refers to {module}.{name}, which DCP metadata never contains; "
            f"refusing to load it (nothing from it was run)."
        )


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is unpickled with an allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except UnsafeCheckpointError:
                raise
            except Exception as err:
                raise UnsafeCheckpointError(f"{path} is not DCP metadata: {err}") from err
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata.")
        metadata.storage_meta = metadata.storage_meta or dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, reading non-tensor items with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(f"item {read_item.dest_index.fqn!r}: {err}") from err
        self.state_dict[read_item.dest_index.fqn] = obj
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)


def read_meta(path: Path) -> dict[str, Any]:
    """``meta.pt`` through torch's restricted unpickler (tensors, containers, numbers, strings only)."""
    try:
        return torch.load(path / META_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path / META_FILE} holds objects a checkpoint of this package never contains; refusing to "
            f"load it (nothing from it was run): {err}"
        ) from err


def resolve(path: str | Path) -> Path:
    """The checkpoint directory; after a crash between the two renames of a save, the previous one."""
    path = Path(path)
    if not path.exists():
        old = path.with_name(f".{path.name}.old")
        if old.is_dir():
            return old
        raise FileNotFoundError(f"ckpt_path={str(path)!r} does not exist.")
    if not (path / ".metadata").is_file() or not (path / META_FILE).is_file():
        raise ValueError(
            f"ckpt_path={str(path)!r} is not a sharded checkpoint of lightning-par (a directory with .metadata "
            f"and {META_FILE})."
        )
    return path
