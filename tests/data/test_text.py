"""Tests of lightning_par.data: the offline corpus, tokenizers, caches and the TextDataModule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_par.data import text as data
from lightning_par.data.text import TextDataModule, build_tokenizer, default_corpus_text, load_corpus

SAMPLES = [
    "hello world",
    "def f(x):\n    return x  # ok\n",
    "héllo wörld, naïve café — 日本語 ✓ 🚀",
    "  \t\n",
]


@pytest.fixture(scope="module")
def corpus() -> str:
    return default_corpus_text()


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the default-corpus BPE and token ids, so they are trained/tokenized once per module."""
    cache = tmp_path_factory.mktemp("cache")
    TextDataModule(cache_dir=str(cache)).prepare_data()
    return cache


def small_module(cache: Path, **kwargs) -> TextDataModule:
    kwargs = {"block_size": 32, "batch_size": 4, "max_tokens": 4096, "val_fraction": 0.1, **kwargs}
    dm = TextDataModule(cache_dir=str(cache), **kwargs)
    dm.setup("fit")
    return dm


def test_default_corpus_is_large_and_deterministic(corpus: str) -> None:
    assert 1_500_000 < len(corpus.encode("utf-8")) < 3_000_000
    assert len(data.load_documents(None)) >= 40
    assert "def " in corpus and "class " in corpus and '"""' in corpus
    assert default_corpus_text() == corpus
    assert load_corpus(None) == corpus


def test_bpe_round_trips_and_has_eos(corpus: str, shared_cache: Path) -> None:
    tok = build_tokenizer("bpe", corpus, 4096, shared_cache)
    assert tok.vocab_size == 4096
    assert tok.eos_token_id is not None
    for text in SAMPLES:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # Trained merges compress Python source well below one token per byte.
    assert len(tok.encode(corpus[:20_000])) < 20_000 / 2.5


def test_bpe_cache_is_reused_and_keyed_by_vocab_size(
    corpus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = corpus[:100_000]
    first = build_tokenizer("bpe", text, 512, tmp_path)
    (cached,) = tmp_path.glob("bpe-*/tokenizer.json")
    assert not list(tmp_path.glob("bpe-*/*.tmp")), "temporary file left behind"
    calls: list[int] = []

    def no_training(corpus_text: str, vocab_size: int, out_file: str) -> None:
        calls.append(vocab_size)
        raise RuntimeError("BPE retrained")

    monkeypatch.setattr(data, "_train_bpe", no_training)
    second = build_tokenizer("bpe", text, 512, tmp_path)
    assert calls == []
    assert second.encode(SAMPLES[1]) == first.encode(SAMPLES[1])
    assert list(tmp_path.glob("bpe-*/tokenizer.json")) == [cached]
    with pytest.raises(RuntimeError, match="retrained"):  # another vocab_size is another cache entry
        build_tokenizer("bpe", text, 600, tmp_path)
    assert calls == [600]


def test_write_once_first_writer_wins(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.txt"
    data._write_once(target, lambda tmp: Path(tmp).write_text("first"))
    data._write_once(target, lambda tmp: Path(tmp).write_text("second"))
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]


def test_byte_tokenizer() -> None:
    tok = build_tokenizer("byte", "", 4096, None)
    assert tok.vocab_size == 256 and tok.eos_token_id is None
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("é") == [0xC3, 0xA9]
    assert TextDataModule(tokenizer="byte").vocab_size == 256


def test_vocab_size_builds_tokenizer_lazily(tmp_path: Path) -> None:
    dm = TextDataModule(cache_dir=str(tmp_path), vocab_size=300)
    assert dm._tokenizer is None and not list(tmp_path.iterdir())
    assert dm.vocab_size == 300
    assert len(list(tmp_path.glob("bpe-*/tokenizer.json"))) == 1


def test_batches_shapes_and_labels(shared_cache: Path) -> None:
    dm = small_module(shared_cache)
    train = dm.train_dataloader()
    batch = next(iter(train))
    assert set(batch) == {"input_ids", "labels"}
    for value in batch.values():
        assert value.shape == (4, 32) and value.dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr()
    assert 0 <= int(batch["input_ids"].min()) and int(batch["input_ids"].max()) < dm.vocab_size
    assert len(train) == len(dm.train_dataset) // 4  # drop_last
    val_batch = next(iter(dm.val_dataloader()))
    assert torch.equal(val_batch["input_ids"][0], dm.val_dataset[0]["input_ids"])  # val is not shuffled


def test_split_is_positional_disjoint_and_val_nonempty(shared_cache: Path) -> None:
    dm = small_module(shared_cache)
    full = small_module(shared_cache, max_tokens=None)
    stream = torch.cat([full.train_dataset.tokens, full.val_dataset.tokens])
    train, val = dm.train_dataset.tokens, dm.val_dataset.tokens
    assert len(train) + len(val) == 4096
    assert torch.equal(torch.cat([train, val]), stream[:4096])  # train is a prefix, val the suffix: disjoint
    assert len(dm.val_dataset) >= 1 and len(val) >= int(4096 * 0.1)
    assert len(dm.train_dataset) == len(train) // 32
    assert len(full.train_dataset.tokens) + len(full.val_dataset.tokens) > 500_000


def test_shuffle_is_seeded(shared_cache: Path) -> None:
    def first_batch(seed: int) -> torch.Tensor:
        return next(iter(small_module(shared_cache, seed=seed).train_dataloader()))["input_ids"]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))


