"""The dry run: print the wrap plan and a per-rank memory estimate for any Qwen2.5-VL
config.json, without loading weights (the model is built on the meta device) and
without a GPU. The loop prints the same plan at start-up (`format_plan`).

    python -m ft.dryrun /models/Qwen2.5-VL-7B-Instruct --world-size 16 [--freeze-vision-tower] [--optim adamw]
"""

from __future__ import annotations

import argparse
import re
from typing import NamedTuple

import torch
from torch import nn

from ft.backends import BACKENDS, DEFAULT
from ft.config import field_choices
from ft.fsdp_wrap import Unit, plan_units, root_members
from ft.optim import OPTIMIZERS
from ft.parts import PART_NAMES, PARTS, apply_freezing


def shard_numel(numel: int, world_size: int, backend: str = DEFAULT) -> int:
    """Elements of a unit of `numel` parameters that each rank holds."""
    return BACKENDS[backend].shard_numel(numel, world_size)


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _checkpoint_label(u: Unit) -> str:
    """`yes`: the unit's module is recomputed in backward; `N`: that many modules inside
    it are; `skip`: a checkpointed class that backward never reaches (frozen); `-`: none."""
    if u.recompute:
        return "yes" if list(u.recompute) == [u.fqn] else str(len(u.recompute))
    return "skip" if u.recompute_skipped else "-"


def format_plan(
    units: list[Unit],
    world_size: int,
    param_bytes: int = 4,
    root_names: list[str] | None = None,
) -> str:
    """A table of the plan; runs of identical layers are folded into one line. Frozen
    units are marked; `skip` in the ckpt column is a checkpointed class that
    `apply_checkpointing` leaves alone because backward never reaches it.

    `param_bytes` is the size of the sharded (master) parameter: 4 for fp32.
    """
    def status(u: Unit) -> str:
        if u.trainable_numel == u.numel:
            return "train"
        return "frozen" if u.trainable_numel == 0 else "MIXED"

    groups: list[tuple[str, Unit, int]] = []  # (label, first unit, count)
    for u in units:
        base = re.sub(r"\.(\d+)$", "", u.fqn)
        last = groups[-1] if groups else None
        if (
            last
            and last[1].cls_name == u.cls_name
            and last[1].numel == u.numel
            and status(last[1]) == status(u)
            and re.sub(r"\.(\d+)$", "", last[1].fqn) == base
            and base != u.fqn
        ):
            groups[-1] = (last[0], last[1], last[2] + 1)
        else:
            groups.append((u.fqn or "<root>", u, 1))

    lines = [
        f"FSDP units (world size {world_size}; per rank = ceil(params / {world_size}) "
        f"x {param_bytes} B master weights):",
        f"  {'unit':<44} {'class':<34} {'part':<12} {'params':>9} {'per rank':>10}  ckpt  status",
    ]
    for label, u, count in groups:
        if count > 1:
            i0 = int(u.fqn.rsplit(".", 1)[1])
            label = f"{u.fqn.rsplit('.', 1)[0]}.{{{i0}..{i0 + count - 1}}} x{count}"
        per_rank = shard_numel(u.numel, world_size) * param_bytes
        lines.append(
            f"  {label:<44} {u.cls_name:<34} {'+'.join(u.parts):<12} {_fmt_count(u.numel):>9} "
            f"{_fmt_bytes(per_rank):>10}  {_checkpoint_label(u):<4}  {status(u)}"
        )
    if root_names:
        shown = ", ".join(root_names[:6]) + (" ..." if len(root_names) > 6 else "")
        lines.append(f"  root holds: {shown}")
    total = sum(u.numel for u in units)
    per_rank_total = sum(shard_numel(u.numel, world_size) for u in units) * param_bytes
    biggest = max(units, key=lambda u: u.numel)
    lines.append(
        f"  total {_fmt_count(total)} params in {len(units)} units; "
        f"{_fmt_bytes(per_rank_total)} of master weights per rank; "
        f"largest unit {biggest.fqn or '<root>'} ({_fmt_count(biggest.numel)} params, "
        "the biggest all-gather)"
    )
    per_part = []
    for name in PART_NAMES:
        in_part = [p for u in units for n, p in u.params.items() if u.part_of[n] == name]
        size = sum(p.numel() for p in in_part)
        trainable = sum(p.numel() for p in in_part if p.requires_grad)
        state = {0: "frozen", size: "trainable"}.get(trainable, f"{_fmt_count(trainable)} trainable")
        per_part.append(f"{name} {_fmt_count(size)} {state}")
    trainable_total = sum(u.trainable_numel for u in units)
    lines.append(f"  trainable {_fmt_count(trainable_total)} of {_fmt_count(total)} params: "
                 + ", ".join(per_part))
    return "\n".join(lines)




