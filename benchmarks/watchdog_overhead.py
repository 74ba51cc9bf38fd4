"""What the hang watchdog (ft.watchdog) costs a training step.

    python benchmarks/watchdog_overhead.py [--model DIR --steps 30]

Three figures:

* recording: one `with at(label):` (enter and leave), in microseconds. A step records
  4 + gradient_accumulation_steps labels (agree, each forward-backward, clip, loss sum,
  optimizer), plus one on logging steps (peak memory);
* publishing: the watchdog thread's once-a-second write of the record to a TCPStore on
  this machine (it holds the GIL only to build the JSON);
* with `--model`: ft's own step time (bench.py's runs under launch.sh) with the watchdog
  off (`train.hang_timeout_s=0`) and on, alternated twice. On a shared CPU the runs
  differ by a few percent from run to run whatever the setting, which bounds what this
  comparison can resolve; the first two figures are the precise ones.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed as td  # noqa: E402

from ft.watchdog import HERE, at  # noqa: E402


def recording_us(n: int = 200_000) -> float:
    start = time.perf_counter()
    for _ in range(n):
        with at("step/agree"):
            pass
    return (time.perf_counter() - start) / n * 1e6


def publishing_us(n: int = 2_000) -> float:
    store = td.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=30))
    start = time.perf_counter()
    for _ in range(n):
        store.set("where/0", json.dumps({**HERE.__dict__, "written": time.time()}))
    return (time.perf_counter() - start) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    from bench import add_common_args, add_nproc_arg, run_ft

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    add_nproc_arg(parser)
    parser._option_string_actions["--model"].required = False  # the step-time runs are optional
    args = parser.parse_args(argv)
    rec, pub = recording_us(), publishing_us()
    labels = 4 + args.accum
    print(f"recording: {rec:.2f} us per label, {labels} labels per step (accumulation {args.accum}): "
          f"{rec * labels:.1f} us per step")
    print(f"publishing: {pub:.0f} us per write, once a second on the watchdog thread: "
          f"{pub / 1e6:.3%} of wall time at most")
    if args.model:
        times = {"off": [], "on": []}
        for _ in range(2):
            for name, value in (("off", 0), ("on", 900)):
                r = run_ft(args, [f"train.hang_timeout_s={value}"])
                times[name].append(r["step_time_s"])
                print(f"  watchdog {name}: step {r['step_time_s']:.4f} s", flush=True)
        off, on = (sum(v) / len(v) for v in (times["off"], times["on"]))
        print(f"step time: off {off:.4f} s, on {on:.4f} s ({on / off - 1:+.1%}); recording's share of "
              f"the step: {rec * labels / 1e6 / off:.4%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
