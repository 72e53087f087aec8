"""Text data for causal-LM training: corpus, tokenizer and a LightningDataModule, all offline.

The default corpus is the source of a fixed list of pure-Python standard-library modules (see
``corpus/README.txt``), so every machine that has Python has the data and nothing is ever downloaded.
The tokenizer (a byte-level BPE trained on the corpus, raw bytes, or a local Hugging Face tokenizer) and
the token ids are cached on disk under a content hash, written atomically, so distributed ranks that start
at once all read the same complete files.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["TextDataModule", "build_tokenizer", "default_corpus_text", "load_corpus", "load_documents"]

FORMAT_VERSION = "1"  # bump when the cache layout or tokenization changes: old caches are then ignored
EOS_TOKEN = "<|endoftext|>"
DOC_SEPARATOR = "\n\n"
_TOKENIZER_HELP = (
    "use 'bpe', 'byte', or the path of a local Hugging Face tokenizer directory or tokenizer.json"
)
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>")
# Pure-Python files present in every CPython 3.10-3.13 (sorted, paths relative to the stdlib), ~2.1 MB.
DEFAULT_CORPUS_MODULES = (
    "abc.py", "argparse.py", "ast.py", "bisect.py", "calendar.py", "collections/__init__.py", "colorsys.py",
    "configparser.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py", "doctest.py",
    "enum.py", "fnmatch.py", "fractions.py", "functools.py", "gettext.py", "glob.py", "heapq.py",
    "inspect.py", "ipaddress.py", "json/decoder.py", "json/encoder.py", "keyword.py", "locale.py",
    "logging/__init__.py", "mailbox.py", "numbers.py", "operator.py", "optparse.py", "pickle.py",
    "pprint.py", "queue.py", "random.py", "reprlib.py", "sched.py", "shlex.py", "shutil.py",
    "statistics.py", "string.py", "subprocess.py", "tarfile.py", "tempfile.py", "textwrap.py",
    "threading.py", "token.py", "tokenize.py", "traceback.py", "typing.py", "weakref.py",
)  # fmt: skip


def load_documents(text_files: Sequence[str] | None = None) -> list[str]:
    """One string per file: the given UTF-8 files, or the standard-library modules for ``None``."""
    if text_files is None:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        paths = [stdlib / name for name in DEFAULT_CORPUS_MODULES if (stdlib / name).is_file()]
    else:
        paths = [Path(p) for p in text_files]
    return [p.read_text(encoding="utf-8") for p in paths]


def load_corpus(text_files: Sequence[str] | None = None) -> str:
    """The whole corpus as one string (documents joined by a blank line)."""
    return DOC_SEPARATOR.join(load_documents(text_files))


def default_corpus_text() -> str:
    """The embedded default corpus: same text on every run of the same Python version."""
    return load_corpus(None)


class ByteTokenizer:
    """Raw UTF-8 bytes: vocab 256, no training, no special tokens."""

    vocab_size: int = 256
    eos_token_id: int | None = None
    fingerprint: str = "byte"  # identifies the tokenizer in the token-id cache key

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]


class HFTokenizer:
    """A ``tokenizers.Tokenizer``: our BPE, a tokenizer.json, or the fast backend of a transformers one."""

    def __init__(self, backend: Any, fingerprint: str, eos_token: str | None = None) -> None:
        self.backend = backend
        self.fingerprint = fingerprint
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        ids = (backend.token_to_id(t) for t in ((eos_token,) if eos_token else _EOS_CANDIDATES))
        self.eos_token_id: int | None = next((i for i in ids if i is not None), None)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        # Special tokens stay visible so document boundaries show up in decoded samples.
        return self.backend.decode(ids, skip_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encodes on all cores (one document per thread)."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]


TextTokenizer = ByteTokenizer | HFTokenizer  # both: encode, decode, encode_batch, vocab_size, eos_token_id


def _sha256(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8", errors="surrogatepass") + b"\x00")
    return h.hexdigest()


def _write_once(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temp file in the same folder, then publish it atomically; the first writer wins.

    ``os.link`` fails when the file already exists, so ranks that raced all end up reading one file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache may be shared by users of a node
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # file system without hard links
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _train_bpe(corpus_text: str, vocab_size: int, out_file: str) -> None:
    """Train a byte-level BPE on the corpus and save it as tokenizer.json (about a second for 2 MB)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus_text.splitlines(keepends=True),
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        show_progress=False,
    )
    bpe.save(out_file)


def _local_fingerprint(path: Path) -> str:
    """Hash of a local tokenizer's files (small files only, never model weights)."""
    h = hashlib.sha256(str(path.resolve()).encode())
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for file in files:
        if file.stat().st_size < 64 * 2**20 and file.suffix not in (".bin", ".safetensors", ".pt"):
            h.update(file.name.encode() + b"\x00" + file.read_bytes())
    return h.hexdigest()


