"""Load and export the official processor of a Qwen VL model (tokenizer, image and video
processors).

The processor is transformers' own class for the model's family (`ft.families`:
``Qwen2_5_VLProcessor`` for Qwen2.5-VL, ``Qwen3VLProcessor`` for Qwen3-VL), built from
``AutoTokenizer``, ``AutoImageProcessor`` and ``AutoVideoProcessor`` so that images and
video frames get separate pixel bounds (``data.min_pixels``/``max_pixels`` and
``data.video_min_pixels``/``video_max_pixels``); ``AutoProcessor.from_pretrained`` would
give both the same. What this module adds to transformers: a start-up check that
torchvision imports (both processors need it, and without it the failure would come
from deep inside the first sample), a check that the tokenizer's special tokens match
the model config, and the export of the processor files next to fine-tuned weights.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ft.deps import require
from ft.families import family_of

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


def _read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: load_processor checks the tokenizer against the model config")
    return json.loads(path.read_text(encoding="utf-8"))


def check_processor(processor, model_dir: str | os.PathLike) -> None:
    """Raise ValueError if the tokenizer or the image or video processor disagree with the model config.

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
    for kind in ("image", "video"):
        part = getattr(processor, f"{kind}_processor", None)
        for ip_attr, cfg_key in (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                                 ("temporal_patch_size", "temporal_patch_size")):
            if part is not None and cfg_key in vision and getattr(part, ip_attr, vision[cfg_key]) != vision[cfg_key]:
                problems.append(f"{kind} processor {ip_attr}={getattr(part, ip_attr)} but "
                                f"vision_config {cfg_key}={vision[cfg_key]}")
    if problems:
        raise ValueError(f"processor files in {model_dir} do not match its config.json:\n  " + "\n  ".join(problems))


