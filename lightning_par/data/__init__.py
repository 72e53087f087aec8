"""Data modules (GPT text, BERT masked LM and classification) and the resumable loader."""

from lightning_par.data.classification import (
    DEFAULT_LABELS,
    TextClassificationDataModule,
    default_labelled_lines,
    read_labelled_file,
)
from lightning_par.data.loader import ResumableLoader, prepare_loader
from lightning_par.data.mlm import SPECIAL_TOKENS, MLMCollator, MLMDataModule, mask_tokens
from lightning_par.data.text import (
    DEFAULT_CORPUS_MODULES,
    DOC_SEPARATOR,
    EOS_TOKEN,
    FORMAT_VERSION,
    BlockDataset,
    ByteTokenizer,
    HFTokenizer,
    TextDataModule,
    TextTokenizer,
    build_tokenizer,
    default_corpus_text,
    load_corpus,
    load_documents,
    seeded_loader,
)

__all__ = [
    "BlockDataset",
    "ByteTokenizer",
    "DEFAULT_CORPUS_MODULES",
    "DEFAULT_LABELS",
    "DOC_SEPARATOR",
    "EOS_TOKEN",
    "FORMAT_VERSION",
    "HFTokenizer",
    "MLMCollator",
    "MLMDataModule",
    "ResumableLoader",
    "SPECIAL_TOKENS",
    "TextClassificationDataModule",
    "TextDataModule",
    "TextTokenizer",
    "build_tokenizer",
    "default_corpus_text",
    "default_labelled_lines",
    "load_corpus",
    "load_documents",
    "mask_tokens",
    "prepare_loader",
    "read_labelled_file",
    "seeded_loader",
]
