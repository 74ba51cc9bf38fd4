"""ft against the Hugging Face Trainer reference recipe: every ft path in one run, each
against the Trainer measured in the same round on the same machine.

    python benchmarks/compare.py --model DIR [--data FILE] [--steps 20] [--nproc 2]
        [--batch-size 2] [--accum 1] [--precision auto] [--warmup 3] [--rounds 2]
        [--batches padded,packed] [--backends fsdp1,fsdp2] [--weights fp32,bf16]
        [--attention sdpa] [--paths batch/backend/weights[/attention],...]
        [--json OUT.json] [section.key=value ...]

Each round runs the baseline (benchmarks/hf_trainer_baseline.py under torchrun with as
many processes) and ft (benchmarks/bench.py: ./launch.sh) once per combination of:

* batches: `padded` (`--batch-size` rows per device, as the Trainer gets them) or
  `packed` (`data.packing`, packs of the longest row rounded up to 64 tokens, as many
  per device as carry about the padded rows' real tokens: benchmarks/packing.py's plan);
* backend: `fsdp.backend` fsdp1 or fsdp2;
* weights: `train.master_weights` fp32 (the recipe's) or bf16 (stochastic rounding);
* attention: `model.attn_implementation`, sdpa (the Trainer's) unless asked for
  flash_attention_2 (the flash-attn package, a GPU; with packing, its varlen kernels).

`--paths` names the combinations instead (e.g. `padded/fsdp1/fp32,packed/fsdp2/bf16`).

Compute is `--precision` for all: `auto` is bf16 on a GPU and fp32 on the CPU, where the
Trainer runs fp32 too. Even rounds run the systems in reverse order, so that drift in
the machine's load falls on both sides. Without `--data` the rows are
benchmarks/longtail_data.py's (256 rows, seed 0: 0-3 images, answers of 5-500 words).
`section.key=value` arguments go to ft only.

Prints one row per run, then per ft path the median over rounds of its ratio to the
same round's Trainer: tokens/s per device and peak memory (GPU: max allocated and
reserved; CPU: peak RSS, highest over ranks). GPU targets: at least 1.2x the tokens/s at
equal or lower peak memory. The JSON holds every figure, the environment and what the
Trainer actually ran; it is rewritten after each run, so an interrupted comparison keeps
the runs it finished. The baseline needs `accelerate` (`pip install -e .[dev]`).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
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

HF = "hf_trainer"
# An ft path is one value per axis; the first value of `attention` is the Trainer's.
AXES = {"batches": ("padded", "packed"), "backends": ("fsdp1", "fsdp2"), "weights": ("fp32", "bf16"),
        "attention": ("sdpa", "flash_attention_2")}
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


def ratios(runs: list[dict]) -> dict[str, dict]:
    """Per ft path (`system`), the median over rounds of its ratio to the Trainer run
    of the same round, per figure."""
    rounds: dict[int, dict] = {}
    for r in runs:
        rounds.setdefault(r["round"], {})[r["system"]] = r
    out: dict[str, dict] = {}
    for system in dict.fromkeys(r["system"] for r in runs if r["system"] != HF):
        pairs = [(d[system], d[HF]) for d in rounds.values() if system in d and HF in d]
        figures = {}
        for key in ("tokens_per_s_per_device", *(k for k, _ in MEMORY)):
            values = [ft[key] / hf[key] for ft, hf in pairs if ft.get(key) and hf.get(key)]
            if values:
                figures[key] = statistics.median(values)
        if figures:
            out[system] = figures
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
    return markdown([head, *rows])


def ratio_table(runs: list[dict]) -> str:
    """A Markdown table, the Trainer then one row per ft path: medians over rounds of
    tokens/s per device and peak memory, and of each round's ratio to the Trainer."""
    memory = [(k, name) for k, name in MEMORY if any(k in r for r in runs)]
    rounds = len({r["round"] for r in runs})
    head = ["system", "real tokens per device per step", "tokens/s per device", "x Trainer",
            *(x for _, name in memory for x in (f"{name} GiB", "x Trainer"))]
    r = {HF: {}, **ratios(runs)}

    def figure(x, key):  # real tokens per step: compare only paths whose steps carry the same
        if key == "tokens_per_device_per_step":
            return x.get("tokens_per_s_per_device", 0) * x.get("step_time_s", 0)
        return x.get(key)

    def median(system, key, fmt):
        values = [figure(x, key) for x in runs if x["system"] == system and figure(x, key)]
        return format(statistics.median(values), fmt) if values else "-"

    def ratio(system, key):
        return "1.00x" if system == HF else f"{r[system][key]:.2f}x" if key in r[system] else "-"

    rows = [[system, median(system, "tokens_per_device_per_step", ".0f"), median(system, "tokens_per_s_per_device", ".1f"),
             ratio(system, "tokens_per_s_per_device"),
             *(x for k, _ in memory for x in (median(system, k, ".2f"), ratio(system, k)))] for system in r]
    return markdown([head, *rows]) + f"\n\n(medians over {rounds} rounds; each ratio is to the Trainer of the same round)"


def markdown(rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(row) + " |" for row in [rows[0], ["---"] * len(rows[0]), *rows[1:]])


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


