"""Build a tiny, randomly initialised Qwen VL checkpoint (Qwen2-VL, Qwen2.5-VL or Qwen3-VL:
`ft.families`) that loads like a real one.

(Long because it rebuilds the real Qwen2 tokenizer offline as well as the model: both
are one artefact, the demo checkpoint.)

The tiny model keeps every structural feature of its family the training loop depends
on (vision tower with Qwen2.5-VL's windowed and full-attention blocks or Qwen3-VL's
DeepStack mergers, patch merger, M-RoPE, tied or untied LM head, Qwen's special-token
ids) at a size that runs on a CPU in milliseconds.

Two vocabularies:
  * ``"real"``: Qwen2's actual 151,643-token BPE, rebuilt offline from the
    ``qwen.tiktoken`` rank file bundled in the ``dashscope`` wheel, with the special
    tokens at Qwen's real ids and the embedding padded to 151,936 rows like the
    released checkpoints. Slow-ish (about 2 s CPU per forward) but faithful.
  * ``"small"``: a ~1k-token byte-level BPE trained on a built-in text, special tokens
    appended right after it. Fast; meant for unit tests.

Its command line is `ft.tiny` (``python -m ft.tiny OUT_DIR ...``); loop, tests and benchmarks
import this module.
"""

from __future__ import annotations

import base64
import errno
import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from ft.families import DEFAULT_FAMILY, family_named, family_of

# Qwen2's special tokens, in id order. The first 14 are "special" (never split, skipped
# when decoding with skip_special_tokens); the last 8 are plain added tokens, as in the
# released tokenizer_config.json.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
ADDED_TOKENS = [
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]

# Qwen2's pre-tokenizer split pattern (published with the model); the byte-level BPE
# only ever merges inside these pieces.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

REAL_VOCAB_SIZE = 151936  # embedding rows of Qwen2.5-VL-3B: the tokenizer's 151,665 ids, padded
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 448 * 448  # small images keep CPU steps fast

# The Qwen VL conversation format. Every literal is emitted through an expression with
# explicit "\n", so the output does not depend on the jinja whitespace options of the
# renderer (transformers uses trim_blocks/lstrip_blocks, other tools may not).
_DEFAULT_SYSTEM = (
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
)
_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "DEFAULT_SYSTEM"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or 'video' in part %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part %}"
    "{{- part['text'] }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def chat_template(default_system: bool = True) -> str:
    """The tiny model's chat template: Qwen2-VL's and Qwen2.5-VL's insert the default
    system message into a conversation without one, Qwen3-VL's does not
    (`ft.families.Family.default_system`)."""
    return _CHAT_TEMPLATE.replace("DEFAULT_SYSTEM", _DEFAULT_SYSTEM if default_system else "")


# Training text for the small vocabulary, written for this project: captions, questions
# and training vocabulary, so typical test strings tokenize into few pieces.
SMALL_VOCAB_TEXT = """\
The photograph shows a small red boat resting on the sand near the water. Behind it, a
row of wooden houses faces the harbour, and a few clouds drift across a pale blue sky.
Two people walk along the shore with a dog, and the light suggests late afternoon.

A vision language model reads an image and a question, then writes an answer. The image
is cut into square patches; each patch becomes a vector, and neighbouring patches are
merged before they reach the language model. Text and image tokens then share one
sequence, and the model predicts the next token one step at a time.

Fine-tuning adjusts the weights of a pretrained model on a new dataset. Each training
step draws a batch of examples, computes the loss on the answer tokens only, and moves
the parameters a little against the gradient. Sharding the parameters, gradients and
optimizer state across several devices lets a large model fit in memory.

What colour is the car in the picture? The car is blue. How many birds are sitting on
the wire? There are three birds. Describe the scene in one sentence. A cat sleeps on a
chair next to an open window while rain falls outside. Is there a clock on the wall?
Yes, a round clock hangs above the door and shows ten past nine.

Numbers and symbols appear too: 0 1 2 3 4 5 6 7 8 9, 12.5%, (a), [b], {c}, x = y + 1,
"quoted text", it's, they're, we'll, I'm, you've, she'd. Coffee, rocket, astronaut,
coins, camera, brick, grass, gravel, text, cell, retina, galaxy, stars and planets.
"""


# --------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def qwen_tiktoken_path() -> Path:
    """Locate dashscope's bundled ``qwen.tiktoken`` without importing dashscope (its
    import pulls network-client dependencies that are deliberately not installed)."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "vocab='real' needs the Qwen2 BPE ranks from the dashscope wheel: "
            "pip install --no-deps dashscope==2.0.2 (or use vocab='small')"
        )
    path = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed dashscope package")
    return path


def _real_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Qwen2's regular vocabulary and BPE merges, rebuilt from tiktoken ranks.

    tiktoken stores only token -> rank; a merge list is implied: each multi-byte token is
    the result of merging the two pieces that byte-level BPE reaches when it may only use
    merges of lower rank. Replaying BPE per token recovers that last pair. Listing the
    pairs in rank order gives HF's BPE the same merge priorities tiktoken uses.
    """
    ranks: dict[bytes, int] = {}
    with open(qwen_tiktoken_path(), "rb") as f:
        for line in f:
            if line.strip():
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64)] = int(rank)

    to_unicode = _bytes_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        # Merge the lowest-ranked adjacent pair until two pieces remain; those two can
        # only be joined by this token's own rank, so they are its merge.
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token rank {rank} is not reachable by BPE merges; the rank file looks corrupt")
        merges.append((as_text(parts[0]), as_text(parts[1])))

    vocab = {as_text(token): rank for token, rank in ranks.items()}
    return vocab, merges


