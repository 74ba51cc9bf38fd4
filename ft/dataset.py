"""Conversation data as training samples: rows to tokens, exact assistant-only labels.

Pipeline:

1. :func:`ft.rows.load_rows` gives the raw rows of a JSONL file or a Hugging Face
   dataset on local disk (``save_to_disk`` folder, Parquet or Arrow files), each with
   its place for error messages. Nothing is parsed yet, nothing decoded.
2. :class:`ConversationDataset` turns one row into tensors on access (``__getitem__``),
   so start-up is fast and DataLoader workers do the work. A row is parsed and
   normalised (:func:`ft.messages.parse`, which describes the row formats), rendered in
   the Qwen VL chat format, tokenised with the processor, labelled and, if too long,
   truncated.
3. :class:`ft.collate.Collator` pads a list of samples into a batch of model kwargs.

Before training, :func:`ft.datacheck.check_data` checks every row with
:meth:`ConversationDataset.layout`: the same parsing, image and length checks as
``__getitem__`` but without pixel processing, and each row's length in tokens.
Which frames of a video a sample takes is :mod:`ft.video`'s business.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from typing import Any

import numpy
import torch
from PIL import Image

from ft.families import processor_family
from ft.messages import ASSISTANT_HEADER, IGNORE_INDEX, MEDIA, VIDEO_PLACEHOLDER, VISION_END, parse, render_segments
from ft.rows import Rows, Where, load_rows
from ft.video import Clip, VideoError, VideoSampling, processor_kwargs
from ft.video import probe as probe_video
from ft.video import read as read_video

__all__ = ["ConversationDataset", "build_datasets", "hold_out", "open_image"]


def _name(image: str | bytes) -> str:
    """An image's name in messages: its path, or what an embedded image is."""
    return image if isinstance(image, str) else f"<embedded image, {len(image)} bytes>"


def _key(value: str | bytes | list) -> Any:
    """A cache key for an image or video part's value: the path, a digest of embedded
    bytes (the cache must not hold every image), or a tuple of frame keys."""
    if isinstance(value, bytes):
        return hashlib.blake2b(value, digest_size=16).digest()
    if isinstance(value, (list, tuple)):
        return tuple(_key(v) for v in value)
    return value


def _decode_image(path: str | bytes, *, reduced: bool = False) -> tuple[Image.Image, tuple[int, int]]:
    """Decode the image file `path` (or the encoded file `path` holds, given bytes);
    return the image and the file's (width, height).

    Decoding, not just opening, is what finds a truncated file: ``Image.open`` reads
    only the header. With `reduced`, a JPEG decodes at 1/8 scale and the image returned
    is that small: for checks that need only the size, as it halves the time on a large
    photo and a truncated file still fails (every byte is still read). Raises
    ValueError naming the path and the reason when the file cannot be read.
    """
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as image:
            size = image.size
            if reduced:
                image.draft(None, (1, 1))  # formats other than JPEG ignore it
            image.load()
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {_name(path)}: {e}") from e
    return image, size


def open_image(path: str | bytes) -> Image.Image:
    """The image file `path` (or embedded image bytes) decoded as RGB, transparent
    pixels laid on white: Qwen's reference preprocessing (qwen_vl_utils.to_rgb), so that
    training inputs look like inference inputs. Raises ValueError naming the image."""
    image, _ = _decode_image(path)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
        return image
    return image.convert("RGB")


def _load_image(path: str | bytes, where: Where) -> Image.Image:
    try:
        return open_image(path)
    except ValueError as e:
        raise where.error("image", str(e)) from e

