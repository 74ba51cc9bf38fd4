"""How Qwen2.5-VL is cut into FSDP units, and how those units are sharded.

This is the file to edit when you change the sharding. Read it in this order:

1. `WRAP_PLAN` — which module classes become their own FSDP unit, and which of those
   recompute their activations in the backward pass. Everything not matched stays in the
   root unit, which is wrapped last.
2. `PARTS` — the three parts a user can freeze or give their own learning rate: the
   vision tower, the merger and the language model (`model.freeze_*`,
   `train.vision_lr`, `train.merger_lr`). `apply_freezing` sets `requires_grad` from
   the config before wrapping; `param_groups` builds the optimizer's groups after it.
3. `plan_units` — turns the plan into the concrete list of units for a model (matched by
   class, never by attribute path: transformers 4.x and 5.x nest the towers differently).
   It raises if a rule matches nothing, so a renamed class cannot silently leave the
   whole model in one giant unit.
4. `wrap_model` — FSDP1 (`FullyShardedDataParallel`) with the reference recipe's knobs:
   FULL_SHARD, BACKWARD_PRE prefetch, limit_all_gathers, sync_module_states,
   use_orig_params=False, no CPU offload, bf16 compute over fp32 master weights.
   It first refuses a unit that mixes frozen and trainable parameters
   (`check_uniform_requires_grad`): FSDP1 flattens a unit into one tensor with one
   `requires_grad`.
5. `apply_checkpointing` — non-reentrant activation checkpointing, applied *after*
   wrapping (the FSDP1 order; FSDP2 does it the other way round), skipped on frozen
   units that the backward pass never reaches.

The loop calls them in this order: `load_model`, `apply_freezing`, `plan_units`,
`format_plan`, `wrap_model`, `apply_checkpointing`, `param_groups` (into the optimizer).

`python -m ft.fsdp_wrap MODEL_DIR_OR_CONFIG_JSON --world-size 8` prints the plan and a
per-rank memory estimate for any Qwen2.5-VL config.json without loading weights (the
model is built on the meta device); see `main` for the freeze and optimizer options.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

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
from torch.distributed.fsdp._flat_param import FlatParameter
from torch.distributed.fsdp.wrap import CustomPolicy
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionPatchEmbed,
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLDecoderLayer,
    Qwen2_5_VLPatchMerger,
    Qwen2_5_VLVisionBlock,
)

from ft.dist import DistInfo, broadcast_module_state
from ft.optim import adafactor_state_bytes


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
        "Conv3d patch embedding: its own small unit so the root holds no vision weights "
        "(the vision tower can then be frozen while the root trains)",
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
# Not in the plan, hence in the root unit: token embeddings, final norm and lm_head (all
# language model; the vision tower's only parameter-free child, its rotary embedding,
# holds buffers only). When the embeddings are tied (3B) lm_head *is*
# embed_tokens.weight, and FSDP1 needs both uses in one unit. The root's parameters stay
# gathered from forward to backward, so on large-vocabulary models the root is the
# biggest all-gather: see `format_plan`.


# =====================================================================================
# Parts: what `model.freeze_*` and the per-part learning rates act on.
# =====================================================================================
@dataclass(frozen=True)
class Part:
    name: str
    cls: type[nn.Module] | None  # the part is this class's subtree; None: all the rest
    freeze_field: str  # in ModelConfig
    lr_field: str  # in TrainConfig; a negative value there means train.learning_rate
    what: str


# In forward data-flow order (pixels -> tower -> merger -> language model): a frozen part
# still carries gradients in backward when a part before it trains.
PARTS: list[Part] = [
    Part(
        "vision_tower", Qwen2_5_VisionTransformerPretrainedModel, "freeze_vision_tower", "vision_lr",
        "the ViT: patch_embed, blocks, rotary_pos_emb (its child merger is a part of its own)",
    ),
    Part(
        "merger", Qwen2_5_VLPatchMerger, "freeze_merger", "merger_lr",
        "the projector from vision features to the language model's embeddings",
    ),
    Part(
        "llm", None, "freeze_llm", "learning_rate",
        "everything else: embed_tokens, decoder layers, final norm, lm_head",
    ),
]
PART_NAMES = [p.name for p in PARTS]


class WrapPlanError(RuntimeError):
    pass


def module_parts(model: nn.Module) -> dict[int, str]:
    """The part of every module of `model`, by `id`: that of its nearest ancestor (itself
    included) whose class a `Part` names. FSDP and checkpoint wrappers match no part, so
    this works the same on the wrapped model."""
    by_cls = {p.cls: p.name for p in PARTS if p.cls is not None}
    rest = next(p.name for p in PARTS if p.cls is None)
    parts: dict[int, str] = {}
    found: set[type] = set()
    stack = [(model, rest)]
    while stack:
        mod, part = stack.pop()
        if type(mod) in by_cls:
            found.add(type(mod))
            part = by_cls[type(mod)]
        parts[id(mod)] = part
        stack += [(child, part) for child in mod.children()]
    missing = [cls.__name__ for cls in by_cls if cls not in found]
    if missing:
        # Otherwise freeze_vision_tower would silently freeze nothing.
        raise WrapPlanError(
            f"part class {', '.join(missing)} matched no module of {type(model).__name__}: "
            "fix PARTS in ft/fsdp_wrap.py (transformers may have renamed the class)"
        )
    return parts


def _unwrapped_name(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def _parameters_by_part(model: nn.Module) -> list[tuple[str, nn.Parameter, dict[str, list[str]]]]:
    """Each parameter of `model` once: (its name, it, {part: names of the weights of that
    part it holds}). A plain parameter holds one weight; an FSDP1 FlatParameter holds all
    the original parameters of its unit, found through its owning modules (`_param_infos`,
    private but present since torch 2.0)."""
    parts = module_parts(model)
    result = []
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights
                continue
            seen.add(id(p))
            name = _unwrapped_name(f"{mod_name}.{p_name}" if mod_name else p_name)
            if isinstance(p, FlatParameter):
                prefix = _unwrapped_name(f"{mod_name}.") if mod_name else ""
                held = [(parts[id(info.module)], prefix + fqn) for info, fqn in zip(p._param_infos, p._fqns)]
            else:
                held = [(parts[id(mod)], name)]
            by_part = {part: [n for q, n in held if q == part] for part in PART_NAMES}
            result.append((name, p, {part: names for part, names in by_part.items() if names}))
    return result


def apply_freezing(model: nn.Module, model_cfg) -> dict[str, dict[str, int | bool]]:
    """Set `requires_grad` of every parameter from `model_cfg.freeze_*`, before wrapping
    (FSDP1 fixes each flat parameter's `requires_grad` when it builds it). Returns
    {part: {"params": count, "frozen": bool}} in `PARTS` order."""
    frozen = {p.name for p in PARTS if getattr(model_cfg, p.freeze_field)}
    summary: dict[str, dict[str, int | bool]] = {
        name: {"params": 0, "frozen": name in frozen} for name in PART_NAMES
    }
    for _, param, held in _parameters_by_part(model):
        (part,) = held  # unwrapped: one weight per parameter
        param.requires_grad_(part not in frozen)
        summary[part]["params"] += param.numel()
    return summary


def part_learning_rates(train_cfg) -> dict[str, float]:
    """Peak learning rate of each part: its own field when set (>= 0), else learning_rate."""
    lrs = {}
    for p in PARTS:
        lr = getattr(train_cfg, p.lr_field)
        lrs[p.name] = lr if lr >= 0 else train_cfg.learning_rate
    return lrs


def param_groups(model: nn.Module, train_cfg) -> list[dict]:
    """The optimizer's parameter groups of the wrapped `model`, one per part that trains:
    [{"name": part, "params": [trainable parameters], "lr": peak lr}] in `PARTS` order.

    Under use_orig_params=False these are FSDP's flat parameters, one per unit, so each
    unit must hold one part's weights only (the plan guarantees it; an edited plan that
    merges two parts is refused here).
    """
    lrs = part_learning_rates(train_cfg)
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in PART_NAMES}
    for name, param, held in _parameters_by_part(model):
        if not param.requires_grad:
            continue
        if len(held) > 1:
            detail = "; ".join(f"{part}: {_few(names)}" for part, names in held.items())
            raise WrapPlanError(
                f"{name} holds weights of {len(held)} parts, which then cannot have their "
                f"own learning rates ({detail}). Give each part its own units in WRAP_PLAN "
                "(ft/fsdp_wrap.py)."
            )
        groups[next(iter(held))].append(param)
    return [{"name": name, "params": ps, "lr": lrs[name]} for name, ps in groups.items() if ps]


def _backward_reaches(part: str, trains: bool, trainable_parts: set[str]) -> bool:
    """Whether backward runs through a module of `part` (`trains`: it has trainable
    parameters): yes if it trains or if its part or one before it in `PARTS` does."""
    upstream = PART_NAMES[: PART_NAMES.index(part) + 1]
    return trains or any(p in trainable_parts for p in upstream)


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# =====================================================================================
# Units
# =====================================================================================
@dataclass
class Unit:
    """One FSDP unit of the plan: `fqn` is its module path ("" for the root)."""

    fqn: str
    cls_name: str
    checkpoint: bool
    module: nn.Module = field(repr=False, compare=False)
    # The parameters this unit owns (nested units excluded, tied weights once), by name,
    # in the order FSDP1 lays them out in the unit's flat parameter.
    params: dict[str, nn.Parameter] = field(repr=False, compare=False)
    part_of: dict[str, str] = field(repr=False, compare=False)  # parameter name -> its part

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts its weights belong to, in `PARTS` order: one, unless the plan was edited."""
        return tuple(name for name in PART_NAMES if name in self.part_of.values())

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @property
    def trainable_numel(self) -> int:
        return sum(p.numel() for p in self.params.values() if p.requires_grad)


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

    by_part = _parameters_by_part(model)
    names = {id(p): name for name, p, _ in by_part}
    part_of = {id(p): next(iter(held)) for _, p, held in by_part}

    def unit(fqn: str, mod: nn.Module, checkpoint: bool, own: list[nn.Parameter]) -> Unit:
        return Unit(fqn, type(mod).__name__, checkpoint, mod, {names[id(p)]: p for p in own},
                    {names[id(p)]: part_of[id(p)] for p in own})

    # A parameter belongs to the innermost unit that contains it, as in FSDP. Claim
    # parameters deepest-first so a nested unit's weights are not counted twice.
    claimed: set[int] = set()
    units: list[Unit] = []
    for name, mod, rule in sorted(matched, key=lambda t: -t[0].count(".")):
        own = [p for p in mod.parameters() if id(p) not in claimed]
        claimed.update(id(p) for p in own)
        units.append(unit(name, mod, rule.checkpoint, own))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    units.sort(key=lambda u: order[u.fqn])

    units.append(unit("", model, False, [p for p in model.parameters() if id(p) not in claimed]))
    return units


