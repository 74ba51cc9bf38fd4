"""Row formats to normalised messages, and the Qwen VL chat format.

Imports no torch: reading a row needs only the standard library.

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
:mod:`ft.video`'s business. A bad row raises :class:`ft.rows.DataError` whose message
reads ``file:line: field: reason`` (``dataset:row N: field: reason``).

:func:`render_segments` writes the normalised messages in the chat format, split where
the learned spans begin and end: what :mod:`ft.dataset` tokenises and labels.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, NamedTuple

from ft.rows import Rows, Where

__all__ = [
    "ASSISTANT_HEADER",
    "DEFAULT_SYSTEM_PROMPT",
    "IGNORE_INDEX",
    "IMAGE",
    "MEDIA",
    "VIDEO",
    "Medium",
    "parse",
    "parse_record",
    "parse_row",
    "render_segments",
]

IGNORE_INDEX = -100
"""Label of positions that are not learned (the value cross-entropy ignores)."""

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
"""The system message Qwen2-VL's and Qwen2.5-VL's chat templates insert when a
conversation has none; training inserts it too so that prompts match those seen at
inference (Qwen3-VL's inserts none: `ft.families.Family.default_system`)."""

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


def render_segments(messages: list[dict[str, Any]], default_system: str | None = DEFAULT_SYSTEM_PROMPT
                    ) -> list[tuple[str, list[dict[str, Any]], bool]]:
    """Render the conversation as ``(text, media, learned)`` segments, `media` being the
    segment's image and video parts in order.

    Concatenated, the texts are exactly what the family's chat template renders (a
    conversation without a system message gets `default_system`, when not None:
    `ft.families.Family.default_system`). A new
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
    if messages[0]["role"] != "system" and default_system is not None:
        text = f"{IM_START}system\n{default_system}{IM_END}\n"
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
