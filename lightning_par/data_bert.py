"""Data for BERT, all offline: masked-LM batches from the embedded corpus, and sequence classification from
local CSV / JSONL files or an embedded default task.

Tokens: the tokenizers of :mod:`lightning_par.data` (the BPE trained on the embedded corpus by default)
with four special tokens appended after their vocabulary: ``[PAD] [CLS] [SEP] [MASK]``, so the model's
``vocab_size`` is the tokenizer's plus 4. A sequence is ``[CLS] tokens [SEP]`` padded with ``[PAD]``.

Masking (:class:`MLMCollator`) follows BERT: 15% of the non-special tokens are selected; of those 80%
become ``[MASK]``, 10% a random token, 10% stay; labels hold the original token at selected positions and
-100 elsewhere. Each example's draw comes from a generator seeded by the run seed and the example's index,
so every tensor/pipeline peer and every layout sees the same masked batch.

The default classification task needs no download: lines of the embedded corpus (standard-library Python)
labelled by their kind: 0 comment, 1 definition (``def``/``class``), 2 import, 3 control flow exit
(``return``/``raise``/``yield``/``break``/``continue``), balanced and shuffled with the seed.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_par.data import TextDataModule, _check_int, _resolve_cache_dir, build_tokenizer, load_documents

__all__ = [
    "MLMCollator",
    "MLMDataModule",
    "TextClassificationDataModule",
    "mask_tokens",
    "default_labelled_lines",
]

SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]")
DEFAULT_LABELS = ("comment", "definition", "import", "exit")


def _seed_of(*parts: Any) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def mask_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    mask_token_id: int,
    random_vocab_size: int,
    generator: torch.Generator,
    mlm_probability: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of one sequence: ``(masked input_ids, labels)``.

    ``maskable`` marks the positions that may be selected (not special tokens, not padding). Random
    replacements are drawn from ``0..random_vocab_size - 1`` (the tokenizer's own tokens).
    """
    probs = torch.full(input_ids.shape, mlm_probability) * maskable
    selected = torch.bernoulli(probs, generator=generator).bool()
    labels = input_ids.masked_fill(~selected, -100)
    replace = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=generator).bool() & selected
    randomize = torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=generator).bool()
    randomize &= selected & ~replace
    random_ids = torch.randint(random_vocab_size, input_ids.shape, generator=generator)
    out = input_ids.masked_fill(replace, mask_token_id)
    out = torch.where(randomize, random_ids, out)
    return out, labels


class MLMCollator:
    """Stacks examples and masks them, each from a generator seeded by ``(seed, example index)``."""

    def __init__(
        self, mask_token_id: int, random_vocab_size: int, seed: int, mlm_probability: float = 0.15
    ) -> None:
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability={mlm_probability!r} is not valid: expected a float in (0, 1).")
        self.mask_token_id = mask_token_id
        self.random_vocab_size = random_vocab_size
        self.seed = seed
        self.mlm_probability = mlm_probability

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ids, labels = [], []
        for ex in examples:
            gen = torch.Generator().manual_seed(_seed_of(self.seed, int(ex["index"])))
            masked, lab = mask_tokens(
                ex["input_ids"],
                ex["special_tokens_mask"] == 0,
                self.mask_token_id,
                self.random_vocab_size,
                gen,
                self.mlm_probability,
            )
            ids.append(masked)
            labels.append(lab)
        return {
            "input_ids": torch.stack(ids),
            "attention_mask": torch.stack([ex["attention_mask"] for ex in examples]),
            "token_type_ids": torch.stack([ex["token_type_ids"] for ex in examples]),
            "labels": torch.stack(labels),
        }


class _MLMWindows(Dataset):
    """``[CLS] window [SEP]`` over non-overlapping windows of a token stream (no padding needed)."""

    def __init__(self, tokens: torch.Tensor, length: int, cls_id: int, sep_id: int) -> None:
        self.tokens, self.window, self.cls_id, self.sep_id = tokens, length - 2, cls_id, sep_id

    def __len__(self) -> int:
        return len(self.tokens) // self.window

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        body = self.tokens[index * self.window : (index + 1) * self.window].long()
        ids = torch.cat([torch.tensor([self.cls_id]), body, torch.tensor([self.sep_id])])
        special = torch.zeros_like(ids)
        special[0] = special[-1] = 1
        ones = torch.ones_like(ids)
        return {
            "input_ids": ids,
            "attention_mask": ones,
            "token_type_ids": torch.zeros_like(ids),
            "special_tokens_mask": special,
            "index": torch.tensor(index),
        }


class MLMDataModule(TextDataModule):
    """Masked-LM batches (``input_ids``, ``attention_mask``, ``token_type_ids``, ``labels``, ``[B, T]``).

    Arguments are those of :class:`lightning_par.data.TextDataModule` (``block_size`` is the sequence
    length including ``[CLS]`` and ``[SEP]``; ``tokenizer_vocab_size`` is its ``vocab_size``, the BPE's
    target), plus ``mlm_probability``. The ``vocab_size`` property (the model's, linked by the CLI)
    includes the four special tokens.
    """

    def __init__(
        self,
        text_files: list[str] | None = None,
        tokenizer: str = "bpe",
        tokenizer_vocab_size: int = 4096,
        block_size: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 1234,
        max_tokens: int | None = None,
        mlm_probability: float = 0.15,
    ) -> None:
        super().__init__(
            text_files, tokenizer, tokenizer_vocab_size, block_size, batch_size, val_fraction, num_workers,
            cache_dir, seed, max_tokens,
        )  # fmt: skip
        self.save_hyperparameters()  # this signature's names (vocab_size is the model's, with specials)
        _check_int("block_size", block_size, 3)  # [CLS] and [SEP] take two positions
        MLMCollator(0, 1, seed, mlm_probability)  # checks mlm_probability now, before any work
        self.collator_args = {"mlm_probability": mlm_probability}

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary plus ``[PAD] [CLS] [SEP] [MASK]``."""
        return self.tokenizer.vocab_size + len(SPECIAL_TOKENS)

    def special_id(self, token: str) -> int:
        return self.tokenizer.vocab_size + SPECIAL_TOKENS.index(token)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        super().setup(stage)  # token stream split into train / val
        cls_id, sep_id = self.special_id("[CLS]"), self.special_id("[SEP]")
        self.train_dataset = _MLMWindows(self.train_dataset.tokens, self.block_size, cls_id, sep_id)
        self.val_dataset = _MLMWindows(self.val_dataset.tokens, self.block_size, cls_id, sep_id)

    def _loader(self, dataset: Any, shuffle: bool) -> DataLoader:
        loader = super()._loader(dataset, shuffle)
        # Validation masks with another seed than training, so a window seen in both is masked differently.
        seed = self.seed if shuffle else self.seed + 1
        collate = MLMCollator(
            self.special_id("[MASK]"), self.tokenizer.vocab_size, seed, **self.collator_args
        )
        return DataLoader(
            loader.dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=loader.generator,
            collate_fn=collate,
        )


# ---- classification ---------------------------------------------------------------------------------------
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
        pad, cls, sep = base, base + 1, base + 2
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
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )
