"""The training batch sampler: sharded over ranks, resumable mid-epoch, optionally
grouped by length.

Use it as ``DataLoader(dataset, batch_sampler=ShardedBatchSampler(...))``. Each epoch's
batches are a pure function of ``(seed, epoch)``, so a resumed run that knows how many
batches of which epoch it has consumed can continue exactly where it stopped
(:meth:`ShardedBatchSampler.set_position`): no sample is seen twice or skipped.

The sampler keeps no cursor of its own on purpose. A DataLoader with workers draws
batches from the sampler ahead of the training step (``prefetch_factor`` per worker),
so how far the sampler has been iterated says nothing about what was trained on; the
training loop counts the batches it consumed and passes that count back on resume.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

__all__ = ["MEGA_BATCHES", "ShardedBatchSampler"]

MEGA_BATCHES = 50
"""Default number of global batches per length-sorted chunk (the ``k`` of grouping).

Larger chunks give closer lengths within a batch (less padding) but fewer distinct
chunks per epoch, so which rows share a batch is less random. 50 is what HF's
``LengthGroupedSampler`` uses, and past it the gain is small: on 20,000 synthetic
lengths (40 to 1,800 tokens, long-tailed) padding fell from 34-67% unsorted (batch
2 to 8, 1-2 ranks) to 8-10% at k=10, ~2% at k=50 and ~1% at k=100. A dataset smaller
than one chunk is sorted whole every epoch, so which rows share a batch barely changes
from epoch to epoch (only the rows left over and ties between equal lengths move),
only the order of the batches does; pass a smaller k for such a dataset if that
matters."""


class ShardedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Per-rank batches of row indices: equal count on every rank, disjoint rows.

    Args:
        rows: the number of rows, or each row's length in tokens (from
            ``ft.data.validate``) when `group_by_length` is true.
        batch_size: rows per batch on each rank.
        num_replicas, rank: the world size and this process's rank.
        seed: with the epoch, the only source of randomness; use the same on every rank.
        group_by_length: batch rows of similar length together (see below).
        mega_batches: global batches per length-sorted chunk when grouping
            (:data:`MEGA_BATCHES`).

    Every epoch, each rank gets ``len(self)`` = ``rows // (num_replicas * batch_size)``
    full batches and the remaining rows of the epoch's shuffle are left out (different
    ones each epoch). Equal counts matter under FSDP: every forward is a series of
    collectives, so a rank with one batch more would wait forever for the others.

    Without grouping the order is that of ``DistributedSampler(shuffle=True,
    drop_last=True, seed=seed)`` cut into batches of `batch_size`: the same batches as
    ``DataLoader(ds, batch_size, sampler=DistributedSampler(...))``, less the partial
    last batch that loader yields when a rank's share is not a multiple of batch_size.

    With grouping, a global batch is the ``num_replicas * batch_size`` rows of one
    step over all ranks. The epoch's shuffled rows are cut into chunks of
    `mega_batches` global batches; each chunk is sorted by length (longest first) and
    split into global batches, of which rank r takes the r-th run of `batch_size`
    consecutive rows. So each rank's batch holds similar lengths (little padding), and
    all ranks of a step do similar work (none idles waiting for a rank with longer
    samples). The global batches of the epoch are then shuffled, and the one holding
    the epoch's longest row is moved first so that an out-of-memory error shows at the
    first step rather than hours in.
    """

    def __init__(
        self,
        rows: int | Sequence[int],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        group_by_length: bool = False,
        mega_batches: int = MEGA_BATCHES,
    ):
        if isinstance(rows, int):
            self.num_rows, self.lengths = rows, None
        else:
            self.num_rows, self.lengths = len(rows), torch.as_tensor(rows, dtype=torch.long)
        if group_by_length and self.lengths is None:
            raise ValueError("group_by_length needs each row's length, not just the number of rows")
        if batch_size < 1 or mega_batches < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid batch_size {batch_size}, mega_batches {mega_batches}, "
                             f"rank {rank} or num_replicas {num_replicas}")
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.seed, self.group_by_length, self.mega_batches = seed, group_by_length, mega_batches
        self.global_batch = num_replicas * batch_size
        if self.num_rows < self.global_batch:
            raise ValueError(
                f"{self.num_rows} rows, but one batch on every rank needs {self.global_batch} "
                f"(batch size {batch_size} x {num_replicas} ranks)"
            )
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        """Batches per rank per epoch (all of them, whatever :meth:`set_position` skips)."""
        return self.num_rows // self.global_batch

    def batches_in(self, epoch: int) -> int:
        """Batches per rank in epoch `epoch`: the same in every epoch here (a packed
        sampler's count varies, so the loop asks per epoch)."""
        return len(self)

    def samples_in(self, epoch: int, index: int) -> int:
        """Samples in this rank's batch `index` of epoch `epoch`: every batch is full."""
        return self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Iterate over epoch `epoch` from its first batch."""
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, batches_done: int) -> None:
        """Iterate over epoch `epoch` from its batch `batches_done` on, as a run resumed
        after consuming that many batches of it. No data is loaded for the batches
        skipped. The next :meth:`set_epoch` starts its epoch from the beginning."""
        if not 0 <= batches_done <= len(self):
            raise ValueError(f"batches_done {batches_done} is not in [0, {len(self)}]")
        self.epoch, self.start = epoch, batches_done

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)[self.start:]

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of epoch `epoch`, in order."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)  # DistributedSampler's seeding
        order = torch.randperm(self.num_rows, generator=generator)
        if not self.group_by_length:
            # DistributedSampler: rank r takes every num_replicas-th row from r of the
            # first rows // num_replicas * num_replicas.
            mine = order[: self.num_rows // self.num_replicas * self.num_replicas][self.rank::self.num_replicas]
            n = len(self) * self.batch_size
            return mine[:n].view(-1, self.batch_size).tolist()
        global_batches = self._grouped(order[: len(self) * self.global_batch], generator)
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return global_batches[:, lo:hi].tolist()

    def _grouped(self, order: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Global batches [n, global_batch] of the rows `order`, grouped by length."""
        chunk = self.mega_batches * self.global_batch
        sorted_chunks = []
        for rows in order.split(chunk):
            # Stable, so equal lengths keep their shuffled order: still a function of
            # (seed, epoch) only.
            by_length = torch.sort(self.lengths[rows], descending=True, stable=True).indices
            sorted_chunks.append(rows[by_length])
        global_batches = torch.cat(sorted_chunks).view(-1, self.global_batch)
        global_batches = global_batches[torch.randperm(len(global_batches), generator=generator)]
        longest = int(torch.argmax(self.lengths[global_batches].max(dim=1).values))
        first = torch.tensor([longest])
        rest = torch.cat([torch.arange(longest), torch.arange(longest + 1, len(global_batches))])
        return global_batches[torch.cat([first, rest])]
