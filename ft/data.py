"""Conversation data: JSONL rows to model inputs, and the batch collator.

(One file for one contract: the row formats, how a row becomes tokens and exact
assistant-only labels, the check that runs the same code before training, and the
collator that packs those samples; splitting them would separate a label rule from
the check that proves it.)

Pipeline:

1. :func:`load_rows` reads a JSONL file into a :class:`datasets.Dataset` holding each
   non-blank line's raw text, its file and its line number. Nothing is parsed yet.
2. :class:`ConversationDataset` turns one row into tensors on access (``__getitem__``),
   so start-up is fast and DataLoader workers do the work. A row is parsed and
   normalised (:func:`parse_row`), rendered in Qwen2.5-VL's chat format, tokenised with
   the processor, labelled and, if too long, truncated.
3. :class:`Collator` pads a list of samples into a batch of model kwargs and, when the
   batch has no image, appends a dummy image so that the vision tower runs on every
   FSDP rank.

Before training, :func:`validate` checks every row (sharded across ranks) with
:meth:`ConversationDataset.layout`: the same parsing, image and length checks as
``__getitem__`` but without pixel processing. It refuses or skips (``data.on_bad_sample``)
the rows that cannot be trained on and gives each row's length in tokens, which
length-grouped batching (:mod:`ft.sampler`) needs.

Two row formats are accepted, both normalised to the same list of messages
``{"role": "system"|"user"|"assistant", "content": [part, ...]}`` whose parts are
``{"type": "text", "text": str}`` or ``{"type": "image", "image": ABSOLUTE_PATH}``:

* OpenAI-style: ``{"messages": [{"role": ..., "content": str | [part, ...]}]}``.
* LLaVA-style: ``{"image": PATH | [PATH, ...], "conversations": [{"from":
  "human"|"gpt"|"system", "value": "<image>\\n..."}]}``; each ``<image>`` takes the next
  image in order.

Image paths resolve against the directory of the JSONL file. A bad row raises
:class:`DataError` whose message reads ``file:line: field: reason``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from typing import Any, Callable, Iterable, NamedTuple

import datasets
import torch
from PIL import Image

from ft.packing import ROW_MULTIPLE, varlen_kwargs

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
    "parse_row",
    "validate",
]

IGNORE_INDEX = -100
"""Label of positions that are not learned (the value cross-entropy ignores)."""

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
"""The system message Qwen2.5-VL's chat template inserts when a conversation has none;
training inserts it too so that prompts match those seen at inference."""

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END
"""How the chat template writes an image; the processor expands the pad token to one
token per merged patch."""

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
_LLAVA_IMAGE_RE = re.compile(r"\n?<image>\n?")


class DataError(ValueError):
    """A data row that cannot be used; the message reads ``file:line: field: reason``."""


class _Where:
    """The source of a row, for error messages."""

    def __init__(self, file: str, line: int):
        self.file, self.line = file, line

    def error(self, field: str, reason: str) -> DataError:
        return DataError(f"{self.file}:{self.line}: {field}: {reason}")


def load_rows(path: str | os.PathLike) -> datasets.Dataset:
    """Read the non-blank lines of the JSONL file `path`, unparsed.

    Returns a Dataset with columns ``file`` (the path as given), ``line`` (1-based line
    number) and ``text`` (the line). Lines are kept as strings rather than loaded with
    ``load_dataset("json")`` because that infers one schema for the whole file: rows
    whose ``content`` is a string in one place and a list in another, or whose ``image``
    is a string or a list, are refused by older ``datasets`` versions or rewritten with
    null-filled fields, and a malformed line fails the whole file without naming it.
    """
    path = os.fspath(path)
    files, lines, texts = [], [], []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{number}: row: not valid UTF-8 ({e.reason})") from e
                if number == 1:
                    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
                if text.strip():
                    files.append(path)
                    lines.append(number)
                    texts.append(text)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    if not texts:
        raise DataError(f"{path}: no rows (the file is empty)")
    return datasets.Dataset.from_dict({"file": files, "line": lines, "text": texts})


def parse_row(text: str, file: str, line: int) -> list[dict[str, Any]]:
    """Parse one JSONL line into the normalised list of messages (see the module doc).

    Image paths become absolute and must name existing files. Raises DataError for
    malformed JSON, an unknown format or role, missing or mistyped fields, a
    placeholder/image count mismatch, an image outside a user turn, control tokens in
    text, or a conversation without an assistant turn.
    """
    where = _Where(file, line)
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise where.error("row", f"invalid JSON: {e.msg} at column {e.colno}") from e
    if not isinstance(row, dict):
        raise where.error("row", f"expected a JSON object, got {type(row).__name__}")
    base = os.path.dirname(os.path.abspath(file))
    if "messages" in row:
        messages = _from_openai(row, where, base)
    elif "conversations" in row:
        messages = _from_llava(row, where, base)
    else:
        raise where.error(
            "row", "expected a 'messages' (OpenAI-style) or 'conversations' (LLaVA-style) key"
        )
    _check_conversation(messages, where, "messages" if "messages" in row else "conversations")
    return messages


def _from_openai(row: dict, where: _Where, base: str) -> list[dict[str, Any]]:
    for key in ("image", "images"):
        # A row mixing the formats would otherwise train on images silently dropped.
        if row.get(key):
            raise where.error(
                key, "'messages' rows give images as content parts "
                     "{\"type\": \"image\", \"image\": PATH}, not a top-level key"
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


def _openai_content(content: Any, where: _Where, field: str, base: str) -> list[dict[str, str]]:
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
        else:
            raise where.error(f"{part_field}.type", f"unknown part type {kind!r} (expected 'text' or 'image')")
    return parts


def _from_llava(row: dict, where: _Where, base: str) -> list[dict[str, Any]]:
    # Exports of mixed LLaVA data often write "image": null on text-only rows.
    images = row.get("image") or []
    single = isinstance(images, str)
    if single:
        images = [images]
    if not isinstance(images, list):
        raise where.error("image", f"expected a path or a list of paths, got {type(images).__name__}")
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
    placeholders = sum(turn["value"].count("<image>") for turn in turns)
    if placeholders != len(images):
        raise where.error(
            "image", f"{len(images)} image(s) but {placeholders} <image> placeholder(s) in conversations"
        )
    next_image = iter(range(len(images)))
    messages = []
    for i, turn in enumerate(turns):
        field = f"conversations[{i}].value"
        parts = []
        for k, piece in enumerate(_LLAVA_IMAGE_RE.split(turn["value"])):
            if k:
                n = next(next_image)
                parts.append(_image_part(images[n], where, "image" if single else f"image[{n}]", base))
            if piece:
                parts.append(_text_part(piece, where, field))
        messages.append({"role": _LLAVA_ROLES[turn["from"]], "content": parts})
    return messages


def _text_part(text: str, where: _Where, field: str) -> dict[str, str]:
    for token in _CONTROL_TOKENS:
        if token in text:
            raise where.error(field, f"contains the control token {token}")
    return {"type": "text", "text": text}


def _image_part(path: Any, where: _Where, field: str, base: str) -> dict[str, str]:
    if not isinstance(path, str) or not path:
        raise where.error(field, "expected an image path (a non-empty string)")
    resolved = os.path.join(base, path)  # an absolute `path` is kept as is
    if not os.path.isfile(resolved):
        raise where.error(field, f"image file not found: {resolved}")
    return {"type": "image", "image": resolved}


def _check_conversation(messages: list[dict[str, Any]], where: _Where, key: str) -> None:
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system" and i > 0:
            raise where.error(f"{key}[{i}]", "a system message must come first")
        if role != "user" and any(part["type"] == "image" for part in message["content"]):
            raise where.error(f"{key}[{i}]", f"images are only allowed in user turns, not in a {role} turn")
    if not any(message["role"] == "assistant" for message in messages):
        raise where.error(key, "no assistant turn: nothing to learn")


def _decode_image(path: str, *, reduced: bool = False) -> tuple[Image.Image, tuple[int, int]]:
    """Decode the image file `path`; return the image and the file's (width, height).

    Decoding, not just opening, is what finds a truncated file: ``Image.open`` reads
    only the header. With `reduced`, a JPEG decodes at 1/8 scale and the image returned
    is that small: for checks that need only the size, as it halves the time on a large
    photo and a truncated file still fails (every byte is still read). Raises
    ValueError naming the path and the reason when the file cannot be read.
    """
    try:
        with Image.open(path) as image:
            size = image.size
            if reduced:
                image.draft(None, (1, 1))  # formats other than JPEG ignore it
            image.load()
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return image, size


def _load_image(path: str, where: _Where) -> Image.Image:
    try:
        image, _ = _decode_image(path)
    except ValueError as e:
        raise where.error("image", str(e)) from e
    # Qwen's reference preprocessing (qwen_vl_utils.to_rgb) lays transparent images on
    # white; doing the same keeps training inputs like inference inputs.
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
        return image
    return image.convert("RGB")


def _segments(messages: list[dict[str, Any]]) -> list[tuple[str, list[str], bool]]:
    """Render the conversation as ``(text, image_paths, learned)`` segments.

    Concatenated, the texts are exactly what Qwen2.5-VL's chat template renders. A new
    segment starts where an assistant turn's content begins and after its
    ``<|im_end|>``; the learned segments are those content-plus-``<|im_end|>`` spans.
    Splitting before the content makes it tokenise as at inference, where the prompt
    ends with ``<|im_start|>assistant\\n`` and generation starts a fresh token (jointly
    tokenised, a reply starting with a newline would merge with the header's ``\\n``).
    The split after ``<|im_end|>`` is at a special token, which tokenises the same split
    or not.
    """
    segments: list[tuple[str, list[str], bool]] = []
    text, images = "", []
    if messages[0]["role"] != "system":
        text = f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n"
    for message in messages:
        text += f"{IM_START}{message['role']}\n"
        content = ""
        for part in message["content"]:
            if part["type"] == "image":
                content += IMAGE_PLACEHOLDER
                images.append(part["image"])
            else:
                content += part["text"]
        if message["role"] == "assistant":
            segments.append((text, images, False))
            segments.append((content + IM_END, [], True))
            text, images = "\n", []
        else:
            text += content + IM_END + "\n"
    segments.append((text, images, False))
    return segments


class ConversationDataset(torch.utils.data.Dataset):
    """Samples for training: one row of `rows` (from :func:`load_rows`) per index.

    Each sample is a dict of 1-D tensors ``input_ids``, ``labels`` and
    ``mm_token_type_ids`` (1 on image tokens, 0 elsewhere) and, when the row has
    images, ``pixel_values`` ``[n_patches, C]`` and ``image_grid_thw`` ``[n_images, 3]``.
    Labels are the input ids on each assistant turn's content and its closing
    ``<|im_end|>``, and IGNORE_INDEX everywhere else (system, user, turn headers, image
    tokens); they are not shifted (the model's loss shifts them).

    A sample longer than `max_length` tokens is cut at `max_length`, which must leave
    every image whole and at least one learned token; otherwise DataError.

    Any row that cannot be used raises DataError naming its ``file:line``, at access
    time too (an image deleted or overwritten after :func:`validate`): the training
    loop can catch it there without the failure being mistaken for a bug.
    """

    def __init__(self, rows: datasets.Dataset, processor: Any, max_length: int):
        self.rows = rows
        self.processor = processor
        self.max_length = max_length
        tokenizer = processor.tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.vision_end_id = tokenizer.convert_tokens_to_ids(VISION_END)
        self.merge_size = processor.image_processor.merge_size

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, indices: list[int]) -> ConversationDataset:
        """A dataset of the rows `indices` of this one, in that order."""
        return ConversationDataset(self.rows.select(indices), self.processor, self.max_length)

    def messages(self, index: int) -> list[dict[str, Any]]:
        """The normalised messages of row `index`."""
        row = self.rows[index]
        return parse_row(row["text"], row["file"], row["line"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        where = _Where(row["file"], row["line"])
        messages = parse_row(row["text"], row["file"], row["line"])
        ids, labels, mm_types, pixel_values, grids = [], [], [], [], []
        for text, paths, learned in _segments(messages):
            images = [_load_image(path, where) for path in paths]
            # One processor call per segment (a single text each) expands the image
            # pads and marks mm_token_type_ids exactly as at inference, without the
            # ragged-batch path that differs between transformers versions.
            out = self.processor(
                text=[text], images=images or None, return_tensors="pt",
                return_mm_token_type_ids=True, add_special_tokens=False,
            )
            segment_ids = out["input_ids"][0]
            ids.append(segment_ids)
            labels.append(segment_ids.clone() if learned else torch.full_like(segment_ids, IGNORE_INDEX))
            mm_types.append(out["mm_token_type_ids"][0])
            if images:
                pixel_values.append(out["pixel_values"])
                grids.append(out["image_grid_thw"])
        sample = {
            "input_ids": torch.cat(ids),
            "labels": torch.cat(labels),
            "mm_token_type_ids": torch.cat(mm_types).long(),
        }
        if grids:
            sample["pixel_values"] = torch.cat(pixel_values)
            sample["image_grid_thw"] = torch.cat(grids)
        self._check_image_tokens(sample)
        return self._truncate(sample, where)

    def layout(self, index: int, image_cache: dict[str, int | str] | None = None) -> dict[str, torch.Tensor]:
        """Sample `index`'s ``input_ids``, ``labels`` and ``mm_token_type_ids``, as
        ``self[index]`` gives them, without processing any pixels.

        Raises DataError for every row ``self[index]`` refuses (the checks are shared,
        all but the processor's own consistency check), and also for an image whose
        aspect ratio the processor refuses (``self[index]`` raises the processor's
        ValueError there). Each image's token count follows
        from its size by the image processor's resizing rule (prod(grid) / merge²),
        and its file is fully decoded (at reduced scale for a JPEG) so that a truncated
        file is found. Costs tokenising the text plus decoding each image once: several
        times cheaper than ``self[index]``, which also resizes and normalises pixels.

        `image_cache` maps image paths to their token count or the reason they cannot
        be used; pass one dict to many calls to read each image file once.
        """
        row = self.rows[index]
        where = _Where(row["file"], row["line"])
        messages = parse_row(row["text"], row["file"], row["line"])
        image_cache = {} if image_cache is None else image_cache
        ids, labels = [], []
        for text, paths, learned in _segments(messages):
            segment = self.processor.tokenizer.encode(text, add_special_tokens=False)
            if paths:
                # The processor expands each image's pad token to the image's token
                # count before tokenising; special tokens tokenise alone, so expanding
                # after tokenising gives the same ids.
                counts = iter([self._image_tokens(path, where, image_cache) for path in paths])
                segment = [t for token in segment
                           for t in ([token] * next(counts) if token == self.image_token_id else [token])]
            ids += segment
            labels += segment if learned else [IGNORE_INDEX] * len(segment)
        input_ids = torch.tensor(ids)
        sample = {
            "input_ids": input_ids,
            "labels": torch.tensor(labels),
            "mm_token_type_ids": (input_ids == self.image_token_id).long(),
        }
        return self._truncate(sample, where)

    def _image_tokens(self, path: str, where: _Where, cache: dict[str, int | str]) -> int:
        if path not in cache:
            cache[path] = self._count_image_tokens(path)
        if isinstance(cache[path], str):
            raise where.error("image", cache[path])
        return cache[path]

    def _count_image_tokens(self, path: str) -> int | str:
        """The image tokens of the image file `path`, or why it cannot be used."""
        try:
            _, (width, height) = _decode_image(path, reduced=True)
        except ValueError as e:
            return str(e)
        try:
            patches = self.processor.image_processor.get_number_of_image_patches(height, width)
        except ValueError as e:  # an aspect ratio over 200, which the resizing refuses
            return f"image {path} ({width}x{height}) cannot be processed: {e}"
        return patches // self.merge_size**2

    def _check_image_tokens(self, sample: dict[str, torch.Tensor]) -> None:
        # The model raises on a mismatch only at forward time, far from the cause.
        is_pad = sample["input_ids"] == self.image_token_id
        grid = sample.get("image_grid_thw", torch.zeros(0, 3, dtype=torch.long))
        expected = int(grid.prod(dim=-1).sum()) // self.merge_size**2
        if int(is_pad.sum()) != expected or not torch.equal(sample["mm_token_type_ids"] == 1, is_pad):
            raise RuntimeError(
                f"processor output is inconsistent: {int(is_pad.sum())} image pad tokens, "
                f"{expected} expected from image_grid_thw, mm_token_type_ids marking "
                f"{int((sample['mm_token_type_ids'] == 1).sum())}"
            )

    def _truncate(self, sample: dict[str, torch.Tensor], where: _Where) -> dict[str, torch.Tensor]:
        length = len(sample["input_ids"])
        if length <= self.max_length:
            return sample
        # Cutting through an image would leave fewer pad tokens than image features
        # ("Image features and image tokens do not match"), so only text after the
        # last <|vision_end|> may go.
        ends = (sample["input_ids"] == self.vision_end_id).nonzero()
        images_end = int(ends[-1]) + 1 if len(ends) else 0
        if images_end > self.max_length:
            raise where.error(
                "max_length",
                f"the sample is {length} tokens and its last image ends at token {images_end}, "
                f"beyond max_length {self.max_length}: raise max_length or lower max_pixels",
            )
        cut = {key: sample[key][: self.max_length] for key in ("input_ids", "labels", "mm_token_type_ids")}
        if not (cut["labels"] != IGNORE_INDEX).any():
            raise where.error(
                "max_length",
                f"the sample is {length} tokens; cut to max_length {self.max_length} it keeps "
                f"no assistant token to learn",
            )
        return {**sample, **cut}


@dataclasses.dataclass(frozen=True)
class BatchStats:
    """The work in one micro-batch, padding and the dummy image excluded: what the loop,
    the metrics and the FLOP count need to know of a batch, however its rows were built."""

    seq_lens: tuple[int, ...]
    """Real tokens of each sample (text and image tokens), in batch order."""

    label_tokens: int
    """Positions with a next-token label: the rows of the loss."""

    image_grids: tuple[tuple[int, int, int], ...]
    """(t, h, w) of each real image, in vision patches (14×14 pixels; t counts pairs
    of frames, 1 for a still image)."""

    dummy_image: bool = False
    """Whether the collator added its dummy image (the batch had none; see
    `Collator._add_dummy_image`)."""

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
        """Real tokens of the batch (text and image): the tokens/s numerator."""
        return sum(self.seq_lens)

    @property
    def patches(self) -> int:
        """Vision patches of the real images."""
        return sum(t * h * w for t, h, w in self.image_grids)


class Batch(NamedTuple):
    """What the collator returns: the model's forward kwargs, and the batch's statistics."""

    inputs: dict[str, torch.Tensor]
    stats: BatchStats


class Collator:
    """Pads samples from :class:`ConversationDataset` into one :class:`Batch`.

    ``inputs`` holds the model's forward kwargs ``input_ids``, ``attention_mask``,
    ``labels``, ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw``, and nothing
    else. Sequences are right-padded: ids with the pad id, labels with IGNORE_INDEX,
    mm_token_type_ids with 0; the attention mask is 1 on real tokens. Images are
    concatenated in sample order, the order in which the model assigns image features
    to pad tokens. ``stats`` is counted here, on the CPU, before any padding.

    Every batch carries at least one image; see :meth:`_add_dummy_image`.

    Packed (`rope_index` given, see :mod:`ft.packing`): the collator takes a list of
    packs (lists of samples) and makes one row per pack, the samples one after the
    other. Then ``inputs`` has ``position_ids`` [4, rows, length] (text positions and
    M-RoPE, restarting at 0 for every sample) and no ``attention_mask``; a shorter row
    ends in a pad segment whose positions also restart at 0, and the row length is a
    multiple of ``ft.packing.ROW_MULTIPLE``. With `varlen`, also flash-attention's
    ``cu_seq_lens_q/k`` and ``max_length_q/k`` over the flattened rows.
    """

    def __init__(self, processor: Any, rope_index: Callable | None = None, varlen: bool = False):
        self.rope_index, self.varlen = rope_index, varlen
        tokenizer = processor.tokenizer
        # Padded positions are masked out of attention and loss, so any valid id will
        # do when the tokenizer defines no pad token.
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        image_processor = processor.image_processor
        side = image_processor.patch_size * image_processor.merge_size
        # The processor resizes this up to its min_pixels: the smallest image it makes.
        black = Image.new("RGB", (side, side))
        out = processor(
            text=[IMAGE_PLACEHOLDER], images=[black], return_tensors="pt",
            return_mm_token_type_ids=True, add_special_tokens=False,
        )
        self.dummy_input_ids = out["input_ids"][0]
        self.dummy_mm_token_type_ids = out["mm_token_type_ids"][0].long()
        self.dummy_pixel_values = out["pixel_values"]
        self.dummy_image_grid_thw = out["image_grid_thw"]

    def __call__(self, samples: list) -> Batch:
        if self.rope_index is not None:
            return self._packed(samples)
        input_ids = [s["input_ids"] for s in samples]
        labels = [s["labels"] for s in samples]
        mm_types = [s["mm_token_type_ids"] for s in samples]
        pixel_values = [s["pixel_values"] for s in samples if "pixel_values" in s]
        grids = [s["image_grid_thw"] for s in samples if "image_grid_thw" in s]
        dummy = not grids
        if dummy:
            self._add_dummy_image(input_ids, labels, mm_types, pixel_values, grids)
        length = max(len(ids) for ids in input_ids)
        inputs = {
            "input_ids": _pad(input_ids, length, self.pad_id),
            "attention_mask": _pad([torch.ones_like(ids) for ids in input_ids], length, 0),
            "labels": _pad(labels, length, IGNORE_INDEX),
            "mm_token_type_ids": _pad(mm_types, length, 0),
            "pixel_values": torch.cat(pixel_values),
            "image_grid_thw": torch.cat(grids),
        }
        return Batch(inputs, _stats(samples, dummy, len(samples), length))

    def _packed(self, packs: list[list[dict[str, torch.Tensor]]]) -> Batch:
        samples = [s for p in packs for s in p]
        rows = [list(p) for p in packs]
        dummy = not any("image_grid_thw" in s for s in samples)
        if dummy:  # a segment of its own, after the first row's last sample
            rows[0].append({
                "input_ids": self.dummy_input_ids,
                "labels": torch.full_like(self.dummy_input_ids, IGNORE_INDEX),
                "mm_token_type_ids": self.dummy_mm_token_type_ids,
                "pixel_values": self.dummy_pixel_values,
                "image_grid_thw": self.dummy_image_grid_thw,
            })
        used = [sum(len(s["input_ids"]) for s in row) for row in rows]
        length = -(-max(used) // ROW_MULTIPLE) * ROW_MULTIPLE
        ids, labels, mm_types, positions, segments = [], [], [], [], []
        for row, n in zip(rows, used):
            for s in row:
                if s["labels"][0] != IGNORE_INDEX:  # what keeps the loss inside each sample
                    raise RuntimeError("a packed sample's first token has a label: the previous "
                                       "sample's last token would learn to predict it")
                positions.append(self.rope_index(s["input_ids"], s["mm_token_type_ids"], s.get("image_grid_thw")))
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
            "pixel_values": torch.cat([s["pixel_values"] for row in rows for s in row if "pixel_values" in s]),
            "image_grid_thw": torch.cat([s["image_grid_thw"] for row in rows for s in row if "image_grid_thw" in s]),
        }
        if self.varlen:
            inputs.update(varlen_kwargs(segments))
        return Batch(inputs, _stats(samples, dummy, len(rows), length))

    def _add_dummy_image(self, input_ids, labels, mm_types, pixel_values, grids) -> None:
        """Append a small black image after the first sample's last token (in place).

        Why: under FSDP every rank must run the same modules in every forward, because
        each sharded module all-gathers its parameters collectively. A rank whose batch
        had no image would skip the vision tower while the others gather its shards:
        the collectives mismatch and the job aborts (gloo) or hangs (NCCL).

        Why it changes nothing: the tokens ``<|vision_start|>``, the image pads and
        ``<|vision_end|>`` are appended after the sample's last real token, with
        attention mask 1 and label IGNORE_INDEX. Attention is causal, so no earlier
        position attends to them and every real position's output is unchanged; their
        own outputs carry no label, so the loss is unchanged; and as nothing that
        reaches the loss depends on the image, every gradient is unchanged and the
        vision tower's gradients are exactly zero. The M-RoPE positions of the real
        tokens are unchanged too: the image comes after them.
        """
        input_ids[0] = torch.cat([input_ids[0], self.dummy_input_ids])
        labels[0] = torch.cat([labels[0], torch.full_like(self.dummy_input_ids, IGNORE_INDEX)])
        mm_types[0] = torch.cat([mm_types[0], self.dummy_mm_token_type_ids])
        pixel_values.append(self.dummy_pixel_values)
        grids.append(self.dummy_image_grid_thw)


def _stats(samples: list[dict[str, torch.Tensor]], dummy: bool, rows: int, row_length: int) -> BatchStats:
    return BatchStats(
        seq_lens=tuple(len(s["input_ids"]) for s in samples),
        label_tokens=sum(int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in samples),
        image_grids=tuple(tuple(int(x) for x in g) for s in samples if "image_grid_thw" in s
                          for g in s["image_grid_thw"].tolist()),
        dummy_image=dummy, rows=rows, row_length=row_length,
    )


def _pad(sequences: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
    batch = torch.full((len(sequences), length), value, dtype=sequences[0].dtype)
    for i, sequence in enumerate(sequences):
        batch[i, : len(sequence)] = sequence
    return batch


def build_datasets(data_cfg: Any, processor: Any) -> tuple[ConversationDataset, ConversationDataset | None]:
    """The train and eval datasets of a ``DataConfig`` (``train_file``, ``eval_file``,
    ``max_length``); eval is None when ``eval_file`` is empty.

    `processor` comes from ``load_processor(model_dir, min_pixels, max_pixels)``, which
    is where the config's pixel bounds apply. Rows are not checked here: pass each
    dataset through :func:`validate`.
    """
    train = ConversationDataset(load_rows(data_cfg.train_file), processor, data_cfg.max_length)
    evaluation = None
    if data_cfg.eval_file:
        evaluation = ConversationDataset(load_rows(data_cfg.eval_file), processor, data_cfg.max_length)
    return train, evaluation


@dataclasses.dataclass
class RowCheck:
    """What :func:`check_rows` found, by row index: the length in tokens of each row
    that can be trained on, and the DataError message of each row that cannot."""

    lengths: dict[int, int] = dataclasses.field(default_factory=dict)
    errors: dict[int, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def merge(cls, parts: Iterable[RowCheck]) -> RowCheck:
        """One RowCheck of the checks of disjoint sets of rows (e.g. every rank's)."""
        merged = cls()
        for part in parts:
            merged.lengths.update(part.lengths)
            merged.errors.update(part.errors)
        return merged


class _RowChecker(torch.utils.data.Dataset):
    """Row i of `indices` -> (row index, length or None, error or None); a Dataset so
    that DataLoader workers can share the rows out."""

    def __init__(self, dataset: ConversationDataset, indices: Iterable[int]):
        self.dataset, self.indices = dataset, list(indices)
        # One cache per process (each worker fills its own): rows often share images.
        self.image_cache: dict[str, int | str] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, int | None, str | None]:
        index = self.indices[i]
        try:
            return index, len(self.dataset.layout(index, self.image_cache)["input_ids"]), None
        except DataError as e:
            return index, None, str(e)


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
    for index, length, error in results:
        if error is None:
            check.lengths[index] = length
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
    when rows were skipped (None otherwise).

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
        return dataset, [check.lengths[i] for i in range(len(dataset))], None
    file = dataset.rows[0]["file"]
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
    return dataset.select(keep), [check.lengths[i] for i in keep], note
