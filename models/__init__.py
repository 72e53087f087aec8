"""Models that every lightning_par layout can shard (installed as ``lightning_par.models``).

Importing this package registers the Hugging Face exporters of its families with
:mod:`lightning_par.checkpoint.hf` (``lightning-par export-hf``).
"""

from lightning_par.models.bert import BERTConfig, BERTNetwork
from lightning_par.models.bert_tasks import BERT, BERTClassifier
from lightning_par.models.gpt import GPT, GPTConfig, GPTNetwork
from lightning_par.models.hf_bert import export_bert_checkpoint
from lightning_par.models.hf_export import export_gpt2_checkpoint

from lightning_par.checkpoint.hf import HFExporter, register_hf_exporter

__all__ = ["BERT", "BERTClassifier", "BERTConfig", "BERTNetwork", "GPT", "GPTConfig", "GPTNetwork"]

# BERT first: its checkpoints also hold a word embedding; token-type embeddings tell it apart.
register_hf_exporter(
    HFExporter("bert", lambda names: "model.embed.tte.weight" in names, export_bert_checkpoint)
)
register_hf_exporter(
    HFExporter("gpt2", lambda names: "model.embed.wte.weight" in names, export_gpt2_checkpoint)
)
