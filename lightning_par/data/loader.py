"""The data position within an epoch: a loader that skips the batches a resumed run already consumed."""

from __future__ import annotations

from typing import Any

import torch


# ---- the data position within an epoch ------------------------------------------------------------------
class _SkipFirst:
    """A batch sampler that leaves out the first ``skip`` batches of the wrapped one (once)."""

    def __init__(self, batch_sampler: Any, skip: int) -> None:
        self.batch_sampler = batch_sampler
        self.skip = skip

    def __iter__(self) -> Any:
        for i, batch in enumerate(self.batch_sampler):
            if i >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)


class ResumableLoader:
    """A map-style ``DataLoader`` whose position within the epoch goes into checkpoints.

    Lightning saves ``state_dict()`` of a training loader that has one and calls ``load_state_dict`` on
    resume; the next epoch iteration then starts after the batches already trained on (skipped in the
    batch sampler: no data is loaded for them), so a resumed run sees the batches the uninterrupted run
    would have. ``position`` returns the number of batches trained in the current epoch (the strategy reads
    Lightning's progress counter, which, unlike the loader, is not ahead by the prefetched batch).
    """

    def __init__(self, loader: Any, position: Any) -> None:
        self.loader = loader
        self.position = position
        self._skip = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        skip, self._skip = self._skip, 0
        if not skip:
            return iter(self.loader)
        from torch.utils.data import DataLoader

        loader = self.loader
        # A new iterator draws its base seed from the global generator; the uninterrupted run drew it at
        # the epoch's start, long before the RNG state this resume restored. Draw it without moving the
        # generator, so dropout after the resume sees the numbers it would have seen.
        rng = torch.get_rng_state()
        iterator = iter(
            DataLoader(
                loader.dataset,
                batch_sampler=_SkipFirst(loader.batch_sampler, skip),
                num_workers=loader.num_workers,
                collate_fn=loader.collate_fn,
                pin_memory=loader.pin_memory,
                worker_init_fn=loader.worker_init_fn,
                persistent_workers=False,
            )
        )
        torch.set_rng_state(rng)
        return iterator

    def state_dict(self) -> dict[str, int]:
        return {"batches_done_in_epoch": int(self.position())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state.get("batches_done_in_epoch", 0))
        if self._skip >= len(self.loader):
            self._skip = 0  # saved on the epoch's last batch: the next epoch starts from its beginning

    def __getattr__(self, name: str) -> Any:  # sampler, batch_size, dataset, ... as the wrapped loader
        return getattr(self.__dict__["loader"], name)


def prepare_loader(dataloader: Any, trainer: Any, num_microbatches: int | None) -> Any:
    """The strategy's view of a data loader: checked against the microbatches, resumable when training.

    ``num_microbatches`` (pipeline parallel): the per-replica batch size must be a multiple, refused here
    before the first step. A training loader becomes a :class:`ResumableLoader`, so a checkpoint records
    how far into the epoch training got and a resume continues from there.
    """
    batch_size = getattr(dataloader, "batch_size", None)
    m = num_microbatches
    if m is not None and isinstance(batch_size, int) and batch_size % m:
        raise ValueError(
            f"batch size {batch_size} (per data-parallel rank) is not divisible by num_microbatches={m}; "
            f"use a batch size that is a multiple of {m} (e.g. {max(m, batch_size - batch_size % m)}) or a "
            f"num_microbatches that divides {batch_size}."
        )
    if (
        trainer is not None
        and trainer.training
        and getattr(dataloader, "batch_sampler", None) is not None
        and not hasattr(dataloader, "state_dict")
    ):
        loop = trainer.fit_loop.epoch_loop
        dataloader = ResumableLoader(dataloader, position=lambda: loop.batch_progress.current.processed)
    return dataloader