def test_encode_decode_on_module(shared_cache: Path) -> None:
    dm = TextDataModule(cache_dir=str(shared_cache))
    ids = dm.encode(SAMPLES[2])
    assert ids.dtype == torch.long and ids.dim() == 2 and ids.shape[0] == 1
    assert dm.decode(ids) == SAMPLES[2]
    assert dm.decode(ids[0].tolist()) == SAMPLES[2]


def test_local_text_files(tmp_path: Path) -> None:
    text = "Ünïcode line number {i}: the quick brown fox jumps over the lazy dog.\n"
    path = tmp_path / "story.txt"
    path.write_text("".join(text.format(i=i) for i in range(200)), encoding="utf-8")
    dm = TextDataModule(text_files=[str(path)], tokenizer="byte", block_size=16, cache_dir=str(tmp_path))
    dm.setup("fit")
    raw = path.read_bytes()  # byte tokenizer: the token stream is the file's bytes
    assert bytes(dm.train_dataset.tokens.tolist()) == raw[: len(dm.train_dataset.tokens)]
    assert len(dm.train_dataset.tokens) + len(dm.val_dataset.tokens) == len(raw)
    bpe = TextDataModule(text_files=[str(path)], vocab_size=300, block_size=16, cache_dir=str(tmp_path))
    bpe.setup("fit")
    assert bpe.vocab_size <= 300 and len(bpe.train_dataset) > 0
    assert bpe.decode(bpe.encode("the quick brown fox")) == "the quick brown fox"


def test_local_tokenizer_json_and_directory(corpus: str, tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    trained = build_tokenizer("bpe", corpus[:50_000], 400, tmp_path / "cache")
    json_file = tmp_path / "tokenizer.json"
    trained.backend.save(str(json_file))
    from_file = TextDataModule(tokenizer=str(json_file)).tokenizer
    assert from_file.encode(SAMPLES[2]) == trained.encode(SAMPLES[2])
    assert from_file.eos_token_id == trained.eos_token_id
    hf_dir = tmp_path / "hf"
    PreTrainedTokenizerFast(tokenizer_object=trained.backend, eos_token=data.EOS_TOKEN).save_pretrained(
        hf_dir
    )
    from_dir = TextDataModule(tokenizer=str(hf_dir)).tokenizer
    assert from_dir.vocab_size == trained.vocab_size
    assert from_dir.decode(from_dir.encode(SAMPLES[2])) == SAMPLES[2]
    assert from_dir.eos_token_id == trained.eos_token_id


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_PAR_CACHE", str(tmp_path / "env"))
    assert TextDataModule().cache_dir == tmp_path / "env"
    assert TextDataModule(cache_dir=str(tmp_path / "arg")).cache_dir == tmp_path / "arg"
    monkeypatch.delenv("LIGHTNING_PAR_CACHE")
    assert TextDataModule().cache_dir == Path("~/.cache/lightning_par").expanduser()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"block_size": 1}, "block_size"),
        ({"block_size": 8.0}, "block_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": "0.1"}, "val_fraction"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"seed": -5}, "seed"),
        ({"max_tokens": 10}, "max_tokens"),
        ({"tokenizer": "gpt2"}, "tokenizer"),
        ({"tokenizer": "/no/such/tokenizer.json"}, "tokenizer"),
        ({"text_files": []}, "text_files"),
        ({"text_files": "a.txt"}, "text_files"),
        ({"text_files": ["/no/such/file.txt"]}, "text_files"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name) as info:
        TextDataModule(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)  # the message shows the bad value


def test_bad_cache_dir_and_too_little_data(tmp_path: Path, shared_cache: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ValueError, match="cache_dir"):
        TextDataModule(cache_dir=str(not_a_dir))
    with pytest.raises(ValueError, match="batch_size"):
        small_module(shared_cache, max_tokens=64, block_size=32, batch_size=4)
