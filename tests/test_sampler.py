"""Tests of ft.sampler.ShardedBatchSampler: sharding, determinism, resume, grouping, and
the same global batches at any world size."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ft.sampler import ShardedBatchSampler

# Lengths with a long tail, like text + image token counts.
RNG = random.Random(0)
LENGTHS = [RNG.randint(40, 300) + (RNG.random() < 0.2) * RNG.randint(300, 1500) for _ in range(1003)]


def samplers(rows, batch_size, world, **kwargs):
    return [ShardedBatchSampler(rows, batch_size, world, rank, **kwargs) for rank in range(world)]


def padding_fraction(batches, lengths):
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded


@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("world, batch_size", [(1, 4), (2, 3), (3, 5)])
def test_epochs_are_deterministic_disjoint_and_equal_across_ranks(group, world, batch_size):
    rows = LENGTHS if group else len(LENGTHS)
    ranks = samplers(rows, batch_size, world, seed=7, group_by_length=group, mega_batches=4)
    n = len(LENGTHS) // (world * batch_size)
    epochs = []
    for epoch in range(3):
        per_rank = [s.batches(epoch) for s in ranks]
        for batches in per_rank:
            assert len(batches) == n == len(ranks[0])
            assert all(len(b) == batch_size for b in batches)
        seen = [i for batches in per_rank for b in batches for i in b]
        assert len(set(seen)) == len(seen) == n * world * batch_size  # disjoint, only the remainder left out
        assert set(seen) <= set(range(len(LENGTHS)))
        # A pure function of (seed, epoch): a fresh sampler, or iteration, agrees.
        assert per_rank == [s.batches(epoch) for s in samplers(rows, batch_size, world, seed=7,
                                                                 group_by_length=group, mega_batches=4)]
        ranks[0].set_epoch(epoch)
        assert list(ranks[0]) == per_rank[0]
        epochs.append(per_rank)
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert ranks[0].batches(0) != samplers(rows, batch_size, world, seed=8, group_by_length=group)[0].batches(0)


@pytest.mark.parametrize("world, batch_size, rows", [(1, 2, 8), (2, 2, 8), (2, 3, 17), (3, 4, 50)])
def test_without_grouping_batches_match_a_distributed_sampler_loader(world, batch_size, rows):
    dataset = list(range(rows))
    for rank, sampler in enumerate(samplers(rows, batch_size, world, seed=42)):
        reference = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=42, drop_last=True)
        for epoch in range(3):
            reference.set_epoch(epoch)
            sampler.set_epoch(epoch)
            # What the loop used before, minus a partial last batch (now dropped).
            expected = [b.tolist() for b in DataLoader(dataset, batch_size=batch_size, sampler=reference)]
            expected = [b for b in expected if len(b) == batch_size]
            got = [b.tolist() for b in DataLoader(dataset, batch_sampler=sampler)]
            assert got == expected


@pytest.mark.parametrize("group", [False, True])
def test_set_position_resumes_the_uninterrupted_sequence(group):
    rows = LENGTHS if group else len(LENGTHS)
    world, batch_size = 2, 8
    per_epoch = len(LENGTHS) // (world * batch_size)

    def run(sampler, epoch, count):
        """Consume `count` batches the way the loop does, starting a new epoch when one ends."""
        out, it = [], iter(sampler)
        while len(out) < count:
            batch = next(it, None)
            if batch is None:
                epoch += 1
                sampler.set_epoch(epoch)
                it = iter(sampler)
                continue
            out.append(batch)
        return out

    for rank in range(world):
        sampler = ShardedBatchSampler(rows, batch_size, world, rank, seed=3, group_by_length=group)
        sampler.set_epoch(0)
        full = run(sampler, 0, 2 * per_epoch + 5)
        for done in (0, 1, per_epoch - 1, per_epoch + 4, 2 * per_epoch):
            epoch, k = divmod(done, per_epoch)
            resumed = ShardedBatchSampler(rows, batch_size, world, rank, seed=3, group_by_length=group)
            resumed.set_position(epoch, k)
            assert run(resumed, epoch, len(full) - done) == full[done:]
        # Through a DataLoader with prefetching workers the position is the same.
        resumed = ShardedBatchSampler(rows, batch_size, world, rank, seed=3, group_by_length=group)
        resumed.set_position(1, 3)
        loader = DataLoader(range(len(LENGTHS)), batch_sampler=resumed, num_workers=1)
        assert [b.tolist() for b in loader] == full[per_epoch + 3:2 * per_epoch]
    with pytest.raises(ValueError, match="steps_done"):
        sampler.set_position(0, per_epoch + 1)


@pytest.mark.parametrize("world, batch_size", [(1, 4), (2, 4), (4, 8)])
def test_grouping_cuts_padding_but_keeps_batches_spread(world, batch_size):
    plain = samplers(LENGTHS, batch_size, world, seed=1)
    grouped = samplers(LENGTHS, batch_size, world, seed=1, group_by_length=True)
    plain_batches = [b for s in plain for e in range(3) for b in s.batches(e)]
    grouped_batches = [b for s in grouped for e in range(3) for b in s.batches(e)]
    assert padding_fraction(grouped_batches, LENGTHS) < padding_fraction(plain_batches, LENGTHS) / 3

    # The ranks of one step get similar lengths too: the longest row of each rank's
    # batch is close to the step's longest row.
    steps = list(zip(*[s.batches(0) for s in grouped]))
    spread = [max(LENGTHS[i] for b in step for i in b) - min(max(LENGTHS[i] for i in b) for b in step)
              for step in steps]
    plain_steps = list(zip(*[s.batches(0) for s in plain]))
    plain_spread = [max(LENGTHS[i] for b in step for i in b) - min(max(LENGTHS[i] for i in b) for b in step)
                    for step in plain_steps]
    if world > 1:
        assert sum(spread) < sum(plain_spread) / 3

    # Not sorted globally: the batches' lengths go up and down along the epoch, and the
    # first batch holds the epoch's longest row.
    maxima = [max(LENGTHS[i] for b in step for i in b) for step in steps]
    assert maxima[0] == max(LENGTHS[i] for step in steps for b in step for i in b)
    rises = sum(b > a for a, b in zip(maxima[1:], maxima[2:]))
    assert 0.3 < rises / (len(maxima) - 2) < 0.7
    # ... and which rows share a batch changes from epoch to epoch.
    assert {tuple(sorted(b)) for b in grouped[0].batches(0)} != {tuple(sorted(b)) for b in grouped[0].batches(1)}


def test_grouping_keeps_equal_lengths_in_shuffled_order():
    # Stable sort: with all lengths equal, grouping changes only the order of the
    # global batches, whose contents are the plain shuffle's.
    sampler = ShardedBatchSampler([100] * 64, 4, seed=5, group_by_length=True)
    plain = ShardedBatchSampler(64, 4, seed=5)
    assert sorted(sampler.batches(0)) == sorted(plain.batches(0))


# (per-device batch, accumulation, world size) splits of one global batch of 12 rows.
SPLITS_OF_12 = [(12, 1, 1), (2, 6, 1), (3, 2, 2), (1, 6, 2), (2, 3, 2), (4, 1, 3), (2, 2, 3), (1, 4, 3)]


def steps_of(rows, split, epoch, **kwargs):
    """Each step's rows over all ranks, as sets, from the per-rank micro-batches; checks
    on the way that the ranks' micro-batches are disjoint and equal in number."""
    bs, accum, world = split
    ranks = [ShardedBatchSampler(rows, bs, world, r, accumulation=accum, **kwargs) for r in range(world)]
    per_rank = [s.batches(epoch) for s in ranks]
    assert {len(b) for b in per_rank} == {ranks[0].steps_in(epoch) * accum}
    steps = []
    for t in range(ranks[0].steps_in(epoch)):
        rows_t = [i for b in per_rank for batch in b[t * accum:(t + 1) * accum] for i in batch]
        assert len(rows_t) == len(set(rows_t)) == bs * accum * world  # disjoint, full
        steps.append(set(rows_t))
    return steps, ranks