def check_uniform_requires_grad(units: list[Unit]) -> None:
    """Refuse a unit that mixes frozen and trainable parameters, naming the unit and the
    parameters: FSDP1 without use_orig_params flattens a unit into one tensor, which has
    one `requires_grad`, and its own error ("Must flatten tensors with uniform
    requires_grad") does not say which unit. `wrap_model` calls this."""
    for u in units:
        frozen = [n for n, p in u.params.items() if not p.requires_grad]
        trainable = [n for n, p in u.params.items() if p.requires_grad]
        if frozen and trainable:
            raise WrapPlanError(
                f"FSDP unit {u.fqn or '<root>'} ({u.cls_name}) mixes frozen and trainable "
                f"parameters: frozen {_few(frozen)}; trainable {_few(trainable)}. FSDP1 "
                "flattens a unit into one tensor with one requires_grad: give the frozen "
                "modules their own WrapRule in WRAP_PLAN (ft/fsdp_wrap.py)."
            )


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
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _checkpoint_label(u: Unit, trainable_parts: set[str]) -> str:
    if not u.checkpoint:
        return "-"
    reached = any(_backward_reaches(part, u.trainable_numel > 0, trainable_parts) for part in u.parts)
    return "yes" if reached else "skip"


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

    trainable_parts = {part for u in units if u.trainable_numel for part in u.parts}
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
            f"{_fmt_bytes(per_rank):>10}  {_checkpoint_label(u, trainable_parts):<4}  {status(u)}"
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
    Freeze parts (`apply_freezing`) before calling this.
    """
    if not fsdp_cfg.use_orig_params:
        # Before any collective, so every rank raises the same readable error.
        check_uniform_requires_grad(units)
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


class CheckpointSummary(NamedTuple):
    wrapped: int  # modules whose activations are recomputed in backward
    skipped: int  # modules of a checkpointed class that backward never reaches (frozen)


def apply_checkpointing(model: FSDP, rules: list[WrapRule] = WRAP_PLAN) -> CheckpointSummary:
    """Non-reentrant activation checkpointing on the units the plan marks.

    Applied after FSDP wrapping, so each checkpoint wrapper sits inside its FSDP unit:
    in the backward pass FSDP all-gathers the unit once, then the unit's forward is
    recomputed and its backward runs on the gathered weights. Do not also call HF's
    `gradient_checkpointing_enable()`: the layers would be recomputed twice.

    A frozen module is skipped only when backward never reaches it (no part up to its
    own in `PARTS` trains, e.g. a frozen vision tower): it builds no autograd graph, so
    there is nothing to recompute. Frozen decoder layers keep their checkpointing when
    the vision side trains: the gradient flows through them to the merger, and their
    activations would otherwise be stored.
    """
    classes = tuple(r.cls for r in rules if r.checkpoint)
    if not classes:
        return CheckpointSummary(0, 0)
    parts = module_parts(model)
    trainable_parts = {part for _, p, held in _parameters_by_part(model) if p.requires_grad for part in held}
    targets = [m for m in model.modules() if isinstance(m, classes)]
    keep = {
        id(m) for m in targets
        if _backward_reaches(parts[id(m)], any(p.requires_grad for p in m.parameters()), trainable_parts)
    }
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: id(m) in keep,
    )
    return CheckpointSummary(len(keep), len(targets) - len(keep))


# =====================================================================================
# Per-rank memory, computed from the plan (the dry run prints it).
# =====================================================================================
OPTIMIZERS = ("adafactor", "hf_adafactor", "adamw")


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
    if optim == "adafactor":
        optimizer = max(adafactor_state_bytes(units, world_size, rank) for rank in range(world_size))
    else:
        optimizer = trainable_shard * (8 if optim == "adamw" else 4)
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
    optim_why = {
        "adamw": "2 fp32 moments per trainable shard element",
        "hf_adafactor": "1 fp32 moment per trainable shard element (unfactored on flat shards)",
        "adafactor": "full fp32 row+col factors of the matrices a rank touches, worst rank",
    }[est.optim]
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
        prog="python -m ft.fsdp_wrap",
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
    parser.add_argument("--optim", choices=OPTIMIZERS, default="adafactor",
                        help="adafactor: ft's shard-invariant Adafactor (factored); "
                        "hf_adafactor: HF's, unfactored on flat shards; adamw")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
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
