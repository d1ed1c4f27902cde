"""Epoch-keyed sampling so that a resumed run sees exactly the batches and augmentations of an uninterrupted one.

Every random choice in training data is a function of ``(seed, epoch, index)``: the sampler's permutation and the
torch RNG used by the augmentations of each sample. That makes results independent of the number of workers,
of persistent workers, and of where a run was interrupted.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    # Large odd multipliers keep neighbouring (epoch, index) pairs far apart in seed space.
    return (seed * 1_000_003 + epoch * 998_244_353 + index * 2_654_435_761) % (2**63 - 1)


class EpochSeededDataset(Dataset):
    """Wraps a dataset; ``ds[(epoch, i)]`` seeds torch's RNG from ``(seed, epoch, i)`` before ``base[i]``."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key):
        epoch, index = key
        state = torch.random.get_rng_state()
        torch.manual_seed(sample_seed(self.seed, epoch, index))
        try:
            return self.base[index]
        finally:
            torch.random.set_rng_state(state)


class EpochSampler(Sampler):
    """Yields ``(epoch, index)``; shuffled per epoch from ``(seed, epoch)``; sharded over ranks like
    ``DistributedSampler`` (padded so every rank runs the same number of steps)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 indices: list[int] | None = None):
        self.indices = list(range(n)) if indices is None else list(indices)
        self.seed, self.shuffle, self.rank, self.world = seed, shuffle, rank, world_size
        self.epoch = 0
        self.per_rank = -(-len(self.indices) // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.indices
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
            order = [self.indices[i] for i in torch.randperm(len(self.indices), generator=g).tolist()]
        if self.world > 1:
            total = self.per_rank * self.world
            order = (order * (-(-total // max(1, len(order)))))[:total]
            order = order[self.rank::self.world]
        return iter((self.epoch, i) for i in order)


def padded_shard(n: int, rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s fixed share of ``range(n)``, padded by wrapping around like ``DistributedSampler``, so every
    rank gets ``ceil(n / world_size)`` indices and runs the same number of steps (collectives stay matched)."""
    per_rank = -(-n // world_size)
    total = per_rank * world_size
    padded = (list(range(n)) * -(-total // max(1, n)))[:total]
    return padded[rank::world_size]


class ShardSampler(Sampler):
    """Evaluation sharding without padding (no image is scored twice): rank r takes indices r, r+W, ..."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.order = list(range(rank, n, world_size))

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)
