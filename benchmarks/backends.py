"""fsdp1 against fsdp2 (`fsdp.backend`), alternating on the same machine.

    python benchmarks/backends.py --model DIR [--data FILE] [--steps 20] [--nproc 2]
        [--batch-size 2] [--accum 1] [--precision auto] [--warmup 3] [--rounds 2]
        [--optims adafactor,adamw] [--json OUT.json] [section.key=value ...]
    python benchmarks/backends.py --model DIR --profile 15 [--profile-reps 6] [--batch-size 1]

For each round and optimizer, trains the same run (benchmarks/bench.py: launch.sh,
evaluation and checkpoints off) once per backend, so that both see the same drift in
machine load, then prints one row per run and the median over rounds of each round's
fsdp2/fsdp1 ratio of: step time, optimizer time (the loop's `optim_s`: clip, loss
all-reduce and update), tokens/s per device and peak memory (resident host memory on
CPU; on GPU also the allocator's max allocated / reserved). The JSON holds every figure
and is rewritten after each run. `--step-reps N` times only `optimizer.step()` and the
clip, N times each in-process (medians), which load spikes on a shared machine shift less.
`--profile TOP` builds both backends' models side by side in the same processes, times
`--profile-reps` forward+backward passes alternating between them (wall and process CPU
time), then profiles one pass of each with torch.profiler and prints the TOP operators by
self CPU time, FSDP's labelled regions and the time by kind of operator (copies, matmuls,
waits inside FSDP's hooks, ...): where one backend's extra time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from pathlib import Path

from bench import add_common_args, add_nproc_arg, format_result, run_ft
from compare import MEMORY, environment, table

BACKENDS = ("fsdp1", "fsdp2")
FIGURES = (("step_time_s", "step time"), ("optim_s", "optimizer time"),
           ("tokens_per_s_per_device", "tokens/s per device"), *MEMORY)


def ratios(runs: list[dict], optim: str) -> dict:
    """Median over rounds of each round's fsdp2/fsdp1 ratio, per figure, for `optim`."""
    rounds: dict[int, dict] = {}
    for r in runs:
        if r["optim"] == optim:
            rounds.setdefault(r["round"], {})[r["backend"]] = r
    pairs = [(d["fsdp2"], d["fsdp1"]) for d in rounds.values() if len(d) == 2]
    out = {}
    for key, _ in FIGURES:
        values = [two[key] / one[key] for two, one in pairs if two.get(key) and one.get(key)]
        if values:
            out[key] = statistics.median(values)
    return out


def _join(rank: int, world: int, port: int, model_dir: str, rows: int):
    """Join the spawned process group as `rank` (one thread, as launch.sh gives a rank) and
    collate this rank's own `rows` demo rows: (ft.dist info, the model's inputs)."""
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from ft import dist
    from ft.collate import Collator
    from ft.dataset import ConversationDataset
    from ft.processor import load_processor
    from ft.rows import load_rows

    info = dist.init_distributed()
    processor = load_processor(model_dir)
    ds = ConversationDataset(load_rows(str(Path(__file__).resolve().parent.parent / "data/demo/train.jsonl")),
                             processor, 1024)
    return info, Collator(processor)([ds[rows * rank + i] for i in range(rows)]).inputs


def _step_worker(rank, world, port, model_dir, reps, out):
    """Median time of `optimizer.step()` (and of the clip) per backend and optimizer, on
    the gradients of one real backward: a figure a load spike shifts less than a run's."""
    import time

    from ft import dist
    from ft.config import FSDPConfig, TrainConfig
    from ft.fsdp_wrap import plan_units, wrap_model
    from ft.model import load_model, loss_sum
    from ft.optim import build_optimizer, clip_grad_norm

    info, batch = _join(rank, world, port, model_dir, rows=2)
    times = {}
    for backend in BACKENDS:
        for optim in ("adafactor", "adamw"):
            model = load_model(model_dir, info)
            model = wrap_model(model, plan_units(model), FSDPConfig(backend=backend), "fp32", info)
            opt = build_optimizer(model.parameters(), TrainConfig(optim=optim, learning_rate=0.0), model=model)
            s, n = loss_sum(model, batch)
            (s / n).backward()
            step, clip = [], []
            for _ in range(reps):  # lr 0: the same gradients and weights every time
                t0 = time.perf_counter()
                clip_grad_norm(model, 1e9)
                t1 = time.perf_counter()
                opt.step()
                t2 = time.perf_counter()
                clip.append(t1 - t0)
                step.append(t2 - t1)
            times[backend, optim] = (statistics.median(step), statistics.median(clip))
            del model, opt
    if rank == 0:
        Path(out).write_text(json.dumps({f"{b} {o}": v for (b, o), v in times.items()}))
    dist.cleanup()


