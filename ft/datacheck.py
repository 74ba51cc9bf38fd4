"""The pre-training data check: every row through the code that will train on it.

:func:`check_data` checks every row (sharded across ranks) with
:meth:`ft.dataset.ConversationDataset.layout`: the same parsing, image and length
checks as ``__getitem__`` but without pixel processing. It refuses or skips
(``data.on_bad_sample``) the rows that cannot be trained on and gives each row's length
in tokens, which length-grouped batching (:mod:`ft.sampler`) needs.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterable

import torch

from ft.dataset import ConversationDataset
from ft.rows import DataError

__all__ = ["RowCheck", "check_data", "check_rows"]


@dataclasses.dataclass
class RowCheck:
    """What :func:`check_rows` found, by row index: the length in tokens of each row
    that can be trained on, the kinds of vision input (:data:`ft.messages.IMAGE`,
    :data:`~ft.messages.VIDEO`) in each, and the DataError message of each row that
    cannot."""

    lengths: dict[int, int] = dataclasses.field(default_factory=dict)
    errors: dict[int, str] = dataclasses.field(default_factory=dict)
    media: dict[int, frozenset[int]] = dataclasses.field(default_factory=dict)

    @classmethod
    def merge(cls, parts: Iterable[RowCheck]) -> RowCheck:
        """One RowCheck of the checks of disjoint sets of rows (e.g. every rank's)."""
        merged = cls()
        for part in parts:
            merged.lengths.update(part.lengths)
            merged.errors.update(part.errors)
            merged.media.update(part.media)
        return merged

    def media_of(self, rows: Iterable[int]) -> frozenset[int]:
        """The kinds of vision input that the rows `rows` hold between them."""
        return frozenset().union(*(self.media[r] for r in rows))


class _RowChecker(torch.utils.data.Dataset):
    """Row i of `indices` -> (row index, length or None, error or None, vision kinds); a
    Dataset so that DataLoader workers can share the rows out."""

    def __init__(self, dataset: ConversationDataset, indices: Iterable[int]):
        self.dataset, self.indices = dataset, list(indices)
        # One cache per process (each worker fills its own): rows often share images.
        self.cache: dict[Any, int | str] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, int | None, str | None, frozenset[int]]:
        index = self.indices[i]
        try:
            types = self.dataset.layout(index, self.cache)["mm_token_type_ids"]
        except DataError as e:
            return index, None, str(e), frozenset()
        return index, len(types), None, frozenset(types.unique().tolist()) - {0}


def check_rows(dataset: ConversationDataset, indices: Iterable[int], num_workers: int = 0) -> RowCheck:
    """Check the rows `indices` of `dataset` with :meth:`ConversationDataset.layout`:
    every DataError a row can raise, and each usable row's length in tokens (text plus
    image tokens, after truncation: the ``len(input_ids)`` its sample will have).

    Needs no model and no pixel processing. `num_workers` > 0 shares the rows out
    among that many DataLoader worker processes.
    """
    checker = _RowChecker(dataset, indices)
    if num_workers:
        # Results travel back 64 rows at a time: fewer inter-process transfers.
        loader = torch.utils.data.DataLoader(checker, batch_size=64, num_workers=num_workers, collate_fn=list)
        results: Iterable = itertools.chain.from_iterable(loader)
    else:
        results = (checker[i] for i in range(len(checker)))
    check = RowCheck()
    for index, length, error, media in results:
        if error is None:
            check.lengths[index] = length
            check.media[index] = media
        else:
            check.errors[index] = error
    return check


def check_data(
    dataset: ConversationDataset,
    on_bad_sample: str,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[RowCheck], list[RowCheck]] | None = None,
    num_workers: int = 0,
    listed: int = 10,
) -> tuple[ConversationDataset, list[int], str | None]:
    """Check every row of `dataset` before training (see :func:`check_rows`).

    Returns the dataset to train on, the length in tokens of each of its rows (for
    ``ShardedBatchSampler(lengths, group_by_length=True)``) and a note for the log
    when rows were skipped (None otherwise). The returned dataset's ``media`` holds
    the kinds of vision input its rows have (the same on every rank).

    `on_bad_sample` (``data.on_bad_sample``): ``"error"`` raises DataError listing the
    first `listed` bad rows as ``file:line: field: reason`` and how many more there
    are; ``"skip"`` returns only the good rows, and the note says how many were
    skipped and why (first `listed`).

    Distributed: each of the `world_size` ranks checks every world_size-th row from
    `rank` on, and `gather` (required when world_size > 1) must return every rank's
    RowCheck, e.g. ``torch.distributed.all_gather_object``'s output list. Every rank
    then holds the same merged result, so with ``"error"`` all ranks raise the same
    DataError: none is left waiting in a collective.
    """
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    if world_size > 1 and gather is None:
        raise ValueError("check_data on several ranks needs `gather` to merge the ranks' checks")
    mine = check_rows(dataset, range(rank, len(dataset), world_size), num_workers)
    check = RowCheck.merge(gather(mine)) if world_size > 1 else mine
    if not check.errors:
        everything = range(len(dataset))
        return dataset.with_media(check.media_of(everything)), [check.lengths[i] for i in everything], None
    file = dataset.rows.name
    errors = [check.errors[i] for i in sorted(check.errors)]
    listing = "\n  ".join(errors[:listed])
    if len(errors) > listed:
        listing += f"\n  and {len(errors) - listed} more"
    summary = f"{file}: {len(errors)} of {len(dataset)} rows cannot be used"
    if on_bad_sample == "error" or len(errors) == len(dataset):
        hint = "no row is usable" if len(errors) == len(dataset) else "data.on_bad_sample=skip leaves them out"
        raise DataError(f"{summary} ({hint}):\n  {listing}")
    keep = sorted(check.lengths)
    note = f"{summary}, skipped (data.on_bad_sample=skip):\n  {listing}"
    return dataset.select(keep).with_media(check.media_of(keep)), [check.lengths[i] for i in keep], note
