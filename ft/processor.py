"""Load and export the Qwen2.5-VL processor (tokenizer + image processor).

Why not just ``AutoProcessor.from_pretrained``: for Qwen2.5-VL it also builds the video
processor, which needs torchvision (the PyPI wheel does not import with the CPU torch
build) and a video_preprocessor_config.json; ``Qwen2_5_VLProcessor(...,
video_processor=None)`` is refused by the class check. Image fine-tuning never uses
video, so this module builds the processor from its two real parts:
``AutoTokenizer`` and ``AutoImageProcessor`` (which picks the torchvision image
processor where torchvision works and the PIL one otherwise, just as AutoProcessor
would). Returning the same class everywhere also means ``mm_token_type_ids`` (needed
for M-RoPE positions) is always requested, whatever the transformers version's default.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor

PROCESSOR_CLASS = "Qwen2_5_VLProcessor"

# Model-config key -> token the tokenizer must map to that id.
_CONFIG_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
# Chat-format tokens the config does not name, which must still be single tokens.
_CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")

# Files of a model folder that describe the network, not the processor.
_MODEL_FILES = {"config.json", "generation_config.json", "README.md"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without the video part.

    transformers derives a processor's parts from its ``__init__`` signature (5.x) or
    its ``attributes`` list (earlier releases); declaring only the image processor and
    tokenizer in both makes the parent's ``video_processor`` argument be ignored
    instead of class-checked.
    """

    attributes = ["image_processor", "tokenizer"]
    video_processor = None

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(self, *args, **kwargs):
        # transformers 5.24 returns mm_token_type_ids by default for this processor,
        # earlier 5.x releases only on request; without it the model silently falls
        # back to 1-D positions, so always ask.
        kwargs.setdefault("return_mm_token_type_ids", True)
        return super().__call__(*args, **kwargs)


def _read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: load_processor checks the tokenizer against the model config")
    return json.loads(path.read_text(encoding="utf-8"))


def check_processor(processor, model_dir: str | os.PathLike) -> None:
    """Raise ValueError if the tokenizer or image processor disagree with the model config.

    A wrong special-token id does not crash: the model just never finds its image
    tokens (or finds the wrong ones), so check before training rather than after.
    """
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    tokenizer = processor.tokenizer

    def single_id(token: str) -> int | None:
        # Encoding the literal text checks more than convert_tokens_to_ids: the token
        # must also be registered as an added token, or the BPE would split it.
        ids = tokenizer.encode(token, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    problems = []
    for key, token in _CONFIG_TOKENS.items():
        if key not in config:
            continue
        got = single_id(token)
        if got != config[key]:
            problems.append(f"{token} encodes to {tokenizer.encode(token, add_special_tokens=False)}, "
                            f"config.json {key} is {config[key]}")
    for token in _CHAT_TOKENS:
        if single_id(token) is None:
            problems.append(f"{token} is not a single token "
                            f"(encodes to {tokenizer.encode(token, add_special_tokens=False)})")

    vision = config.get("vision_config", {})
    image_processor = processor.image_processor
    for ip_attr, cfg_key in (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                             ("temporal_patch_size", "temporal_patch_size")):
        if cfg_key in vision and getattr(image_processor, ip_attr, vision[cfg_key]) != vision[cfg_key]:
            problems.append(f"image processor {ip_attr}={getattr(image_processor, ip_attr)} but "
                            f"vision_config {cfg_key}={vision[cfg_key]}")
    if problems:
        raise ValueError(f"processor files in {model_dir} do not match its config.json:\n  " + "\n  ".join(problems))


def load_image_processor(model_dir: str | os.PathLike, **overrides):
    """``AutoImageProcessor.from_pretrained``, which picks the torchvision processor
    where torchvision imports and the PIL one otherwise — except that some 5.x releases
    (5.17) raise ImportError instead of falling back. The PIL processor gives the same
    pixels (2.4e-7 apart), so load it directly there."""
    try:
        return AutoImageProcessor.from_pretrained(model_dir, **overrides)
    except ImportError as e:
        if "orchvision" not in str(e):
            raise
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil.from_pretrained(model_dir, **overrides)


def load_processor(
    model_dir: str | os.PathLike,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> Qwen2_5_VLImageOnlyProcessor:
    """Tokenizer + image processor of ``model_dir`` as one Qwen2.5-VL processor.

    ``min_pixels``/``max_pixels``, when given, override the saved image size bounds
    (``size={"shortest_edge": min_pixels, "longest_edge": max_pixels}``); they decide
    how many image tokens each picture becomes.
    """
    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Passed as init kwargs they replace the saved values under both spellings the
    # image processor understands (flat keys in older releases, `size` in newer ones).
    overrides = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    image_processor = load_image_processor(model_dir, **overrides)
    # Processor-level chat template (chat_template.json, older checkpoints) wins over
    # none at all; the tokenizer's own template (chat_template.jinja) is the usual source.
    processor = Qwen2_5_VLImageOnlyProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=_processor_chat_template(model_dir) or getattr(tokenizer, "chat_template", None),
    )
    check_processor(processor, model_dir)
    return processor


def _processor_chat_template(model_dir: Path) -> str | None:
    legacy = model_dir / "chat_template.json"
    if legacy.is_file():
        return json.loads(legacy.read_text(encoding="utf-8")).get("chat_template")
    return None


def _is_processor_file(path: Path) -> bool:
    name = path.name
    if not path.is_file() or name.startswith(".") or name in _MODEL_FILES:
        return False
    return not name.endswith(_WEIGHT_SUFFIXES)


def export_processor_files(src_model_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy the source model's processor/tokenizer files into an exported model folder.

    Everything in the top level of ``src_model_dir`` except weights, weight indexes,
    config.json, generation_config.json, README.md (the base model's card does not
    describe the fine-tune) and hidden files is copied (symlinks, as in the HF cache,
    are resolved). Then every ``processor_class`` entry is made to read
    ``Qwen2_5_VLProcessor``: a subclass name there (ours, if a processor object was
    saved) makes AutoProcessor silently return the bare tokenizer. Files that already
    name it are left byte-for-byte unchanged.

    Returns the names of the files copied.
    """
    src, dst = Path(src_model_dir).resolve(), Path(dst_dir).resolve()
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(src.iterdir()):
        if _is_processor_file(path):
            if src != dst:
                shutil.copyfile(path, dst / path.name)
            copied.append(path.name)
    for name in copied:
        if name.endswith(".json"):
            _fix_processor_class(dst / name)
    return copied


def _fix_processor_class(path: Path) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return  # not a JSON config (e.g. an unusual vocab file): copy as is
    if isinstance(data, dict) and "processor_class" in data and data["processor_class"] != PROCESSOR_CLASS:
        data["processor_class"] = PROCESSOR_CLASS
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
