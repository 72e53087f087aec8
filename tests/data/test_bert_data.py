"""BERT data (masking, collator, data modules) and the shipped BERT configs through the CLI."""

from __future__ import annotations

import pytest
import torch
from transformers import BertForMaskedLM, BertForSequenceClassification


# ---- data ------------------------------------------------------------------------------------------------
def test_masking_follows_bert_and_is_the_same_in_any_batching() -> None:
    from lightning_par.data.mlm import MLMCollator, mask_tokens

    n, vocab, mask_id = 200_000, 1000, 1003
    ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0))
    maskable = torch.ones(n, dtype=torch.bool)
    maskable[::10] = False  # special tokens: never selected
    out, labels = mask_tokens(ids, maskable, mask_id, vocab, torch.Generator().manual_seed(1))
    selected = labels != -100
    assert not selected[~maskable].any()
    assert torch.equal(labels[selected], ids[selected]) and torch.equal(out[~selected], ids[~selected])
    k = int(selected.sum())
    masked = float((out[selected] == mask_id).sum()) / k
    changed = float(((out[selected] != mask_id) & (out[selected] != ids[selected])).sum()) / k
    # Binomial fractions: 0.005 and 0.01 are more than 5 standard deviations at these sample sizes.
    assert abs(k / int(maskable.sum()) - 0.15) < 0.005
    assert abs(masked - 0.8) < 0.01
    assert abs(changed - 0.1 * (1 - 1 / vocab)) < 0.01  # a random token may equal the original

    rows = [
        {
            "input_ids": torch.randint(0, vocab, (12,)),
            "attention_mask": torch.ones(12, dtype=torch.long),
            "token_type_ids": torch.zeros(12, dtype=torch.long),
            "special_tokens_mask": torch.zeros(12, dtype=torch.long),
            "index": torch.tensor(i),
        }
        for i in range(6)
    ]
    collate = MLMCollator(mask_id, vocab, seed=7)
    whole = collate(rows)
    parts = [collate(rows[:2]), collate(rows[2:3]), collate(rows[3:])]  # e.g. data-parallel replicas
    for key in whole:
        assert torch.equal(whole[key], torch.cat([p[key] for p in parts]))
    assert not torch.equal(whole["labels"], MLMCollator(mask_id, vocab, seed=8)(rows)["labels"])


def test_data_modules(tmp_path) -> None:
    from lightning_par.data.classification import TextClassificationDataModule, default_labelled_lines
    from lightning_par.data.mlm import MLMDataModule

    cache = str(tmp_path / "cache")
    mlm = MLMDataModule(tokenizer="byte", block_size=16, batch_size=4, max_tokens=4000, cache_dir=cache)
    mlm.prepare_data()
    mlm.setup()
    assert mlm.vocab_size == 260  # 256 bytes + [PAD] [CLS] [SEP] [MASK]
    batch = next(iter(mlm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 16)
    assert (batch["input_ids"][:, 0] == 257).all() and (batch["input_ids"][:, -1] == 258).all()
    assert ((batch["labels"] == -100) | (batch["labels"] < 256)).all() and (batch["labels"] != -100).any()

    (tmp_path / "d.csv").write_text('text,label\nhello world,pos\n"a, b",neg\nmore text,pos\n')
    (tmp_path / "d.jsonl").write_text('{"text": "x y", "label": 2}\n{"text": "z", "label": 0}\n')
    dm = TextClassificationDataModule(
        str(tmp_path / "d.csv"),
        str(tmp_path / "d.jsonl"),
        tokenizer="byte",
        max_length=8,
        batch_size=2,
        cache_dir=cache,
    )
    with pytest.raises(ValueError, match="label"):  # names in one file, integers in the other: refused
        dm.setup()
    dm = TextClassificationDataModule(
        str(tmp_path / "d.csv"),
        tokenizer="byte",
        max_length=8,
        batch_size=2,
        cache_dir=cache,
        val_fraction=0.34,
    )
    assert dm.num_labels == 2 and dm.label_names == ["neg", "pos"]
    item = dm.train_dataset[1]
    assert item["input_ids"].tolist() == [257, *b"a, b", 258, 256, 256] and item["labels"] == 0
    assert item["attention_mask"].tolist() == [1] * 6 + [0] * 2
    (tmp_path / "bad.csv").write_text("sentence,label\nhi,1\n")
    with pytest.raises(ValueError, match="needs a header with columns 'text' and 'label'"):
        TextClassificationDataModule(str(tmp_path / "bad.csv"), tokenizer="byte", cache_dir=cache).setup()

    rows = default_labelled_lines(100, seed=3)
    assert rows == default_labelled_lines(100, seed=3) and len(rows) == 400
    assert sorted({label for _, label in rows}) == [0, 1, 2, 3]
    assert all(text.startswith("#") for text, label in rows if label == 0)


# ---- the shipped configs through `lightning-par fit` (and export-hf on the checkpoint) ----------------
@pytest.mark.parametrize(
    ("config", "extra"),
    [
        ("bert_mlm_tp.yaml", ["--data.init_args.max_tokens", "40000"]),
        (
            "bert_cls_tp_pp.yaml",
            [
                "--data.init_args.max_examples",
                "200",
                "--data.init_args.max_length",
                "32",
                "--model.max_position_embeddings",
                "32",
            ],
        ),
    ],
)
def test_cli_fit_runs_bert_config(tmp_path, config: str, extra: list[str]) -> None:
    from tests.test_cli import _run, fit_shipped_config

    small = ["--model.n_layer", "2", "--model.n_embd", "64"]
    _, log = fit_shipped_config(config, [*small, *extra], tmp_path)
    keys = [b"train/loss", b"val/loss", b"val/accuracy", b"train/consumed_samples", b"model_config"]
    keys += [b"train/lengths"]  # ParallelThroughputMonitor
    keys += [b"val/ppl"] if "mlm" in config else [b"val/f1", b"num_labels"]
    for key in keys:
        assert key in log, f"{key!r} not recorded in the W&B run"
    ckpt = tmp_path / "runs" / "checkpoints" / config.removesuffix(".yaml") / "last.ckpt"
    proc = _run(["export-hf", str(ckpt), str(tmp_path / "hf")], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    hf_cls = BertForMaskedLM if "mlm" in config else BertForSequenceClassification
    hf = hf_cls.from_pretrained(tmp_path / "hf").eval()
    if "cls" in config:
        assert hf.config.num_labels == 4
    with torch.no_grad():
        assert torch.isfinite(hf(input_ids=torch.tensor([[4097, 5, 6, 4098]])).logits).all()