def load_processor(
    model_dir: str | os.PathLike,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    video_min_pixels: int | None = None,
    video_max_pixels: int | None = None,
):
    """The processor of `model_dir` (its family's class), checked against its config.json.

    ``min_pixels``/``max_pixels`` (still images) and ``video_min_pixels``/
    ``video_max_pixels`` (each video frame), when given, override the saved size bounds
    (``size={"shortest_edge": min, "longest_edge": max}``): they decide how many tokens
    a picture or a frame becomes. Raises MissingDependency when torchvision does not
    load.
    """
    require("torchvision", "the Qwen VL image and video processors of transformers")
    from transformers import AutoImageProcessor, AutoTokenizer, AutoVideoProcessor

    model_dir = Path(model_dir)
    family = family_of(_read_config(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = _sized(AutoImageProcessor, model_dir, min_pixels, max_pixels)
    # A checkpoint without video_preprocessor_config.json (some older exports) gets the
    # video processor's defaults, which share the image processor's patch geometry.
    video_processor = _sized(AutoVideoProcessor, model_dir, video_min_pixels, video_max_pixels)
    # Processor-level chat template (chat_template.json, older checkpoints) wins over
    # none at all; the tokenizer's own template (chat_template.jinja) is the usual source.
    processor = family.processor_class()(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=_processor_chat_template(model_dir) or getattr(tokenizer, "chat_template", None),
    )
    check_processor(processor, model_dir)
    return processor


def load_processor_for(model_dir: str | os.PathLike, data_cfg):
    """:func:`load_processor` with a run's ``DataConfig`` pixel bounds: what training
    uses (and, through :func:`training_settings`, what its exports record)."""
    return load_processor(model_dir, data_cfg.min_pixels, data_cfg.max_pixels,
                          data_cfg.video_min_pixels, data_cfg.video_max_pixels)


def _sized(auto_class, model_dir: Path, low: int | None, high: int | None):
    """`auto_class`'s processor of `model_dir` with its pixel bounds replaced (None keeps
    the saved one), checked: transformers 5.25's Qwen2-VL processors let the saved flat
    `min_pixels`/`max_pixels` keys win over a `size` argument, while Qwen3-VL's video
    processor ignores flat `min_pixels`/`max_pixels` arguments and reads `size` alone.
    So `size` is tried, then the flat keys, and the one that took is kept."""
    processor = auto_class.from_pretrained(model_dir)
    if low is None and high is None:
        return processor
    want = (processor.size["shortest_edge"] if low is None else low,
            processor.size["longest_edge"] if high is None else high)
    for kwargs in ({"size": {"shortest_edge": want[0], "longest_edge": want[1]}},
                   {"min_pixels": want[0], "max_pixels": want[1]}):
        processor = auto_class.from_pretrained(model_dir, **kwargs)
        if (processor.size["shortest_edge"], processor.size["longest_edge"]) == want:
            return processor
    raise ValueError(f"{model_dir}: {type(processor).__name__} keeps its saved pixel bounds "
                     f"{processor.size['shortest_edge']}..{processor.size['longest_edge']}; asked for "
                     f"{want[0]}..{want[1]}")


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


def training_settings(data_cfg) -> dict[str, dict]:
    """What a run's ``DataConfig`` changed in the processor, by processor file: the pixel
    bounds of images and of video frames, and the video frame rate and frame cap. Written
    into an export (:func:`export_processor_files`) so that ``AutoProcessor`` on it
    prepares inputs as training did, not as the base model's files say."""

    def bounds(low: int, high: int) -> dict:
        return {"size": {"shortest_edge": low, "longest_edge": high}, "min_pixels": low, "max_pixels": high}

    return {
        "preprocessor_config.json": bounds(data_cfg.min_pixels, data_cfg.max_pixels),
        "video_preprocessor_config.json": {**bounds(data_cfg.video_min_pixels, data_cfg.video_max_pixels),
                                           "fps": data_cfg.video_fps, "max_frames": data_cfg.video_max_frames},
    }


def saved_video_sampling(model_dir: str | os.PathLike, fps: float | None = None, max_frames: int | None = None):
    """How to take frames from a video for the model in `model_dir`: `fps` and
    `max_frames` when given, else what its video_preprocessor_config.json records (ft's
    exports write the run's ``data.video_fps`` and ``video_max_frames`` there), else
    ft's defaults; the frame count stays a multiple of the model's temporal patch size."""
    from ft.video import VideoSampling

    model_dir = Path(model_dir)
    saved = _json_or_empty(model_dir / "video_preprocessor_config.json")
    vision = _json_or_empty(model_dir / "config.json").get("vision_config") or {}
    default = VideoSampling()
    return VideoSampling(
        fps=float(fps if fps is not None else saved.get("fps") or default.fps),
        max_frames=int(max_frames if max_frames is not None else saved.get("max_frames") or default.max_frames),
        temporal=int(vision.get("temporal_patch_size", saved.get("temporal_patch_size", default.temporal))))


def _json_or_empty(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def export_processor_files(src_model_dir: str | os.PathLike, dst_dir: str | os.PathLike,
                           settings: dict[str, dict] | None = None) -> list[str]:
    """Copy the source model's processor/tokenizer files into an exported model folder.

    Everything in the top level of ``src_model_dir`` except weights, weight indexes,
    config.json, generation_config.json, README.md (the base model's card does not
    describe the fine-tune) and hidden files is copied (symlinks, as in the HF cache,
    are resolved). Then every ``processor_class`` entry is made to name the family's
    processor class (``Qwen2_5_VLProcessor`` for Qwen2.5-VL): a subclass name there
    (ours, if a processor object was saved) makes AutoProcessor silently return the
    bare tokenizer. `settings` (see
    :func:`training_settings`) maps a copied JSON file's name to keys to set in it.
    Files that already name the class and get no settings are left byte-for-byte
    unchanged.

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
    processor_class = family_of(_read_config(src)).processor
    for name in copied:
        if name.endswith(".json"):
            _update_json(dst / name, (settings or {}).get(name, {}), processor_class)
    return copied


def _update_json(path: Path, settings: dict, processor_class: str) -> None:
    """Make `path`'s processor_class read `processor_class` and set `settings` in it;
    rewrite the file only if that changes something."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return  # not a JSON config (e.g. an unusual vocab file): copy as is
    if not isinstance(data, dict):
        return
    updated = {**data, **settings}
    if "processor_class" in data:
        updated["processor_class"] = processor_class
    if updated != data:
        path.write_text(json.dumps(updated, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
