"""Conversation data: JSONL rows to model inputs, and the batch collator.

(One file for one contract: the row formats, how a row becomes tokens and exact
assistant-only labels, the check that runs the same code before training, and the
collator that packs those samples; splitting them would separate a label rule from
the check that proves it.)

Pipeline:

1. :func:`ft.rows.load_rows` gives the raw rows of a JSONL file or a Hugging Face
   dataset on local disk (``save_to_disk`` folder, Parquet or Arrow files), each with
   its place for error messages. Nothing is parsed yet, nothing decoded.
2. :class:`ConversationDataset` turns one row into tensors on access (``__getitem__``),
   so start-up is fast and DataLoader workers do the work. A row is parsed and
   normalised (:func:`parse`), rendered in Qwen2.5-VL's chat format, tokenised with
   the processor, labelled and, if too long, truncated.
3. :class:`Collator` pads a list of samples into a batch of model kwargs and appends a
   dummy image or video where a batch lacks one, so that every FSDP rank runs the
   vision tower the same number of times.

Before training, :func:`validate` checks every row (sharded across ranks) with
:meth:`ConversationDataset.layout`: the same parsing, image and length checks as
``__getitem__`` but without pixel processing. It refuses or skips (``data.on_bad_sample``)
the rows that cannot be trained on and gives each row's length in tokens, which
length-grouped batching (:mod:`ft.sampler`) needs.

Two row formats are accepted, both normalised to the same list of messages
``{"role": "system"|"user"|"assistant", "content": [part, ...]}`` whose parts are
``{"type": "text", "text": str}``, ``{"type": "image", "image": ABSOLUTE_PATH | bytes}``
(bytes: an image file embedded in a dataset) or ``{"type": "video", "video":
ABSOLUTE_PATH | [IMAGE, ...]}`` (a video file, or its frames in order):

* OpenAI-style: ``{"messages": [{"role": ..., "content": str | [part, ...]}]}``. TRL's
  vision format is this one with ``{"type": "image"}`` parts that take, in order, the
  images of an ``images`` column.
* LLaVA-style: ``{"image": PATH | [PATH, ...], "video": PATH, "conversations": [{"from":
  "human"|"gpt"|"system", "value": "<image>\\n..."}]}``; each ``<image>`` takes the next
  image in order, ``<video>`` the video. ``images`` works as ``image``.

Paths resolve against the directory of the JSONL file (the dataset folder, or the
Parquet/Arrow file's directory). Which frames of a video a sample takes is
:mod:`ft.video`'s business. A bad row raises :class:`DataError` whose message reads
``file:line: field: reason`` (``dataset:row N: field: reason``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
from typing import Any, Callable, Iterable, NamedTuple

import numpy
import torch
from PIL import Image

from ft.packing import ROW_MULTIPLE, varlen_kwargs
from ft.rows import DataError, Rows, Where, load_rows
from ft.video import VideoError, VideoSampling, processor_kwargs
from ft.video import probe as probe_video
from ft.video import read as read_video

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "IGNORE_INDEX",
    "Collator",
    "ConversationDataset",
    "DataError",
    "RowCheck",
    "build_datasets",
    "check_rows",
    "load_rows",
    "open_image",
    "parse",
    "parse_record",
    "parse_row",
    "validate",
    "vision_inputs",
]

IGNORE_INDEX = -100
"""Label of positions that are not learned (the value cross-entropy ignores)."""

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
"""The system message Qwen2.5-VL's chat template inserts when a conversation has none;
training inserts it too so that prompts match those seen at inference."""

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
ASSISTANT_HEADER = f"{IM_START}assistant\n"
"""What a prompt ends with, for generation to continue with the answer."""
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END
VIDEO_PLACEHOLDER = VISION_START + VIDEO_PAD + VISION_END
"""How the chat template writes an image and a video; the processor expands the pad
token to one token per merged patch (per two frames, for a video)."""

IMAGE, VIDEO = 1, 2
"""Their `mm_token_type_ids` (0 is text), and the keys of :data:`MEDIA`."""


class Medium(NamedTuple):
    """One kind of vision input: how it is written and what the model takes for it."""

    name: str
    placeholder: str
    pad: str
    inputs: tuple[str, ...]


MEDIA = {
    IMAGE: Medium("image", IMAGE_PLACEHOLDER, IMAGE_PAD, ("pixel_values", "image_grid_thw")),
    VIDEO: Medium("video", VIDEO_PLACEHOLDER, VIDEO_PAD,
                  ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")),
}
"""Each kind's placeholder and model inputs (pixels, then grids, then any more). A batch
concatenates each input in sample order: the order in which the model hands features
to pad tokens."""

# Text that contains one of these would change the structure the labels are computed
# from (a stray <|im_end|> ends a turn, a stray <|image_pad|> steals an image), so such
# rows are refused rather than tokenised as control tokens.
_CONTROL_TOKENS = (
    "<|endoftext|>", IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>",
)

_ROLES = ("system", "user", "assistant")
_LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
# LLaVA writes "<image>\n" before the question; Qwen's template puts a parts list's
# image and text side by side, so one newline on each side of the placeholder goes
# with it. That makes `<image>\nWhat?` and `[image, "What?"]` give the same tokens.
_LLAVA_MEDIA_RE = re.compile(r"\n?(<image>|<video>)\n?")


def parse_row(text: str, file: str, line: int) -> list[dict[str, Any]]:
    """Parse one JSONL line into the normalised list of messages (see the module doc).

    Image paths become absolute and must name existing files. Raises DataError for
    malformed JSON, an unknown format or role, missing or mistyped fields, a
    placeholder/image count mismatch, an image outside a user turn, control tokens in
    text, or a conversation without an assistant turn.
    """
    where = Where(file, line)
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise where.error("row", f"invalid JSON: {e.msg} at column {e.colno}") from e
    if not isinstance(row, dict):
        raise where.error("row", f"expected a JSON object, got {type(row).__name__}")
    return parse_record(row, where, os.path.dirname(os.path.abspath(file)))


def parse(rows: Rows, index: int) -> list[dict[str, Any]]:
    """The normalised messages of row `index` of `rows`, whatever their source."""
    raw = rows.raw(index)
    where = rows.where(index)
    if isinstance(raw, str):
        return parse_row(raw, where.source, where.place)
    return parse_record(raw, where, rows.base)


def parse_record(row: dict[str, Any], where: Where, base: str) -> list[dict[str, Any]]:
    """:func:`parse_row` for a row already decoded (a JSON object, or a dataset record,
    whose null fields count as absent); relative paths resolve against `base`."""
    if "messages" in row and row["messages"] is not None:
        messages = _from_openai(row, where, base)
    elif row.get("conversations") is not None:
        messages = _from_llava(row, where, base)
    else:
        raise where.error(
            "row", "expected a 'messages' (OpenAI-style) or 'conversations' (LLaVA-style) key"
        )
    _check_conversation(messages, where, "messages" if "messages" in row else "conversations")
    return messages


def _from_openai(row: dict, where: Where, base: str) -> list[dict[str, Any]]:
    row = _fill_image_placeholders(row, where)
    for key in ("image", "images", "video", "videos"):
        # A row mixing the formats would otherwise train on images silently dropped.
        if row.get(key):
            kind = key.rstrip("s")
            raise where.error(
                key, f"'messages' rows give {kind}s as content parts "
                     f"{{\"type\": \"{kind}\", \"{kind}\": PATH}}, not a top-level key"
            )
    raw_messages = row["messages"]
    if not isinstance(raw_messages, list) or not raw_messages:
        raise where.error("messages", "expected a non-empty list of messages")
    messages = []
    for i, message in enumerate(raw_messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise where.error(field, f"expected an object, got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise where.error(f"{field}.{key}", "missing")
        role = message["role"]
        if role not in _ROLES:
            raise where.error(f"{field}.role", f"unknown role {role!r} (expected one of {', '.join(_ROLES)})")
        content = _openai_content(message["content"], where, f"{field}.content", base)
        messages.append({"role": role, "content": content})
    return messages


def _fill_image_placeholders(row: dict, where: Where) -> dict:
    """TRL's vision format: ``{"type": "image"}`` parts with no image of their own take,
    in order, the images of the row's ``images`` (or ``image``) column. Returns the row
    with those parts filled in and that column removed; a row without such parts is
    returned as is."""
    key = "images" if row.get("images") is not None else "image"
    images = row.get(key)
    if images is None or not isinstance(row["messages"], list):
        return row
    images = images if isinstance(images, list) else [images]
    slots = [(i, j) for i, message in enumerate(row["messages"]) if isinstance(message, dict)
             and isinstance(message.get("content"), list)
             for j, part in enumerate(message["content"])
             if isinstance(part, dict) and part.get("type") == "image" and part.get("image") is None]
    if not slots:
        return row
    if len(slots) != len(images):
        raise where.error(key, f"{len(images)} image(s) but {len(slots)} {{\"type\": \"image\"}} "
                               "placeholder(s) in messages")
    messages = [dict(m, content=list(m["content"])) if isinstance(m, dict) and isinstance(m.get("content"), list)
                else m for m in row["messages"]]
    for (i, j), image in zip(slots, images):
        messages[i]["content"][j] = {**messages[i]["content"][j], "image": image}
    return {k: v for k, v in row.items() if k != key} | {"messages": messages}


def _openai_content(content: Any, where: Where, field: str, base: str) -> list[dict[str, str]]:
    if isinstance(content, str):
        return [_text_part(content, where, field)]
    if not isinstance(content, list):
        raise where.error(field, f"expected a string or a list of parts, got {type(content).__name__}")
    parts = []
    for j, part in enumerate(content):
        part_field = f"{field}[{j}]"
        if not isinstance(part, dict):
            raise where.error(part_field, f"expected an object, got {type(part).__name__}")
        kind = part.get("type")
        if kind == "text":
            value = part.get("text")
            if not isinstance(value, str):
                raise where.error(f"{part_field}.text", "missing or not a string")
            parts.append(_text_part(value, where, f"{part_field}.text"))
        elif kind == "image":
            parts.append(_image_part(part.get("image"), where, f"{part_field}.image", base))
        elif kind == "video":
            parts.append(_video_part(part.get("video"), where, f"{part_field}.video", base))
        else:
            raise where.error(f"{part_field}.type",
                              f"unknown part type {kind!r} (expected 'text', 'image' or 'video')")
    return parts


def _from_llava(row: dict, where: Where, base: str) -> list[dict[str, Any]]:
    # Exports of mixed LLaVA data often write "image": null on text-only rows; some
    # write a list under "images".
    images = row.get("image") or row.get("images") or []
    single = not isinstance(images, list)
    if single:
        images = [images]
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise where.error("conversations", "expected a non-empty list of turns")
    for i, turn in enumerate(turns):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise where.error(field, f"expected an object, got {type(turn).__name__}")
        for key in ("from", "value"):
            if key not in turn:
                raise where.error(f"{field}.{key}", "missing")
        if turn["from"] not in _LLAVA_ROLES:
            raise where.error(
                f"{field}.from", f"unknown role {turn['from']!r} (expected one of {', '.join(_LLAVA_ROLES)})"
            )
        if not isinstance(turn["value"], str):
            raise where.error(f"{field}.value", f"expected a string, got {type(turn['value']).__name__}")
    video = row.get("video") or None
    if video is not None and not isinstance(video, str):
        raise where.error("video", f"expected the path of one video file, got {type(video).__name__} "
                                   "(several videos, or a video as frames: use the 'messages' form)")
    videos = [video] if video else []
    for key, found in (("image", images), ("video", videos)):
        placeholders = sum(turn["value"].count(f"<{key}>") for turn in turns)
        if placeholders != len(found):
            raise where.error(
                key, f"{len(found)} {key}(s) but {placeholders} <{key}> placeholder(s) in conversations"
            )
    next_image = iter(range(len(images)))
    messages = []
    for i, turn in enumerate(turns):
        field = f"conversations[{i}].value"
        parts = []
        pieces = _LLAVA_MEDIA_RE.split(turn["value"])  # text, placeholder, text, ...
        for k, piece in enumerate(pieces):
            if k % 2 == 0:
                if piece:
                    parts.append(_text_part(piece, where, field))
            elif piece == "<video>":
                parts.append(_video_part(video, where, "video", base))
            else:
                n = next(next_image)
                parts.append(_image_part(images[n], where, "image" if single else f"image[{n}]", base))
        messages.append({"role": _LLAVA_ROLES[turn["from"]], "content": parts})
    return messages


def _text_part(text: str, where: Where, field: str) -> dict[str, str]:
    for token in _CONTROL_TOKENS:
        if token in text:
            raise where.error(field, f"contains the control token {token}")
    return {"type": "text", "text": text}


def _image_part(value: Any, where: Where, field: str, base: str) -> dict[str, str | bytes]:
    """An image: a path (relative to `base`), or an encoded image file's bytes (a
    dataset's embedded image, stored as ``{"bytes": ..., "path": ...}``)."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes) and value:
        return {"type": "image", "image": value}
    if not isinstance(value, str) or not value:
        raise where.error(field, "expected an image path (a non-empty string) or an embedded image")
    resolved = os.path.join(base, value)  # an absolute path is kept as is
    if not os.path.isfile(resolved):
        raise where.error(field, f"image file not found: {resolved}")
    return {"type": "image", "image": resolved}