def build_tokenizer(
    kind: str, corpus_text: str, vocab_size: int = 4096, cache_dir: str | os.PathLike | None = None
) -> TextTokenizer:
    """Return a tokenizer: ``"bpe"`` (trained on ``corpus_text``, cached), ``"byte"``, or a local path."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        from tokenizers import Tokenizer

        key = _sha256(corpus_text, str(vocab_size), FORMAT_VERSION)
        path = _resolve_cache_dir(cache_dir) / f"bpe-{key[:32]}" / "tokenizer.json"
        if not path.is_file():
            _write_once(path, lambda tmp: _train_bpe(corpus_text, vocab_size, tmp))
        return HFTokenizer(Tokenizer.from_file(str(path)), fingerprint=f"bpe-{key}")
    local = Path(kind).expanduser()
    if local.is_file():
        from tokenizers import Tokenizer

        return HFTokenizer(Tokenizer.from_file(str(local)), fingerprint=_local_fingerprint(local))
    if local.is_dir():
        from transformers import AutoTokenizer  # heavy import, only when asked for

        hf = AutoTokenizer.from_pretrained(str(local), local_files_only=True)
        if not hf.is_fast:
            raise ValueError(f"tokenizer={kind!r}: only fast (tokenizers-backed) tokenizers are supported")
        return HFTokenizer(hf.backend_tokenizer, _local_fingerprint(local), eos_token=hf.eos_token)
    raise ValueError(f"tokenizer={kind!r} is not valid: {_TOKENIZER_HELP}")


def _resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """Explicit argument, else ``$LIGHTNING_PAR_CACHE``, else ``~/.cache/lightning_par``."""
    chosen = cache_dir or os.environ.get("LIGHTNING_PAR_CACHE") or "~/.cache/lightning_par"
    return Path(chosen).expanduser()


class BlockDataset(Dataset):
    """Non-overlapping ``block_size`` windows of a token stream; labels equal inputs (the model shifts)."""

    def __init__(self, tokens: torch.Tensor, block_size: int) -> None:
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.tokens) // self.block_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.block_size
        ids = self.tokens[start : start + self.block_size].long()
        return {"input_ids": ids, "labels": ids.clone()}


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not valid: expected an integer >= {minimum}")


class TextDataModule(L.LightningDataModule):
    """Causal-LM batches (``input_ids`` and ``labels``, both ``[batch_size, block_size]``) from local text.

    Args:
        text_files: local UTF-8 text files; ``None`` uses the embedded default corpus (stdlib sources).
        tokenizer: ``"bpe"`` (byte-level BPE trained on the corpus, cached), ``"byte"`` (UTF-8 bytes,
            vocab 256), or a path to a local Hugging Face tokenizer directory or ``tokenizer.json``.
        vocab_size: target vocabulary of the trained BPE (ignored by the other tokenizers).
        block_size: tokens per training example.
        batch_size: examples per batch on each data-parallel rank.
        val_fraction: fraction of the token stream, taken from its end, held out for validation.
        num_workers: DataLoader worker processes.
        cache_dir: where tokenizers and token ids are cached; default ``$LIGHTNING_PAR_CACHE`` or
            ``~/.cache/lightning_par``.
        seed: seed of the training shuffle.
        max_tokens: keep only the first ``max_tokens`` tokens of the stream (quick runs and tests).
    """

    def __init__(
        self,
        text_files: list[str] | None = None,
        tokenizer: str = "bpe",
        vocab_size: int = 4096,
        block_size: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 1234,
        max_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if text_files is not None:
            if isinstance(text_files, str) or not text_files:
                raise ValueError(f"text_files={text_files!r} is not valid: expected None or a non-empty list")
            missing = [f for f in text_files if not Path(f).is_file()]
            if missing:
                raise ValueError(f"text_files={text_files!r}: these are not existing files: {missing}")
        if not isinstance(tokenizer, str) or (
            tokenizer not in ("bpe", "byte") and not Path(tokenizer).expanduser().exists()
        ):
            raise ValueError(f"tokenizer={tokenizer!r} is not valid: {_TOKENIZER_HELP}")
        _check_int("vocab_size", vocab_size, 257)  # 256 byte symbols + <|endoftext|>
        _check_int("block_size", block_size, 2)
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("seed", seed, 0)
        if (
            isinstance(val_fraction, bool)
            or not isinstance(val_fraction, (int, float))
            or not 0 < val_fraction < 1
        ):
            raise ValueError(f"val_fraction={val_fraction!r} is not valid: expected a float in (0, 1)")
        if max_tokens is not None:
            _check_int("max_tokens", max_tokens, 2 * block_size)
        if cache_dir is not None and Path(cache_dir).expanduser().is_file():
            raise ValueError(f"cache_dir={cache_dir!r} is not valid: it exists and is not a directory")
        self.save_hyperparameters()
        self.text_files, self.tokenizer_name, self._vocab_size = text_files, tokenizer, vocab_size
        self.block_size, self.batch_size, self.val_fraction = block_size, batch_size, val_fraction
        self.num_workers, self.seed, self.max_tokens = num_workers, seed, max_tokens
        self.cache_dir = _resolve_cache_dir(cache_dir)
        self._tokenizer: TextTokenizer | None = None
        self._documents: list[str] | None = None
        self.train_dataset: BlockDataset | None = None
        self.val_dataset: BlockDataset | None = None

    @property
    def tokenizer(self) -> TextTokenizer:
        """Built on first use (BPE training reads the cache when it is there)."""
        if self._tokenizer is None:
            corpus = self._corpus_text() if self.tokenizer_name == "bpe" else ""
            self._tokenizer = build_tokenizer(self.tokenizer_name, corpus, self._vocab_size, self.cache_dir)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Size of the tokenizer's vocabulary (the model's embedding rows); builds the tokenizer."""
        return self.tokenizer.vocab_size

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` as a ``LongTensor[1, n]``, ready for ``model.generate``-style calls."""
        return torch.tensor([self.tokenizer.encode(text)], dtype=torch.long)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Text of a 1-D (or ``[1, n]``) sequence of token ids."""
        flat = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tokenizer.decode(flat)

    def _documents_list(self) -> list[str]:
        if self._documents is None:
            self._documents = load_documents(self.text_files)
        return self._documents

    def _corpus_text(self) -> str:
        return DOC_SEPARATOR.join(self._documents_list())  # same string as load_corpus(text_files)

    def _token_ids(self) -> np.ndarray:
        """All token ids of the corpus (EOS after each document), from the cache or computed and cached."""
        documents = self._documents_list()
        key = _sha256(self.tokenizer.fingerprint, *documents, FORMAT_VERSION)
        path = self.cache_dir / f"tokens-{key[:32]}" / "ids.npy"
        if not path.is_file():
            eos = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
            dtype = np.uint16 if self.vocab_size <= 2**16 else np.int32
            encoded = self.tokenizer.encode_batch(documents)
            ids = np.concatenate([np.asarray(doc + eos, dtype=dtype) for doc in encoded])

            def write(tmp: str) -> None:
                with open(tmp, "wb") as f:
                    np.save(f, ids)

            _write_once(path, write)
        return np.load(path)

    def prepare_data(self) -> None:
        """Train/cache the tokenizer and token ids once per node (local rank 0) before ``setup``."""
        self._token_ids()

    def setup(self, stage: str | None = None) -> None:
        """Load the token ids (safe on many processes at once) and split them into train and val."""
        if self.train_dataset is not None:
            return
        tokens = torch.from_numpy(self._token_ids().astype(np.int32))
        if self.max_tokens is not None:
            tokens = tokens[: self.max_tokens]
        n_val = max(int(len(tokens) * self.val_fraction), self.block_size)  # at least one val block
        n_train_blocks = (len(tokens) - n_val) // self.block_size
        if n_train_blocks < self.batch_size:
            raise ValueError(
                f"only {n_train_blocks} training blocks of block_size={self.block_size} from {len(tokens)} "
                f"tokens, fewer than batch_size={self.batch_size}: use more text, a larger max_tokens or a "
                "smaller block_size/batch_size"
            )
        self.train_dataset = BlockDataset(tokens[: len(tokens) - n_val], self.block_size)
        self.val_dataset = BlockDataset(tokens[len(tokens) - n_val :], self.block_size)

    def train_dataloader(self) -> DataLoader:
        """Seeded shuffle; Lightning swaps in a DistributedSampler under data parallelism."""
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation blocks in order."""
        return self._loader(self.val_dataset, shuffle=False)

    def _loader(
        self, dataset: Dataset | None, shuffle: bool, collate_fn: Callable[[list], Any] | None = None
    ) -> DataLoader:
        return seeded_loader(dataset, self.batch_size, shuffle, self.num_workers, self.seed, collate_fn)


def seeded_loader(
    dataset: Dataset | None,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    collate_fn: Callable[[list], Any] | None = None,
) -> DataLoader:
    """The data modules' loader: a seeded shuffle and no short last batch when training, in order otherwise."""
    if dataset is None:
        raise RuntimeError("call setup() before asking for a dataloader")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        collate_fn=collate_fn,
    )
