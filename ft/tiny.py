"""Command line for the tiny demo model (`ft.tinymodel` builds it):

    python -m ft.tiny OUT_DIR [--family qwen2_vl|qwen2_5_vl|qwen3_vl] [--vocab real|small] [--seed N]
                      [--if-missing] [--untied]
"""

from __future__ import annotations

import argparse

from ft.families import DEFAULT_FAMILY, FAMILIES
from ft.tinymodel import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, save_tiny


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ft.tiny",
                                     description="Write a tiny random Qwen2-VL, Qwen2.5-VL or Qwen3-VL model.")
    parser.add_argument("out_dir")
    parser.add_argument("--family", choices=sorted(FAMILIES), default=DEFAULT_FAMILY,
                        help=f"config.json's model_type (default {DEFAULT_FAMILY})")
    parser.add_argument("--vocab", choices=("real", "small"), default="real")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--if-missing", action="store_true", help="do nothing if OUT_DIR already holds a model")
    parser.add_argument("--untied", action="store_true", help="separate lm_head (like 7B) instead of tied (like 3B)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--vision-depth", type=int, default=2)
    parser.add_argument("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS)
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    args = parser.parse_args(argv)

    info = save_tiny(
        args.out_dir,
        vocab=args.vocab,
        seed=args.seed,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        tie_word_embeddings=not args.untied,
        hidden=args.hidden,
        text_layers=args.text_layers,
        vision_depth=args.vision_depth,
        if_missing=args.if_missing,
        family=args.family,
    )
    if info["built"]:
        print(f"wrote {info['path']}: {FAMILIES[args.family].name}, {info['parameters']:,} parameters, "
              f"vocab_size {info['vocab_size']} ({info['tokenizer_size']} tokenizer ids), "
              f"{'untied' if args.untied else 'tied'} embeddings, vocab={args.vocab}, seed={args.seed}")
    else:
        print(f"kept existing model at {info['path']} (vocab_size {info['vocab_size']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
