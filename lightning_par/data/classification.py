"""Sequence-classification data for BERT, offline: local CSV / JSONL files, or an embedded default task.

Sequences are ``[CLS] tokens [SEP]`` padded with ``[PAD]`` to ``max_length`` (one shape for every batch,
which suits pipeline stages), with the tokenizer and special tokens of :mod:`lightning_par.data_bert`.

The default task needs no download: lines of the embedded corpus (standard-library Python) labelled by
their kind: 0 comment, 1 definition (``def``/``class``), 2 import, 3 exit (``return``/``raise``/``yield``/
``break``/``continue``), balanced and shuffled with the seed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_par.data.mlm import SPECIAL_TOKENS
from lightning_par.data.text import (
    _check_int,
    _resolve_cache_dir,
    build_tokenizer,
    load_documents,
    seeded_loader,
)

__all__ = ["DEFAULT_LABELS", "TextClassificationDataModule", "default_labelled_lines", "read_labelled_file"]

DEFAULT_LABELS = ("comment", "definition", "import", "exit")


def default_labelled_lines(max_per_label: int, seed: int) -> list[tuple[str, int]]:
    """The embedded labelled task: corpus lines and their kind (see the module docstring), balanced."""
    prefixes = {
        0: ("#",),
        1: ("def ", "class ", "async def "),
        2: ("import ", "from "),
        3: ("return ", "raise ", "yield ", "break", "continue"),
    }
    by_label: dict[int, list[str]] = {k: [] for k in prefixes}
    seen: set[str] = set()
    for doc in load_documents(None):
        for raw in doc.splitlines():
            line = raw.strip()
            if not 8 <= len(line) <= 200 or line in seen:
                continue
            label = next((k for k, p in prefixes.items() if line.startswith(p)), None)
            if label is not None:
                seen.add(line)
                by_label[label].append(line)
    gen = torch.Generator().manual_seed(seed)
    per_label = min(max_per_label, *(len(v) for v in by_label.values()))
    rows = []
    for label, lines in by_label.items():
        order = torch.randperm(len(lines), generator=gen)[:per_label].tolist()
        rows += [(lines[i], label) for i in order]
    order = torch.randperm(len(rows), generator=gen).tolist()
    return [rows[i] for i in order]


def read_labelled_file(path: str) -> list[tuple[str, Any]]:
    """``(text, label)`` rows of a CSV (header with ``text`` and ``label``) or JSONL file."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(
            f"{str(file)!r} is not an existing file (expected a .csv or .jsonl with text and label)."
        )
    rows: list[tuple[str, Any]] = []
    if file.suffix == ".csv":
        with file.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
                raise ValueError(
                    f"{str(file)!r} needs a header with columns 'text' and 'label', got {reader.fieldnames}."
                )
            rows = [(r["text"], r["label"]) for r in reader]
    elif file.suffix in (".jsonl", ".json"):
        for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if not isinstance(obj, dict) or "text" not in obj or "label" not in obj:
                raise ValueError(f"{str(file)!r} line {n}: expected an object with 'text' and 'label'.")
            rows.append((obj["text"], obj["label"]))
    else:
        raise ValueError(f"{str(file)!r}: unknown format {file.suffix!r}; valid: .csv, .jsonl")
    if not rows:
        raise ValueError(f"{str(file)!r} holds no rows.")
    return rows


def _label_ids(labels: list[Any]) -> tuple[list[Any], list[str] | None]:
    """Integer class ids as given; float targets (regression); names mapped to ids in sorted order.

    A mix (names beside numbers) is refused: mapping it silently would scramble the classes.
    """
    text = [str(v).strip() for v in labels]

    def kind(t: str) -> str:
        if t.lstrip("-").isdigit():
            return "int"
        try:
            float(t)
            return "float"
        except ValueError:
            return "name"

    kinds = {kind(t) for t in text}
    if kinds == {"int"}:
        return [int(t) for t in text], None
    if kinds <= {"int", "float"}:
        return [float(t) for t in text], None
    if kinds == {"name"}:
        names = sorted(set(text))
        return [names.index(t) for t in text], names
    example = {k: next(t for t in text if kind(t) == k) for k in sorted(kinds)}
    raise ValueError(
        f"labels mix names and numbers (e.g. {example}); use class ids 0..n-1, float targets, or names throughout."
    )


class _Encoded(Dataset):
    def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


