"""A training DataLoader whose position is part of the Lightning checkpoint, for exact mid-epoch resume.

Lightning keeps the ``state_dict()`` of a train dataloader that has ``state_dict``/``load_state_dict``
in the checkpoint (``loops.fit_loop.state_dict.combined_loader``) and hands it back on resume before
the first batch is drawn. :class:`ResumableLoader` saves which epoch it is in and how many batches of
it were handed out; :class:`EpochSampler` orders each epoch by a permutation seeded with
``(seed, epoch)`` alone and can start part-way through one. So a run killed anywhere and resumed
from its last checkpoint trains on exactly the batches the uninterrupted run would have.

The loader's state also holds the torch RNG state at that moment (CPU, and the current CUDA
device's when CUDA is in use) and puts it back just before the first resumed batch, so dropout draws
the masks it would have drawn. Both loaders of :class:`~lightning_qlora.data.InstructDataModule` draw
their worker seeds from their own generator, not the global one, so loading data never moves it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

_STATE_VERSION = 1


class EpochSampler(DistributedSampler):
    """Indices of one epoch: seeded by ``(seed, epoch)`` only, this rank's share, optionally from part-way.

    A ``DistributedSampler`` (so Lightning leaves it in place under DDP rather than wrapping it) whose
    order is ``torch.randperm`` with a generator seeded ``seed + epoch`` (no global RNG), split over
    ``num_replicas`` ranks as ``DistributedSampler`` does (the last indices repeat to make the shares
    equal). Lightning calls :meth:`set_epoch` at each epoch start.

    Args:
        dataset: what is sampled (only its length is used).
        seed: the seed of every epoch's permutation.
        shuffle: permute each epoch; ``False`` keeps the dataset order.
        num_replicas: processes sharing the data (the world size).
        rank: this process's rank.
    """

    def __init__(
        self, dataset: Sized, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self.start = 0  # indices of this rank's share to skip in the next pass (set when resuming)
        self.started_epoch = self.epoch  # the epoch the current (last started) pass belongs to

    def __iter__(self) -> Iterator[int]:
        self.started_epoch = self.epoch
        return itertools.islice(super().__iter__(), self.start, None)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` that saves and restores its position within the epoch (``state_dict``).

    Takes ``DataLoader``'s arguments. With an :class:`EpochSampler` a resumed epoch starts at the saved
    batch by skipping indices (nothing is loaded for the skipped batches); with any other sampler (e.g.
    the sequential one Lightning puts in for ``overfit_batches``) the skipped batches are drawn and
    dropped. Without Lightning, each finished pass moves the sampler to the next epoch.

    Args:
        limit_batches: returns the trainer's ``limit_train_batches`` (int, fraction or None): an epoch
            that far in is finished, and a checkpoint taken there resumes at the next epoch.
    """

    def __init__(
        self, *args: Any, limit_batches: Callable[[], int | float | None] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.limit_batches = limit_batches
        self._epoch = getattr(self.sampler, "epoch", 0)
        self._batches = 0
        self._resume: dict[str, Any] | None = None  # loaded, not yet used by a pass

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Any]:
        resume = self._resume
        start = resume["batches"] if resume else 0
        sampler = self.sampler
        if resume is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(resume["epoch"])
        if isinstance(sampler, EpochSampler):
            sampler.start, drop = start * (self.batch_size or 1), 0
        else:
            drop = start
        return self._counted(super().__iter__(), start, drop)

    def _counted(self, batches: Iterator[Any], start: int, drop: int) -> Iterator[Any]:
        for _ in range(drop):
            if next(batches, _END) is _END:
                break
        first = True
        for batch in batches:
            if first:  # the pass has begun: its epoch is known, and a loaded state is used up
                first, resume, self._resume = False, self._resume, None
                self._epoch = self._pass_epoch(resume)
                self._batches = start
                if resume is not None and resume.get("rng") is not None:
                    _set_rng_state(resume["rng"])  # last: nothing draws from it before this batch's step
            self._batches += 1
            yield batch
        # A pass that ran to its end (a plain loop; Lightning stops at the length): the next one is a new
        # epoch. A loaded position is used up even when nothing of its epoch was left to yield; kept, it
        # would empty every later epoch too.
        if first:
            self._epoch, self._resume = self._pass_epoch(self._resume), None
        self._epoch, self._batches = self._epoch + 1, 0
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self._epoch)

    def _pass_epoch(self, resume: dict[str, Any] | None) -> int:
        """The epoch of the pass under way: the sampler's, a loaded one, or the loader's own count."""
        if isinstance(self.sampler, EpochSampler):
            return self.sampler.started_epoch
        return int(resume["epoch"]) if resume is not None else self._epoch

    # ------------------------------------------------------------------ state

    def _identity(self) -> dict[str, Any]:
        """What must match for a saved position to mean the same batches."""
        sampler = self.sampler
        return {
            "rows": len(self.dataset),
            "batch_size": self.batch_size,
            "seed": getattr(sampler, "seed", None),
            "shuffle": getattr(sampler, "shuffle", None),
            "replicas": getattr(sampler, "num_replicas", 1),
        }

    def state_dict(self) -> dict[str, Any]:
        """The epoch, the batches of it handed out so far, what they depend on, and the RNG state."""
        if self._resume is not None:  # loaded but not started yet: still that position
            return {**self._resume, **self._identity(), "version": _STATE_VERSION}
        return {
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "batches": self._batches,
            **self._identity(),
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Makes the next pass start where the saved one stopped.

        Raises:
            ValueError: the saved position was for other data (row count, batch size, seed, shuffling
                or world size differ), so it cannot name the same batches.
        """
        if problem := resume_mismatch(state, self._identity()):
            raise ValueError(problem)
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= self._epoch_batches():  # saved after the epoch's last batch: resume at the next
            epoch, batches = epoch + 1, 0
        self._resume = {"epoch": epoch, "batches": batches, "rng": state.get("rng")}

    def _epoch_batches(self) -> int:
        """Batches per epoch as Lightning counts them (``limit_train_batches`` applied)."""
        n = len(self)
        limit = self.limit_batches() if self.limit_batches is not None else None
        if isinstance(limit, int) and not isinstance(limit, bool):
            return min(n, limit)
        if isinstance(limit, float):
            return int(n * limit)
        return n


_END = object()

_IDENTITY_FIX = {
    "rows": "the training set has another number of rows (other data, max_samples, val_fraction, max_length or on_overlong)",
    "batch_size": "data.batch_size differs",
    "seed": "data.seed differs",
    "shuffle": "shuffling differs",
    "replicas": "the number of processes (devices) differs",
}


def resume_mismatch(state: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why a saved loader position does not fit the current loader, or None when it does.

    Args:
        state: a :meth:`ResumableLoader.state_dict` (from a checkpoint).
        current: this run's values of the same keys (``rows``, ``batch_size``, ``seed``, ...); a key
            missing on either side is not compared.
    """
    if not isinstance(state, dict) or not {"epoch", "batches"} <= state.keys():
        return (
            "the checkpoint's data position is not one this version wrote; start a new run (ckpt_path=null)"
        )
    for key, why in _IDENTITY_FIX.items():
        if key in state and key in current and state[key] is not None and state[key] != current[key]:
            return (
                f"cannot resume the data position: {why} (checkpoint {key}={state[key]}, now {current[key]}); "
                "resume with the data settings the checkpoint was made with, or start a new run (ckpt_path=null)"
            )
    return None


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
