"""Ending every rank when one fails."""

from lightning_par.fault_tolerance.watchdog import FailureWatchdog

__all__ = ["FailureWatchdog"]
