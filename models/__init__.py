"""Models that every lightning_par layout can shard (installed as ``lightning_par.models``).

Importing this package registers the Hugging Face exporters of its families with
:mod:`lightning_par.checkpoint.hf` (``lightning-par export-hf``).
"""

from lightning_par.models.bert import BERTConfig, BERTNetwork
from lightning_par.models.bert_tasks import BERT, BERTClassifier
from lightning_par.models.gpt import GPT, GPTConfig, GPTNetwork
from lightning_par.models.hf_bert import export_bert_checkpoint
from lightning_par.models.hf_export import export_gpt2_checkpoint
from lightning_par.models.hf_llama_export import export_llama_checkpoint
from lightning_par.models.llama import Llama
from lightning_par.models.llama_network import LlamaConfig, LlamaNetwork

from lightning_par.checkpoint.hf import HFExporter, register_hf_exporter

__all__ = [
    "BERT",
    "BERTClassifier",
    "BERTConfig",
    "BERTNetwork",
    "GPT",
    "GPTConfig",
    "GPTNetwork",
    "Llama",
    "LlamaConfig",
    "LlamaNetwork",
]

# BERT and Llama first: their checkpoints also hold a word embedding; token-type embeddings and the
# key/value projection tell them apart from GPT-2.
register_hf_exporter(
    HFExporter("bert", lambda names: "model.embed.tte.weight" in names, export_bert_checkpoint)
)
register_hf_exporter(
    HFExporter(
        "llama", lambda names: any(n.endswith(".attn.kv.weight") for n in names), export_llama_checkpoint
    )
)
register_hf_exporter(
    HFExporter("gpt2", lambda names: "model.embed.wte.weight" in names, export_gpt2_checkpoint)
)
