"""Resumable, distributed batch sampling for iteration-based training.

``ResumableSampler`` is a *batch* sampler: each item it yields is the list of dataset keys one rank
loads for one training step. A key is ``(index, aug_seed)``; ``CocoDetectionDataset`` seeds its
random augmentation from ``aug_seed``, so what a sample looks like depends only on
``(seed, epoch, index)`` — not on the rank, the worker process or how often training was resumed.

Epoch ``e`` visits the dataset in the order of ``torch.randperm`` drawn from a generator seeded by
``seed + e`` (the same on every rank). The global batch of step ``s`` is
``order[s*B:(s+1)*B]``; rank ``r`` of ``W`` takes every W-th element of it starting at ``r``
(the ``DistributedSampler`` interleaving), so the union over ranks is exactly the batch one process
would see with the same global batch. Incomplete global batches are dropped (every rank runs the
same number of steps); a dataset smaller than one global batch is padded by cycling the order.

``ResumableLoader`` turns a ``DataLoader`` built on this sampler into an endless stream of batches
and records how many batches of the current epoch the trainer has *consumed* (prefetched batches
do not count): ``state_dict() == {"epoch", "offset"}`` resumes the stream exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 31-bit seed for the augmentation of sample ``index`` in ``epoch``."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (epoch & _MASK64))
    h = _splitmix64(h ^ (index & _MASK64))
    return h & 0x7FFFFFFF


class ResumableSampler(Sampler[list[tuple[int, int]]]):
    """Yields, per step, this rank's share of the global batch as ``(index, aug_seed)`` keys.

    ``batch_size`` is the *global* batch; each of the ``num_replicas`` ranks gets
    ``batch_size // num_replicas`` keys per step.
    """

    def __init__(
        self,
        dataset_len: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int,
    ) -> None:
        if dataset_len < 1:
            raise ValueError(f"dataset_len must be >= 1, got {dataset_len}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}")
        if batch_size < 1 or batch_size % num_replicas:
            raise ValueError(
                f"batch_size ({batch_size}) must be a positive multiple of num_replicas ({num_replicas})"
            )
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.batch_size = batch_size
        self.per_rank_batch = batch_size // num_replicas
        self.epoch = 0
        self.offset = 0  # steps of ``epoch`` already done

    @property
    def steps_per_epoch(self) -> int:
        return max(self.dataset_len // self.batch_size, 1)

    def set_position(self, epoch: int, offset: int = 0) -> None:
        """The next ``__iter__`` starts at step ``offset`` of ``epoch``."""
        if epoch < 0 or not 0 <= offset <= self.steps_per_epoch:
            raise ValueError(f"invalid position epoch={epoch} offset={offset}")
        self.epoch, self.offset = epoch, offset

    def epoch_order(self, epoch: int) -> list[int]:
        """The global visiting order of ``epoch``: ``steps_per_epoch * batch_size`` indices."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        total = self.steps_per_epoch * self.batch_size
        while len(order) < total:  # tiny dataset: pad by cycling, like DistributedSampler
            order += order[: total - len(order)]
        return order[:total]

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This rank's keys for every step of ``epoch``."""
        order = self.epoch_order(epoch)
        B, W, r = self.batch_size, self.num_replicas, self.rank
        batches = []
        for step in range(self.steps_per_epoch):
            global_batch = order[step * B : (step + 1) * B]
            mine = global_batch[r::W]
            batches.append([(i, augmentation_seed(self.seed, epoch, i)) for i in mine])
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # Computed eagerly: a DataLoader may call ``iter`` and only pull from it later.
        return iter(self.epoch_batches(self.epoch)[self.offset :])

    def __len__(self) -> int:
        return self.steps_per_epoch - self.offset


class ResumableLoader:
    """An endless, resumable stream of batches from a ``DataLoader`` over a ``ResumableSampler``."""

    def __init__(self, loader: Iterable[Any], sampler: ResumableSampler) -> None:
        self.loader = loader
        self.sampler = sampler
        self.epoch = 0
        self.offset = 0
        self._it: Iterator[Any] | None = None

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def __iter__(self) -> "ResumableLoader":
        return self

    def __next__(self) -> Any:
        while True:
            if self._it is None:
                if self.offset >= self.sampler.steps_per_epoch:
                    self.epoch, self.offset = self.epoch + 1, 0
                self.sampler.set_position(self.epoch, self.offset)
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                self.epoch, self.offset = self.epoch + 1, 0
                continue
            self.offset += 1
            return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.close()
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def close(self) -> None:
        """Drops the current epoch's iterator (and with it any worker processes)."""
        self._it = None
