"""Generate a text sample from the trained model at the end of ``fit``."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info


class GenerateText(L.Callback):
    """Sample ``max_new_tokens`` after ``prompt`` when training ends; print it and log it to W&B.

    Every rank takes part (the model is sharded); rank 0 prints. Needs a data module with
    ``encode(text)`` / ``decode(ids)`` (``TextDataModule``) and a model with ``generate``.
    """

    def __init__(
        self, prompt: str = "def ", max_new_tokens: int = 80, temperature: float = 0.8, top_k: int = 40
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} is not valid: it must be >= 1.")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} is not valid: it must be > 0.")
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.text: str | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data = trainer.datamodule
        if data is None or not hasattr(data, "encode") or not hasattr(pl_module, "generate"):
            return
        ids = data.encode(self.prompt).to(pl_module.device)
        out = pl_module.generate(ids, self.max_new_tokens, temperature=self.temperature, top_k=self.top_k)
        self.text = data.decode(out[0].tolist())
        rank_zero_info(f"\n--- sample after {trainer.global_step} steps ---\n{self.text}\n---")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                logger.log_text("samples", columns=["step", "text"], data=[[trainer.global_step, self.text]])
