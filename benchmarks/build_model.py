"""Build a randomly initialised Qwen2.5-VL with a released checkpoint's layer shapes, for
benchmarks that need the real sizes but no weights.

    python benchmarks/build_model.py OUT_DIR [--config configs/qwen2_5_vl_3b/config.json]
        [--text-layers 36] [--vision-depth 32] [--device cpu|cuda] [--dtype bf16|fp32]
        [--seed 0] [--if-missing]

Every layer has the shapes of the published config (hidden sizes, heads, vocabulary,
tied embeddings, vision tower); only the number of decoder layers and vision blocks can
be cut, which scales time and memory per layer but keeps the embedding, lm_head and
merger at full size. The vision tower's full-attention blocks keep the published
positions that still exist (every 8th block: 7, 15, ...); a tower shorter than the
first of them gets its last block as the full-attention one. Throughput per token and
the memory of each layer are those of the real model; totals scale with the layer count.

The folder is a normal Hugging Face checkpoint, as ft.tinymodel writes for the tiny model:
config.json, model.safetensors (in `--dtype`, bf16 like the released weights; ft and
the HF baseline load it as fp32 master weights), generation_config.json, the real Qwen2
tokenizer rebuilt offline (needs the `dashscope` wheel, see ft.tinymodel) with the chat
template, and the processor files. Build on a GPU (`--device cuda`) where there is one:
random initialisation of billions of parameters is slow on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

# ft.tinymodel writes the tokenizer and processor files exactly as the tiny model has them,
# which ft's loader and the tests already check.
from ft.tinymodel import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    build_tokenizer,
    has_model,
    save_model_folder,
    special_token_ids,
)

# Where the model config names each special token, checked against the tokenizer.
TOKEN_FIELDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "bos_token_id": "<|endoftext|>",
    "eos_token_id": "<|im_end|>",
}


def shaped_config(config_path: str | os.PathLike, text_layers: int | None, vision_depth: int | None):
    """The Qwen2_5_VLConfig of `config_path` with `text_layers` decoder layers and
    `vision_depth` vision blocks (None: as published)."""
    from transformers import Qwen2_5_VLConfig

    raw = json.loads(Path(config_path).read_text())
    # Released configs are in the flat 4.x layout (text fields at the top level), which
    # Qwen2_5_VLConfig still reads; a nested text_config is handled too.
    text = raw.get("text_config", raw)
    vision = raw["vision_config"]
    if text_layers is not None:
        text["num_hidden_layers"] = text_layers
    if vision_depth is not None:
        full = [i for i in vision["fullatt_block_indexes"] if i < vision_depth]
        vision["depth"] = vision_depth
        vision["fullatt_block_indexes"] = full or [vision_depth - 1]
    return Qwen2_5_VLConfig(**raw)


def build(out_dir: str | os.PathLike, config_path: str, text_layers: int | None, vision_depth: int | None,
          device: str, dtype: torch.dtype, seed: int) -> dict:
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    config = shaped_config(config_path, text_layers, vision_depth)
    tokenizer = build_tokenizer("real")
    ids = special_token_ids(tokenizer)
    text = config.text_config
    for field, token in TOKEN_FIELDS.items():
        expected = getattr(config, field, None) or getattr(text, field, None)
        if expected is not None and expected != ids[token]:
            raise ValueError(f"{config_path}: {field} is {expected}, the tokenizer has {token} at {ids[token]}")

    torch.manual_seed(seed)
    # Initialised in place on `device` (fast on a GPU), then saved in `dtype`.
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32)
    model.to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"], do_sample=False,
    )
    parameters = sum(p.numel() for p in model.parameters())

    out = Path(out_dir).resolve()
    save_model_folder(out, model, tokenizer, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS, replace=True)
    return {
        "path": str(out),
        "parameters": parameters,
        "text_layers": text.num_hidden_layers,
        "vision_depth": config.vision_config.depth,
        "fullatt_block_indexes": config.vision_config.fullatt_block_indexes,
        "hidden": text.hidden_size,
        "vocab_size": text.vocab_size,
        "tie_word_embeddings": config.tie_word_embeddings,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--config", default="configs/qwen2_5_vl_3b/config.json",
                        help="a released config.json whose shapes to copy")
    parser.add_argument("--text-layers", type=int, help="decoder layers (default: as published)")
    parser.add_argument("--vision-depth", type=int, help="vision blocks (default: as published)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="of the saved weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--if-missing", action="store_true", help="keep a model already in OUT_DIR")
    args = parser.parse_args(argv)
    if args.if_missing and has_model(args.out_dir):
        print(f"kept the model already in {args.out_dir}")
        return 0
    start = time.perf_counter()
    info = build(args.out_dir, args.config, args.text_layers, args.vision_depth, args.device,
                 torch.bfloat16 if args.dtype == "bf16" else torch.float32, args.seed)
    print(f"wrote {info['path']} in {time.perf_counter() - start:.0f} s: {info['parameters'] / 1e9:.2f}B parameters, "
          f"{info['text_layers']} decoder layers, {info['vision_depth']} vision blocks (full attention at "
          f"{info['fullatt_block_indexes']}), hidden {info['hidden']}, vocab {info['vocab_size']}, "
          f"tied embeddings {info['tie_word_embeddings']}, random weights (seed {args.seed}), {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