def _profile_worker(rank, world, port, model_dir, batch_size, top, reps, out):
    """Both backends' models side by side on rank `rank`'s own rows: one unmeasured
    forward+backward each, then `reps` timed ones alternating (the order flips every
    repetition, so that load drift falls on both), then one each under torch.profiler.
    Rank 0 writes the times, the top operators by self CPU time and FSDP's labelled
    regions to `out`."""
    import time

    from torch.profiler import ProfilerActivity, profile

    from ft import dist
    from ft.config import FSDPConfig
    from ft.fsdp_wrap import plan_units, wrap_model
    from ft.model import load_model, loss_sum

    info, batch = _join(rank, world, port, model_dir, rows=batch_size)
    models = {}
    for backend in BACKENDS:
        model = load_model(model_dir, info)
        models[backend] = wrap_model(model, plan_units(model), FSDPConfig(backend=backend), "fp32", info)

    def step(backend: str) -> tuple[float, float]:
        torch_dist_barrier()
        wall, cpu = time.perf_counter(), time.process_time()  # process: gloo's threads included
        s, n = loss_sum(models[backend], batch)
        (s / n).backward()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        models[backend].zero_grad(set_to_none=True)
        return wall, cpu

    for backend in BACKENDS:
        step(backend)
    times = {b: [] for b in BACKENDS}
    for i in range(reps):
        for backend in BACKENDS if i % 2 == 0 else BACKENDS[::-1]:
            times[backend].append(step(backend))
    report = {}
    for backend in BACKENDS:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wall, _ = step(backend)
        report[backend] = {"wall_s": [t for t, _ in times[backend]], "cpu_s": [c for _, c in times[backend]],
                           "wall_profiled_s": wall, **profile_figures(prof.key_averages(), top)}
    if rank == 0:
        Path(out).write_text(json.dumps(report))
    dist.cleanup()


def profile_figures(events, top: int) -> dict:
    """The `top` operators by self CPU time, FSDP's labelled regions and time by kind."""
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "top": [(e.key, e.count, e.self_cpu_time_total / 1e6, e.cpu_time_total / 1e6) for e in ops[:top]],
        "regions": sorted(((e.key, e.count, e.cpu_time_total / 1e6) for e in events
                           if e.key.startswith(("FSDP", "FullyShardedDataParallel"))), key=lambda r: -r[2]),
        "by_kind": by_kind(events),
    }


def torch_dist_barrier():
    import torch.distributed

    torch.distributed.barrier()


# Operators by what they do, for the profile's summary (self CPU time, seconds).
KINDS = (
    ("collectives", ("gloo:", "c10d::", "nccl:", "record_param_comms")),
    ("copies and casts", ("aten::copy_", "aten::cat", "aten::split_with_sizes_copy", "aten::_chunk_cat",
                          "aten::chunk_cat", "aten::_to_copy", "aten::clone", "aten::contiguous",
                          "aten::index_select", "aten::narrow_copy", "fsdp::")),
    ("matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention", ("aten::_scaled_dot_product", "aten::scaled_dot_product")),
    ("allocation", ("aten::empty", "aten::zeros", "aten::zero_", "aten::resize_", "aten::new_empty",
                    "aten::fill_")),
)


# gloo runs a collective on its own threads: the operator returns at once and the
# caller's wait (work.wait() in FSDP's Python) is self time of the region around it.
IN_FSDP = "in FSDP's hooks, outside operators (waits on gloo, Python)"


def by_kind(events) -> dict[str, float]:
    """Self CPU seconds per kind of operator (KINDS; the rest as `other`)."""
    out = dict.fromkeys([k for k, _ in KINDS] + [IN_FSDP, "other"], 0.0)
    for e in events:
        if e.key.startswith(("FSDP", "FullyShardedDataParallel")):
            kind = IN_FSDP  # a labelled region's self time: outside any operator
        else:
            kind = next((k for k, prefixes in KINDS if e.key.startswith(prefixes)), "other")
        out[kind] += e.self_cpu_time_total / 1e6
    return out


