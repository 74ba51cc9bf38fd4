"""The longest single sample that fits, per sequence-parallel size: the dry run's estimate
(ft.dryrun, ft.activations), no GPU, no weights.

    python benchmarks/fit_sequence.py [--world-size 8] [--gpu-memory-gib 80] [--headroom-gib 4]

For each model (configs/qwen2_5_vl_7b, configs/qwen2_5_vl_72b), each
parallel.sequence_parallel_size N that the world size and the query heads allow
(`ft.dryrun.sequence_sizes`) and each setting of the table (the vision tower trained or
frozen; fp32 or bf16 master weights), the most tokens of one micro-batch of one row
whose per-rank estimate (`ft.dryrun.plan_total`) plus the row's pixel values (which the
dry run does not count: the processor's fp32 rows, one per patch) stays within
--gpu-memory-gib less --headroom-gib (left for the CUDA context, NCCL buffers and the
allocator). The row is
mostly video: --text-tokens of text, the rest video tokens, each merged from 4 vision
patches (the merger joins 2 x 2 patches), so vision patches = 4 x (tokens - text tokens).
The optimizer is the default (ft's Adafactor), bf16 compute, activation checkpointing
on, loss chunk 1,024, fsdp1. The search steps by --step tokens. The commands after the
table are the dry runs of its rows, with --gpu-memory-gib less the headroom: their
spare memory is at least the row's pixel values.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ft.activations import estimate_activations  # noqa: E402
from ft.config import ModelConfig  # noqa: E402
from ft.dryrun import build_on_meta, estimate_memory, plan_total, sequence_sizes  # noqa: E402
from ft.fsdp_wrap import plan_units  # noqa: E402
from ft.parts import apply_freezing  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30
MODELS = {"7B": "qwen2_5_vl_7b", "72B": "qwen2_5_vl_72b"}
# (vision tower, master weights) settings of the table, per model.
SETTINGS = {"7B": [("trained", "fp32"), ("frozen", "fp32")],
            "72B": [("trained", "fp32"), ("trained", "bf16"), ("frozen", "bf16")]}


def patches_of(tokens: int, text_tokens: int) -> int:
    """Vision patches of a row of `tokens`, all but `text_tokens` of them video tokens of
    4 patches each."""
    return 4 * max(tokens - text_tokens, 0)


def pixel_bytes(config, patches: int) -> int:
    """The pixel values of `patches` vision patches: fp32, channels x temporal patch x
    patch x patch values each (Qwen2.5-VL: 3 x 2 x 14 x 14, 4,704 B)."""
    vision = config.vision_config
    channels = getattr(vision, "in_channels", None) or getattr(vision, "in_chans", 3)
    return patches * channels * vision.temporal_patch_size * vision.patch_size**2 * 4


def per_rank(model, units, world: int, size: int, tokens: int, master: str, text_tokens: int) -> tuple[int, int]:
    """(the dry run's per-rank total, the pixel values), in bytes, for one row of `tokens`
    at sequence-parallel size `size`: parameters, gradients, ft's Adafactor and the
    activations; every rank of a group holds all of the row's pixel values."""
    patches = patches_of(tokens, text_tokens)
    est = estimate_memory(units, world, "adafactor", "bf16", master)
    act = estimate_activations(model.config, units, tokens, "bf16", True, 1024, patches, size)
    return plan_total(est, act), pixel_bytes(model.config, patches)


def longest(model, units, world: int, size: int, master: str, budget: int, text_tokens: int, step: int) -> int:
    """The most tokens (a multiple of `step`) of one row within `budget` bytes per rank;
    0 when not even `step` tokens fit."""
    def fits(tokens: int) -> bool:
        return sum(per_rank(model, units, world, size, tokens, master, text_tokens)) <= budget

    if not fits(step):
        return 0
    high = step
    while fits(high * 2):
        high *= 2
    low, high = high, high * 2  # fits(low), not fits(high)
    while high - low > step:
        mid = (low + high) // 2 // step * step
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def table(world: int, gpu_gib: float, headroom_gib: float, text_tokens: int, step: int) -> list[str]:
    """The Markdown table, one line per model, setting and N, then the reproducing commands."""
    budget = int((gpu_gib - headroom_gib) * GiB)
    lines = ["| model | vision tower | master weights | N | longest row (tokens) | tokens per rank | "
             "vision patches | dry run per rank | + pixel values |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    commands = []
    for name, folder in MODELS.items():
        model = build_on_meta(os.path.join(REPO, "configs", folder))
        for tower, master in SETTINGS[name]:
            apply_freezing(model, ModelConfig(freeze_vision_tower=tower == "frozen"))
            units = plan_units(model)
            for size in sequence_sizes(model.config, world):
                tokens = longest(model, units, world, size, master, budget, text_tokens, step)
                if not tokens:
                    lines.append(f"| {name} | {tower} | {master} | {size} | does not fit | | | | |")
                    continue
                patches = patches_of(tokens, text_tokens)
                total, pixels = per_rank(model, units, world, size, tokens, master, text_tokens)
                lines.append(f"| {name} | {tower} | {master} | {size} | {tokens:,} | {-(-tokens // size):,} | "
                             f"{patches:,} | {total / GiB:.1f} GiB | {pixels / GiB:.1f} GiB |")
                commands.append(f"python -m ft.dryrun configs/{folder} --world-size {world} --sequence-parallel "
                                f"{size} --tokens {tokens} --vision-patches {patches} --master-weights {master}"
                                + (" --freeze-vision-tower" if tower == "frozen" else "")
                                + f" --gpu-memory-gib {gpu_gib - headroom_gib:g}")
    return lines + [""] + commands


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--headroom-gib", type=float, default=4.0,
                        help="left for the CUDA context, NCCL buffers and the allocator (default 4)")
    parser.add_argument("--text-tokens", type=int, default=1024, help="text tokens of the row (default 1024)")
    parser.add_argument("--step", type=int, default=1024, help="tokens the search steps by (default 1024)")
    args = parser.parse_args(argv)
    print("\n".join(table(args.world_size, args.gpu_memory_gib, args.headroom_gib, args.text_tokens, args.step)))


if __name__ == "__main__":
    main()
