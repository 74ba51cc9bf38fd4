"""Packing: several whole samples in one row, each attending only to itself.

Long-tailed data padded into batches spends much of its compute on pad tokens (the
demo data at 4 rows per device: a quarter). A packed row concatenates whole samples up
to `data.pack_length` tokens; a sample is never split. Three things make a packed row
compute exactly what the same samples compute one per row:

1. **Positions restart per sample.** Every family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) takes `position_ids` of shape
   (4, rows, length): row 0 holds the text positions (they drive the causal mask and
   are handed to attention), rows 1-3 the M-RoPE (t, h, w) positions. Row 0 is an
   `arange` per sample; rows 1-3 come from the model's own `get_rope_index` called on
   each sample alone. (Called on a whole packed row it shares one image-grid iterator
   and continues positions across samples.) See :class:`RopeIndex`.
2. **No attention crosses samples.** sdpa and eager: with `attention_mask=None`,
   transformers' `create_causal_mask` starts a new block wherever row 0 does not step
   by +1, and builds the block-diagonal causal mask. Any attention mask, even all ones,
   turns that detection off, so a packed batch never carries one.
   flash_attention_2: the explicit varlen kwargs `cu_seq_lens_q/k` and
   `max_length_q/k` (:func:`varlen_kwargs`), which work for any number of rows and
   need no device sync per layer (deriving them from position ids does both wrong).
3. **The loss does not cross samples either.** Position t predicts label t+1; the
   first token of every sample is its system header, never learned, so the last
   token of one sample predicts nothing of the next.

A row shorter than the batch's longest is filled with one pad segment whose positions
restart at 0: a block of its own, with no labels. The dummy image of a batch without
images (see `ft.collate.Collator`) is a segment of its own too.

Which samples share a row is planned here (:func:`pack`, :class:`PackedBatchSampler`,
:func:`eval_batches`) as a pure function of the row lengths, the seed and the epoch,
so resuming stays exact.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence

import torch

from ft.families import family_of

__all__ = ["PackedBatchSampler", "PackedRows", "RopeIndex", "eval_batches", "pack", "truncates_video_seconds",
           "varlen_kwargs"]

CHUNK_GROUPS = 16
"""Packs are planned within shuffled chunks of the epoch's rows, each about this many
steps' packs (all ranks' packs of one optimizer step) of rows. Larger chunks fill
packs better but change less from epoch to epoch which samples share a pack: a dataset
smaller than one chunk is packed whole, so its packs differ between epochs only where
equal lengths tie."""

ROW_MULTIPLE = 8
"""A packed batch's row length is rounded up to a multiple of this (the rest is a pad
segment): friendlier shapes for the GPU kernels."""


def pack(rows: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the rows `rows` (indices into `lengths`) in packs of at most
    `capacity` tokens. Longest first, each into the fullest pack it still fits in, else
    a new pack. Deterministic: equal lengths keep their order in `rows`. A row longer
    than `capacity` gets a pack of its own (the data check keeps rows within max_length,
    and pack_length is at least that)."""
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, pack number), sorted
    for row in sorted(rows, key=lambda r: -lengths[r]):
        need = lengths[row]
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            room, number = free.pop(at)
            packs[number].append(row)
            bisect.insort(free, (room - need, number))
        else:
            packs.append([row])
            bisect.insort(free, (capacity - need, len(packs) - 1))
    return packs


def _balance(packs: list[list[int]], lengths: Sequence[int], ranks: int, per_rank: int) -> list[list[list[int]]]:
    """Deal `ranks * per_rank` packs to `ranks` ranks, `per_rank` each, evening out the
    ranks' token counts: each pack, fullest first, to the rank with the fewest tokens so
    far that still has room (ties to the lower rank)."""
    dealt: list[list[list[int]]] = [[] for _ in range(ranks)]
    tokens = [0] * ranks
    for p in sorted(packs, key=lambda p: -sum(lengths[r] for r in p)):
        rank = min((r for r in range(ranks) if len(dealt[r]) < per_rank), key=lambda r: tokens[r])
        dealt[rank].append(p)
        tokens[rank] += sum(lengths[r] for r in p)
    return dealt


