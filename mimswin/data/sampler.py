"""Deterministic per-rank sampling that can start mid-epoch, so a resumed run sees exactly the batches it had not seen.

The sampler yields (index, sample_seed) pairs and `SeededSamples` seeds the augmentation of each sample with its own
seed, so what a sample looks like depends on (seed, epoch, index) only: not on worker count, prefetching or resume.
"""

from __future__ import annotations

from typing import Any, Iterator, Tuple

import torch
from torch.utils.data import Dataset, Sampler

SEED_MODULUS = 2**63 - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct augmentation seed for every (run seed, epoch, dataset index)."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % SEED_MODULUS


class SeededSamples(Dataset):
    """Wraps a map-style dataset; item (index, seed) runs the dataset's transform under that torch seed."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Tuple[int, int]) -> Any:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class ResumableDistributedSampler(Sampler[Tuple[int, int]]):
    """Epoch e is a permutation seeded by (seed, e), cut to a whole number of per-rank batches and dealt round-robin.

    Every rank gets the same number of batches (no DDP hang); `set_epoch(e, start_batch)` skips what was consumed.
    """

    def __init__(self, size: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, batch_multiple: int = 1) -> None:
        self.size, self.batch_size = size, batch_size
        self.num_replicas, self.rank, self.seed, self.shuffle = num_replicas, rank, seed, shuffle
        per_rank = size // num_replicas
        self.batches_per_epoch = per_rank // batch_size // batch_multiple * batch_multiple
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def indices(self) -> torch.Tensor:
        """This rank's full index list for the current epoch."""
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        used = self.batches_per_epoch * self.batch_size * self.num_replicas
        return order[:used][self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for index in self.indices()[self.start_batch * self.batch_size:].tolist():
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
