"""How a Qwen VL model is cut into FSDP units, and which modules recompute their activations.
**This is the file to edit when you change the sharding.** Read it in this order:

1. `WRAP_PLAN`: one `WrapRule` per role (`ft.families`: the class playing it in the
   model's family, e.g. `vision_block` is `Qwen2_5_VLVisionBlock` in Qwen2.5-VL and
   `Qwen3VLVisionBlock` in Qwen3-VL), saying whether each matched module becomes its own
   FSDP unit (`unit`), and whether it recomputes its activations in backward
   (`checkpoint`). The two are separate decisions: one unit for the whole vision tower
   with per-block checkpointing is `WrapRule("vision_tower", ..., unit=True)` plus
   `WrapRule("vision_block", ..., unit=False, checkpoint=True)`. Everything that no
   unit rule matches stays in the root unit, which is wrapped last.
2. `plan_units`: the plan for a concrete model, as data (`Unit`s, root last): which
   parameters each unit owns, and which modules in it are recomputed. Matched by class,
   never by attribute path; a rule that matches nothing is refused, so a renamed class
   cannot silently leave the whole model in one giant unit. Checkpointing is skipped
   where no backward pass reaches (`ft.parts.backward_reaches`: a frozen vision tower).
   `format_plan` prints it as a table, at the loop's start-up and in the dry run
   (`python -m ft.dryrun`, for any config.json without loading weights).
3. `wrap_model`: hands the plan to the sharding backend (`fsdp.backend`: `ft.fsdp1` or
   `ft.fsdp2`), which wraps and applies checkpointing in its own order. An FSDP1 unit is
   one flat tensor with one `requires_grad`, so under FSDP1 a unit that mixes frozen and
   trainable weights is refused first, naming it (`check_uniform_requires_grad`); FSDP2
   keeps one `requires_grad` per parameter and takes such units.

The loop calls `load_model`, `ft.parts.apply_freezing`, `plan_units`, `wrap_model`, then
`ft.parts.param_groups` (into the optimizer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn

from ft.backends import BACKENDS, DEFAULT
from ft.dist import DistInfo
from ft.families import FAMILIES, family_of
from ft.parts import (PART_NAMES, WrapPlanError, backward_reaches, few, module_parts, parameters_by_part,
                      trainable_parts)

__all__ = ["WRAP_PLAN", "WrapRule", "Unit", "WrapPlanError", "plan_units", "check_uniform_requires_grad",
           "checkpoint_summary", "root_members", "wrap_model", "format_plan", "per_rank_numel", "fmt_count",
           "fmt_bytes"]


# =====================================================================================
# The plan. Order is documentation order (vision tower first, then the language model);
# FSDP itself wraps bottom-up and the root last, whatever the order here.
# =====================================================================================
@dataclass(frozen=True)
class WrapRule:
    role: str  # the module class playing this role in the model's family (ft.families)
    why: str
    unit: bool = True  # each matched module becomes its own FSDP unit
    checkpoint: bool = False  # each matched module recomputes its activations in backward


WRAP_PLAN: list[WrapRule] = [
    WrapRule(
        "vision_own",
        "the vision tower's weights outside its blocks and mergers (the Conv3d patch "
        "embedding; Qwen3-VL's learned position embedding too): a unit of their own so the "
        "root holds no vision weights (the vision tower can then be frozen while the root trains)",
    ),
    WrapRule(
        "vision_block",
        "one ViT block: gathered just before it runs, freed right after",
        checkpoint=True,
    ),
    WrapRule(
        "merger",
        "vision-to-language projector (the 'merger'; Qwen3-VL also has one per DeepStack "
        "level): frozen or trained on its own",
    ),
    WrapRule(
        "router",
        "an MoE router (Qwen3-VL-MoE's gate in each decoder layer): a small unit of its own, so "
        "that it can be frozen or get its own learning rate while its layer's experts train",
    ),
    WrapRule(
        "decoder_layer",
        "one decoder layer of the language model: the bulk of the weights",
        checkpoint=True,
    ),
]
# Not in the plan, hence in the root unit: token embeddings, final norm and lm_head (all
# language model; the vision tower's only parameter-free child, its rotary embedding,
# holds buffers only). When the embeddings are tied (3B) lm_head *is*
# embed_tokens.weight, and FSDP1 needs both uses in one unit. The root's parameters stay
# gathered from forward to backward, so on large-vocabulary models the root is the
# biggest all-gather (the dry run says so).


# =====================================================================================
# Units
# =====================================================================================
@dataclass
class Unit:
    """One FSDP unit of the plan: `fqn` is its module path ("" for the root)."""

    fqn: str
    cls_name: str
    module: nn.Module = field(repr=False, compare=False)
    # The parameters this unit owns (nested units excluded, tied weights once), by name,
    # in the order FSDP1 lays them out in the unit's flat parameter.
    params: dict[str, nn.Parameter] = field(repr=False, compare=False)
    part_of: dict[str, str] = field(repr=False, compare=False)  # parameter name -> its part
    # Modules of this unit (itself included, nested units excluded) that a rule marks
    # `checkpoint`, by path: those recomputed in backward, and those left alone because
    # no backward pass reaches them (frozen, with nothing trainable before them).
    recompute: dict[str, nn.Module] = field(default_factory=dict, repr=False, compare=False)
    recompute_skipped: dict[str, nn.Module] = field(default_factory=dict, repr=False, compare=False)

    @property
    def checkpoint(self) -> bool:
        """Whether the unit's own module is a checkpointed class."""
        return self.fqn in self.recompute or self.fqn in self.recompute_skipped

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