class PackedBatchSampler(torch.utils.data.Sampler[list[list[int]]]):
    """Per-rank micro-batches of packs: each micro-batch is `batch_size` packs (lists of
    row indices, at most `pack_length` tokens each). Use it with :class:`PackedRows`.

    The plan is made per optimizer step, over all ranks, and depends on the step's
    number of packs ``step_packs = batch_size * accumulation * num_replicas`` but not on
    how it is split: at any world size with the same `step_packs`, step t trains on the
    same packs (the same rows in the same packs), only dealt to other ranks and
    micro-batches. So a run can continue on another number of ranks.

    Each epoch: the rows in shuffled order (the seed and epoch alone decide it) are cut
    into chunks of about :data:`CHUNK_GROUPS` x `step_packs` packs' worth of rows, and
    each chunk is packed (:func:`pack`). The epoch's packs, fullest first, are cut into
    steps of `step_packs`, so packs of similar fill run side by side; a step's packs,
    still fullest first, are cut into `accumulation` global micro-batches of
    ``num_replicas * batch_size`` packs, each dealt to the ranks evening out their
    tokens: no rank idles long waiting for the others at the step's collectives. The
    steps are then shuffled, except that the one holding the fullest pack goes first,
    so that an out-of-memory error shows at the first step. The packs that do not fill
    a last step are left out of the epoch (the emptiest ones; different rows each epoch).

    Every rank gets the same number of micro-batches in an epoch
    (:meth:`steps_in` x `accumulation`), as FSDP needs, but that number may differ
    between epochs.
    """

    def __init__(self, lengths: Sequence[int], pack_length: int, batch_size: int, num_replicas: int = 1,
                 rank: int = 0, seed: int = 0, chunk_groups: int = CHUNK_GROUPS, accumulation: int = 1):
        if batch_size < 1 or chunk_groups < 1 or accumulation < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid batch_size {batch_size}, chunk_groups {chunk_groups}, accumulation "
                             f"{accumulation}, rank {rank} or num_replicas {num_replicas}")
        self.lengths, self.pack_length = list(lengths), pack_length
        self.batch_size, self.num_replicas, self.rank, self.seed = batch_size, num_replicas, rank, seed
        self.accumulation = accumulation
        self.group = num_replicas * batch_size  # packs of one micro-batch over all ranks
        self.step_packs = self.group * accumulation  # packs of one optimizer step
        mean = sum(self.lengths) / max(len(self.lengths), 1)
        self.chunk_rows = max(1, round(chunk_groups * self.step_packs * pack_length / max(mean, 1.0)))
        self.epoch, self.start = 0, 0
        self._plans: dict[int, list[list[list[list[list[int]]]]]] = {}

    def steps(self, epoch: int) -> list[list[list[int]]]:
        """The packs of each step of `epoch`, fullest first: [step][pack] -> rows. A
        function of (seed, epoch, step_packs, pack_length, lengths) alone."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        packs = [p for start in range(0, len(order), self.chunk_rows)
                 for p in pack(order[start:start + self.chunk_rows], self.lengths, self.pack_length)]
        packs.sort(key=lambda p: -sum(self.lengths[r] for r in p))  # stable: ties keep chunk order
        n = self.step_packs
        steps = [packs[i:i + n] for i in range(0, len(packs) // n * n, n)]
        if steps:
            rest = [steps[i] for i in torch.randperm(len(steps) - 1, generator=generator).add(1).tolist()]
            steps = [steps[0]] + rest
        return steps

    def plan(self, epoch: int) -> list[list[list[list[list[int]]]]]:
        """All ranks' micro-batches of `epoch`: [step][micro-batch][rank][pack] -> rows."""
        if epoch not in self._plans:
            g = self.group
            plan = [[_balance(step[i:i + g], self.lengths, self.num_replicas, self.batch_size)
                     for i in range(0, self.step_packs, g)] for step in self.steps(epoch)]
            self._plans = {epoch: plan}  # one epoch at a time is all the loop needs
        return self._plans[epoch]

    def batches(self, epoch: int) -> list[list[list[int]]]:
        """This rank's micro-batches of `epoch`, in order (`accumulation` per step)."""
        return [micro[self.rank] for step in self.plan(epoch) for micro in step]

    def steps_in(self, epoch: int) -> int:
        """Optimizer steps in `epoch` (the same at every world size with the same
        step_packs)."""
        return len(self.plan(epoch))

    def __len__(self) -> int:
        return self.steps_in(self.epoch) * self.accumulation

    def samples_in(self, epoch: int, index: int) -> int:
        """Samples in this rank's micro-batch `index` of epoch `epoch`."""
        return sum(len(p) for p in self.batches(epoch)[index])

    def set_position(self, epoch: int, steps_done: int) -> None:
        """Iterate over epoch `epoch` from its step `steps_done` on."""
        if not 0 <= steps_done <= self.steps_in(epoch):
            raise ValueError(f"steps_done {steps_done} is not in [0, {self.steps_in(epoch)}]")
        self.epoch, self.start = epoch, steps_done

    def __iter__(self) -> Iterator[list[list[int]]]:
        yield from self.batches(self.epoch)[self.start * self.accumulation:]

    def efficiency(self, epoch: int = 0) -> tuple[float, int, int]:
        """(real tokens / (packs x pack_length), rows packed, rows left out) in `epoch`."""
        packs = [p for step in self.plan(epoch) for micro in step for rank in micro for p in rank]
        used = sum(len(p) for p in packs)
        tokens = sum(self.lengths[r] for p in packs for r in p)
        return tokens / max(len(packs) * self.pack_length, 1), used, len(self.lengths) - used


