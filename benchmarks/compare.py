"""ft against the Hugging Face Trainer reference recipe, alternating on the same machine.

    python benchmarks/compare.py --model DIR [--data FILE] [--steps 20] [--nproc 2]
        [--batch-size 2] [--accum 1] [--precision auto] [--warmup 3] [--rounds 2]
        [--json OUT.json] [section.key=value ...]

Runs ft (benchmarks/bench.py) then the baseline (benchmarks/hf_trainer_baseline.py,
under torchrun with as many processes) R times, so that both see the same drift in
machine load, on the same model, rows, batch shape and steps; `section.key=value`
arguments go to ft only. Prints one row per run and the median over rounds of each
round's ft/HF ratio. The targets (GPU): ft at least 1.2x the Trainer's tokens/s per
device at equal or lower peak memory. The JSON holds every figure, the environment
and what the Trainer actually ran; it is rewritten after each run, so an interrupted
comparison keeps the runs it finished.

The baseline needs `accelerate` (the Trainer imports it; ft does not).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import REPO, add_common_args, add_nproc_arg, format_result, free_port, run_ft

MEMORY = (("max_allocated_gib", "max alloc"), ("max_reserved_gib", "max reserved"), ("peak_rss_gib", "peak RSS"))


def run_hf(args: argparse.Namespace, workdir: str) -> dict:
    """One baseline run under torchrun; its result plus `command` and `wall_s`."""
    out_json = os.path.join(workdir, "hf.json")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
        "--master-port", str(free_port()), "benchmarks/hf_trainer_baseline.py",
        "--model", args.model, "--data", args.data, "--steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--accum", str(args.accum), "--precision", args.precision,
        "--max-length", str(args.max_length), "--min-pixels", str(args.min_pixels),
        "--max-pixels", str(args.max_pixels), "--lr", str(args.lr), "--max-grad-norm", str(args.max_grad_norm),
        "--warmup", str(args.warmup), "--output-dir", os.path.join(workdir, "trainer"), "--json", out_json,
    ]
    # What launch.sh gives ft's workers, so that both run under the same threads and
    # offline settings; the repository goes on the path for `import ft`.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    log_path = os.path.join(workdir, "hf.log")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if rc != 0:
        tail = Path(log_path).read_text(errors="replace").splitlines()[-40:]
        raise RuntimeError(f"the HF baseline exited with {rc}; last lines of {log_path}:\n" + "\n".join(tail))
    result = json.loads(Path(out_json).read_text())
    result.update(command=" ".join(["python", *command[1:]]), wall_s=wall)
    return result


def environment() -> dict:
    import torch
    import transformers

    try:
        import accelerate
        accelerate_version = accelerate.__version__
    except ImportError:
        accelerate_version = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate_version,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def ratios(runs: list[dict]) -> dict:
    """Median over rounds of each round's ft/HF ratio, per figure."""
    rounds: dict[int, dict] = {}
    for r in runs:
        rounds.setdefault(r["round"], {})[r["system"]] = r
    pairs = [(d["ft"], d["hf_trainer"]) for d in rounds.values() if len(d) == 2]
    out = {}
    for key in ("tokens_per_s_per_device", *(k for k, _ in MEMORY)):
        values = [ft[key] / hf[key] for ft, hf in pairs if ft.get(key) and hf.get(key)]
        if values:
            out[key] = statistics.median(values)
    return out


def table(runs: list[dict]) -> str:
    """A Markdown table, one row per run."""
    memory = [(k, name) for k, name in MEMORY if any(k in r for r in runs)]
    head = ["round", "system", "tokens/s/device", "step s", "data s", "fwd+bwd s", "optim s", "MFU",
            *(f"{name} GiB" for _, name in memory), "wall s"]

    def cell(r, key, fmt):
        return "-" if r.get(key) is None else format(r[key], fmt)

    rows = [[str(r["round"]), r["system"], cell(r, "tokens_per_s_per_device", ".1f"),
             *(cell(r, k, ".3f") for k in ("step_time_s", "data_s", "fwd_bwd_s", "optim_s")),
             "-" if r.get("mfu") is None else f"{r['mfu']:.1%}",
             *(cell(r, k, ".2f") for k, _ in memory), cell(r, "wall_s", ".0f")] for r in runs]
    return "\n".join("| " + " | ".join(row) + " |" for row in
                     [head, ["---"] * len(head), *rows])


def trainer_summary(ran: dict) -> str:
    """One paragraph on what the Trainer ran."""
    wrapped = ran["wrapped_model_class"].rsplit(".", 1)[-1]
    return (
        f"is_fsdp_enabled={ran['is_fsdp_enabled']}, accelerate {ran['distributed_type']}, "
        f"fsdp version used {ran['fsdp_version']}, model wrapped as {wrapped} "
        f"({ran['fsdp1_units']} FSDP1 units, {ran['fsdp2_units']} FSDP2 modules), "
        f"gradient checkpointing {ran['gradient_checkpointing']}, mixed precision {ran['mixed_precision']}, "
        f"optimizer {ran['optimizer'].rsplit('.', 1)[-1]} {ran['optimizer_group']}, "
        f"schedule {ran['lr_scheduler_type']} (warmup_steps {ran['warmup_steps']}); "
        f"dropped or changed: " + ("; ".join(f"{k} ({v})" for k, v in ran["dropped_args"].items()) or "nothing")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    add_nproc_arg(parser)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="write every figure here (rewritten after each run)")
    parser.add_argument("--workdir", help="where the runs' temporary folders go (default: the system's)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="for ft only")
    args = parser.parse_args(argv)

    report = {"environment": environment(), "args": vars(args), "runs": []}
    print(f"[compare] {report['environment']}", flush=True)
    for round_ in range(1, args.rounds + 1):
        for system in ("ft", "hf_trainer"):
            print(f"[compare] round {round_}/{args.rounds}: {system} ...", flush=True)
            if system == "ft":
                result = run_ft(args, args.overrides, workdir=args.workdir)
            else:
                with tempfile.TemporaryDirectory(prefix="hf-bench-", dir=args.workdir) as workdir:
                    result = run_hf(args, workdir)
            result["round"] = round_
            report["runs"].append(result)
            print(format_result(system, result), flush=True)
            report["ratios_ft_over_hf"] = ratios(report["runs"])
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=2) + "\n")

    print("\n" + table(report["runs"]))
    r = report["ratios_ft_over_hf"]
    print("\nft/HF, median over rounds: " + ", ".join(
        f"{name} {r[k]:.2f}x" for k, name in (("tokens_per_s_per_device", "tokens/s per device"), *MEMORY)
        if k in r) + "  (GPU targets: tokens/s >= 1.2x, memory <= 1.0x)")
    hf_runs = [x for x in report["runs"] if x["system"] == "hf_trainer"]
    if hf_runs:
        print("\nWhat the Trainer ran: " + trainer_summary(hf_runs[0]["ran"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