def _matches(model: nn.Module, rule: WrapRule) -> list[tuple[str, nn.Module]]:
    family = family_of(model)
    cls = family.cls(rule.role)
    hits = [(name, mod) for name, mod in model.named_modules() if type(mod) is cls]
    if not hits:
        present = sorted({type(m).__name__ for m in model.modules()})
        raise WrapPlanError(
            f"wrap rule {rule.role} ({family.name}: {cls.__name__}) matched no module of "
            f"{type(model).__name__}. Classes present: {', '.join(present)}. "
            "Fix the role in ft/families.py (transformers may have renamed the class)."
        )
    return hits


def plan_units(model: nn.Module, rules: list[WrapRule] = WRAP_PLAN) -> list[Unit]:
    """The FSDP units `wrap_model` will create for the unwrapped `model`, root last, with
    the modules each recomputes. Freeze parts (`ft.parts.apply_freezing`) first: whether
    backward reaches a module depends on it."""
    # A role this family lacks but another has (a dense family's `router`) plans nothing;
    # a role no family has is a typo, refused in `_matches`.
    roles = family_of(model).roles
    rules = [r for r in rules if r.role in roles or not any(r.role in f.roles for f in FAMILIES.values())]
    matched = [(name, mod, rule) for rule in rules for name, mod in _matches(model, rule)]
    by_part = parameters_by_part(model)
    names = {id(p): name for name, p, _ in by_part}
    part_of = {id(p): next(iter(held)) for _, p, held in by_part}

    def unit(fqn: str, mod: nn.Module, own: list[nn.Parameter]) -> Unit:
        return Unit(fqn, type(mod).__name__, mod, {names[id(p)]: p for p in own},
                    {names[id(p)]: part_of[id(p)] for p in own})

    # A parameter belongs to the innermost unit that contains it, as in FSDP. Claim
    # parameters deepest-first so a nested unit's weights are not counted twice.
    claimed: set[int] = set()
    units: list[Unit] = []
    for name, mod, rule in sorted((m for m in matched if m[2].unit), key=lambda t: -t[0].count(".")):
        own = [p for p in mod.parameters() if id(p) not in claimed]
        claimed.update(id(p) for p in own)
        units.append(unit(name, mod, own))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    units.sort(key=lambda u: order[u.fqn])
    units.append(unit("", model, [p for p in model.parameters() if id(p) not in claimed]))

    # Checkpointing: each marked module goes to the innermost unit holding it.
    parts = module_parts(model)
    trainable = trainable_parts(model)
    for name, mod, rule in matched:
        if not rule.checkpoint:
            continue
        owner = max((u for u in units if u.fqn == "" or name == u.fqn or name.startswith(u.fqn + ".")),
                    key=lambda u: len(u.fqn))
        reached = backward_reaches(parts[id(mod)], trainable)
        (owner.recompute if reached else owner.recompute_skipped)[name] = mod
    return units


class CheckpointSummary(NamedTuple):
    wrapped: int  # modules whose activations are recomputed in backward
    skipped: int  # modules of a checkpointed class that backward never reaches (frozen)


def checkpoint_summary(units: list[Unit]) -> CheckpointSummary:
    return CheckpointSummary(sum(len(u.recompute) for u in units),
                             sum(len(u.recompute_skipped) for u in units))


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
                f"parameters: frozen {few(frozen)}; trainable {few(trainable)}. FSDP1 "
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


# =====================================================================================
# Wrapping
# =====================================================================================
def wrap_model(model: nn.Module, units: list[Unit], fsdp_cfg, precision: str, info: DistInfo,
               master: str = "fp32") -> nn.Module:
    """Shard `model` into the planned units (root last) with the backend
    `fsdp_cfg.backend` and, when `fsdp_cfg.activation_checkpointing`, recompute the
    planned modules; return the root. `precision` is the compute dtype, `master` that of
    the sharded weights (the model's own: `ft.model.load_model`). A collective (rank 0's
    weights are broadcast)."""
    impl = BACKENDS[fsdp_cfg.backend]
    if impl.flattens_units(fsdp_cfg):
        # Before any collective, so every rank raises the same readable error.
        check_uniform_requires_grad(units)
    recompute = [m for u in units for m in u.recompute.values()] if fsdp_cfg.activation_checkpointing else []
    return impl.wrap(model, [u.module for u in units[:-1]], recompute, fsdp_cfg, precision, info, master)  # SYNC


