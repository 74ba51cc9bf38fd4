"""What stochastic rounding costs: fp32 -> bf16 write-back throughput of
`ft.rounding.stochastic_round_` against round-to-nearest (`copy_`), and the optimizer
step of ft's Adafactor on bf16 weights with each, on this machine's device.

    python benchmarks/rounding.py [--elements 16777216] [--repeats 5] [--device cuda]

Prints elements per second (best of --repeats) and nanoseconds per element; the
optimizer figure is one step over a 3B-layer-shaped parameter set (one decoder layer's
matrices of Qwen2.5-VL-3B: hidden 2,048, MLP 11,008; 82M elements) on one process.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from ft.adafactor import Adafactor
from ft.rounding import WriteBack, stochastic_round_


def best_time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def layer_3b(device: torch.device) -> nn.Module:
    h, m, kv = 2048, 11008, 256
    layer = nn.ModuleDict({
        "q_proj": nn.Linear(h, h), "k_proj": nn.Linear(h, kv), "v_proj": nn.Linear(h, kv),
        "o_proj": nn.Linear(h, h, bias=False), "gate_proj": nn.Linear(h, m, bias=False),
        "up_proj": nn.Linear(h, m, bias=False), "down_proj": nn.Linear(m, h, bias=False),
    })
    return layer.to(device=device, dtype=torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=1 << 24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    n = args.elements
    src = torch.randn(n, device=device) * 0.02
    dst = torch.empty(n, dtype=torch.bfloat16, device=device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if device.type != "cpu":  # the bits must not depend on the device
        cpu = torch.empty(n, dtype=torch.bfloat16)
        stochastic_round_(cpu, src.cpu(), 12345, 7)
        stochastic_round_(dst, src, 12345, 7)
        print(f"stochastic rounding on {device.type} equals the CPU's bit for bit: {torch.equal(dst.cpu(), cpu)}")
    for name, fn in (("round-to-nearest (copy_)", lambda: dst.copy_(src)),
                     ("stochastic (ft.rounding)", lambda: stochastic_round_(dst, src, 12345, 0))):
        t = best_time(fn, args.repeats, device)
        print(f"{name:<26} {n / t / 1e9:8.3f} G elements/s  {t / n * 1e9:7.2f} ns/element")

    layer = layer_3b(device)
    numel = sum(p.numel() for p in layer.parameters())
    for stochastic in (False, True):
        opt = Adafactor(layer.parameters(), layer, lr=1e-5, write_back=WriteBack(seed=0, stochastic=stochastic))
        for p in layer.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()  # warm-up
        t = best_time(opt.step, args.repeats, device)
        print(f"Adafactor step, one 3B decoder layer's matrices ({numel / 1e6:.0f}M bf16 elements), "
              f"{'stochastic' if stochastic else 'round-to-nearest'}: {t * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