def _video_part(value: Any, where: Where, field: str, base: str) -> dict[str, Any]:
    """A video file's path, or a non-empty list of its frames' image paths."""
    if isinstance(value, list):
        if not value:
            raise where.error(field, "an empty list of frames")
        return {"type": "video", "video": [_image_part(path, where, f"{field}[{k}]", base)["image"]
                                           for k, path in enumerate(value)]}
    if not isinstance(value, str) or not value:
        raise where.error(field, "expected a video file's path, or a list of its frames' image paths")
    resolved = os.path.join(base, value)
    if not os.path.isfile(resolved):
        raise where.error(field, f"video file not found: {resolved}")
    return {"type": "video", "video": resolved}


def _check_conversation(messages: list[dict[str, Any]], where: Where, key: str) -> None:
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system" and i > 0:
            raise where.error(f"{key}[{i}]", "a system message must come first")
        if role != "user" and any(part["type"] != "text" for part in message["content"]):
            raise where.error(f"{key}[{i}]",
                              f"images and videos are only allowed in user turns, not in a {role} turn")
    if not any(message["role"] == "assistant" for message in messages):
        raise where.error(key, "no assistant turn: nothing to learn")


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


def _segments(messages: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]], bool]]:
    """Render the conversation as ``(text, media, learned)`` segments, `media` being the
    segment's image and video parts in order.

    Concatenated, the texts are exactly what Qwen2.5-VL's chat template renders. A new
    segment starts where an assistant turn's content begins and after its
    ``<|im_end|>``; the learned segments are those content-plus-``<|im_end|>`` spans.
    Splitting before the content makes it tokenise as at inference, where the prompt
    ends with ``<|im_start|>assistant\\n`` and generation starts a fresh token (jointly
    tokenised, a reply starting with a newline would merge with the header's ``\\n``).
    The split after ``<|im_end|>`` is at a special token, which tokenises the same split
    or not.
    """
    segments: list[tuple[str, list[dict[str, Any]], bool]] = []
    text, media = "", []
    if messages[0]["role"] != "system":
        text = f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n"
    for message in messages:
        text += f"{IM_START}{message['role']}\n"
        content = ""
        for part in message["content"]:
            if part["type"] == "text":
                content += part["text"]
            else:
                content += IMAGE_PLACEHOLDER if part["type"] == "image" else VIDEO_PLACEHOLDER
                media.append(part)
        if message["role"] == "assistant":
            segments.append((text, media, False))
            segments.append((content + IM_END, [], True))
            text, media = "\n", []
        else:
            text += content + IM_END + "\n"
    segments.append((text, media, False))
    return segments


