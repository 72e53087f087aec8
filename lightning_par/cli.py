"""``lightning-par``: LightningCLI entry point (``fit``, ``validate``, ``test``, ``predict``).

``lightning-par fit --config configs/gpt_tp.yaml --trainer.max_steps 20 --model.n_layer 2`` trains from a
YAML file with command-line overrides; ``--print_config`` prints a complete config that runs as is.
``lightning-par export-hf CKPT_DIR OUT_DIR`` writes a Hugging Face directory from a sharded checkpoint;
``lightning-par consolidate CKPT_DIR OUT.ckpt [--no-optimizer] [--model CLASS]`` one ordinary Lightning
checkpoint file (for ``Trainer(strategy="auto")``, ``load_from_checkpoint``, ``torch.load``).
``lightning-par plan --config CFG --gpus 64 --gpu h100-80gb`` ranks the layouts of a model on a cluster.
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


def export_hf_main(args: list[str]) -> None:
    """``lightning-par export-hf CKPT_DIR OUT_DIR``: one process, no training layout needed."""
    import argparse

    import lightning_par.models  # noqa: F401  (registers the GPT-2, BERT and Llama exporters)
    from lightning_par.checkpoint.hf import export_hf

    parser = argparse.ArgumentParser(
        prog="lightning-par export-hf",
        description="Write a Hugging Face directory (config.json + safetensors: GPT-2, BERT, Llama or Mixtral) "
        "from a sharded checkpoint.",
    )
    parser.add_argument(
        "checkpoint_dir", help="a checkpoint directory written by the strategy (e.g. last.ckpt)"
    )
    parser.add_argument("out_dir", help="a new (or empty) directory for the Hugging Face files")
    ns = parser.parse_args(args)
    out = export_hf(ns.checkpoint_dir, ns.out_dir)
    print(f"wrote {out}")


def consolidate_main(args: list[str]) -> None:
    """``lightning-par consolidate CKPT_DIR OUT.ckpt``: one process, no training layout needed."""
    import argparse

    import lightning_par.models  # noqa: F401  (so the classes LightningCLI runs record are imported)
    from lightning_par.checkpoint.consolidate import consolidate
    from lightning_par.checkpoint.safe import UnsafeCheckpointError

    parser = argparse.ArgumentParser(
        prog="lightning-par consolidate",
        description="Write one ordinary Lightning checkpoint file (whole tensors, one-process parameter "
        "names and optimizer state) from a sharded checkpoint of any layout.",
    )
    parser.add_argument(
        "checkpoint_dir", help="a checkpoint directory written by the strategy (e.g. last.ckpt)"
    )
    parser.add_argument("out_file", help="the new checkpoint file (an existing file is refused)")
    parser.add_argument(
        "--no-optimizer",
        action="store_true",
        help="weights and loop counters only, like save_weights_only=True (load_from_checkpoint reads it; "
        "fit(ckpt_path=...) does not)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="the LightningModule class, e.g. lightning_par.models.GPT (default: the class a LightningCLI "
        "run recorded in the checkpoint)",
    )
    ns = parser.parse_args(args)
    try:
        out = consolidate(ns.checkpoint_dir, ns.out_file, optimizer=not ns.no_optimizer, module=ns.model)
    except (FileExistsError, FileNotFoundError, ValueError, UnsafeCheckpointError) as err:
        parser.error(str(err))  # exit status 2 with the reason, no traceback
    print(f"wrote {out}")


def main(args: list[str] | None = None) -> None:
    """Run the CLI on ``args`` (default: ``sys.argv[1:]``)."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "export-hf":
        export_hf_main(argv[1:])
        return
    if argv and argv[0] == "consolidate":
        consolidate_main(argv[1:])
        return
    if argv and argv[0] == "plan":
        from lightning_par.planner.cli import plan_main

        plan_main(argv[1:])
        return
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
