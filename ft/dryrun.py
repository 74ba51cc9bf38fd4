"""The dry run: print the wrap plan and a per-rank memory estimate for any Qwen VL
config.json, without loading weights (the model is built on the meta device) and
without a GPU. The plan's table is `ft.fsdp_wrap.format_plan`, which the loop prints at
start-up too.

    python -m ft.dryrun /models/Qwen2.5-VL-7B-Instruct --world-size 16 [--freeze-vision-tower] [--optim adamw]

It is also the fit check of a run config: given the YAML file a run would use (plus
`section.key=value` overrides, as `./launch.sh` and `python -m ft.loop` take them), it
reads model.path, the freeze_* switches, train.optim, train.precision,
fsdp.activation_checkpointing, train.loss_chunk_size and the micro-batch's tokens from
it, adds an activation estimate (`ft.activations.estimate_activations`) to the memory
table and says whether a rank fits in `--gpu-memory-gib` (80 by default). With
parallel.sequence_parallel_size N (`--sequence-parallel N`) the activations are one
rank's of a group of N sharing each micro-batch (`ft.sequence`):

    python -m ft.dryrun configs/example_qwen2_5_vl_7b.yaml --world-size 8 train.optim=adamw

The Config is built by `ft.config_load.load_config` either way (a model folder becomes
`model.path`, the flags that set a field become overrides), so its validation is the
only gate.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ft import sequence
from ft.activations import ActivationEstimate, estimate_activations, format_activations
from ft.backends import BACKENDS, DEFAULT
from ft.config import Config, ConfigError, TrainConfig, field_choices
from ft.config_load import load_config
from ft.dist import DistInfo
from ft.families import family_of, read_family
from ft.fsdp_wrap import Unit, fmt_bytes, fmt_count, format_plan, per_rank_numel, plan_units, root_members
from ft.optim import OPTIMIZERS
from ft.parts import PARTS, apply_freezing
from ft.rounding import MASTER_DTYPES


# =====================================================================================
# Per-rank memory, computed from the plan
# =====================================================================================
class MemoryEstimate(NamedTuple):
    """Bytes per rank. Activations, buffers and the CUDA context are not included."""

    world_size: int
    precision: str
    optim: str
    master_weights: str  # train.master_weights: fp32 or bf16
    master: int  # parameter shards in the master dtype
    gathered: int  # compute-dtype unsharded copies alive at once (see estimate_memory)
    gathered_units: tuple[Unit, Unit | None]  # (root, largest other unit)
    gradients: int  # gradient shards (master dtype) of the trainable units
    optimizer: int  # optimizer state on the worst rank
    trainable: int  # trainable parameters (whole model)


def estimate_memory(units: list[Unit], world_size: int, optim: str, precision: str,
                    master_weights: str = "fp32", backend: str = DEFAULT) -> MemoryEstimate:
    """Per-rank memory of parameters, gradients and optimizer state under FULL_SHARD.

    Parameter and gradient shards are in the master dtype (`train.master_weights`: fp32
    4 B, bf16 2 B per element); the optimizer state is fp32 either way.

    Gathered copies: FSDP1 keeps the root unit gathered from forward to backward, and
    with limit_all_gathers and backward prefetch at most two other units are gathered
    at once (the one running and the next), so the peak is taken as the root plus twice
    the largest other unit, in the compute dtype (bf16: 2 B, fp32: 4 B).
    Optimizer state per trainable shard element: adamw 8 B (two fp32 moments);
    hf_adafactor 4 B (HF Adafactor cannot factor FSDP1's 1-D shards);
    adafactor (ft's, `ft.optim.Adafactor`): full fp32 row and column factors of every
    trainable matrix a rank holds any slice of, and its slice of the 1-D parameters'
    second moments; the worst rank is reported.
    """
    if optim not in OPTIMIZERS:
        raise ValueError(f"optim must be one of {', '.join(OPTIMIZERS)}, got {optim!r}")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    if master_weights not in MASTER_DTYPES:
        raise ValueError(f"master_weights must be one of {', '.join(MASTER_DTYPES)}, got {master_weights!r}")
    master_bytes = MASTER_DTYPES[master_weights].itemsize
    trainable_shard = sum(per_rank_numel(u.numel, world_size, backend) for u in units if u.trainable_numel)
    root, others = units[-1], units[:-1]
    largest = max(others, key=lambda u: u.numel, default=None)
    compute_bytes = 2 if precision == "bf16" else 4
    gathered = (root.numel + 2 * (largest.numel if largest else 0)) * compute_bytes
    optimizer = OPTIMIZERS[optim].state_bytes(units, world_size, backend)
    return MemoryEstimate(
        world_size=world_size,
        precision=precision,
        optim=optim,
        master_weights=master_weights,
        master=sum(per_rank_numel(u.numel, world_size, backend) for u in units) * master_bytes,
        gathered=gathered,
        gathered_units=(root, largest),
        gradients=trainable_shard * master_bytes,
        optimizer=optimizer,
        trainable=sum(u.trainable_numel for u in units),
    )


def format_memory(est: MemoryEstimate, act: "ActivationEstimate | None" = None) -> str:
    root, largest = est.gathered_units
    biggest = max((u for u in est.gathered_units if u), key=lambda u: u.numel)
    dtype = est.precision
    gathered_why = f"<root> {fmt_count(root.numel)}"
    if largest:
        gathered_why += f" + 2 x {largest.fqn} {fmt_count(largest.numel)} (running + prefetched)"
    optim_why = OPTIMIZERS[est.optim].memory_note
    total = est.master + est.gathered + est.gradients + est.optimizer
    rows = [
        ("parameters", est.master, f"{est.master_weights} master shards"),
        ("", est.gathered, f"{dtype} gathered during compute: {gathered_why}"),
        ("gradients", est.gradients, f"{est.master_weights} shards, trainable units only "
                                     f"({fmt_count(est.trainable)} params)"),
        ("optimizer", est.optimizer, f"{est.optim}: {optim_why}"),
    ]
    if act is None:
        rows.append(("total", total, "+ activations, buffers, allocator slack"))
    lines = [
        f"Per-rank memory estimate (world size {est.world_size}, {dtype} compute, {est.master_weights} "
        f"master weights, {est.optim}); "
        f"largest all-gather: {biggest.fqn or '<root>'}, {fmt_count(biggest.numel)} params = "
        f"{fmt_bytes(biggest.numel * (2 if dtype == 'bf16' else 4))} in {dtype}",
    ]
    lines += [f"  {name:<11} {fmt_bytes(n):>10}  {why}" for name, n, why in rows]
    if act is not None:
        lines.append(format_activations(act))
        lines.append(f"  {'total':<11} {fmt_bytes(total + act.total):>10}  "
                     "+ CUDA context, NCCL buffers, allocator fragmentation (a few GiB)")
    return "\n".join(lines)


# =====================================================================================
# The fit check: activations (ft.activations) added to the table, and a verdict
# =====================================================================================
def fit_verdict(total: int, gpu_bytes: int, suggestions: list[str]) -> str:
    spare = gpu_bytes - total
    if spare >= 0:
        return f"fits: {fmt_bytes(total)} of {fmt_bytes(gpu_bytes)} per rank, {fmt_bytes(spare)} to spare"
    line = f"does NOT fit: {fmt_bytes(total)} per rank is {fmt_bytes(-spare)} over {fmt_bytes(gpu_bytes)}"
    return line + (". To fit: " + "; ".join(suggestions) if suggestions else "")


def plan_total(est: MemoryEstimate, act: ActivationEstimate | None) -> int:
    return est.master + est.gathered + est.gradients + est.optimizer + (act.total if act else 0)


# =====================================================================================
# Dry run: print the plan for a config, no weights, no GPU.
# =====================================================================================
def build_on_meta(config_path: str) -> nn.Module:
    """The model of a config.json (or of the folder holding one), on the meta device."""
    from transformers import AutoConfig

    folder = config_path if os.path.isdir(config_path) else os.path.dirname(config_path) or "."
    model_class = read_family(folder).model_class()
    config = AutoConfig.from_pretrained(config_path)
    with torch.device("meta"):
        return model_class._from_config(config)


class _Plan(NamedTuple):
    """What the fit check needs, from a run config or from the flags."""

    model_path: str
    freeze: dict[str, bool]
    optim: str
    precision: str
    master_weights: str
    checkpointing: bool
    tokens: int
    tokens_why: str
    loss_chunk_size: int
    backend: str = DEFAULT
    sequence_parallel: int = 1  # parallel.sequence_parallel_size
    attn_implementation: str = "sdpa"


def _is_run_config(path: str) -> bool:
    return Path(path).suffix.lower() in (".yaml", ".yml")


def micro_batch_tokens(cfg: Config) -> tuple[int, str]:
    """Tokens of one micro-batch of a run config, and where the number comes from."""
    if cfg.data.packing and cfg.data.pack_length:
        return cfg.data.pack_length, f"data.pack_length {cfg.data.pack_length}"
    batch = cfg.train.per_device_train_batch_size
    return (cfg.data.max_length * batch,
            f"data.max_length {cfg.data.max_length} x train.per_device_train_batch_size {batch}")


def _flag_overrides(args) -> list[str]:
    """The flags that set a config field, as the `section.key=value` overrides they are."""
    out = [f"model.{p.freeze_field}=true" for p in PARTS if getattr(args, p.freeze_field)]
    out += [f"train.{key}={getattr(args, key)}" for key in ("optim", "precision", "master_weights")
            if getattr(args, key)]
    if args.no_activation_checkpointing:
        out.append("fsdp.activation_checkpointing=false")
    if args.sequence_parallel is not None:
        out.append(f"parallel.sequence_parallel_size={args.sequence_parallel}")
    return out


def _load(args, parser) -> Config:
    """The Config the plan is for, built by `load_config`, whose validation is the one
    gate: a run config (YAML) with its overrides, or a model folder (a config.json: its
    folder) as `model.path`; the flags given come last, so they win. The model must be
    there: the dry run builds no demo model (`model.build_tiny_if_missing=false`)."""
    flags = ["model.build_tiny_if_missing=false", *_flag_overrides(args)]
    if _is_run_config(args.config):
        return load_config(args.config, [*args.overrides, *flags], check_model=True)
    if args.overrides:
        parser.error(f"section.key=value overrides need a run config (YAML), got {args.overrides}")
    path = Path(args.config)
    folder = path.parent if path.name == "config.json" and path.is_file() else path
    return load_config(None, [f"model.path={folder}", *flags], check_model=True)


def _resolve(args, parser) -> _Plan:
    """The plan from a run config or a model folder, and the flags. Raises ConfigError
    for bad input."""
    cfg = _load(args, parser)
    refusals = BACKENDS[cfg.fsdp.backend].config_refusals(cfg)
    if refusals:
        raise ConfigError("; ".join(refusals))
    tokens, why = micro_batch_tokens(cfg)
    if args.tokens:
        tokens, why = args.tokens, "--tokens"
    elif not _is_run_config(args.config):
        why = f"data.max_length's default {cfg.data.max_length}"
    precision = cfg.train.precision
    return _Plan(cfg.model.path, {p.freeze_field: getattr(cfg.model, p.freeze_field) for p in PARTS},
                 cfg.train.optim, "bf16" if precision == "auto" else precision, cfg.train.master_weights,
                 cfg.fsdp.activation_checkpointing, tokens, why, cfg.train.loss_chunk_size, cfg.fsdp.backend,
                 cfg.parallel.sequence_parallel_size, cfg.model.attn_implementation)


def check_sequence(config, size: int, world: int, kernel: str = "sdpa") -> None:
    """Raise ConfigError where a run would refuse parallel.sequence_parallel_size `size`
    at `world` ranks for the model of `config` under attention `kernel`: the run's own
    checks (`ft.sequence.grouped`, `ft.sequence.check`)."""
    if size == 1:
        return
    sequence.grouped(DistInfo(0, world, 0, torch.device("cpu")), size)
    sequence.check(config, size, kernel)


def sequence_sizes(config, world: int, kernel: str = "sdpa") -> list[int]:
    """Every parallel.sequence_parallel_size a run of `world` ranks accepts for the model
    of `config` (`check_sequence`), smallest first; [1] at least."""
    sizes = []
    for size in range(1, world + 1):
        try:
            check_sequence(config, size, world, kernel)
        except ConfigError:
            continue
        sizes.append(size)
    return sizes


def _total(model, units, plan: _Plan, world: int, patches) -> int:
    """plan_total of `plan` at `world` ranks, activations included."""
    est = estimate_memory(units, world, plan.optim, plan.precision, plan.master_weights, plan.backend)
    act = estimate_activations(model.config, units, plan.tokens, plan.precision, plan.checkpointing,
                               plan.loss_chunk_size, patches, plan.sequence_parallel)
    return plan_total(est, act)


def _most_tokens(fits, plan: _Plan, vision_patches) -> int:
    """The most tokens per micro-batch that fit (`fits(tokens=, patches=)`), by
    bisection to 64 tokens, vision patches scaled with them; 0: under 64."""
    low, high = 0, plan.tokens
    while high - low > 64:
        mid = (low + high) // 2
        patches = None if vision_patches is None else vision_patches * mid // plan.tokens
        low, high = (mid, high) if fits(tokens=mid, patches=patches) else (low, mid)
    return low // 64 * 64


def _suggestions(model, units, plan: _Plan, world: int, gpu_bytes: int, vision_patches) -> list[str]:
    """What would make a plan that does not fit, fit: more ranks, a larger sequence-parallel
    group (one the heads and the world size allow), bf16 weights, ft's Adafactor,
    freezing, checkpointing, fewer tokens."""
    def fits(world_=world, units_=units, patches=vision_patches, **changes) -> bool:
        return _total(model, units_, plan._replace(**changes), world_, patches) <= gpu_bytes

    out = []
    more = next((w for w in (world * 2**k for k in range(1, 8)) if fits(w)), None)
    if more:
        out.append(f"--world-size {more}")
    elif not fits(world * 2**7):
        out.append("more ranks alone do not help (activations and gathered units do not shrink)")
    larger = [n for n in sequence_sizes(model.config, world, plan.attn_implementation) if n > plan.sequence_parallel]
    size = next((n for n in larger if fits(sequence_parallel=n)), None)
    if size:
        out.append(f"parallel.sequence_parallel_size={size} (--sequence-parallel {size})")
    if plan.optim != "adafactor" and fits(optim="adafactor"):
        out.append("train.optim=adafactor")
    if plan.master_weights == "fp32":
        optim = "adafactor" if plan.optim == "hf_adafactor" else plan.optim
        if fits(optim=optim, master_weights="bf16"):
            out.append("train.master_weights=bf16" + (" train.optim=adafactor" if optim != plan.optim else ""))
    if not plan.freeze["freeze_vision_tower"]:
        frozen = dict(plan.freeze, freeze_vision_tower=True)
        if not all(frozen.values()):
            apply_freezing(model, argparse.Namespace(**frozen))
            if fits(units_=plan_units(model)):
                out.append("model.freeze_vision_tower=true")
            apply_freezing(model, argparse.Namespace(**plan.freeze))
    if not plan.checkpointing and fits(checkpointing=True):
        out.append("fsdp.activation_checkpointing=true")
    most = _most_tokens(fits, plan, vision_patches)
    if most:
        out.append(f"at most ~{most} tokens per micro-batch (--tokens; data.max_length/pack_length)")
    return out


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ft.dryrun",
        description="Print the FSDP wrap plan of a Qwen VL model and an estimate of "
        "each rank's memory for parameters, gradients, optimizer state and activations, "
        "without loading weights (the model is built on the meta device), and whether it "
        "fits in --gpu-memory-gib.",
    )
    parser.add_argument("config", metavar="CONFIG",
                        help="a run config (.yaml, as ./launch.sh and python -m ft.loop take it), a model "
                        "folder holding config.json, or a config.json file")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides of the run config, as ./launch.sh and python -m ft.loop take them")
    parser.add_argument("--world-size", type=int, default=8, help="ranks sharing the model (default 8)")
    for part in PARTS:
        flag = "--" + part.freeze_field.replace("_", "-")
        parser.add_argument(flag, action="store_true", help=f"freeze the {part.name}: {part.what}")
    parser.add_argument("--optim", choices=field_choices("train.optim"), default=None,
                        help="optimizer state counted (default: the run config's train.optim, else "
                        f"{TrainConfig.optim}): " + "; ".join(
                            f"{name}: {spec.memory_note}" for name, spec in OPTIMIZERS.items()))
    parser.add_argument("--precision", choices=[c for c in field_choices("train.precision") if c != "auto"],
                        default=None,
                        help="compute dtype of the gathered parameters and activations (default: the "
                        "run config's train.precision, auto meaning bf16; else bf16)")
    parser.add_argument("--master-weights", choices=field_choices("train.master_weights"), default=None,
                        help="dtype of the parameter and gradient shards (default: the run config's "
                        f"train.master_weights, else {TrainConfig.master_weights})")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per micro-batch (default: the run config's data.pack_length if "
                        "packing, else data.max_length x train.per_device_train_batch_size)")
    parser.add_argument("--vision-patches", type=int, default=None,
                        help="vision patches per micro-batch (default: every token an image token, "
                        "4 patches each: an upper bound)")
    parser.add_argument("--sequence-parallel", type=int, default=None, metavar="N",
                        help="ranks sharing each micro-batch, each running the language model on 1/N of "
                        "its tokens (parallel.sequence_parallel_size; default: the run config's, else 1); "
                        "N must divide --world-size and the query heads")
    parser.add_argument("--no-activation-checkpointing", action="store_true",
                        help="estimate without activation checkpointing")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0,
                        help="memory of one GPU for the verdict (default 80)")
    return parser


def _check_numbers(parser: argparse.ArgumentParser, args) -> None:
    if args.world_size < 1:
        parser.error("--world-size must be >= 1")
    if args.tokens is not None and args.tokens < 1:
        parser.error("--tokens must be >= 1")
    if args.vision_patches is not None and args.vision_patches < 0:
        parser.error("--vision-patches must be >= 0")


def sequence_line(config, act: ActivationEstimate, world: int, kernel: str = "sdpa") -> str:
    """The report's line on sequence parallelism: N, the tokens per rank, the heads per
    rank, where the vision tower runs; at N 1, the sizes `world` ranks would allow."""
    size = act.sequence_parallel
    if size == 1:
        return (f"Sequence parallelism: off (parallel.sequence_parallel_size 1); --sequence-parallel N takes one "
                f"of {sequence_sizes(config, world, kernel)} at world size {world}")
    text = config.get_text_config()
    repeat = sequence.head_split(text, size)
    vision = f"all {act.vision_patches} patches on every rank" if act.vision_split == 1 \
        else f"{act.rank_patches} of the {act.vision_patches} patches per rank"
    groups = f"{world // size} group" + ("s" if world > size else "")
    return (f"Sequence parallelism: groups of {size} ranks share each micro-batch ({groups}): "
            f"{act.rank_tokens} of its {act.tokens} tokens per rank in the language model; attention on all "
            f"{act.tokens} with {text.num_attention_heads // size} query and "
            f"{text.num_key_value_heads * repeat // size} key/value heads per rank"
            + (f" (key/value heads repeated {repeat}x)" if repeat > 1 else "")
            + f"; the vision tower on {vision}")


def _report(model: nn.Module, plan: _Plan, args) -> None:
    """Print the plan, the memory table and the fit verdict."""
    units = plan_units(model)
    est = estimate_memory(units, args.world_size, plan.optim, plan.precision, plan.master_weights, plan.backend)
    act = estimate_activations(model.config, units, plan.tokens, plan.precision, plan.checkpointing,
                               plan.loss_chunk_size, args.vision_patches, plan.sequence_parallel)
    print(format_plan(units, args.world_size, root_names=root_members(model, units),
                      param_bytes=MASTER_DTYPES[plan.master_weights].itemsize))
    print(f"Sharding backend: {plan.backend} (fsdp.backend)")
    print(format_memory(est, act))
    gpu_bytes = int(args.gpu_memory_gib * 2**30)
    total = plan_total(est, act)
    suggestions = _suggestions(model, units, plan, args.world_size, gpu_bytes, args.vision_patches) \
        if total > gpu_bytes else []
    print(f"Tokens per micro-batch: {plan.tokens} ({plan.tokens_why}); activation checkpointing "
          f"{'on' if plan.checkpointing else 'off'}; loss chunk {plan.loss_chunk_size}")
    print(sequence_line(model.config, act, args.world_size, plan.attn_implementation))
    print(f"Fit check ({args.gpu_memory_gib:g} GiB per GPU): " + fit_verdict(total, gpu_bytes, suggestions))


def main(argv: list[str] | None = None) -> None:
    parser = _argument_parser()
    args = parser.parse_intermixed_args(argv)
    _check_numbers(parser, args)
    try:
        plan = _resolve(args, parser)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        model = build_on_meta(plan.model_path)
    except (OSError, ValueError) as e:
        print(f"error: {plan.model_path}: cannot read the model config: {e}".splitlines()[0], file=sys.stderr)
        sys.exit(2)
    try:
        check_sequence(model.config, plan.sequence_parallel, args.world_size, plan.attn_implementation)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    apply_freezing(model, argparse.Namespace(**plan.freeze))  # the freeze_* attributes of a ModelConfig
    _report(model, plan, args)


if __name__ == "__main__":
    main()

