"""The batch collator: samples of :class:`ft.dataset.ConversationDataset` to the model's
forward kwargs, and each batch's statistics.

:class:`Collator` pads (or packs, see :mod:`ft.packing`) a list of samples into a
:class:`Batch` and appends a dummy image or video where a batch lacks one, so that every
FSDP rank runs the vision tower the same number of times. :class:`BatchStats` counts
the batch's real work, for the loop and :mod:`ft.metrics`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, NamedTuple

import torch

from ft.families import processor_family
from ft.messages import IGNORE_INDEX, IMAGE, IMAGE_PLACEHOLDER, MEDIA, VIDEO, VIDEO_PLACEHOLDER
from ft.packing import ROW_MULTIPLE, varlen_kwargs
from ft.video import processor_kwargs

__all__ = ["Batch", "BatchStats", "Collator", "vision_inputs"]


@dataclasses.dataclass(frozen=True)
class BatchStats:
    """The work in one micro-batch, padding and the dummy image or video excluded: what
    the loop, the metrics and the FLOP count need to know of a batch, however its rows
    were built."""

    seq_lens: tuple[int, ...]
    """Real tokens of each sample (text, image and video tokens), in batch order."""

    label_tokens: int
    """Positions with a next-token label: the rows of the loss."""

    image_grids: tuple[tuple[int, int, int], ...]
    """(t, h, w) of each real image, in vision patches (14×14 pixels; t counts pairs
    of frames, 1 for a still image)."""

    dummy_image: bool = False
    """Whether the collator added its dummy image (the batch had none; see
    `Collator._dummies`)."""

    video_grids: tuple[tuple[int, int, int], ...] = ()
    """(t, h, w) of each real video, in vision patches (t counts pairs of frames)."""

    dummy_video: bool = False
    """Whether the collator added its dummy video."""

    rows: int = 0
    """Rows of the batch tensor: samples when padded, packs when packed."""

    row_length: int = 0
    """Tokens per row of the batch tensor, padding and the dummy image included."""

    @property
    def samples(self) -> int:
        """Samples in the batch: one per row when padded, several per row when packed."""
        return len(self.seq_lens)

    @property
    def slots(self) -> int:
        """Token positions the batch tensor holds: what the forward computes on."""
        return self.rows * self.row_length

    @property
    def tokens(self) -> int:
        """Real tokens of the batch (text, image and video): the tokens/s numerator."""
        return sum(self.seq_lens)

    @property
    def vision_grids(self) -> tuple[tuple[int, int, int], ...]:
        """The grids of the real images and videos: what the vision tower works on."""
        return self.image_grids + self.video_grids

    @property
    def patches(self) -> int:
        """Vision patches of the real images and videos."""
        return sum(t * h * w for t, h, w in self.vision_grids)


class Batch(NamedTuple):
    """What the collator returns: the model's forward kwargs, and the batch's statistics."""

    inputs: dict[str, torch.Tensor]
    stats: BatchStats
    real: torch.Tensor | None = None
    """[rows, length] bool: the positions holding a sample's token (not a pad, a pack's
    pad segment or the collator's dummy image or video). The MoE load-balancing loss
    counts these only (`ft.moe`)."""


class Collator:
    """Pads samples from :class:`ft.dataset.ConversationDataset` into one :class:`Batch`.

    ``inputs`` holds the model's forward kwargs ``input_ids``, ``attention_mask``,
    ``labels``, ``mm_token_type_ids``, the image inputs ``pixel_values`` and
    ``image_grid_thw`` and, when the batch has a video, ``pixel_values_videos``,
    ``video_grid_thw`` and ``second_per_grid_ts``; nothing else. Sequences are
    right-padded: ids with the pad id, labels with IGNORE_INDEX, mm_token_type_ids with
    0; the attention mask is 1 on real tokens. Images and videos are concatenated in
    sample order, the order in which the model assigns their features to pad tokens.
    ``stats`` is counted here, on the CPU, before any padding.

    Every batch carries at least one of each kind of vision input in `media` (an
    image when `media` is empty); see :meth:`_dummies`. Pass the kinds the data holds
    (``ConversationDataset.media``, the same on every rank).

    Packed (`rope_index` given, see :mod:`ft.packing`): the collator takes a list of
    packs (lists of samples) and makes one row per pack, the samples one after the
    other. Then ``inputs`` has ``position_ids`` [4, rows, length] (text positions and
    M-RoPE, restarting at 0 for every sample) and no ``attention_mask``; a shorter row
    ends in a pad segment whose positions also restart at 0, and the row length is a
    multiple of ``ft.packing.ROW_MULTIPLE``. Every row length is a multiple of `multiple`
    (more padding at the end), so that a sequence-parallel group splits it evenly. With
    `varlen`, also flash-attention's ``cu_seq_lens_q/k`` and ``max_length_q/k`` over the
    flattened rows.
    """

    def __init__(self, processor: Any, rope_index: Callable | None = None, varlen: bool = False,
                 media: Iterable[int] = (IMAGE,), multiple: int = 1):
        self.rope_index, self.varlen = rope_index, varlen
        self.multiple = multiple  # row lengths a multiple of it: the sequence-parallel group size
        self.required = sorted(set(media)) or [IMAGE]
        tokenizer = processor.tokenizer
        # Padded positions are masked out of attention and loss, so any valid id will
        # do when the tokenizer defines no pad token.
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        image_processor = processor.image_processor
        side = image_processor.patch_size * image_processor.merge_size
        # The processor resizes these up to its min_pixels: the smallest input it makes.
        black = torch.zeros(3, side, side, dtype=torch.uint8)
        two_frames = black.expand(2, -1, -1, -1)
        made = {
            IMAGE: processor(text=[IMAGE_PLACEHOLDER], images=[black], return_tensors="pt",
                             return_mm_token_type_ids=True, add_special_tokens=False),
            VIDEO: processor(text=[VIDEO_PLACEHOLDER], videos=[two_frames],
                             videos_kwargs=processor_kwargs([(two_frames, 2.0)], processor_family(processor)),
                             return_tensors="pt", return_mm_token_type_ids=True, add_special_tokens=False),
        }
        self.dummies = {kind: {"input_ids": out["input_ids"][0],
                               "labels": torch.full_like(out["input_ids"][0], IGNORE_INDEX),
                               "mm_token_type_ids": out["mm_token_type_ids"][0].long(),
                               **{key: torch.as_tensor(out[key]) for key in MEDIA[kind].inputs if key in out}}
                        for kind, out in made.items()}

    def __call__(self, samples: list) -> Batch:
        if self.rope_index is not None:
            return self._packed(samples)
        dummies = self._dummies(samples)
        # The dummies go after the first sample's last token (see _dummies).
        first = {key: torch.cat([samples[0][key]] + [d[key] for d in dummies])
                 for key in ("input_ids", "labels", "mm_token_type_ids")}
        rows = [first] + list(samples[1:])
        length = -(-max(len(s["input_ids"]) for s in rows) // self.multiple) * self.multiple
        inputs = {
            "input_ids": _pad([s["input_ids"] for s in rows], length, self.pad_id),
            "attention_mask": _pad([torch.ones_like(s["input_ids"]) for s in rows], length, 0),
            "labels": _pad([s["labels"] for s in rows], length, IGNORE_INDEX),
            "mm_token_type_ids": _pad([s["mm_token_type_ids"] for s in rows], length, 0),
            **vision_inputs(list(samples) + dummies),
        }
        real = _pad([torch.ones(len(s["input_ids"]), dtype=torch.bool) for s in samples], length, False)
        return Batch(inputs, _stats(samples, dummies, len(samples), length), real)

    def _packed(self, packs: list[list[dict[str, torch.Tensor]]]) -> Batch:
        samples = [s for p in packs for s in p]
        rows = [list(p) for p in packs]
        dummies = self._dummies(samples)
        rows[0] += dummies  # segments of their own, after the first row's last sample
        used = [sum(len(s["input_ids"]) for s in row) for row in rows]
        step = math.lcm(ROW_MULTIPLE, self.multiple)
        length = -(-max(used) // step) * step
        ids, labels, mm_types, positions, segments = [], [], [], [], []
        real = torch.zeros(len(rows), length, dtype=torch.bool)
        real[0, :sum(len(s["input_ids"]) for s in packs[0])] = True  # row 0's dummies follow its samples
        for r, n in enumerate(used[1:], 1):
            real[r, :n] = True
        for row, n in zip(rows, used):
            for s in row:
                if s["labels"][0] != IGNORE_INDEX:  # what keeps the loss inside each sample
                    raise RuntimeError("a packed sample's first token has a label: the previous "
                                       "sample's last token would learn to predict it")
                positions.append(self.rope_index(s["input_ids"], s["mm_token_type_ids"], s.get("image_grid_thw"),
                                                 s.get("video_grid_thw"), s.get("second_per_grid_ts")))
                segments.append(len(s["input_ids"]))
            pad = length - n
            filler = torch.full((pad,), self.pad_id, dtype=torch.long)
            ids.append(torch.cat([s["input_ids"] for s in row] + [filler]))
            labels.append(torch.cat([s["labels"] for s in row] + [torch.full((pad,), IGNORE_INDEX)]))
            mm_types.append(torch.cat([s["mm_token_type_ids"] for s in row] + [torch.zeros(pad, dtype=torch.long)]))
            if pad:
                positions.append(torch.arange(pad).expand(4, pad))
                segments.append(pad)
        inputs = {
            "input_ids": torch.stack(ids),
            "labels": torch.stack(labels),
            "mm_token_type_ids": torch.stack(mm_types),
            "position_ids": torch.cat(positions, dim=1).view(4, len(rows), length),
            **vision_inputs([s for row in rows for s in row]),
        }
        if self.varlen:
            inputs.update(varlen_kwargs(segments))
        return Batch(inputs, _stats(samples, dummies, len(rows), length), real)

    def _dummies(self, samples: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """A small black image (two black frames, for a video) for each kind of vision
        input in `self.required` that no sample of the batch has.

        Why: under FSDP every rank must run the same modules the same number of times
        in every forward, because each sharded module all-gathers its parameters
        collectively. The model runs the vision tower once for a batch's images and once
        more for its videos; a rank whose batch lacked a kind the others have would run
        it fewer times while the others gather its shards: the collectives mismatch and
        the job aborts (gloo) or hangs (NCCL).

        Why it changes nothing: the tokens ``<|vision_start|>``, the pads and
        ``<|vision_end|>`` come after the sample's last real token (padded) or as a
        segment of their own (packed), with label IGNORE_INDEX. Attention is causal, so
        no earlier position attends to them and every real position's output is
        unchanged; their own outputs carry no label, so the loss is unchanged; and as
        nothing that reaches the loss depends on them, every gradient is unchanged and
        the dummy's share of the vision tower's gradients is exactly zero. The M-RoPE
        positions of the real tokens are unchanged too: the dummy comes after them.
        """
        return [self.dummies[kind] for kind in self.required
                if not any(MEDIA[kind].inputs[1] in s for s in samples)]


def vision_inputs(segments: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each image and video input of the segments, concatenated in segment order."""
    return {key: torch.cat([s[key] for s in segments if key in s])
            for medium in MEDIA.values() for key in medium.inputs if any(key in s for s in segments)}


def _stats(samples: list[dict[str, torch.Tensor]], dummies: list[dict[str, torch.Tensor]], rows: int,
           row_length: int) -> BatchStats:
    def grids(key: str) -> tuple[tuple[int, int, int], ...]:
        return tuple(tuple(int(x) for x in g) for s in samples if key in s for g in s[key].tolist())

    return BatchStats(
        seq_lens=tuple(len(s["input_ids"]) for s in samples),
        label_tokens=sum(int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in samples),
        image_grids=grids("image_grid_thw"), video_grids=grids("video_grid_thw"),
        dummy_image=any("image_grid_thw" in d for d in dummies),
        dummy_video=any("video_grid_thw" in d for d in dummies),
        rows=rows, row_length=row_length,
    )


def _pad(sequences: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
    batch = torch.full((len(sequences), length), value, dtype=sequences[0].dtype)
    for i, sequence in enumerate(sequences):
        batch[i, : len(sequence)] = sequence
    return batch