@pytest.mark.parametrize("group", [False, True])
def test_every_split_of_the_global_batch_trains_the_same_rows_per_step(group):
    """World size 1, 2, 3 with per-device batch and accumulation making the same global
    batch: each step's rows are the same set, never seen twice in an epoch, and a
    position in steps resumes any split where another stopped."""
    rows = LENGTHS if group else len(LENGTHS)
    for epoch in (0, 1):
        reference, _ = steps_of(rows, SPLITS_OF_12[0], epoch, seed=11, group_by_length=group, mega_batches=4)
        assert len(reference) == len(LENGTHS) // 12
        seen = [i for step in reference for i in step]
        assert len(seen) == len(set(seen))  # no row twice in an epoch
        for split in SPLITS_OF_12[1:]:
            steps, ranks = steps_of(rows, split, epoch, seed=11, group_by_length=group, mega_batches=4)
            assert steps == reference, split
            # Resume this split at step 5 of the epoch: the rows the reference trains next.
            bs, accum, world = split
            for r, sampler in enumerate(ranks):
                sampler.set_position(epoch, 5)
                assert list(sampler) == sampler.batches(epoch)[5 * accum:]
            rest = [i for s in ranks for batch in s for i in batch]
            assert sorted(rest) == sorted(i for step in reference[5:] for i in step)
    if group:  # each micro-batch still holds similar lengths: padding as with one rank
        one = ShardedBatchSampler(LENGTHS, 12, seed=11, group_by_length=True, mega_batches=4).batches(0)
        three = [b for r in range(3) for b in
                 ShardedBatchSampler(LENGTHS, 2, 3, r, seed=11, group_by_length=True, mega_batches=4,
                                     accumulation=2).batches(0)]
        plain = [b for r in range(3) for b in ShardedBatchSampler(len(LENGTHS), 2, 3, r, seed=11,
                                                                   accumulation=2).batches(0)]
        assert padding_fraction(three, LENGTHS) <= padding_fraction(one, LENGTHS) + 0.05
        assert padding_fraction(three, LENGTHS) < padding_fraction(plain, LENGTHS) / 3


def test_refuses_bad_arguments():
    with pytest.raises(ValueError, match="needs each row's length"):
        ShardedBatchSampler(100, 4, group_by_length=True)
    with pytest.raises(ValueError, match="needs 8"):
        ShardedBatchSampler(7, 4, 2, 0)
    with pytest.raises(ValueError, match=r"needs 24 \(batch size 4 x accumulation 3 x 2 ranks\)"):
        ShardedBatchSampler(23, 4, 2, 0, accumulation=3)
    with pytest.raises(ValueError, match="rank 2"):
        ShardedBatchSampler(100, 4, 2, 2)
    assert len(ShardedBatchSampler(torch.arange(17).tolist(), 4, 2, 1)) == 2