def profile_backends(model_dir: str, nproc: int, batch_size: int, top: int, reps: int) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    from bench import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "profile.json")
        mp.spawn(_profile_worker, args=(nproc, free_port(), model_dir, batch_size, top, reps, out), nprocs=nproc, join=True)
        return json.loads(Path(out).read_text())


def print_profile(report: dict) -> None:
    one, two = (report[b] for b in BACKENDS)
    ratios = [b / a for a, b in zip(one["wall_s"], two["wall_s"])]
    print(f"forward+backward, rank 0, {len(ratios)} alternating repetitions: "
          + "; ".join(f"{b} wall median {statistics.median(report[b]['wall_s']):.2f} s "
                      f"(min {min(report[b]['wall_s']):.2f}), process CPU median "
                      f"{statistics.median(report[b]['cpu_s']):.2f} s" for b in BACKENDS)
          + f"; fsdp2/fsdp1 wall per repetition: {', '.join(f'{r:.2f}' for r in ratios)}")
    for backend, r in report.items():
        print(f"\n### {backend}: profiled forward+backward {r['wall_profiled_s']:.2f} s, rank 0")
        print("\n| kind | self CPU s |\n| --- | ---: |")
        for kind, seconds in r["by_kind"].items():
            print(f"| {kind} | {seconds:.2f} |")
        print("\n| operator | calls | self CPU s | CPU total s |\n| --- | ---: | ---: | ---: |")
        for name, calls, self_s, total_s in r["top"]:
            print(f"| `{name}` | {calls} | {self_s:.3f} | {total_s:.3f} |")
        if r["regions"]:
            print("\n| FSDP region | calls | CPU total s |\n| --- | ---: | ---: |")
            for name, calls, total_s in r["regions"][:12]:
                print(f"| `{name}` | {calls} | {total_s:.3f} |")


def step_times(model_dir: str, nproc: int, reps: int) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    from bench import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "steps.json")
        mp.spawn(_step_worker, args=(nproc, free_port(), model_dir, reps, out), nprocs=nproc, join=True)
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    add_nproc_arg(parser)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--optims", default="adafactor,adamw", help="train.optim values, comma-separated")
    parser.add_argument("--json", help="write every figure here (rewritten after each run)")
    parser.add_argument("--workdir", help="where the runs' temporary folders go (default: the system's)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="for both backends")
    parser.add_argument("--step-reps", type=int, default=0,
                        help="instead of training runs: time optimizer.step() and the clip this many "
                        "times per backend and optimizer in-process, print the medians")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="instead of training runs: profile one forward+backward per backend "
                        "(torch.profiler, after a warm-up pass) and print the TOP operators by self CPU time")
    parser.add_argument("--profile-reps", type=int, default=4,
                        help="with --profile: timed forward+backward passes per backend before profiling")
    args = parser.parse_args(argv)
    optims = args.optims.split(",")
    if args.profile:
        report = profile_backends(args.model, args.nproc, args.batch_size, args.profile, args.profile_reps)
        print_profile(report)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        return 0
    if args.step_reps:
        for name, (step, clip) in step_times(args.model, args.nproc, args.step_reps).items():
            print(f"{name}: optimizer.step() {1e3 * step:.1f} ms, clip {1e3 * clip:.1f} ms (median of "
                  f"{args.step_reps}, {args.nproc} ranks)")
        return 0

    report = {"environment": environment(), "args": vars(args), "runs": [], "ratios_fsdp2_over_fsdp1": {}}
    print(f"[backends] {report['environment']}", flush=True)
    for round_ in range(1, args.rounds + 1):
        for optim in optims:
            for backend in BACKENDS:
                print(f"[backends] round {round_}/{args.rounds}: {backend}, {optim} ...", flush=True)
                result = run_ft(args, [f"train.optim={optim}", f"fsdp.backend={backend}", *args.overrides],
                                workdir=args.workdir)
                result.update(round=round_, backend=backend, optim=optim, system=f"{backend} {optim}")
                report["runs"].append(result)
                print(format_result(f"{backend} {optim}", result), flush=True)
                report["ratios_fsdp2_over_fsdp1"][optim] = ratios(report["runs"], optim)
                if args.json:
                    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")

    print("\n" + table(report["runs"]))
    for optim, r in report["ratios_fsdp2_over_fsdp1"].items():
        print(f"\nfsdp2/fsdp1 with {optim}, median over rounds: " + ", ".join(
            f"{name} {r[k]:.2f}x" for k, name in FIGURES if k in r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