def eval_batches(lengths: Sequence[int], pack_length: int, batch_size: int, num_replicas: int,
                 rank: int) -> tuple[list[list[list[int]]], int]:
    """Evaluation micro-batches of packs for `rank`, and how many every rank must run
    (the most any rank has: the others repeat a batch, uncounted). Every row is
    evaluated once: all rows are packed, the packs dealt to the ranks evening out
    tokens, and each rank's packs cut into micro-batches of `batch_size`."""
    packs = pack(range(len(lengths)), lengths, pack_length)
    per_rank = math.ceil(len(packs) / num_replicas)
    dealt = _balance(packs, lengths, num_replicas, per_rank)
    mine = [dealt[rank][i:i + batch_size] for i in range(0, len(dealt[rank]), batch_size)]
    return mine, max(math.ceil(len(d) / batch_size) for d in dealt)


class PackedRows(torch.utils.data.Dataset):
    """A dataset whose items are packs: ``self[[i, j, ...]]`` is the list of samples
    ``[dataset[i], dataset[j], ...]``, for a DataLoader fed by a batch sampler of packs."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, rows: list[int]) -> list[dict]:
        return [self.dataset[r] for r in rows]


class RopeIndex:
    """The model family's own `get_rope_index` (`ft.families`), run on the model config
    alone (no weights), so that positions are built in the collator, in the DataLoader
    workers.

    `get_rope_index` reads only `self.config` and its sibling `get_vision_position_ids`;
    an instance of this class stands in for the model as that `self`.
    tests/test_packing.py checks the positions against the ones the model computes for
    itself, per family, so a transformers release that changes what the method reads
    fails there, not silently in training.
    """

    def __init__(self, config):
        self.config = config
        self.family = family_of(config)
        self._takes = {name: self.family.rope_takes(name) for name in ("mm_token_type_ids", "second_per_grid_ts")}

    def get_vision_position_ids(self, *args, **kwargs):
        return self.family.inner_class().get_vision_position_ids(self, *args, **kwargs)

    def __call__(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                 image_grid_thw: torch.Tensor | None, video_grid_thw: torch.Tensor | None = None,
                 second_per_grid_ts: torch.Tensor | None = None) -> torch.Tensor:
        """The (4, n) positions of one sample: text positions, then M-RoPE (t, h, w); on
        Qwen2.5-VL a video's time positions advance with `second_per_grid_ts` (seconds
        per two frames)."""
        kwargs = {"mm_token_type_ids": mm_token_type_ids[None]} if self._takes["mm_token_type_ids"] else {}
        if self._takes["second_per_grid_ts"]:
            kwargs["second_per_grid_ts"] = second_per_grid_ts
        get_rope_index = self.family.inner_class().get_rope_index
        mrope, _ = get_rope_index(self, input_ids[None], image_grid_thw=image_grid_thw,
                                  video_grid_thw=video_grid_thw, **kwargs)
        return torch.cat([torch.arange(len(input_ids))[None], mrope[:, 0]])


def truncates_video_seconds(config) -> bool:
    """Whether this transformers' M-RoPE rounds a video's seconds per temporal patch
    (`second_per_grid_ts`) down to whole seconds.

    transformers 5.17's `get_rope_index` takes ``int(second_per_grid_ts)``: a clip
    sampled faster than one temporal patch per second (at 4 fps, 0.5 s per patch) gets
    time steps of 0, every frame at the same time position; 5.24 keeps the fraction.
    Training on either matches inference on the same version (ft's positions are the
    model's own), not across versions. Found by asking the method itself. Families
    whose positions do not take `second_per_grid_ts` (Qwen2-VL, Qwen3-VL) never round.
    """
    if not family_of(config).rope_takes("second_per_grid_ts"):
        return False
    grid = torch.tensor([[2, 2, 2]])  # two temporal patches of one merged token each
    types = torch.full((2,), 2)  # video
    positions = RopeIndex(config)(torch.zeros(2, dtype=torch.long), types, None, grid, torch.tensor([0.5]))
    return int(positions[1, 1] - positions[1, 0]) != int(config.vision_config.tokens_per_second * 0.5)


def varlen_refusal(attn_implementation: str) -> str | None:
    """Why packing cannot run with this attention kernel on this transformers, or None.

    flash_attention_2 needs the varlen kwargs kept out of the vision tower, which runs
    its own flash-attention call with its own boundaries: transformers 5.24 drops them
    there (`transformers.utils.generic._FLASH_VARLEN_KWARGS`); 5.17 passes them on and
    the vision attention receives `cu_seq_lens_q` twice (TypeError). sdpa and eager
    need nothing of the kind (packed rows are exact on 5.17 and 5.24 alike).
    """
    from transformers.utils import generic

    if attn_implementation == "flash_attention_2" and not hasattr(generic, "_FLASH_VARLEN_KWARGS"):
        import transformers

        return (f"data.packing with model.attn_implementation=flash_attention_2 needs a transformers that "
                f"keeps flash-attention's varlen arguments out of the vision tower (5.24 does); "
                f"transformers {transformers.__version__} passes them on and the vision attention fails. "
                "Upgrade transformers, or pack with attn_implementation=sdpa")
    return None


def varlen_kwargs(segments: Sequence[int]) -> dict:
    """flash_attention_2's explicit varlen kwargs for a batch whose rows, flattened one
    after the other, are segments of these lengths (pad segments included): cumulative
    boundaries (int32, starting at 0) and the longest segment."""
    bounds = torch.zeros(len(segments) + 1, dtype=torch.int32)
    bounds[1:] = torch.tensor(segments, dtype=torch.int32).cumsum(0)
    longest = max(segments)
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds.clone(),
            "max_length_q": longest, "max_length_k": longest}
