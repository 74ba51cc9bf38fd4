"""Benchmark ft: train K steps under ./launch.sh, then report throughput, the step split
and peak memory read back from ``metrics.jsonl``.

    python benchmarks/bench.py --model DIR [--data FILE] [--steps 20] [--nproc 2]
        [--batch-size 2] [--accum 1] [--precision auto] [--max-length 2048]
        [--warmup 3] [--json OUT.json] [--keep] [section.key=value ...]

The run writes into a temporary output folder with evaluation and checkpoints off,
wandb disabled and a log record every step; trailing ``section.key=value`` arguments
go to the loop after those (so they win). Figures are averages over the steps after
the first ``--warmup`` of the process:

* tokens/s per device: real (non-pad) text and image tokens of all ranks per second of
  step time, divided by the number of processes;
* step split: data wait (fetch, collate, host-to-device copy), forward+backward, and
  optimizer (clip, loss all-reduce, update), each a mean per step;
* MFU: only on a GPU whose bf16 peak ft.metrics knows;
* peak memory: the highest over ranks (GiB): resident host memory, and on GPU the
  allocator's max allocated / max reserved.

The loop's end-of-run ``summary`` record is used when present; with an older loop
(no summary) the averages are computed here from the per-step records, and with the
oldest (only ``tokens_per_s`` and ``peak_mem_gb``) only throughput and memory exist.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Memory figures as the loop names them, by unit suffix: ft.metrics.memory_stats uses
# GiB (`_gib`); the first loop logged `peak_mem_gb` in GB (1e9 bytes).
MEMORY_NAMES = ("peak_rss", "max_allocated", "max_reserved", "peak_mem")
UNITS = {"_gib": 1.0, "_gb": 1e9 / 2**30}
SPLIT = ("step_time_s", "data_s", "fwd_bwd_s", "optim_s")
RATES = ("flops_per_s_per_device", "padding_share", "pack_efficiency")  # summary only


def free_port() -> int:
    """A TCP port nothing listens on now: each launch gets its own, so a run never
    collides with another torchrun on the same machine (the default 29500 is popular)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_records(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def memory_gib(record: dict) -> dict[str, float]:
    """The record's memory figures in GiB, keyed `<name>_gib` whatever unit it used."""
    out = {}
    for name in MEMORY_NAMES:
        for suffix, to_gib in UNITS.items():
            if name + suffix in record:
                out[name + "_gib"] = record[name + suffix] * to_gib
    return out


def summarize(records: list[dict], warmup: int, world: int) -> dict:
    """Throughput, step split, MFU and peak memory of one ft run from its metrics records.

    Prefers the loop's `summary` record. Otherwise averages the training records whose
    logging window lies entirely after the first `warmup` steps: totals of tokens and
    time when the records carry `step_time_s` (a mean of rates would overweight fast
    steps), else a plain mean of the windows' `tokens_per_s` divided by `world` (the
    oldest loop logged only that global rate).
    """
    train = [r for r in records if "loss" in r and not r.get("summary")]
    if not train:
        raise ValueError("metrics.jsonl holds no training records")
    peak: dict[str, float] = {}
    for r in records:
        for k, v in memory_gib(r).items():
            peak[k] = max(peak.get(k, 0.0), v)
    result: dict = {"steps": train[-1]["step"], **peak}

    summary = next((r for r in reversed(records) if r.get("summary")), None)
    if summary is not None:
        result.update(
            source="summary record",
            warmup_steps=summary["warmup_steps"],
            steps_measured=summary["step"] - summary["warmup_steps"],
            tokens_per_s_per_device=summary["avg_tokens_per_s_per_device"],
            mfu=summary.get("avg_mfu"),
            **{k: summary.get(f"avg_{k}") for k in SPLIT + RATES},
        )
        return result

    windows, prev = [], 0
    for r in train:
        if prev >= warmup:
            windows.append((r["step"] - prev, r))
        prev = r["step"]
    if not windows:
        raise ValueError(f"no training record after the first {warmup} warm-up steps")
    steps = sum(n for n, _ in windows)
    result.update(warmup_steps=warmup, steps_measured=steps)
    if all("step_time_s" in r for _, r in windows):
        seconds = sum(n * r["step_time_s"] for n, r in windows)
        tokens = sum(n * r["step_time_s"] * r["tokens_per_s"] for n, r in windows)
        mfus = [(n * r["step_time_s"], r["mfu"]) for n, r in windows if "mfu" in r]
        result.update(
            source="per-step records",
            tokens_per_s_per_device=tokens / seconds / world,
            # Time-weighted: total model FLOPs over total time, like the summary's.
            mfu=sum(t * m for t, m in mfus) / sum(t for t, _ in mfus) if mfus else None,
            **{k: sum(n * r[k] for n, r in windows) / steps if all(k in r for _, r in windows) else None
               for k in SPLIT},
        )
    else:
        rates = [r["tokens_per_s"] for _, r in windows]
        result.update(
            source="per-step records, tokens_per_s only (mean of window rates)",
            tokens_per_s_per_device=sum(rates) / len(rates) / world,
            mfu=None,
            **dict.fromkeys(SPLIT),
        )
    return result


def format_result(name: str, r: dict) -> str:
    """A few human-readable lines for one run's result."""
    def seconds(k):
        return "-" if r.get(k) is None else f"{r[k]:.3f}"

    lines = [
        f"{name}: {r['tokens_per_s_per_device']:.1f} tokens/s per device over {r['steps_measured']} steps "
        f"(after {r['warmup_steps']} warm-up; {r.get('source', '')})",
        f"  step {seconds('step_time_s')} s = data {seconds('data_s')} + forward/backward "
        f"{seconds('fwd_bwd_s')} + optimizer {seconds('optim_s')}",
        "  MFU " + ("n/a (CPU or unknown GPU)" if r.get("mfu") is None else f"{r['mfu']:.1%}"),
        "  peak memory (max over ranks): " + ", ".join(
            f"{k[:-4].replace('_', ' ')} {r[k]:.2f} GiB" for k in
            ("max_allocated_gib", "max_reserved_gib", "peak_rss_gib", "peak_mem_gib") if k in r),
    ]
    return "\n".join(lines)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The run's shape, shared by ft's bench, the HF baseline and compare (the process
    count is torchrun's business in the baseline: see add_nproc_arg)."""
    parser.add_argument("--model", required=True, help="Hugging Face folder of a Qwen2.5-VL model")
    parser.add_argument("--data", default="data/demo/train.jsonl", help="training JSONL (ft's format)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=2, help="per-device micro-batch")
    parser.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--min-pixels", type=int, default=3136)
    parser.add_argument("--max-pixels", type=int, default=200704)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the averages")


def add_nproc_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=2, help="processes (one per GPU on a GPU machine)")


def ft_overrides(args: argparse.Namespace, output_dir: str) -> list[str]:
    """The loop's config for a benchmark run. No LR warmup: the recipe's `constant`
    schedule ignores warmup_ratio, so the HF baseline runs without one too."""
    return [
        f"model.path={args.model}",
        "model.build_tiny_if_missing=false",
        f"data.train_file={args.data}",
        "data.eval_file=",
        f"data.max_length={args.max_length}",
        f"data.min_pixels={args.min_pixels}",
        f"data.max_pixels={args.max_pixels}",
        f"train.output_dir={output_dir}",
        "train.resume=none",
        f"train.max_steps={args.steps}",
        f"train.per_device_train_batch_size={args.batch_size}",
        f"train.gradient_accumulation_steps={args.accum}",
        f"train.precision={args.precision}",
        f"train.learning_rate={args.lr}",
        "train.warmup_ratio=0",
        f"train.max_grad_norm={args.max_grad_norm}",
        "train.optim=adafactor",
        "train.logging_steps=1",
        f"train.metrics_warmup_steps={args.warmup}",
        "train.eval_steps=0",
        "train.save_steps=0",
        "wandb.mode=disabled",
    ]


def loop_knows(key: str) -> bool:
    """Whether this checkout's config has `section.key` (older loops lack
    train.metrics_warmup_steps and refuse unknown keys)."""
    from ft.config import SECTIONS, field_docs

    section, name = key.split(".")
    return name in field_docs(SECTIONS[section])


def run_ft(args: argparse.Namespace, extra: list[str], workdir: str | None = None, keep: bool = False) -> dict:
    """Train under launch.sh and return the summarized metrics, plus `command` and
    `wall_s` (start-up, data check, model load and final export included)."""
    out = tempfile.mkdtemp(prefix="ft-bench-", dir=workdir)
    overrides = [o for o in ft_overrides(args, out) if loop_knows(o.split("=", 1)[0])] + extra
    env = dict(os.environ, NPROC_PER_NODE=str(args.nproc), MASTER_PORT=str(free_port()),
               MAX_RESTARTS="0", WANDB_MODE="disabled", PYTHON=os.environ.get("PYTHON", sys.executable))
    command = ["./launch.sh", "configs/demo.yaml", *overrides]
    log_path = os.path.join(out, "run.log")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    try:
        if rc != 0:
            tail = Path(log_path).read_text(errors="replace").splitlines()[-40:]
            raise RuntimeError(f"ft exited with {rc}; last lines of {log_path}:\n" + "\n".join(tail))
        result = summarize(read_records(os.path.join(out, "metrics.jsonl")), args.warmup, args.nproc)
    finally:
        if not keep and rc == 0:
            shutil.rmtree(out, ignore_errors=True)
    result.update(system="ft", command=" ".join(command), wall_s=wall, output_dir=out if keep else None)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    add_nproc_arg(parser)
    parser.add_argument("--json", help="also write the result as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the run's output folder (metrics, log)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    result = run_ft(args, args.overrides, keep=args.keep)
    print(format_result("ft", result))
    print(f"  wall {result['wall_s']:.0f} s for the whole launch: {result['command']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