# =====================================================================================
# Per-rank memory, computed from the plan
# =====================================================================================
class MemoryEstimate(NamedTuple):
    """Bytes per rank. Activations, buffers and the CUDA context are not included."""

    world_size: int
    precision: str
    optim: str
    master: int  # fp32 parameter shards
    gathered: int  # compute-dtype unsharded copies alive at once (see estimate_memory)
    gathered_units: tuple[Unit, Unit | None]  # (root, largest other unit)
    gradients: int  # fp32 gradient shards of the trainable units
    optimizer: int  # optimizer state on the worst rank
    trainable: int  # trainable parameters (whole model)


def estimate_memory(units: list[Unit], world_size: int, optim: str, precision: str) -> MemoryEstimate:
    """Per-rank memory of parameters, gradients and optimizer state under FULL_SHARD.

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
    trainable_shard = sum(shard_numel(u.numel, world_size) for u in units if u.trainable_numel)
    root, others = units[-1], units[:-1]
    largest = max(others, key=lambda u: u.numel, default=None)
    compute_bytes = 2 if precision == "bf16" else 4
    gathered = (root.numel + 2 * (largest.numel if largest else 0)) * compute_bytes
    optimizer = OPTIMIZERS[optim].state_bytes(units, world_size, DEFAULT)
    return MemoryEstimate(
        world_size=world_size,
        precision=precision,
        optim=optim,
        master=sum(shard_numel(u.numel, world_size) for u in units) * 4,
        gathered=gathered,
        gathered_units=(root, largest),
        gradients=trainable_shard * 4,
        optimizer=optimizer,
        trainable=sum(u.trainable_numel for u in units),
    )


def format_memory(est: MemoryEstimate) -> str:
    root, largest = est.gathered_units
    biggest = max((u for u in est.gathered_units if u), key=lambda u: u.numel)
    dtype = est.precision
    gathered_why = f"<root> {_fmt_count(root.numel)}"
    if largest:
        gathered_why += f" + 2 x {largest.fqn} {_fmt_count(largest.numel)} (running + prefetched)"
    optim_why = OPTIMIZERS[est.optim].memory_note
    total = est.master + est.gathered + est.gradients + est.optimizer
    rows = [
        ("parameters", est.master, "fp32 master shards"),
        ("", est.gathered, f"{dtype} gathered during compute: {gathered_why}"),
        ("gradients", est.gradients, f"fp32 shards, trainable units only ({_fmt_count(est.trainable)} params)"),
        ("optimizer", est.optimizer, f"{est.optim}: {optim_why}"),
        ("total", total, "+ activations, buffers, allocator slack"),
    ]
    lines = [
        f"Per-rank memory estimate (world size {est.world_size}, {dtype} compute, {est.optim}); "
        f"largest all-gather: {biggest.fqn or '<root>'}, {_fmt_count(biggest.numel)} params = "
        f"{_fmt_bytes(biggest.numel * (2 if dtype == 'bf16' else 4))} in {dtype}",
    ]
    lines += [f"  {name:<11} {_fmt_bytes(n):>10}  {why}" for name, n, why in rows]
    return "\n".join(lines)


# =====================================================================================
# Dry run: print the plan for a config, no weights, no GPU.
# =====================================================================================
def build_on_meta(config_path: str) -> nn.Module:
    """The model of a config.json (or of the folder holding one), on the meta device."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(config_path)
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration._from_config(config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ft.dryrun",
        description="Print the FSDP wrap plan of a Qwen2.5-VL model and an estimate of "
        "each rank's memory for parameters, gradients and optimizer state, without "
        "loading weights (the model is built on the meta device).",
    )
    parser.add_argument("config", metavar="CONFIG",
                        help="a model folder holding config.json, or a config.json file")
    parser.add_argument("--world-size", type=int, default=8)
    for part in PARTS:
        flag = "--" + part.freeze_field.replace("_", "-")
        parser.add_argument(flag, action="store_true", help=f"freeze the {part.name}: {part.what}")
    parser.add_argument("--optim", choices=field_choices("train.optim"), default="adafactor",
                        help="optimizer state counted: " + "; ".join(
                            f"{name}: {spec.memory_note}" for name, spec in OPTIMIZERS.items()))
    parser.add_argument("--precision", choices=[c for c in field_choices("train.precision") if c != "auto"],
                        default="bf16",
                        help="compute dtype of the gathered parameters")
    args = parser.parse_args(argv)
    if args.world_size < 1:
        parser.error("--world-size must be >= 1")
    if all(getattr(args, p.freeze_field) for p in PARTS):
        parser.error("every part is frozen: nothing would be trained")
    model = build_on_meta(args.config)
    apply_freezing(model, args)  # args has the freeze_* attributes of a ModelConfig
    units = plan_units(model)
    print(format_plan(units, args.world_size, root_names=root_members(model, units)))
    print(format_memory(estimate_memory(units, args.world_size, args.optim, args.precision)))


if __name__ == "__main__":
    main()