def _small_vocab_and_merges(vocab_size: int = 1000) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE trained on SMALL_VOCAB_TEXT with Qwen2's pre-tokenizer.

    The trainer is deterministic for a fixed text and settings, so every build yields
    the same vocabulary (tests compare two builds' tokenizer.json byte for byte). The
    text is short, so training stops below ``vocab_size`` once no pair repeats.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SMALL_VOCAB_TEXT.splitlines(keepends=True), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def build_tokenizer(vocab: str = "real"):
    """A Qwen2 tokenizer (transformers' ``Qwen2Tokenizer``) with the chat template set.

    The special tokens are put into the BPE vocabulary at their final ids before the
    tokenizer is constructed; added later, the constructor would give them whatever ids
    come next in its own order (``<|im_end|>`` would not land on 151645).
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    if vocab == "real":
        regular, merges = _real_vocab_and_merges()
    elif vocab == "small":
        regular, merges = _small_vocab_and_merges()
    else:
        raise ValueError(f"vocab must be 'real' or 'small', not {vocab!r}")

    first_special = len(regular)
    full_vocab = dict(regular)
    for offset, token in enumerate(SPECIAL_TOKENS + ADDED_TOKENS):
        full_vocab[token] = first_special + offset

    tokenizer = Qwen2Tokenizer(
        vocab=full_vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=SPECIAL_TOKENS[1:],  # <|endoftext|> is already the pad token
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    # Registered as added tokens so text containing them is never split by the BPE.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    tokenizer.chat_template = chat_template()
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of every Qwen2 special/added token as the tokenizer maps them."""
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + ADDED_TOKENS}


# --------------------------------------------------------------------------- model


# Standard deviation of the random weights (transformers' `initializer_range`). Its
# default, 0.02, suits widths in the thousands; at width 64 a linear layer then scales
# its input by about 0.02 x sqrt(64) = 0.16, so at the start the image tokens barely
# reach the answer. On the demo's shapes set, after 300 steps, 0.02 left colour, position
# and motion at 50, 50 and 50 % where 0.1 reached 98, 98 and 100 % (docs/demo.md).
INIT_STD = 0.1


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width) like the real
    model does ([16, 24, 24] for head_dim 128): a quarter for time, the rest halved."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _text_config(vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int,
                 bos: int, eos: int, pad: int) -> dict:
    """The language model's part of `tiny_config`: the real layout at toy sizes."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "initializer_range": INIT_STD,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1e4,
            "mrope_section": _mrope_section(hidden // heads),
        },
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }


def tiny_config(
    *,
    vocab_size: int,
    token_ids: dict[str, int],
    hidden: int = 64,
    text_layers: int = 2,
    vision_depth: int = 2,
    vision_hidden: int = 32,
    tie_word_embeddings: bool = True,
    family: str = DEFAULT_FAMILY,
):
    """The config of `family` (a `model_type`, see `ft.families`) with the real model's
    structure at toy sizes.

    ``token_ids`` maps Qwen2's special tokens to the tokenizer's ids so the model's
    image/video/vision markers and bos/eos/pad agree with the tokenizer.
    """
    heads, kv_heads, vision_heads = 4, 2, 2
    if hidden % (2 * heads) or hidden // heads < 8:
        raise ValueError(f"hidden={hidden} must be a multiple of {2 * heads} and at least {8 * heads}")
    if vision_hidden % (2 * vision_heads):
        raise ValueError(f"vision_hidden={vision_hidden} must be a multiple of {2 * vision_heads}")

    bos, eos, pad = token_ids["<|endoftext|>"], token_ids["<|im_end|>"], token_ids["<|endoftext|>"]
    chosen = family_named(family, "family")
    vision = {**chosen.tiny_vision(vision_depth, vision_hidden, vision_heads, hidden), "initializer_range": INIT_STD}
    return chosen.tiny_config(_text_config(vocab_size, hidden, text_layers, heads, kv_heads, bos, eos, pad),
                              vision, token_ids, tie_word_embeddings, INIT_STD)


def build_tiny_model(config, seed: int = 0):
    """Randomly initialise the model under a private RNG stream: same seed, same weights,
    and the caller's global RNG state is left untouched."""
    from transformers import GenerationConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = family_of(config).model_class()(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        # Like the released checkpoints: stop at the end of the assistant turn or of text.
        eos_token_id=[config.text_config.eos_token_id, config.text_config.bos_token_id],
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    )
    return model.eval()


# --------------------------------------------------------------------------- saving


