"""Which samples each process reads, batch by batch.

Sharding is done here rather than by ``accelerator.prepare(dataloader)`` or torch's
``DistributedSampler`` (which pads the last batch with repeated samples) so that it is the
same for every loader (the DALI readers shard the same way), is exact for evaluation, and
can start mid-epoch when a run resumes.
"""

from __future__ import annotations

import torch


class ShardedBatchSampler:
    """Shuffled training batches of ``(epoch, index)`` keys for one process.

    Each epoch draws a permutation from ``seed + epoch`` and cuts it into global batches of
    ``per_process_batch * num_processes``; process ``rank`` takes its contiguous slice of
    each. The global batches therefore do not depend on the number of processes, and every
    process runs the same number of steps (the ragged end of the epoch is dropped), so no
    process waits at a gradient all-reduce the others never reach.

    With gradient accumulation (``micro_batch`` smaller than ``per_process_batch``) the slice
    comes as consecutive micro-batches of ``micro_batch`` keys, the same samples in the same
    order. ``set_epoch``'s start and ``len`` stay in global batches and micro-batches respectively.
    """

    def __init__(self, num_samples: int, per_process_batch: int, num_processes: int, rank: int, seed: int,
                 micro_batch: int | None = None):
        self.num_samples = num_samples
        self.per_process_batch = per_process_batch
        self.micro_batch = micro_batch or per_process_batch
        self.num_processes = num_processes
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    @property
    def global_batch(self) -> int:
        return self.per_process_batch * self.num_processes

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return (self.num_samples // self.global_batch - self.start_batch) * (self.per_process_batch // self.micro_batch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        for batch in range(self.start_batch, self.num_samples // self.global_batch):
            first = batch * self.global_batch + self.rank * self.per_process_batch
            for start in range(first, first + self.per_process_batch, self.micro_batch):
                yield [(self.epoch, index) for index in order[start:start + self.micro_batch]]


class EvalBatchSampler:
    """Evaluation batches for one process: every ``num_processes``-th sample, in order.

    No padding and no dropping: summed over processes, each sample is read exactly once.
    Processes may get batch counts that differ by one, which is fine because evaluation
    runs no collective operation until the final sum.
    """

    def __init__(self, num_samples: int, per_process_batch: int, num_processes: int, rank: int):
        self.indices = list(range(rank, num_samples, num_processes))
        self.per_process_batch = per_process_batch

    def __len__(self) -> int:
        return -(-len(self.indices) // self.per_process_batch)

    def __iter__(self):
        for first in range(0, len(self.indices), self.per_process_batch):
            yield [(0, index) for index in self.indices[first:first + self.per_process_batch]]
