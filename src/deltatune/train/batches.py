"""The order of batches: reproducible per (seed, epoch), resumable mid-epoch, grouped by length.

Length grouping (as in transformers' LengthGroupedSampler): shuffle, cut into mega-batches
of 50 batches, sort each by length, batch, and shuffle the batches; padding inside a batch
then stays small, so CPU time is not spent on pad tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

MEGA_BATCH = 50


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch; the same for the same arguments."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    size = batch_size * MEGA_BATCH
    batches = []
    for start in range(0, len(order), size):
        chunk = sorted(order[start:start + size], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffle = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in shuffle]


class ResumableBatchSampler:
    """A batch sampler whose epoch and starting batch are set from outside (for --resume)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool):
        self.lengths, self.batch_size = lengths, batch_size
        self.seed, self.group_by_length = seed, group_by_length
        self.epoch, self.skip = 0, 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[list[int]]:
        batches = epoch_batches(self.lengths, self.batch_size, self.seed, self.epoch, self.group_by_length)
        yield from batches[self.skip:]

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.skip
