"""Padded vs length-grouped vs packed batches on long-tailed data: throughput, peak
memory, padding, and model FLOP/s against the machine's matmul peak.

    python benchmarks/packing.py --model DIR [--rows-per-device 4] [--data-rows 256]
        [--steps 12] [--warmup 3] [--nproc 2] [--attn sdpa] [--json OUT.json]

The data is `longtail_data.py`'s (one to three images at varied sizes, answers of 5 to
500 words). Each mode trains `--steps` steps under ./launch.sh (bench.py's run, fp32 on
CPU, Adafactor) and is measured after `--warmup` steps:

* padded: `--rows-per-device` samples per micro-batch, in shuffled order;
* grouped: the same, with `data.group_by_length=true`;
* packed: `data.packing=true`, packs of `data.pack_length` = the longest row rounded up
  to 64 tokens (so `data.max_length` cuts nothing), and as many packs per device as
  carry about the same real tokens per step as the padded runs (printed: compare like
  with like).

Columns: real tokens per step (all ranks), tokens/s per device, the ratio to padded,
padding share (token positions computed on that hold no real token: pad rows, pad
segments, the dummy image), peak RSS (max over ranks), and model FLOP/s per device
(ft.metrics conventions: attention per sample, recomputation not counted) as a share of
one rank's fp32 matmul peak (`cpu_peak.py`, with the rank's thread count) on CPU, or
MFU (bf16 peak) on a known GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import add_common_args, add_nproc_arg, run_ft  # noqa: E402
from cpu_peak import measure_matmul_peak  # noqa: E402
from longtail_data import generate  # noqa: E402

from ft.datacheck import check_data  # noqa: E402
from ft.dataset import ConversationDataset  # noqa: E402
from ft.rows import load_rows  # noqa: E402
from ft.packing import PackedBatchSampler  # noqa: E402
from ft.processor import load_processor  # noqa: E402


def plan(args, lengths: list[int]) -> dict[str, tuple[int, list[str]]]:
    """Each mode's rows per device and config overrides."""
    pack_length = -(-max(lengths) // 64) * 64
    mean = sum(lengths) / len(lengths)
    efficiency, _, _ = PackedBatchSampler(lengths, pack_length, 1, args.nproc, 0, seed=42).efficiency(0)
    packs = max(1, round(args.rows_per_device * mean / (pack_length * efficiency)))
    return {
        "padded": (args.rows_per_device, []),
        "grouped": (args.rows_per_device, ["data.group_by_length=true"]),
        "packed": (packs, ["data.packing=true", f"data.pack_length={pack_length}"]),
    }


def row_lengths(args) -> list[int]:
    """Every row's tokens at `args`' pixel bounds and max length (the data check's count)."""
    processor = load_processor(args.model, args.min_pixels, args.max_pixels)
    _, lengths, _ = check_data(ConversationDataset(load_rows(args.data), processor, args.max_length), "error")
    return lengths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    add_nproc_arg(parser)
    parser.add_argument("--rows-per-device", type=int, default=4)
    parser.add_argument("--data-rows", type=int, default=256)
    parser.add_argument("--attn", default="sdpa", help="model.attn_implementation")
    parser.add_argument("--modes", default="padded,grouped,packed")
    parser.add_argument("--json", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="ft-packing-bench-")
    generate(workdir, args.data_rows, seed=0)
    args.data = os.path.join(workdir, "train.jsonl")
    lengths = row_lengths(args)
    args.max_length = -(-max(lengths) // 64) * 64
    threads = int(os.environ.get("OMP_NUM_THREADS") or 1)
    cpu_peak = measure_matmul_peak(threads)
    print(f"{args.data}: {len(lengths)} rows, tokens per row min {min(lengths)}, "
          f"mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}; {args.nproc} ranks, "
          f"{args.steps} steps ({args.warmup} warm-up), attention {args.attn}; "
          f"fp32 matmul peak {cpu_peak / 1e9:.1f} GFLOP/s per rank ({threads} thread)")
    results = {}
    for mode, (rows, extra) in plan(args, lengths).items():
        if mode not in args.modes.split(","):
            continue
        args.batch_size = rows
        r = run_ft(args, [f"model.attn_implementation={args.attn}", *extra])
        r.update(mode=mode, rows_per_device=rows, overrides=extra,
                 tokens_per_step=r["tokens_per_s_per_device"] * args.nproc * r["step_time_s"])
        results[mode] = r
        print(f"  {mode} done: {r['tokens_per_s_per_device']:.0f} tokens/s/device, wall {r['wall_s']:.0f} s",
              flush=True)
    base = results.get("padded")
    print("\n| mode | rows/device | real tokens/step | tokens/s/device | vs padded | padding | "
          "peak RSS GiB | model GFLOP/s/device | of peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode, r in results.items():
        ratio = f"{r['tokens_per_s_per_device'] / base['tokens_per_s_per_device']:.2f}x" if base else "-"
        flops = r.get("flops_per_s_per_device") or 0.0
        share = f"{r['mfu']:.1%} MFU" if r.get("mfu") is not None else f"{flops / cpu_peak:.1%}"
        print(f"| {mode} | {r['rows_per_device']} | {r['tokens_per_step']:.0f} | "
              f"{r['tokens_per_s_per_device']:.0f} | {ratio} | {r.get('padding_share', 0):.1%} | "
              f"{r.get('peak_rss_gib', 0):.2f} | {flops / 1e9:.2f} | {share} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu_peak_flops": cpu_peak, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
