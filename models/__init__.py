"""Models that every lightning_par layout can shard (installed as ``lightning_par.models``)."""

from lightning_par.models.bert import BERTConfig, BERTNetwork
from lightning_par.models.bert_tasks import BERT, BERTClassifier
from lightning_par.models.gpt import GPT, GPTConfig, GPTNetwork

__all__ = ["BERT", "BERTClassifier", "BERTConfig", "BERTNetwork", "GPT", "GPTConfig", "GPTNetwork"]
