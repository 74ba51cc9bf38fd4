"""fsdp1 against fsdp2 (`fsdp.backend`), alternating on the same machine.

    python benchmarks/backends.py --model DIR [--data FILE] [--steps 20] [--nproc 2]
        [--batch-size 2] [--accum 1] [--precision auto] [--warmup 3] [--rounds 2]
        [--optims adafactor,adamw] [--json OUT.json] [section.key=value ...]

For each round and optimizer, trains the same run (benchmarks/bench.py: launch.sh,
evaluation and checkpoints off) once per backend, so that both see the same drift in
machine load, then prints one row per run and the median over rounds of each round's
fsdp2/fsdp1 ratio of: step time, optimizer time (the loop's `optim_s`: clip, loss
all-reduce and update), tokens/s per device and peak memory (resident host memory on
CPU; on GPU also the allocator's max allocated / reserved). The JSON holds every figure
and is rewritten after each run. `--step-reps N` times only `optimizer.step()` and the
clip, N times each in-process (medians), which load spikes on a shared machine shift less.
"""

from __future__ import annotations

import argparse
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


def _step_worker(rank, world, port, model_dir, reps, out):
    """Median time of `optimizer.step()` (and of the clip) per backend and optimizer, on
    the gradients of one real backward: a figure a load spike shifts less than a run's."""
    import os
    import time

    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from ft import dist
    from ft.config import FSDPConfig, TrainConfig
    from ft.collate import Collator
    from ft.dataset import ConversationDataset
    from ft.rows import load_rows
    from ft.fsdp_wrap import plan_units, wrap_model
    from ft.model import load_model, loss_sum
    from ft.optim import build_optimizer, clip_grad_norm
    from ft.processor import load_processor

    info = dist.init_distributed()
    processor = load_processor(model_dir)
    ds = ConversationDataset(load_rows(str(Path(__file__).resolve().parent.parent / "data/demo/train.jsonl")),
                             processor, 1024)
    batch = Collator(processor)([ds[2 * rank], ds[2 * rank + 1]]).inputs
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
    args = parser.parse_args(argv)
    optims = args.optims.split(",")
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