class TextClassificationDataModule(L.LightningDataModule):
    """Sequence classification batches (``input_ids``, ``attention_mask``, ``token_type_ids`` ``[B, T]``,
    ``labels`` ``[B]``), padded to ``max_length``.

    Args:
        train_file: a local ``.csv`` (header ``text,label``) or ``.jsonl`` (``{"text": ..., "label": ...}``);
            ``None``: the embedded default task (4 labels, see the module docstring).
        val_file: like ``train_file``; ``None``: the last ``val_fraction`` of the training rows.
        tokenizer: ``"bpe"`` (trained on the embedded corpus, cached), ``"byte"``, or a local tokenizer path.
        tokenizer_vocab_size: target vocabulary of the trained BPE (the model's is this plus 4 specials).
        max_length: tokens per sequence, ``[CLS]`` and ``[SEP]`` included (longer texts are truncated).
        max_examples: keep at most this many training rows (quick runs); the default task makes up to
            ``max_examples // 4`` rows per label.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        tokenizer: str = "bpe",
        tokenizer_vocab_size: int = 4096,
        max_length: int = 64,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 1234,
        max_examples: int = 4096,
    ) -> None:
        super().__init__()
        _check_int("max_length", max_length, 3)
        _check_int("batch_size", batch_size, 1)
        _check_int("max_examples", max_examples, 8)
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction!r} is not valid: expected a float in (0, 1).")
        self.save_hyperparameters()
        self.train_file, self.val_file, self.tokenizer_name = train_file, val_file, tokenizer
        self._bpe_vocab, self.max_length, self.batch_size = tokenizer_vocab_size, max_length, batch_size
        self.val_fraction, self.num_workers, self.seed, self.max_examples = (
            val_fraction,
            num_workers,
            seed,
            max_examples,
        )
        self.cache_dir = _resolve_cache_dir(cache_dir)
        self._tokenizer: Any = None
        self.label_names: list[str] | None = list(DEFAULT_LABELS) if train_file is None else None
        self.train_dataset: _Encoded | None = None
        self.val_dataset: _Encoded | None = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            corpus = "\n\n".join(load_documents(None)) if self.tokenizer_name == "bpe" else ""
            self._tokenizer = build_tokenizer(self.tokenizer_name, corpus, self._bpe_vocab, self.cache_dir)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary plus ``[PAD] [CLS] [SEP] [MASK]``."""
        return self.tokenizer.vocab_size + len(SPECIAL_TOKENS)

    @property
    def num_labels(self) -> int:
        """Classes in the data (1 for float regression targets); reads the files."""
        self.setup()
        return self._num_labels

    def prepare_data(self) -> None:
        self.tokenizer  # noqa: B018 - trains and caches the BPE once per node

    def _rows(self) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
        if self.train_file is None:
            rows = default_labelled_lines(self.max_examples // 4, self.seed)
        else:
            rows = read_labelled_file(self.train_file)
        val = read_labelled_file(self.val_file) if self.val_file else None
        if val is None:
            n_val = max(1, int(len(rows) * self.val_fraction))
            rows, val = rows[:-n_val], rows[-n_val:]
        return rows[: self.max_examples], val

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        train, val = self._rows()
        labels, names = _label_ids([label for _, label in train + val])
        if names is not None:
            self.label_names = names
        regression = isinstance(labels[0], float)
        self._num_labels = 1 if regression else max(labels) + 1
        if not regression and min(labels) < 0:
            raise ValueError(f"labels must be class ids >= 0 (or names), found {min(labels)}.")
        items = [
            self._encode(text, label, regression)
            for (text, _), label in zip(train + val, labels, strict=True)
        ]
        self.train_dataset, self.val_dataset = _Encoded(items[: len(train)]), _Encoded(items[len(train) :])

    def _encode(self, text: str, label: Any, regression: bool) -> dict[str, torch.Tensor]:
        base = self.tokenizer.vocab_size
        pad, cls, sep = (base + SPECIAL_TOKENS.index(t) for t in ("[PAD]", "[CLS]", "[SEP]"))
        body = self.tokenizer.encode(str(text))[: self.max_length - 2]
        ids = [cls, *body, sep]
        n = len(ids)
        ids += [pad] * (self.max_length - n)
        return {
            "input_ids": torch.tensor(ids),
            "attention_mask": (torch.arange(self.max_length) < n).long(),
            "token_type_ids": torch.zeros(self.max_length, dtype=torch.long),
            "labels": torch.tensor(label, dtype=torch.float32 if regression else torch.long),
        }

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        return seeded_loader(dataset, self.batch_size, shuffle, self.num_workers, self.seed)