def ft_paths(args: argparse.Namespace) -> dict[str, tuple[int, list[str]]]:
    """Each ft path's name: (rows or packs per device, its config overrides)."""
    combinations = args.paths or list(itertools.product(*(getattr(args, a) for a in AXES)))
    batches = {"padded": (args.batch_size, [])}
    if any(batch == "packed" for batch, *_ in combinations):
        from packing import plan, row_lengths  # imports ft: only when packing is compared

        lengths = row_lengths(args)  # at --max-length: the rows as the Trainer and padded ft get them
        packs, extra = plan(argparse.Namespace(rows_per_device=args.batch_size, nproc=args.nproc), lengths)["packed"]
        # Every row fits the pack, so cutting rows at the pack length cuts what --max-length cuts:
        # nothing more (ft refuses a pack shorter than data.max_length).
        batches["packed"] = (packs, [*extra, f"data.max_length={min(args.max_length, -(-max(lengths) // 64) * 64)}"])
    paths = {}
    for batch, backend, weights, attention in combinations:
        rows, extra = batches[batch]
        name = " ".join(["ft", batch, backend, weights] + ([attention] if attention != "sdpa" else []))
        paths[name] = (rows, [*extra, f"fsdp.backend={backend}", f"train.master_weights={weights}",
                              f"model.attn_implementation={attention}"])
    return paths


def parse_path(value: str) -> tuple[str, ...]:
    """`--paths` entry: batch/backend/weights[/attention], e.g. packed/fsdp2/bf16."""
    parts = value.split("/")
    if len(parts) == 3:
        parts.append("sdpa")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"--paths: {value!r} is not batch/backend/weights[/attention]")
    for axis, part in zip(AXES, parts):
        if part not in AXES[axis]:
            raise argparse.ArgumentTypeError(f"--paths: {value!r}: {axis} {part!r} not among {', '.join(AXES[axis])}")
    return tuple(parts)


def run_one(system: str, args: argparse.Namespace, paths: dict) -> dict:
    """One run of `system` (HF or an ft path); a failure is recorded, not raised."""
    try:
        if system == HF:
            with tempfile.TemporaryDirectory(prefix="hf-bench-", dir=args.workdir) as workdir:
                return run_hf(args, workdir)
        rows, extra = paths[system]
        shape = argparse.Namespace(**{**vars(args), "batch_size": rows})
        return dict(run_ft(shape, [*extra, *args.overrides], workdir=args.workdir),
                    rows_per_device=rows, overrides=extra)
    except RuntimeError as e:
        print(f"[compare] {system} failed: {e}", flush=True)
        return {"error": str(e)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    add_nproc_arg(parser)
    parser.set_defaults(data=None)
    parser.add_argument("--rounds", type=int, default=2)
    for axis, choices in AXES.items():
        parser.add_argument(f"--{axis}", default=",".join(choices[:1] if axis == "attention" else choices),
                            type=lambda v, axis=axis: choose(axis, v), help=f"comma-separated: {', '.join(choices)}")
    parser.add_argument("--paths", type=lambda v: [parse_path(p) for p in v.split(",") if p],
                        help="instead of every combination of the axes: these ft paths, comma-separated, "
                        "each batch/backend/weights[/attention], e.g. padded/fsdp1/fp32,packed/fsdp2/bf16")
    parser.add_argument("--json", help="write every figure here (rewritten after each run)")
    parser.add_argument("--workdir", help="where the runs' temporary folders go (default: the system's)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="for ft only")
    return parser.parse_args(argv)


def choose(axis: str, value: str) -> list[str]:
    chosen = [v for v in value.split(",") if v]
    unknown = [v for v in chosen if v not in AXES[axis]]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"--{axis}: {unknown or value!r} not among {', '.join(AXES[axis])}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.data is None:
        from longtail_data import generate

        args.data = os.path.join(tempfile.mkdtemp(prefix="longtail-", dir=args.workdir), "train.jsonl")
        generate(os.path.dirname(args.data), 256, seed=0)
    paths = ft_paths(args)
    report = {"environment": environment(), "args": vars(args), "compute": compute(args.precision),
              "paths": {k: {"rows_per_device": n, "overrides": o} for k, (n, o) in paths.items()}, "runs": []}
    print(f"[compare] {report['environment']}\n[compare] compute: {report['compute']}; data {args.data}", flush=True)
    systems = [HF, *paths]
    for round_ in range(1, args.rounds + 1):
        for system in systems if round_ % 2 else systems[::-1]:
            print(f"[compare] round {round_}/{args.rounds}: {system} ...", flush=True)
            result = dict(run_one(system, args, paths), round=round_, system=system)
            report["runs"].append(result)
            if "error" not in result:
                print(format_result(system, result), flush=True)
            report["ratios_over_hf"] = ratios([r for r in report["runs"] if "error" not in r])
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=2) + "\n")

    done = [r for r in report["runs"] if "error" not in r]
    print("\n" + table(done) + "\n\n" + ratio_table(done) + f"\n\ncompute: {report['compute']}")
    hf_runs = [r for r in done if r["system"] == HF]
    if hf_runs:
        print("\nWhat the Trainer ran: " + trainer_summary(hf_runs[0]["ran"]))
    failed = sorted({r["system"] for r in report["runs"] if "error" in r})
    if failed:
        print(f"\n[compare] failed: {', '.join(failed)} (the JSON holds each error)")
    return 1 if failed else 0


def compute(precision: str) -> str:
    """What `--precision` means on this machine, for the table's reader."""
    import torch

    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    if precision == "fp32" and not torch.cuda.is_available():
        return "fp32 (no GPU: on the CPU both systems compute in fp32; bf16 weights are upcast per unit)"
    return precision


if __name__ == "__main__":
    sys.exit(main())
