"""The training batch sampler: one data order for any world size, sharded over ranks,
resumable mid-epoch, optionally grouped by length.

Use it as ``DataLoader(dataset, batch_sampler=ShardedBatchSampler(...))``. The order is
decided over *global batches*, the ``batch_size x accumulation x num_replicas`` rows of
one optimizer step, as a pure function of ``(seed, epoch)`` and the global batch's size:
the rows of step t are the same whatever the world size and however the global batch
is split into per-device batch, accumulation and ranks. Each rank then takes its slice
of each step, as `accumulation` micro-batches. So a run can continue on another number
of ranks, with the same global batch, and train on exactly the samples it would have
(:meth:`ShardedBatchSampler.set_position` takes a position in steps, which means the
same at every world size): no sample is seen twice or skipped.

The sampler keeps no cursor of its own on purpose. A DataLoader with workers draws
batches from the sampler ahead of the training step (``prefetch_factor`` per worker),
so how far the sampler has been iterated says nothing about what was trained on; the
training loop counts the steps it consumed and passes that count back on resume.
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
    """Per-rank micro-batches of row indices: equal count on every rank, disjoint rows,
    and the same rows in each optimizer step at any world size.

    Args:
        rows: the number of rows, or each row's length in tokens (from
            ``ft.datacheck.check_data``) when `group_by_length` is true.
        batch_size: rows per micro-batch on each rank.
        num_replicas, rank: the world size and this process's rank.
        seed: with the epoch, the only source of randomness; use the same on every rank.
        group_by_length: batch rows of similar length together (see below).
        mega_batches: global batches per length-sorted chunk when grouping
            (:data:`MEGA_BATCHES`).
        accumulation: micro-batches per optimizer step on each rank
            (`train.gradient_accumulation_steps`).

    A global batch is the ``global_batch = batch_size * accumulation * num_replicas``
    rows of one optimizer step. Every epoch has :meth:`steps_in` = ``rows //
    global_batch`` of them; the remaining rows of the epoch's shuffle are left out
    (different ones each epoch). Each rank gets ``accumulation`` micro-batches of
    `batch_size` rows per step, ``len(self)`` in the epoch; equal counts matter under
    FSDP: every forward is a series of collectives, so a rank with one batch more
    would wait forever for the others. The epoch's global batches (:meth:`steps`)
    depend on `global_batch` only, never on how it is split.

    Without grouping, step t holds rows ``t * global_batch`` to ``(t + 1) *
    global_batch`` of the epoch's shuffle, and micro-batch a of rank r takes every
    `num_replicas`-th of the a-th run of ``batch_size * num_replicas`` of them, from
    r. With ``accumulation=1`` that is the order of ``DistributedSampler(shuffle=True,
    drop_last=True, seed=seed)`` cut into batches of `batch_size`: the same batches as
    ``DataLoader(ds, batch_size, sampler=DistributedSampler(...))``, less the partial
    last batch that loader yields when a rank's share is not a multiple of batch_size.

    With grouping, the epoch's shuffled rows are cut into chunks of `mega_batches`
    global batches; each chunk is sorted by length (longest first) and split into
    global batches. A global batch, sorted, is cut into ``accumulation *
    num_replicas`` runs of `batch_size` consecutive rows; micro-batch a of rank r is
    run ``a * num_replicas + r``. So each micro-batch holds similar lengths (little
    padding), and all ranks of a micro-batch do similar work (none idles waiting for
    a rank with longer samples). The global batches of the epoch are then shuffled,
    and the one holding the epoch's longest row is moved first so that an
    out-of-memory error shows at the first step rather than hours in.
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
        accumulation: int = 1,
    ):
        if isinstance(rows, int):
            self.num_rows, self.lengths = rows, None
        else:
            self.num_rows, self.lengths = len(rows), torch.as_tensor(rows, dtype=torch.long)
        if group_by_length and self.lengths is None:
            raise ValueError("group_by_length needs each row's length, not just the number of rows")
        if batch_size < 1 or mega_batches < 1 or accumulation < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid batch_size {batch_size}, mega_batches {mega_batches}, accumulation "
                             f"{accumulation}, rank {rank} or num_replicas {num_replicas}")
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.seed, self.group_by_length, self.mega_batches = seed, group_by_length, mega_batches
        self.accumulation = accumulation
        self.global_batch = batch_size * accumulation * num_replicas
        if self.num_rows < self.global_batch:
            raise ValueError(
                f"{self.num_rows} rows, but one optimizer step needs {self.global_batch} "
                f"(batch size {batch_size} x accumulation {accumulation} x {num_replicas} ranks)"
            )
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        """Micro-batches per rank per epoch (all of them, whatever :meth:`set_position` skips)."""
        return self.steps_in(self.epoch) * self.accumulation

    def steps_in(self, epoch: int) -> int:
        """Optimizer steps (global batches) in epoch `epoch`: the same in every epoch here
        (a packed sampler's count varies, so the loop asks per epoch)."""
        return self.num_rows // self.global_batch

    def samples_in(self, epoch: int, index: int) -> int:
        """Samples in this rank's micro-batch `index` of epoch `epoch`: every batch is full."""
        return self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Iterate over epoch `epoch` from its first batch."""
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, steps_done: int) -> None:
        """Iterate over epoch `epoch` from its step `steps_done` on, as a run resumed
        after training that many steps of it (at any world size: a step is a global
        batch). No data is loaded for the batches skipped. The next :meth:`set_epoch`
        starts its epoch from the beginning."""
        if not 0 <= steps_done <= self.steps_in(epoch):
            raise ValueError(f"steps_done {steps_done} is not in [0, {self.steps_in(epoch)}]")
        self.epoch, self.start = epoch, steps_done

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)[self.start * self.accumulation:]

    def steps(self, epoch: int) -> torch.Tensor:
        """The global batches of epoch `epoch`, [steps_in(epoch), global_batch] row
        indices, in order: a function of (seed, epoch, global_batch) alone."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)  # DistributedSampler's seeding
        order = torch.randperm(self.num_rows, generator=generator)[: self.steps_in(epoch) * self.global_batch]
        if not self.group_by_length:
            return order.view(-1, self.global_batch)
        return self._grouped(order, generator)

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of epoch `epoch`, in order (`accumulation` per step)."""
        steps = self.steps(epoch)
        n, acc, bs, world = len(steps), self.accumulation, self.batch_size, self.num_replicas
        if self.group_by_length:  # runs of consecutive (sorted) rows
            mine = steps.view(n, acc, world, bs)[:, :, self.rank, :]
        else:  # DistributedSampler's stride within each run of bs x world rows
            mine = steps.view(n, acc, bs, world)[:, :, :, self.rank]
        return mine.reshape(n * acc, bs).tolist()

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
