"""``python -m lightning_par fit --config ...`` is the same as ``lightning-par fit --config ...``."""

from lightning_par.cli import main

main()