# =====================================================================================
# The plan as a table: what the dry run prints, and the loop at start-up
# =====================================================================================
def per_rank_numel(numel: int, world_size: int, backend: str = DEFAULT) -> int:
    """Elements of a unit of `numel` parameters that each rank holds."""
    return BACKENDS[backend].shard_numel(numel, world_size)


def fmt_count(n: float) -> str:
    """A parameter count for people: 7.62B, 1.09M, 512."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def fmt_bytes(n: float) -> str:
    """A byte count for people: 2.03 GiB, 12.00 MiB, 512 B."""
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


def _status(u: Unit) -> str:
    if u.trainable_numel == u.numel:
        return "train"
    return "frozen" if u.trainable_numel == 0 else "MIXED"


_NUMBERED = re.compile(r"^(.*)\.(\d+)((?:\.(?!\d+(?:\.|$))[^.]+)*)$")
"""A path's last numbered component, with what comes before and after it:
`model.language_model.layers.3.mlp.gate` -> (`model.language_model.layers`, 3, `.mlp.gate`)."""


def _runs(units: list[Unit]) -> list[tuple[Unit, int]]:
    """The units with each run of identical layers (same class, size and status, at
    consecutive numbers of one module list) folded into (its first unit, its length),
    at its first unit's place. Runs may interleave: an MoE decoder layer and the router
    unit inside it fold into a row each."""
    runs: list[list] = []  # [first unit, length, last number]
    open_runs: dict[tuple, int] = {}
    for u in units:
        m = _NUMBERED.match(u.fqn)
        key = (m[1], m[3], u.cls_name, u.numel, _status(u)) if m else None
        at = open_runs.get(key)
        if at is not None and runs[at][2] + 1 == int(m[2]):
            runs[at][1] += 1
            runs[at][2] += 1
            continue
        if key is not None:
            open_runs[key] = len(runs)
        runs.append([u, 1, int(m[2]) if m else 0])
    return [(u, n) for u, n, _ in runs]


def _unit_row(u: Unit, count: int, world_size: int, param_bytes: int) -> str:
    label = u.fqn or "<root>"
    if count > 1:
        before, i0, after = _NUMBERED.match(u.fqn).groups()
        label = f"{before}.{{{i0}..{int(i0) + count - 1}}}{after} x{count}"
    per_rank = per_rank_numel(u.numel, world_size) * param_bytes
    return (f"  {label:<50} {u.cls_name:<34} {'+'.join(u.parts):<12} {fmt_count(u.numel):>9} "
            f"{fmt_bytes(per_rank):>10}  {_checkpoint_label(u):<4}  {_status(u)}")


def _totals_row(units: list[Unit], world_size: int, param_bytes: int) -> str:
    total = sum(u.numel for u in units)
    per_rank_total = sum(per_rank_numel(u.numel, world_size) for u in units) * param_bytes
    biggest = max(units, key=lambda u: u.numel)
    return (f"  total {fmt_count(total)} params in {len(units)} units; "
            f"{fmt_bytes(per_rank_total)} of master weights per rank; "
            f"largest unit {biggest.fqn or '<root>'} ({fmt_count(biggest.numel)} params, "
            "the biggest all-gather)")


def _parts_row(units: list[Unit]) -> str:
    per_part = []
    for name in PART_NAMES:
        in_part = [p for u in units for n, p in u.params.items() if u.part_of[n] == name]
        size = sum(p.numel() for p in in_part)
        if not size:  # a part this family lacks (a dense model's router)
            continue
        trainable = sum(p.numel() for p in in_part if p.requires_grad)
        state = {0: "frozen", size: "trainable"}.get(trainable, f"{fmt_count(trainable)} trainable")
        per_part.append(f"{name} {fmt_count(size)} {state}")
    total = sum(u.numel for u in units)
    trainable_total = sum(u.trainable_numel for u in units)
    return f"  trainable {fmt_count(trainable_total)} of {fmt_count(total)} params: " + ", ".join(per_part)


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
    lines = [
        f"FSDP units (world size {world_size}; per rank = ceil(params / {world_size}) "
        f"x {param_bytes} B master weights):",
        f"  {'unit':<50} {'class':<34} {'part':<12} {'params':>9} {'per rank':>10}  ckpt  status",
    ]
    lines += [_unit_row(u, count, world_size, param_bytes) for u, count in _runs(units)]
    if root_names:
        shown = ", ".join(root_names[:6]) + (" ..." if len(root_names) > 6 else "")
        lines.append(f"  root holds: {shown}")
    lines.append(_totals_row(units, world_size, param_bytes))
    lines.append(_parts_row(units))
    return "\n".join(lines)