def _vision_preprocessor_config(kind: str, min_pixels: int, max_pixels: int, config) -> dict:
    """preprocessor_config.json / video_preprocessor_config.json in the released layout.

    Written by hand rather than via ``save_pretrained`` because without torchvision the
    loaded image processor is ``Qwen2VLImageProcessorPil``, a class name that older 5.x
    releases do not know; the canonical ``Qwen2VLImageProcessor`` name loads everywhere
    (AutoImageProcessor picks the PIL or torchvision implementation itself).
    min/max_pixels are given both ways: older releases read the flat keys, newer ones
    read ``size`` (and map the flat keys onto it).
    """
    family, vision_config = family_of(config), config.vision_config
    return {
        f"{kind}_type": family.image_processor if kind == "image_processor" else family.video_processor,
        "processor_class": family.processor,
        "do_resize": True,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(family.image_mean),
        "image_std": list(family.image_std),
        "do_convert_rgb": True,
        "patch_size": vision_config.patch_size,
        "temporal_patch_size": vision_config.temporal_patch_size,
        "merge_size": vision_config.spatial_merge_size,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def has_model(model_dir: str | os.PathLike) -> bool:
    """True when the folder holds a loadable model (config plus weights)."""
    d = Path(model_dir)
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return (d / "config.json").is_file() and any((d / w).is_file() for w in weights)


def _publish(tmp: Path, out: Path, replace: bool) -> bool:
    """Move the finished temp folder into place; return False if another builder won.

    rename() of a folder is atomic, so readers see either no model or a complete one.
    If ``out`` already exists the rename fails: then either keep the existing one
    (``replace=False``, the concurrent ``--if-missing`` case) or swap it out.
    """
    try:
        os.rename(tmp, out)
        return True
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    if not replace:
        shutil.rmtree(tmp)
        return False
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old)
    return True


def save_model_folder(out: Path, model, tokenizer, min_pixels: int, max_pixels: int, replace: bool) -> bool:
    """Write `model` with `tokenizer` and the processor files ft and transformers load
    into the folder `out`, atomically (see `_publish`); False if another builder won."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_json(tmp / "preprocessor_config.json",
                    _vision_preprocessor_config("image_processor", min_pixels, max_pixels, model.config))
        _write_json(tmp / "video_preprocessor_config.json",
                    _vision_preprocessor_config("video_processor", min_pixels, max_pixels, model.config))
        _write_json(tmp / "processor_config.json", {"processor_class": family_of(model.config).processor})
        return _publish(tmp, out, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_tiny(
    out_dir: str | os.PathLike,
    vocab: str = "real",
    seed: int = 0,
    *,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    tie_word_embeddings: bool = True,
    hidden: int = 64,
    text_layers: int = 2,
    vision_depth: int = 2,
    vision_hidden: int = 32,
    if_missing: bool = False,
    family: str = DEFAULT_FAMILY,
) -> dict:
    """Write a complete tiny checkpoint of `family` (`ft.families`) and return a summary.

    Files: config.json, model.safetensors, generation_config.json, tokenizer files with
    chat_template.jinja, preprocessor_config.json, video_preprocessor_config.json and
    processor_config.json (naming the family's processor class so AutoProcessor resolves it).
    With ``if_missing`` an existing model in ``out_dir`` is kept as is.

    Returns {"path", "built", "parameters", "vocab_size", "tokenizer_size"}; "built" is
    False when an existing model was kept (the counts are then read from its config).
    """
    out = Path(out_dir).resolve()
    if if_missing and has_model(out):
        return _summary_of_existing(out)

    tokenizer = build_tokenizer(vocab)
    tokenizer.chat_template = chat_template(family_named(family, "family").default_system is not None)
    ids = special_token_ids(tokenizer)
    regular = ids["<|endoftext|>"]  # specials start right after the regular vocabulary
    if vocab == "real":
        vocab_size = REAL_VOCAB_SIZE
    else:
        # Pad the embedding past the tokenizer like the real model does, so code that
        # confuses len(tokenizer) with config.vocab_size fails in tests too.
        vocab_size = -(-(regular + len(SPECIAL_TOKENS) + len(ADDED_TOKENS)) // 64) * 64
    config = tiny_config(
        vocab_size=vocab_size,
        token_ids=ids,
        hidden=hidden,
        text_layers=text_layers,
        vision_depth=vision_depth,
        vision_hidden=vision_hidden,
        tie_word_embeddings=tie_word_embeddings,
        family=family,
    )
    model = build_tiny_model(config, seed=seed)
    built = save_model_folder(out, model, tokenizer, min_pixels, max_pixels, replace=not if_missing)
    if not built:
        return _summary_of_existing(out)
    return {
        "path": str(out),
        "built": True,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": vocab_size,
        "tokenizer_size": len(tokenizer),
    }


def _summary_of_existing(out: Path) -> dict:
    config = json.loads((out / "config.json").read_text())
    text = config.get("text_config", config)
    return {
        "path": str(out),
        "built": False,
        "parameters": None,
        "vocab_size": text.get("vocab_size", config.get("vocab_size")),
        "tokenizer_size": None,
    }
