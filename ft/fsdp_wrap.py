"""How Qwen2.5-VL is cut into FSDP units, and how those units are sharded.

This is the file to edit when you change the sharding. Read it in this order:

1. `WRAP_PLAN` — which module classes become their own FSDP unit, and which of those
   recompute their activations in the backward pass. Everything not matched stays in the
   root unit, which is wrapped last.
2. `plan_units` — turns the plan into the concrete list of units for a model (matched by
   class, never by attribute path: transformers 4.x and 5.x nest the towers differently).
   It raises if a rule matches nothing, so a renamed class cannot silently leave the
   whole model in one giant unit.
3. `wrap_model` — FSDP1 (`FullyShardedDataParallel`) with the reference recipe's knobs:
   FULL_SHARD, BACKWARD_PRE prefetch, limit_all_gathers, sync_module_states,
   use_orig_params=False, no CPU offload, bf16 compute over fp32 master weights.
4. `apply_checkpointing` — non-reentrant activation checkpointing, applied *after*
   wrapping (the FSDP1 order; FSDP2 does it the other way round).

`python -m ft.fsdp_wrap MODEL_DIR --world-size 8` prints the plan for any Qwen2.5-VL
config.json without loading weights (the model is built on the meta device).
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.fsdp import (
    BackwardPrefetch,
    CPUOffload,
    FullyShardedDataParallel as FSDP,
    MixedPrecision,
    ShardingStrategy,
)
from torch.distributed.fsdp.wrap import CustomPolicy
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionPatchEmbed,
    Qwen2_5_VLDecoderLayer,
    Qwen2_5_VLPatchMerger,
    Qwen2_5_VLVisionBlock,
)

from ft.dist import DistInfo, broadcast_module_state


# =====================================================================================
# The plan. Order is documentation order (vision tower first, then the language model);
# FSDP itself wraps bottom-up and the root last, whatever the order here.
# =====================================================================================
@dataclass(frozen=True)
class WrapRule:
    cls: type[nn.Module]
    why: str
    checkpoint: bool = False  # recompute this unit's activations in backward


WRAP_PLAN: list[WrapRule] = [
    WrapRule(
        Qwen2_5_VisionPatchEmbed,
        "Conv3d patch embedding: its own small unit so the root holds no vision weights",
    ),
    WrapRule(
        Qwen2_5_VLVisionBlock,
        "one ViT block: gathered just before it runs, freed right after",
        checkpoint=True,
    ),
    WrapRule(
        Qwen2_5_VLPatchMerger,
        "vision-to-language projector (the 'merger'): frozen or trained on its own",
    ),
    WrapRule(
        Qwen2_5_VLDecoderLayer,
        "one decoder layer of the language model: the bulk of the weights",
        checkpoint=True,
    ),
]
# Not in the plan, hence in the root unit: token embeddings, final norm and lm_head.
# When the embeddings are tied (3B) lm_head *is* embed_tokens.weight, and FSDP1 needs
# both uses in one unit. The root's parameters stay gathered from forward to backward,
# so on large-vocabulary models the root is the biggest all-gather: see `format_plan`.


@dataclass
class Unit:
    """One FSDP unit of the plan: `fqn` is its module path ("" for the root)."""

    fqn: str
    cls_name: str
    numel: int  # parameters this unit owns (nested units excluded; tied weights once)
    checkpoint: bool
    module: nn.Module = field(repr=False, compare=False)


class WrapPlanError(RuntimeError):
    pass


def plan_units(model: nn.Module, rules: list[WrapRule] = WRAP_PLAN) -> list[Unit]:
    """The FSDP units `wrap_model` will create for `model`, root last."""
    matched: list[tuple[str, nn.Module, WrapRule]] = []
    for rule in rules:
        hits = [(name, mod) for name, mod in model.named_modules() if type(mod) is rule.cls]
        if not hits:
            present = sorted({type(m).__name__ for m in model.modules()})
            raise WrapPlanError(
                f"wrap rule {rule.cls.__name__} matched no module of "
                f"{type(model).__name__}. Classes present: {', '.join(present)}. "
                "Fix WRAP_PLAN in ft/fsdp_wrap.py (transformers may have renamed the class)."
            )
        matched += [(name, mod, rule) for name, mod in hits]

    # A parameter belongs to the innermost unit that contains it, as in FSDP. Claim
    # parameters deepest-first so a nested unit's weights are not counted twice.
    claimed: set[int] = set()
    units: list[Unit] = []
    for name, mod, rule in sorted(matched, key=lambda t: -t[0].count(".")):
        own = [p for p in mod.parameters() if id(p) not in claimed]
        claimed.update(id(p) for p in own)
        units.append(Unit(name, rule.cls.__name__, sum(p.numel() for p in own), rule.checkpoint, mod))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    units.sort(key=lambda u: order[u.fqn])

    rest = [p for p in model.parameters() if id(p) not in claimed]
    units.append(Unit("", type(model).__name__, sum(p.numel() for p in rest), False, model))
    return units


def root_members(model: nn.Module, units: list[Unit]) -> list[str]:
    """Names of the modules whose own parameters end up in the root unit."""
    inside = {id(p) for u in units[:-1] for p in u.module.parameters()}
    return [
        name
        for name, mod in model.named_modules()
        if any(id(p) not in inside for p in mod.parameters(recurse=False))
    ]


def shard_numel(numel: int, world_size: int) -> int:
    """Elements of one unit's flat parameter held by each rank: FSDP1 pads the flat
    parameter to a multiple of the world size, then gives each rank an equal slice."""
    return math.ceil(numel / world_size)


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def format_plan(
    units: list[Unit],
    world_size: int,
    param_bytes: int = 4,
    root_names: list[str] | None = None,
) -> str:
    """A table of the plan; runs of identical layers are folded into one line.

    `param_bytes` is the size of the sharded (master) parameter: 4 for fp32.
    """
    groups: list[tuple[str, Unit, int]] = []  # (label, first unit, count)
    for u in units:
        base = re.sub(r"\.(\d+)$", "", u.fqn)
        last = groups[-1] if groups else None
        if (
            last
            and last[1].cls_name == u.cls_name
            and last[1].numel == u.numel
            and re.sub(r"\.(\d+)$", "", last[1].fqn) == base
            and base != u.fqn
        ):
            groups[-1] = (last[0], last[1], last[2] + 1)
        else:
            groups.append((u.fqn or "<root>", u, 1))

    lines = [
        f"FSDP units (world size {world_size}; per rank = ceil(params / {world_size}) "
        f"x {param_bytes} B master weights):",
        f"  {'unit':<44} {'class':<34} {'params':>9} {'per rank':>10}  ckpt",
    ]
    for label, u, count in groups:
        if count > 1:
            i0 = int(u.fqn.rsplit(".", 1)[1])
            label = f"{u.fqn.rsplit('.', 1)[0]}.{{{i0}..{i0 + count - 1}}} x{count}"
        per_rank = shard_numel(u.numel, world_size) * param_bytes
        lines.append(
            f"  {label:<44} {u.cls_name:<34} {_fmt_count(u.numel):>9} "
            f"{_fmt_bytes(per_rank):>10}  {'yes' if u.checkpoint else '-'}"
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
    return "\n".join(lines)


# =====================================================================================
# Wrapping
# =====================================================================================
_STRATEGIES = {
    "FULL_SHARD": ShardingStrategy.FULL_SHARD,
    "SHARD_GRAD_OP": ShardingStrategy.SHARD_GRAD_OP,
    "NO_SHARD": ShardingStrategy.NO_SHARD,
    "HYBRID_SHARD": ShardingStrategy.HYBRID_SHARD,
}
_PREFETCH = {
    "BACKWARD_PRE": BackwardPrefetch.BACKWARD_PRE,
    "BACKWARD_POST": BackwardPrefetch.BACKWARD_POST,
    "NONE": None,
}


def mixed_precision(precision: str, reduce_dtype: str = "fp32") -> MixedPrecision | None:
    """bf16 compute over fp32 master weights. FSDP keeps the sharded fp32 parameters for
    the optimizer and casts a bf16 copy for each all-gather. Gradients are reduced in
    `reduce_dtype` (fp32 by default: summing many ranks' bf16 gradients loses bits).
    Buffers stay fp32: rotary `inv_freq` in bf16 visibly shifts long-context positions."""
    if precision == "fp32":
        return None
    if precision != "bf16":
        raise ValueError(f"precision must be 'bf16' or 'fp32' here, got {precision!r}")
    return MixedPrecision(
        param_dtype=torch.bfloat16,
        reduce_dtype=torch.float32 if reduce_dtype == "fp32" else torch.bfloat16,
        buffer_dtype=torch.float32,
    )


def wrap_model(
    model: nn.Module, units: list[Unit], fsdp_cfg, precision: str, info: DistInfo
) -> FSDP:
    """Shard `model` into the planned units (root last) and return the root FSDP module.

    `model` must already hold rank 0's weights on rank 0; other ranks may hold garbage
    of the right shapes (see `ft.model.load_model`): the states are made equal here.
    """
    if fsdp_cfg.sync_module_states and not info.on_gpu:
        # FSDP refuses sync_module_states on CPU ("requires them to be on GPU"), so do the
        # same broadcast by hand before wrapping: identical result, one collective per tensor.
        broadcast_module_state(model, src=0)

    unit_modules = {id(u.module) for u in units[:-1]}
    wrapped = FSDP(
        model,
        auto_wrap_policy=CustomPolicy(lambda m: id(m) in unit_modules),
        sharding_strategy=_STRATEGIES[fsdp_cfg.sharding_strategy],
        backward_prefetch=_PREFETCH[fsdp_cfg.backward_prefetch],
        forward_prefetch=fsdp_cfg.forward_prefetch,
        limit_all_gathers=fsdp_cfg.limit_all_gathers,
        # On GPU, FSDP broadcasts rank 0's parameters and buffers unit by unit as it wraps.
        sync_module_states=fsdp_cfg.sync_module_states and info.on_gpu,
        use_orig_params=fsdp_cfg.use_orig_params,
        cpu_offload=CPUOffload(offload_params=True) if fsdp_cfg.cpu_offload else None,
        mixed_precision=mixed_precision(precision, fsdp_cfg.reduce_dtype),
        # FSDP on CPU needs device_id=cpu ("needs a non-CPU accelerator device" otherwise).
        device_id=info.device,
    )

    # Check that FSDP built exactly the planned units: a silent mismatch here means the
    # memory figures printed at start-up are wrong.
    built = {id(m.module) for m in FSDP.fsdp_modules(wrapped)}
    expected = unit_modules | {id(model)}
    if built != expected:
        raise WrapPlanError(
            f"FSDP built {len(built)} units but the plan has {len(expected)}: "
            "a module matched twice or a nested unit was skipped"
        )
    return wrapped


def apply_checkpointing(model: FSDP, rules: list[WrapRule] = WRAP_PLAN) -> int:
    """Non-reentrant activation checkpointing on the units the plan marks. Returns how
    many modules were wrapped.

    Applied after FSDP wrapping, so each checkpoint wrapper sits inside its FSDP unit:
    in the backward pass FSDP all-gathers the unit once, then the unit's forward is
    recomputed and its backward runs on the gathered weights. Do not also call HF's
    `gradient_checkpointing_enable()`: the layers would be recomputed twice.
    """
    classes = tuple(r.cls for r in rules if r.checkpoint)
    if not classes:
        return 0
    count = sum(1 for m in model.modules() if isinstance(m, classes))
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, classes),
    )
    return count


# =====================================================================================
# Dry run: print the plan for a config, no weights, no GPU.
# =====================================================================================
def build_on_meta(model_dir: str) -> nn.Module:
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration._from_config(config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ft.fsdp_wrap",
        description="Print the FSDP wrap plan of a Qwen2.5-VL model without loading weights.",
    )
    parser.add_argument("model_dir", help="folder with the model's config.json")
    parser.add_argument("--world-size", type=int, default=8)
    args = parser.parse_args(argv)
    model = build_on_meta(args.model_dir)
    units = plan_units(model)
    print(format_plan(units, args.world_size, root_names=root_members(model, units)))


if __name__ == "__main__":
    main()
