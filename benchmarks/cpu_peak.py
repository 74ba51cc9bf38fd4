"""Measure this machine's fp32 matmul peak, the ceiling for CPU training throughput.

    python benchmarks/cpu_peak.py [--threads T] [--n 2048]

Times ``torch.mm`` on two fp32 n x n matrices (2 n^3 FLOP each) and prints the best
rate in GFLOP/s, with T threads and with 1. Training FLOP/s on CPU (model FLOP per step
over step time) is then read against this figure, the most the matmuls that dominate a
step could reach.

Measure with the thread count a training rank really has. launch.sh exports
``OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}`` (one intra-op thread per process: N processes
on N cores), and torchrun itself, when OMP_NUM_THREADS is unset and it starts more than
one process, sets it to 1 (with a warning). Without it, each rank would take torch's
default, one thread per core, and the ranks would oversubscribe the cores. So a rank
under launch.sh runs with 1 thread, and ``--threads`` defaults to OMP_NUM_THREADS if
set, else 1. A whole node's peak is then about the per-rank figure times the number of
ranks, as long as that is at most the core count (``--threads $(nproc)`` measures one
process using every core, for comparison). Run it on an otherwise idle machine: the best
of a few runs hides a brief disturbance, not a concurrent job sharing the cores.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def measure_matmul_peak(threads: int | None = None, n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 ``torch.mm`` rate on n x n matrices, in FLOP/s, over `repeats` timed runs.

    With `threads`, runs under ``torch.set_num_threads(threads)`` and restores the
    previous count afterwards.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=generator, dtype=torch.float32)
        b = torch.randn(n, n, generator=generator, dtype=torch.float32)
        out = torch.empty(n, n, dtype=torch.float32)
        for _ in range(2):  # warm up: thread pool, caches, BLAS kernel choice
            torch.mm(a, b, out=out)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - start)
        return 2 * n**3 / best
    finally:
        torch.set_num_threads(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_threads = int(os.environ.get("OMP_NUM_THREADS") or 1)
    parser.add_argument(
        "--threads", type=int, default=default_threads,
        help=f"threads per rank (default: OMP_NUM_THREADS, else 1; here {default_threads})",
    )
    parser.add_argument("--n", type=int, default=2048, help="matrix size (default 2048)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch default threads "
          f"{torch.get_num_threads()}, fp32 mm {args.n}x{args.n}, best of {args.repeats}")
    for threads in dict.fromkeys([args.threads, 1]):  # once if --threads is 1
        rate = measure_matmul_peak(threads, args.n, args.repeats)
        print(f"  {threads} thread(s): {rate / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
