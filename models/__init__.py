"""Models that every lightning_par layout can shard (installed as ``lightning_par.models``)."""

from lightning_par.models.gpt import GPT, GPTConfig, GPTNetwork

__all__ = ["GPT", "GPTConfig", "GPTNetwork"]