class ConversationDataset(torch.utils.data.Dataset):
    """Samples for training: one row of `rows` (from :func:`load_rows`) per index.

    Each sample is a dict of 1-D tensors ``input_ids``, ``labels`` and
    ``mm_token_type_ids`` (:data:`IMAGE` on image tokens, :data:`VIDEO` on video tokens,
    0 elsewhere) and, when the row has images, ``pixel_values`` ``[n_patches, C]`` and
    ``image_grid_thw`` ``[n_images, 3]``; when it has videos, ``pixel_values_videos``,
    ``video_grid_thw`` and ``second_per_grid_ts`` (seconds per temporal patch, one per
    video). Labels are the input ids on each assistant turn's content and its closing
    ``<|im_end|>``, and IGNORE_INDEX everywhere else (system, user, turn headers, image
    and video tokens); they are not shifted (the model's loss shifts them).

    A sample whose images and videos end beyond `max_length` first has its video frames
    shrunk: all its videos' frames get the largest pixel cap between
    ``video_min_pixels`` and ``video_max_pixels`` at which they fit (see
    :meth:`_fit_videos`). A sample still longer than `max_length` tokens is cut at
    `max_length`, which must leave every image and video whole and at least one learned
    token; otherwise DataError. `video` says which frames a video gives
    (``data.video_fps``, ``video_max_frames``).

    Any row that cannot be used raises DataError naming its ``file:line``, at access
    time too (an image deleted or overwritten after :func:`validate`): the training
    loop can catch it there without the failure being mistaken for a bug.

    ``media`` is filled in by :func:`validate`: the kinds of vision input (:data:`IMAGE`,
    :data:`VIDEO`) that the checked rows hold.
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
        text = "".join(segment for segment, _, _ in _segments(before)) + ASSISTANT_HEADER
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
        for text, media, learned in _segments(messages):
            images = [_load_image(part["image"], where) for part in media if part["type"] == "image"]
            clips = [self._load_video(part["video"], where) for part in media if part["type"] == "video"]
            # One processor call per segment (a single text each) expands the pads and
            # marks mm_token_type_ids exactly as at inference, without the ragged-batch
            # path that differs between transformers versions. Frames are chosen here
            # (ft.video), so the processor samples none; it sizes each frame within the
            # video pixel bounds and nothing else (no whole-video budget).
            out = self.processor(
                text=[text], images=images or None, videos=[frames for frames, _ in clips] or None,
                videos_kwargs=processor_kwargs(clips, self._size(cap)),
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

    def _load_video(self, video: str | list[str], where: Where) -> tuple[torch.Tensor, float]:
        """A video part's frames (uint8 [T, 3, H, W]) and their rate in frames per second."""
        if isinstance(video, str):
            try:
                return read_video(video, self.video)
            except VideoError as e:
                raise where.error("video", str(e)) from e
        frames = [_load_image(video[i], where) for i in self.video.indices(len(video), None)]
        if len({f.size for f in frames}) > 1:
            raise where.error("video", self._frame_sizes(video))
        stacked = torch.stack([torch.from_numpy(numpy.array(f)) for f in frames]).permute(0, 3, 1, 2)
        return stacked.contiguous(), self.video.sampled_fps(len(video), None)

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
        return self._truncate(sample, where, cache, media=[p for _, m, _ in _segments(messages) for p in m])

    def _count(self, messages: list[dict[str, Any]], where: Where, cache: dict[Any, int | str],
               cap: int | None) -> dict[str, torch.Tensor]:
        """:meth:`layout`'s sample before truncation, video frames at most `cap` pixels."""
        ids, labels = [], []
        for text, media, learned in _segments(messages):
            segment = self.processor.tokenizer.encode(text, add_special_tokens=False)
            if media:
                # The processor expands each pad token to its image's or video's token
                # count before tokenising; special tokens tokenise alone, so expanding
                # after tokenising gives the same ids.
                counts = iter([self._tokens(part, where, cache, cap) for part in media])
                pads = set(self.pad_ids.values())
                segment = [t for token in segment
                           for t in ([token] * next(counts) if token in pads else [token])]
            ids += segment
            labels += segment if learned else [IGNORE_INDEX] * len(segment)
        input_ids = torch.tensor(ids)
        mm_types = torch.zeros_like(input_ids)
        for kind, pad in self.pad_ids.items():
            mm_types[input_ids == pad] = kind
        return {"input_ids": input_ids, "labels": torch.tensor(labels), "mm_token_type_ids": mm_types}

    def _tokens(self, part: dict[str, Any], where: Where, cache: dict[Any, int | str], cap: int | None) -> int:
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

    def _count_video_tokens(self, video: str | list | tuple, size: dict | None = None) -> int | str:
        """The video tokens of a video file or frame list, or why it cannot be used.
        `size` overrides the video processor's pixel bounds."""
        if isinstance(video, str):
            try:
                info = probe_video(video)
            except VideoError as e:
                return str(e)
            frames, width, height = self.video.count(info.frames, info.rate), info.width, info.height
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
        # The video processor's own resizing rule. (Its get_num_of_video_patches reads
        # the bounds from `size` in transformers 5.24 but from min_pixels/max_pixels in
        # 5.17, so it is not asked.)
        # Imported here: the module needs torchvision, which ft.processor.require checks
        # at start-up with a readable message; importing ft.data must not need it.
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

        processor = self.processor.video_processor
        bounds = size or processor.size
        try:
            height, width = smart_resize(height, width, processor.patch_size * self.merge_size,
                                         min_pixels=bounds["shortest_edge"], max_pixels=bounds["longest_edge"])
        except ValueError as e:
            return f"video {video if isinstance(video, str) else _name(video[0])} ({width}x{height}) cannot be processed: {e}"
        patches = frames // processor.temporal_patch_size * (height // processor.patch_size) * (width // processor.patch_size)
        return patches // self.merge_size**2

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
            least = self._count_video_tokens(value, {"shortest_edge": smallest, "longest_edge": smallest})
            name = value if isinstance(value, str) else f"{len(value)} frames from {_name(value[0])}"
            notes.append(f"video {name}: {(cache or {}).get(key, '?')} tokens, {least} at video_min_pixels")
        return f" ({'; '.join(notes)})" if notes else ""


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


