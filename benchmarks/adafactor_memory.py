"""Optimizer state per rank: HF Adafactor under FSDP1 vs ft's Adafactor (`train.optim`
`hf_adafactor` vs `adafactor`), and the step-time cost of ft's two all-reduces.

Memory is computed from the wrap plan (`ft.fsdp_wrap.plan_units` on the meta device: no
weights, any size), every parameter trainable, worst rank reported:
- HF Adafactor sees one 1-D flat shard per FSDP unit (ceil(unit numel / world) elements:
  FSDP1 pads each flat parameter to a multiple of the world size) and keeps a full fp32
  second moment for it, plus a 4-byte `RMS` tensor per flat parameter;
- ft's Adafactor keeps full fp32 row + column factors of every matrix the rank holds any
  element of, and its own elements of the 1-D parameters' second moments
  (`ft.optim.adafactor_state_bytes`; tests/test_adafactor.py checks it against the real
  optimizer's state on 2 and 3 ranks).
The all-reduce payload is what ft's Adafactor reduces per step (fp32 row and column sums
of every matrix, then one squared norm per parameter), the same at every world size.

Step time: the tiny model, 2 gloo ranks on this CPU (one thread each), wrapped as ft
wraps it, fixed random gradients; median `optimizer.step()` time over --steps steps
after a barrier, HF then ft in the same processes.

    python benchmarks/adafactor_memory.py [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ft.dryrun import build_on_meta
from ft.fsdp_wrap import per_rank_numel, plan_units
from ft.adafactor import adafactor_state_bytes

REPO = Path(__file__).resolve().parent.parent
WORLD_SIZES = (1, 8, 64)


def hf_state_bytes(units, world_size: int) -> int:
    return sum(per_rank_numel(u.numel, world_size) * 4 + 4 for u in units)


def allreduce_payload(units) -> int:
    factored = sum(p.shape[:-1].numel() + (p.shape[:-2] + p.shape[-1:]).numel()
                   for u in units for p in u.params.values() if p.dim() >= 2)
    n_params = sum(len(u.params) for u in units)
    return 4 * (factored + n_params)


def fmt(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:7.2f} {unit}"
    return f"{n:7.0f} B  "


def memory_table(models: dict[str, str]) -> str:
    lines = [f"{'model':<12} {'params':>8} {'world':>5}  {'HF Adafactor':>12}  {'ft Adafactor':>12}"
             f"  {'ft/HF':>7}  {'ft all-reduce/step':>18}"]
    for name, config in models.items():
        units = plan_units(build_on_meta(config))
        numel = sum(u.numel for u in units)
        payload = allreduce_payload(units)
        for world in WORLD_SIZES:
            hf = hf_state_bytes(units, world)
            ft = max(adafactor_state_bytes(units, world, rank) for rank in range(world))
            lines.append(f"{name:<12} {numel / 1e9:7.3f}B {world:>5}  {fmt(hf):>12}  {fmt(ft):>12}"
                         f"  {100 * ft / hf:6.2f}%  {fmt(payload):>18}")
    return "\n".join(lines)


def _step_time_worker(rank, port, model_dir, steps, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    import torch.distributed as dist

    from ft import dist as ft_dist
    from ft.config import FSDPConfig, TrainConfig
    from ft.fsdp_wrap import wrap_model
    from ft.model import load_model
    from ft.optim import build_optimizer

    # One intra-op thread per rank, as one GPU per rank: with 2 ranks x 2 threads on 2
    # cores, OpenMP's spinning threads slowed ft's small kernels ~5x.
    torch.set_num_threads(1)
    info = ft_dist.init_distributed()
    model = load_model(model_dir, info)
    wrapped = wrap_model(model, plan_units(model), FSDPConfig(), "fp32", info)
    gen = torch.Generator().manual_seed(rank)
    for p in wrapped.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    result = {}
    for optim in ("hf_adafactor", "adafactor"):
        opt = build_optimizer(wrapped.parameters(), TrainConfig(optim=optim, learning_rate=1e-5), model=wrapped)
        times = []
        for i in range(steps + 3):
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            if i >= 3:  # warm-up: state allocation, first collectives
                times.append(time.perf_counter() - t0)
        result[optim] = statistics.median(times)
    # The same two all-reduces alone (sizes of ft's step buffers), to split the overhead.
    n_sq, n_params = opt._sq_numel, len(opt._all)
    times = []
    for i in range(steps + 3):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(torch.zeros(n_sq))
        dist.all_reduce(torch.zeros(n_params))
        if i >= 3:
            times.append(time.perf_counter() - t0)
    result["all_reduce"] = statistics.median(times)
    result["counts"] = (len(list(wrapped.parameters())), n_params)
    if rank == 0:
        torch.save(result, out)
    ft_dist.cleanup()


def step_times(steps: int) -> str:
    import socket

    import torch.multiprocessing as mp

    from ft.tinymodel import save_tiny

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny(Path(tmp) / "tiny", vocab="small", seed=0)["path"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = Path(tmp) / "times.pt"
        mp.spawn(_step_time_worker, args=(port, model_dir, steps, str(out)), nprocs=2, join=True)
        t = torch.load(out)
        units = plan_units(build_on_meta(model_dir))
    hf, ft, ar = t["hf_adafactor"], t["adafactor"], t["all_reduce"]
    n_flat, n_params = t["counts"]
    return (f"optimizer.step(), tiny model (small vocab), 2 gloo ranks on CPU, median of {steps}:\n"
            f"  HF Adafactor                   {hf * 1e3:7.2f} ms  ({n_flat} flat shards, no collective)\n"
            f"  ft Adafactor                   {ft * 1e3:7.2f} ms  (loops over {n_params} parameters)\n"
            f"  of which its two all-reduces   {ar * 1e3:7.2f} ms  "
            f"({fmt(allreduce_payload(units)).strip()} in all, timed alone)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        from ft.tinymodel import save_tiny

        tiny = save_tiny(Path(tmp) / "tiny", vocab="small", seed=0)["path"]
        print("Optimizer state per rank (fp32; worst rank), all parameters trainable:")
        print(memory_table({
            "tiny": tiny,
            "Qwen2.5-VL-3B": str(REPO / "configs/qwen2_5_vl_3b/config.json"),
            "Qwen2.5-VL-7B": str(REPO / "configs/qwen2_5_vl_7b/config.json"),
        }))
    print()
    print(step_times(args.steps))


if __name__ == "__main__":
    main()
