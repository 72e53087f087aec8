"""``lightning-par``: LightningCLI entry point (``fit``, ``validate``, ``test``, ``predict``).

``lightning-par fit --config configs/gpt_tp.yaml --trainer.max_steps 20 --model.n_layer 2`` trains from a
YAML file with command-line overrides; ``--print_config`` prints a complete config that runs as is.
Importing ``lightning_par`` first registers the strategy names (``strategy: tp``) with Lightning.
"""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI

import lightning_par  # noqa: F401  (registers the strategies)


class ParallelCLI(LightningCLI):
    """LightningCLI whose model vocabulary follows the data module's tokenizer."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")


def main(args: list[str] | None = None) -> None:
    """Run the CLI on ``args`` (default: ``sys.argv[1:]``)."""
    ParallelCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