class Collator:
    """Pads samples from :class:`ConversationDataset` into one :class:`Batch`.

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
    multiple of ``ft.packing.ROW_MULTIPLE``. With `varlen`, also flash-attention's
    ``cu_seq_lens_q/k`` and ``max_length_q/k`` over the flattened rows.
    """

    def __init__(self, processor: Any, rope_index: Callable | None = None, varlen: bool = False,
                 media: Iterable[int] = (IMAGE,)):
        self.rope_index, self.varlen = rope_index, varlen
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
                             videos_kwargs=processor_kwargs([(two_frames, 2.0)]),
                             return_tensors="pt", return_mm_token_type_ids=True, add_special_tokens=False),
        }
        self.dummies = {kind: {"input_ids": out["input_ids"][0],
                               "labels": torch.full_like(out["input_ids"][0], IGNORE_INDEX),
                               "mm_token_type_ids": out["mm_token_type_ids"][0].long(),
                               **{key: torch.as_tensor(out[key]) for key in MEDIA[kind].inputs}}
                        for kind, out in made.items()}

    def __call__(self, samples: list) -> Batch:
        if self.rope_index is not None:
            return self._packed(samples)
        dummies = self._dummies(samples)
        # The dummies go after the first sample's last token (see _dummies).
        first = {key: torch.cat([samples[0][key]] + [d[key] for d in dummies])
                 for key in ("input_ids", "labels", "mm_token_type_ids")}
        rows = [first] + list(samples[1:])
        length = max(len(s["input_ids"]) for s in rows)
        inputs = {
            "input_ids": _pad([s["input_ids"] for s in rows], length, self.pad_id),
            "attention_mask": _pad([torch.ones_like(s["input_ids"]) for s in rows], length, 0),
            "labels": _pad([s["labels"] for s in rows], length, IGNORE_INDEX),
            "mm_token_type_ids": _pad([s["mm_token_type_ids"] for s in rows], length, 0),
            **vision_inputs(list(samples) + dummies),
        }
        return Batch(inputs, _stats(samples, dummies, len(samples), length))

    def _packed(self, packs: list[list[dict[str, torch.Tensor]]]) -> Batch:
        samples = [s for p in packs for s in p]
        rows = [list(p) for p in packs]
        dummies = self._dummies(samples)
        rows[0] += dummies  # segments of their own, after the first row's last sample
        used = [sum(len(s["input_ids"]) for s in row) for row in rows]
        length = -(-max(used) // ROW_MULTIPLE) * ROW_MULTIPLE
        ids, labels, mm_types, positions, segments = [], [], [], [], []
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
        return Batch(inputs, _stats(samples, dummies, len(rows), length))

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


def build_datasets(data_cfg: Any, processor: Any, seed: int = 0
                   ) -> tuple[ConversationDataset, ConversationDataset | None]:
    """The train and eval datasets of a ``DataConfig`` (``train_file``, ``eval_file``,
    ``eval_fraction``, ``max_length``, ``video_fps``, ``video_max_frames``); eval is None
    when there is neither an ``eval_file`` nor an ``eval_fraction``.

    `processor` comes from ``load_processor_for(model_dir, data_cfg)``, which is where
    the config's pixel bounds apply. `seed` (``train.seed``) decides which rows
    ``eval_fraction`` holds out (:func:`hold_out`). Rows are not checked here: pass
    each dataset through :func:`validate`.
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


@dataclasses.dataclass
class RowCheck:
    """What :func:`check_rows` found, by row index: the length in tokens of each row
    that can be trained on, the kinds of vision input (:data:`IMAGE`, :data:`VIDEO`) in
    each, and the DataError message of each row that cannot."""

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


def validate(
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
        raise ValueError("validate on several ranks needs `gather` to merge the ranks' checks")
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