class ConversationDataset(torch.utils.data.Dataset):
    """Samples for training: one row of `rows` (from :func:`ft.rows.load_rows`) per index.

    Each sample is a dict of 1-D tensors ``input_ids``, ``labels`` and
    ``mm_token_type_ids`` (:data:`ft.messages.IMAGE` on image tokens,
    :data:`~ft.messages.VIDEO` on video tokens, 0 elsewhere) and, when the row has
    images, ``pixel_values`` ``[n_patches, C]`` and ``image_grid_thw``
    ``[n_images, 3]``; when it has videos, ``pixel_values_videos``, ``video_grid_thw``
    and ``second_per_grid_ts`` (seconds per temporal patch, one per video). Labels are
    the input ids on each assistant turn's content and its closing ``<|im_end|>``, and
    IGNORE_INDEX everywhere else (system, user, turn headers, image and video tokens);
    they are not shifted (the model's loss shifts them).

    A sample whose images and videos end beyond `max_length` first has its video frames
    shrunk: all its videos' frames get the largest pixel cap between
    ``video_min_pixels`` and ``video_max_pixels`` at which they fit (see
    :meth:`_fit_videos`). A sample still longer than `max_length` tokens is cut at
    `max_length`, which must leave every image and video whole and at least one learned
    token; otherwise DataError. `video` says which frames a video gives
    (``data.video_fps``, ``video_max_frames``).

    Any row that cannot be used raises DataError naming its ``file:line``, at access
    time too (an image deleted or overwritten after :func:`ft.datacheck.check_data`):
    the training loop can catch it there without the failure being mistaken for a bug.

    ``media`` is filled in by :func:`ft.datacheck.check_data`: the kinds of vision input
    (:data:`~ft.messages.IMAGE`, :data:`~ft.messages.VIDEO`) that the checked rows hold.
    """

    def __init__(self, rows: Rows, processor: Any, max_length: int,
                 video: VideoSampling | None = None, media: frozenset[int] | None = None):
        self.rows = rows
        self.processor = processor
        self.max_length = max_length
        temporal = processor.video_processor.temporal_patch_size
        self.video = dataclasses.replace(video or VideoSampling(), temporal=temporal)
        self.media = media
        tokenizer = processor.tokenizer
        self.pad_ids = {kind: tokenizer.convert_tokens_to_ids(m.pad) for kind, m in MEDIA.items()}
        self.vision_end_id = tokenizer.convert_tokens_to_ids(VISION_END)
        self.merge_size = processor.image_processor.merge_size
        self.family = processor_family(processor)

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, indices: list[int]) -> ConversationDataset:
        """A dataset of the rows `indices` of this one, in that order."""
        return self._with(self.rows.select(indices), self.media)

    def with_media(self, media: frozenset[int]) -> ConversationDataset:
        """This dataset, its rows known to hold the vision inputs `media`."""
        return self._with(self.rows, media)

    def _with(self, rows: Rows, media: frozenset[int] | None) -> ConversationDataset:
        return ConversationDataset(rows, self.processor, self.max_length, self.video, media)

    def messages(self, index: int) -> list[dict[str, Any]]:
        """The normalised messages of row `index`."""
        return parse(self.rows, index)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        where = self.rows.where(index)
        messages = parse(self.rows, index)
        sample = self._process(messages, where, None)
        if self._vision_end(sample) > self.max_length and self._has_video(messages):
            cap = self._fit_videos(messages, where, {})
            if cap is not None:
                sample = self._process(messages, where, cap)
        return self._truncate(sample, where)

    def prompt(self, index: int) -> tuple[dict[str, torch.Tensor], str, str]:
        """Row `index` as a generation prompt: the conversation before its last
        assistant turn, processed as a training sample is (same frames, sizes and
        chat format) and ending with the assistant header that generation continues;
        the prompt's text (one pad token per image or video); and that last turn's
        text, the reference answer. Raises DataError as ``self[index]`` does."""
        where, before, reference = self._prompt_parts(index)
        sample = self._process(before, where, None)
        header = torch.tensor(self.processor.tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False))
        sample["input_ids"] = torch.cat([sample["input_ids"], header])
        sample["mm_token_type_ids"] = torch.cat([sample["mm_token_type_ids"], torch.zeros_like(header)])
        del sample["labels"]
        segments = render_segments(before, self.family.default_system)
        text = "".join(segment for segment, _, _ in segments) + ASSISTANT_HEADER
        return sample, text, reference

    def prompt_length(self, index: int, cache: dict[Any, int | str] | None = None) -> int:
        """``len(self.prompt(index)[0]["input_ids"])``, counted as :meth:`layout` counts:
        without processing any pixels. Raises DataError as :meth:`layout` does."""
        where, before, _ = self._prompt_parts(index)
        header = self.processor.tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False)
        return len(self._count(before, where, {} if cache is None else cache, None)["input_ids"]) + len(header)

    def _prompt_parts(self, index: int) -> tuple[Where, list[dict[str, Any]], str]:
        """Row `index`'s place, its messages before the last assistant turn, and that
        turn's text."""
        messages = parse(self.rows, index)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return self.rows.where(index), messages[:last], "".join(part["text"] for part in messages[last]["content"])

    def _process(self, messages: list[dict[str, Any]], where: Where, cap: int | None) -> dict[str, torch.Tensor]:
        """The sample of `messages`, pixels included; video frames at most `cap` pixels
        (None: ``video_max_pixels``)."""
        ids, labels, mm_types = [], [], []
        vision: dict[str, list[torch.Tensor]] = {key: [] for m in MEDIA.values() for key in m.inputs}
        for text, media, learned in render_segments(messages, self.family.default_system):
            images = [_load_image(part["image"], where) for part in media if part["type"] == "image"]
            clips = [self._load_video(part["video"], where) for part in media if part["type"] == "video"]
            # One processor call per segment (a single text each) expands the pads and
            # marks mm_token_type_ids exactly as at inference, without the ragged-batch
            # path that differs between transformers versions. Frames are chosen here
            # (ft.video), so the processor samples none; it sizes each frame within the
            # video pixel bounds and nothing else (no whole-video budget).
            out = self.processor(
                text=[text], images=images or None, videos=[clip.frames for clip in clips] or None,
                videos_kwargs=processor_kwargs(clips, self.family, self._size(cap)),
                return_tensors="pt", return_mm_token_type_ids=True, add_special_tokens=False,
            )
            segment_ids = out["input_ids"][0]
            ids.append(segment_ids)
            labels.append(segment_ids.clone() if learned else torch.full_like(segment_ids, IGNORE_INDEX))
            mm_types.append(out["mm_token_type_ids"][0])
            for key in vision:
                if key in out:
                    vision[key].append(torch.as_tensor(out[key]))
        sample = {
            "input_ids": torch.cat(ids),
            "labels": torch.cat(labels),
            "mm_token_type_ids": torch.cat(mm_types).long(),
        }
        sample.update({key: torch.cat(parts) for key, parts in vision.items() if parts})
        self._check_vision_tokens(sample)
        return sample

    def _size(self, cap: int | None) -> dict | None:
        """The video processor's `size` that caps frames at `cap` pixels (None for None:
        its own bounds)."""
        if cap is None:
            return None
        return {"shortest_edge": self.processor.video_processor.size.shortest_edge, "longest_edge": cap}

    @staticmethod
    def _has_video(messages: list[dict[str, Any]]) -> bool:
        return any(part["type"] == "video" for m in messages for part in m["content"])

    def _vision_end(self, sample: dict[str, torch.Tensor]) -> int:
        """Tokens up to and including the sample's last ``<|vision_end|>`` (0 if none)."""
        ends = (sample["input_ids"] == self.vision_end_id).nonzero()
        return int(ends[-1]) + 1 if len(ends) else 0

    def _fit_videos(self, messages: list[dict[str, Any]], where: Where, cache: dict) -> int | None:
        """The largest per-frame pixel cap, from ``video_min_pixels`` up to
        ``video_max_pixels`` in steps of one token's area, at which the sample's images
        and videos end within `max_length`; None when even ``video_min_pixels`` is too
        much (the sample is then refused, with the numbers).

        Counted from the file headers alone (as the data check counts), so the data
        check and loading the sample pick the same cap. Fewer pixels never give more
        tokens, so a bisection finds it.
        """
        size = self.processor.video_processor.size
        unit = (self.processor.video_processor.patch_size * self.merge_size) ** 2
        low, steps = size.shortest_edge, max(0, (size.longest_edge - size.shortest_edge) // unit)

        def fits(k: int) -> bool:
            return self._vision_end(self._count(messages, where, cache, low + k * unit)) <= self.max_length

        if not fits(0):
            return None
        lo, hi = 0, steps
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return low + lo * unit

    def _load_video(self, video: str | list[str], where: Where) -> Clip:
        """A video part's frames (uint8 [T, 3, H, W]), their rate and where they come from."""
        if isinstance(video, str):
            try:
                return read_video(video, self.video)
            except VideoError as e:
                raise where.error("video", str(e)) from e
        indices = self.video.indices(len(video), None)
        frames = [_load_image(video[i], where) for i in indices]
        if len({f.size for f in frames}) > 1:
            raise where.error("video", self._frame_sizes(video))
        stacked = torch.stack([torch.from_numpy(numpy.array(f)) for f in frames]).permute(0, 3, 1, 2)
        return Clip(stacked.contiguous(), self.video.sampled_fps(len(video), None), indices, self.video.fps)

    def layout(self, index: int, cache: dict[Any, int | str] | None = None) -> dict[str, torch.Tensor]:
        """Sample `index`'s ``input_ids``, ``labels`` and ``mm_token_type_ids``, as
        ``self[index]`` gives them, without processing any pixels.

        Raises DataError for every row ``self[index]`` refuses (the checks are shared,
        all but the processor's own consistency check), and also for an image or frame
        whose aspect ratio the processor refuses (``self[index]`` raises the processor's
        ValueError there). Each image's token count follows from its size by the image
        processor's resizing rule (prod(grid) / merge²), and its file is fully decoded
        (at reduced scale for a JPEG) so that a truncated file is found. A video's
        follows from the frames :class:`ft.video.VideoSampling` takes and the frame
        size; a video file is opened and its first frame decoded, not every frame.
        Costs tokenising the text plus decoding each image once: several times cheaper
        than ``self[index]``, which also resizes and normalises pixels.

        `cache` maps image and video paths to their token count or the reason they
        cannot be used; pass one dict to many calls to read each file once.
        """
        where = self.rows.where(index)
        messages = parse(self.rows, index)
        cache = {} if cache is None else cache
        sample = self._count(messages, where, cache, None)
        if self._vision_end(sample) > self.max_length and self._has_video(messages):
            cap = self._fit_videos(messages, where, cache)
            if cap is not None:
                sample = self._count(messages, where, cache, cap)
        media = [p for _, m, _ in render_segments(messages, self.family.default_system) for p in m]
        return self._truncate(sample, where, cache, media=media)

    def _count(self, messages: list[dict[str, Any]], where: Where, cache: dict[Any, int | str],
               cap: int | None) -> dict[str, torch.Tensor]:
        """:meth:`layout`'s sample before truncation, video frames at most `cap` pixels."""
        ids, labels = [], []
        for text, media, learned in render_segments(messages, self.family.default_system):
            segment = self.processor.tokenizer.encode(text, add_special_tokens=False)
            if media:
                segment = self._expand(segment, [self._tokens(part, where, cache, cap) for part in media])
            ids += segment
            labels += segment if learned else [IGNORE_INDEX] * len(segment)
        input_ids = torch.tensor(ids)
        mm_types = torch.zeros_like(input_ids)
        for kind, pad in self.pad_ids.items():
            mm_types[input_ids == pad] = kind
        return {"input_ids": input_ids, "labels": torch.tensor(labels), "mm_token_type_ids": mm_types}

    def _expand(self, segment: list[int], counts: list[int | tuple[int, ...]]) -> list[int]:
        """The segment's ids with each pad token expanded as the processor does: to its
        image's or video's token count (the processor expands before tokenising; special
        tokens tokenise alone, so expanding after tokenising gives the same ids), or, for
        a count given as ids, the whole placeholder around the pad replaced by them."""
        pads, out, drop_end = set(self.pad_ids.values()), [], False
        counts = iter(counts)
        for token in segment:
            if drop_end and token == self.vision_end_id:
                drop_end = False
            elif token not in pads:
                out.append(token)
            else:
                n = next(counts)
                if isinstance(n, tuple):
                    out.pop()  # its <|vision_start|>; the <|vision_end|> is dropped next
                    out += n
                    drop_end = True
                else:
                    out += [token] * n
        return out

    def _tokens(self, part: dict[str, Any], where: Where, cache: dict[Any, int | str], cap: int | None
                ) -> int | tuple[int, ...]:
        kind = part["type"]
        value, key = part[kind], _key(part[kind])
        if kind == "image":
            if key not in cache:
                cache[key] = self._count_image_tokens(value)
        else:
            if cap is not None:
                key = (key, cap)  # the count at the default size stays under the plain key
            if key not in cache:
                cache[key] = self._count_video_tokens(value, self._size(cap))
        if isinstance(cache[key], str):
            raise where.error(kind, cache[key])
        return cache[key]

    def _count_image_tokens(self, path: str | bytes) -> int | str:
        """The image tokens of the image file `path` (or embedded image), or why it
        cannot be used."""
        try:
            _, (width, height) = _decode_image(path, reduced=True)
        except ValueError as e:
            return str(e)
        try:
            patches = self.processor.image_processor.get_number_of_image_patches(height, width)
        except ValueError as e:  # an aspect ratio over 200, which the resizing refuses
            return f"image {_name(path)} ({width}x{height}) cannot be processed: {e}"
        return patches // self.merge_size**2

    def _count_video_tokens(self, video: str | list | tuple, size: dict | None = None) -> int | tuple[int, ...] | str:
        """The video tokens of a video file or frame list (on Qwen3-VL the ids of its
        whole placeholder, see :meth:`_video_expansion`), or why it cannot be used.
        `size` overrides the video processor's pixel bounds."""
        if isinstance(video, str):
            try:
                info = probe_video(video)
            except VideoError as e:
                return str(e)
            frames, width, height = self.video.count(info.frames, info.rate), info.width, info.height
            indices, rate = self.video.indices(info.frames, info.rate), info.rate
        else:
            sizes = set()
            for path in video:
                try:
                    sizes.add(_decode_image(path, reduced=True)[1])
                except ValueError as e:
                    return str(e)
            if len(sizes) > 1:
                return self._frame_sizes(video)
            (width, height), frames = sizes.pop(), self.video.count(len(video), None)
            indices, rate = self.video.indices(len(video), None), self.video.fps
        # The video processor's own resizing rule, per family. (Its
        # get_num_of_video_patches reads the bounds from `size` in transformers 5.24 but
        # from min_pixels/max_pixels in 5.17, so it is not asked.)
        processor = self.processor.video_processor
        bounds = size or processor.size
        try:
            height, width = self.family.video_frame_size(frames, height, width, processor, bounds)
        except ValueError as e:
            return f"video {video if isinstance(video, str) else _name(video[0])} ({width}x{height}) cannot be processed: {e}"
        if self.family.timestamps:
            return self._video_expansion(Clip(torch.zeros(frames, 3, height, width, dtype=torch.uint8), 0.0,
                                              indices, rate), bounds)
        patches = frames // processor.temporal_patch_size * (height // processor.patch_size) * (width // processor.patch_size)
        return patches // self.merge_size**2

    def _video_expansion(self, clip: Clip, bounds: dict) -> tuple[int, ...]:
        """The ids that a video's placeholder (<|vision_start|><|video_pad|><|vision_end|>)
        becomes, on families that write each temporal patch's time in text (Qwen3-VL:
        `<0.2 seconds><|vision_start|>...<|vision_end|>` per patch). Asked of the
        processor itself, on black frames already at their processed size (cheap next
        to decoding, and exact on every transformers, whatever it does with the markers
        around the frames)."""
        out = self.processor(text=[VIDEO_PLACEHOLDER], videos=[clip.frames],
                             videos_kwargs=processor_kwargs([clip], self.family, dict(bounds)),
                             return_tensors="pt", add_special_tokens=False)
        return tuple(out["input_ids"][0].tolist())

    @staticmethod
    def _frame_sizes(frames: list | tuple) -> str:
        sizes = [_decode_image(path, reduced=True)[1] for path in frames]
        k = next(k for k, size in enumerate(sizes) if size != sizes[0])
        return (f"the frames of a video must have one size: {_name(frames[k])} is {sizes[k][0]}x{sizes[k][1]}, "
                f"{_name(frames[0])} is {sizes[0][0]}x{sizes[0][1]}")

    def _check_vision_tokens(self, sample: dict[str, torch.Tensor]) -> None:
        # The model raises on a mismatch only at forward time, far from the cause.
        for kind, medium in MEDIA.items():
            is_pad = sample["input_ids"] == self.pad_ids[kind]
            grid = sample.get(medium.inputs[1], torch.zeros(0, 3, dtype=torch.long))
            expected = int(grid.prod(dim=-1).sum()) // self.merge_size**2
            if int(is_pad.sum()) != expected or not torch.equal(sample["mm_token_type_ids"] == kind, is_pad):
                raise RuntimeError(
                    f"processor output is inconsistent: {int(is_pad.sum())} {medium.name} pad tokens, "
                    f"{expected} expected from {medium.inputs[1]}, mm_token_type_ids marking "
                    f"{int((sample['mm_token_type_ids'] == kind).sum())}"
                )

    def _truncate(self, sample: dict[str, torch.Tensor], where: Where, cache: dict | None = None,
                  media: list[dict[str, Any]] = ()) -> dict[str, torch.Tensor]:
        length = len(sample["input_ids"])
        if length <= self.max_length:
            return sample
        # Cutting through an image would leave fewer pad tokens than image features
        # ("Image features and image tokens do not match"), so only text after the
        # last <|vision_end|> may go.
        media_end = self._vision_end(sample)
        if media_end > self.max_length:
            raise where.error(
                "max_length",
                f"the sample is {length} tokens and its last image or video ends at token {media_end}, "
                f"beyond max_length {self.max_length}{self._media_note(media, cache)}: raise max_length, "
                "or lower max_pixels (images), video_max_pixels or video_max_frames (videos)",
            )
        cut = {key: sample[key][: self.max_length] for key in ("input_ids", "labels", "mm_token_type_ids")}
        if not (cut["labels"] != IGNORE_INDEX).any():
            raise where.error(
                "max_length",
                f"the sample is {length} tokens; cut to max_length {self.max_length} it keeps "
                f"no assistant token to learn",
            )
        return {**sample, **cut}

    def _media_note(self, media: list[dict[str, Any]], cache: dict | None) -> str:
        """The token counts behind a refusal: each video's, and what it would take at
        the smallest frames `video_min_pixels` allows."""
        notes = []
        smallest = self.processor.video_processor.size.shortest_edge
        for part in media:
            if part["type"] != "video":
                continue
            value, key = part["video"], _key(part["video"])
            least = _length(self._count_video_tokens(value, {"shortest_edge": smallest, "longest_edge": smallest}))
            name = value if isinstance(value, str) else f"{len(value)} frames from {_name(value[0])}"
            notes.append(f"video {name}: {_length((cache or {}).get(key, '?'))} tokens, {least} at video_min_pixels")
        return f" ({'; '.join(notes)})" if notes else ""


def _length(count: int | tuple[int, ...] | str) -> int | str:
    """A video's token count, from a count or from the ids of its placeholder."""
    return len(count) if isinstance(count, tuple) else count


def build_datasets(data_cfg: Any, processor: Any, seed: int = 0
                   ) -> tuple[ConversationDataset, ConversationDataset | None]:
    """The train and eval datasets of a ``DataConfig`` (``train_file``, ``eval_file``,
    ``eval_fraction``, ``max_length``, ``video_fps``, ``video_max_frames``); eval is None
    when there is neither an ``eval_file`` nor an ``eval_fraction``.

    `processor` comes from ``load_processor_for(model_dir, data_cfg)``, which is where
    the config's pixel bounds apply. `seed` (``train.seed``) decides which rows
    ``eval_fraction`` holds out (:func:`hold_out`). Rows are not checked here: pass
    each dataset through :func:`ft.datacheck.check_data`.
    """
    video = VideoSampling(fps=data_cfg.video_fps, max_frames=data_cfg.video_max_frames)
    train = ConversationDataset(load_rows(data_cfg.train_file), processor, data_cfg.max_length, video)
    evaluation = None
    if data_cfg.eval_file:
        evaluation = ConversationDataset(load_rows(data_cfg.eval_file), processor, data_cfg.max_length, video)
    elif getattr(data_cfg, "eval_fraction", 0):
        kept, held = hold_out(len(train), data_cfg.eval_fraction, seed)
        train, evaluation = train.select(kept), train.select(held)
    return train, evaluation


def hold_out(rows: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train rows, eval rows) of `rows` rows with `fraction` of them (rounded, at least
    one, never all) held out for evaluation: a seeded permutation's first rows, each
    list in row order. A pure function of its arguments, so every rank and every
    launch draws the same split."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    count = min(max(1, round(rows * fraction)), rows - 1)
    held = set(torch.randperm(rows, generator=generator)[:count].tolist())
    return [r for r in range(rows) if r not in held], sorted(held)
