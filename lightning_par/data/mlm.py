"""Masked-LM data for BERT, offline: ``[CLS] ... [SEP]`` windows of the embedded corpus, masked by a collator.

Tokens: the tokenizers of :mod:`lightning_par.data` (the BPE trained on the embedded corpus by default)
with four special tokens appended after their vocabulary: ``[PAD] [CLS] [SEP] [MASK]``, so the model's
``vocab_size`` is the tokenizer's plus 4. (:mod:`lightning_par.data_classification` uses the same.)

Masking (:class:`MLMCollator`) follows BERT: 15% of the non-special tokens are selected; of those 80%
become ``[MASK]``, 10% a random token, 10% stay; labels hold the original token at selected positions and
-100 elsewhere. Each example's draw comes from a generator seeded by the run seed and the example's index,
so every tensor/pipeline peer and every layout sees the same masked batch.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_par.data.text import TextDataModule, _check_int

__all__ = ["SPECIAL_TOKENS", "MLMCollator", "MLMDataModule", "mask_tokens"]

SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]")


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

    def _loader(self, dataset: Any, shuffle: bool, collate_fn: Any = None) -> DataLoader:
        # Validation masks with another seed than training, so a window seen in both is masked differently.
        seed = self.seed if shuffle else self.seed + 1
        collate = MLMCollator(
            self.special_id("[MASK]"), self.tokenizer.vocab_size, seed, **self.collator_args
        )
        return super()._loader(dataset, shuffle, collate)
