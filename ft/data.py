"""Conversation data: JSONL rows to model inputs, and the batch collator.

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

import json
import os
import re
from typing import Any

import datasets
import torch
from PIL import Image

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "IGNORE_INDEX",
    "Collator",
    "ConversationDataset",
    "DataError",
    "build_datasets",
    "load_rows",
    "parse_row",
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


def _load_image(path: str, where: _Where) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, Image.DecompressionBombError) as e:
        raise where.error("image", f"cannot read image {path}: {e}") from e
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


class Collator:
    """Pads samples from :class:`ConversationDataset` into one batch.

    The batch holds the model's forward kwargs ``input_ids``, ``attention_mask``,
    ``labels``, ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw``, plus
    ``num_real_tokens`` (0-d: tokens of the samples, without padding or a dummy image),
    which the training loop pops before the forward. Sequences are right-padded: ids
    with the pad id, labels with IGNORE_INDEX, mm_token_type_ids with 0; the attention
    mask is 1 on real tokens. Images are concatenated in sample order, the order in
    which the model assigns image features to pad tokens.

    Every batch carries at least one image; see :meth:`_add_dummy_image`.
    """

    def __init__(self, processor: Any):
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

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        input_ids = [s["input_ids"] for s in samples]
        labels = [s["labels"] for s in samples]
        mm_types = [s["mm_token_type_ids"] for s in samples]
        pixel_values = [s["pixel_values"] for s in samples if "pixel_values" in s]
        grids = [s["image_grid_thw"] for s in samples if "image_grid_thw" in s]
        num_real_tokens = sum(len(ids) for ids in input_ids)
        if not grids:
            self._add_dummy_image(input_ids, labels, mm_types, pixel_values, grids)
        length = max(len(ids) for ids in input_ids)
        return {
            "input_ids": _pad(input_ids, length, self.pad_id),
            "attention_mask": _pad([torch.ones_like(ids) for ids in input_ids], length, 0),
            "labels": _pad(labels, length, IGNORE_INDEX),
            "mm_token_type_ids": _pad(mm_types, length, 0),
            "pixel_values": torch.cat(pixel_values),
            "image_grid_thw": torch.cat(grids),
            "num_real_tokens": torch.tensor(num_real_tokens),
        }

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


def _pad(sequences: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
    batch = torch.full((len(sequences), length), value, dtype=sequences[0].dtype)
    for i, sequence in enumerate(sequences):
        batch[i, : len(sequence)] = sequence
    return batch


def build_datasets(data_cfg: Any, processor: Any) -> tuple[ConversationDataset, ConversationDataset | None]:
    """The train and eval datasets of a ``DataConfig`` (``train_file``, ``eval_file``,
    ``max_length``); eval is None when ``eval_file`` is empty.

    `processor` comes from ``load_processor(model_dir, min_pixels, max_pixels)``, which
    is where the config's pixel bounds apply.
    """
    train = ConversationDataset(load_rows(data_cfg.train_file), processor, data_cfg.max_length)
    evaluation = None
    if data_cfg.eval_file:
        evaluation = ConversationDataset(load_rows(data_cfg.eval_file), processor, data_cfg.max_length)
    return train, evaluation
