"""The parts of a Qwen VL model a user can freeze or give their own learning rate, and what
follows from freezing: `requires_grad`, the optimizer's parameter groups, and which
parts a backward pass still runs through.

- `PARTS`: the vision tower, the merger, the MoE routers and the language model
  (`model.freeze_*`, `train.vision_lr`, `train.merger_lr`, `train.router_lr`), matched
  by the class that plays the part's role in the model's family (`ft.families`), never
  by attribute path (transformers 4.x and 5.x nest the towers differently). Qwen3-VL's DeepStack mergers are mergers.
- `apply_freezing` sets `requires_grad` from the config, before wrapping (FSDP1 fixes
  each flat parameter's `requires_grad` when it builds it).
- `param_groups` builds the optimizer's groups from the wrapped model, one per part.
- `backward_reaches` is the one rule for "does backward run through this part": the
  checkpointing decision (`ft.fsdp_wrap`) and the FLOP count (`ft.metrics`) both use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

from torch import nn

from ft.backends import backend_of
from ft.config import ConfigError
from ft.families import family_of


class WrapPlanError(RuntimeError):
    """The wrap plan or the parts do not fit the model: names the rule or unit to fix."""


@dataclass(frozen=True)
class Part:
    name: str
    role: str | None  # the part is the subtree of the class playing this role (ft.families); None: all the rest
    freeze_field: str  # in ModelConfig
    lr_field: str  # in TrainConfig; a negative value there means train.learning_rate
    what: str

    def in_family(self, family) -> bool:
        """Whether models of `family` have this part (a dense family has no router)."""
        return self.role is None or self.role in family.roles


# In forward data-flow order (pixels -> tower -> merger -> language model): a frozen part
# still carries gradients in backward when a part before it trains.
PARTS: list[Part] = [
    Part(
        "vision_tower", "vision_tower", "freeze_vision_tower", "vision_lr",
        "the ViT: patch_embed, blocks, rotary_pos_emb (Qwen3-VL: pos_embed); its mergers are a part of their own",
    ),
    Part(
        "merger", "merger", "freeze_merger", "merger_lr",
        "the projectors from vision features to the language model's embeddings (Qwen3-VL: also DeepStack's)",
    ),
    Part(
        "router", "router", "freeze_router", "router_lr",
        "the MoE routers, each decoder layer's gate (Qwen3-VL-MoE only; no dense family has the part)",
    ),
    Part(
        "llm", None, "freeze_llm", "learning_rate",
        "everything else: embed_tokens, decoder layers, final norm, lm_head",
    ),
]
PART_NAMES = [p.name for p in PARTS]


def backward_reaches(part: str, trainable_parts: Collection[str]) -> bool:
    """Whether a backward pass runs through the modules of `part`: yes when it trains,
    or when a part before it in `PARTS` does (the gradient must flow through it). A
    frozen vision tower before a trained language model is never reached."""
    upstream = PART_NAMES[: PART_NAMES.index(part) + 1]
    return any(p in trainable_parts for p in upstream)


def module_parts(model: nn.Module) -> dict[int, str]:
    """The part of every module of `model`, by `id`: that of its nearest ancestor (itself
    included) whose class a `Part` names. Wrapper modules match no part, so this works
    the same on the wrapped model (FSDP1's and the checkpoint wrappers, FSDP2's
    in-place subclasses)."""
    family = family_of(model)
    by_cls = {family.cls(p.role): p.name for p in PARTS if p.role is not None and p.in_family(family)}
    rest = next(p.name for p in PARTS if p.role is None)
    parts: dict[int, str] = {}
    found: set[type] = set()
    stack = [(model, rest)]
    while stack:
        mod, part = stack.pop()
        # By class, or by the class FSDP2 subclassed in place when sharding it (FSDP<name>).
        cls = next((c for c in type(mod).__mro__ if c in by_cls), None)
        if cls is not None:
            found.add(cls)
            part = by_cls[cls]
        parts[id(mod)] = part
        stack += [(child, part) for child in mod.children()]
    missing = [cls.__name__ for cls in by_cls if cls not in found]
    if missing:
        # Otherwise freeze_vision_tower would silently freeze nothing.
        raise WrapPlanError(
            f"part class {', '.join(missing)} matched no module of {type(model).__name__}: "
            f"fix the {family.name} roles in ft/families.py (transformers may have renamed the class)"
        )
    return parts


def parameters_by_part(model: nn.Module) -> list[tuple[str, nn.Parameter, dict[str, list[str]]]]:
    """Each parameter tensor of `model` once: (its name, it, {part: names of the weights
    of that part it holds}). A plain parameter holds one weight; a wrapped model's
    tensor may hold several (an FSDP1 flat parameter holds its whole unit)."""
    parts = module_parts(model)
    result = []
    for name, p, held in backend_of(model).original_params(model):
        by_part: dict[str, list[str]] = {}
        for owner, fqn in held:
            by_part.setdefault(parts[id(owner)], []).append(fqn)
        result.append((name, p, {part: by_part[part] for part in PART_NAMES if part in by_part}))
    return result


def trainable_parts(model: nn.Module) -> set[str]:
    """The parts with at least one trainable weight."""
    return {part for _, p, held in parameters_by_part(model) if p.requires_grad for part in held}


def apply_freezing(model: nn.Module, model_cfg) -> dict[str, dict[str, int | bool]]:
    """Set `requires_grad` of every parameter from `model_cfg.freeze_*`, before wrapping.
    Returns {part: {"params": count, "frozen": bool}} in `PARTS` order."""
    frozen = {p.name for p in PARTS if getattr(model_cfg, p.freeze_field)}
    family = family_of(model)
    lacking = [p for p in PARTS if p.name in frozen and not p.in_family(family)]
    if lacking:
        raise ConfigError(f"model.{lacking[0].freeze_field}=true, but {family.name} has no {lacking[0].name} "
                          f"({lacking[0].what})")
    summary: dict[str, dict[str, int | bool]] = {
        p.name: {"params": 0, "frozen": p.name in frozen} for p in PARTS if p.in_family(family)
    }
    for _, param, held in parameters_by_part(model):
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
    [{"name": part, "params": [trainable tensors], "lr": peak lr}] in `PARTS` order.

    Under FSDP1 (use_orig_params=False) these are flat parameters, one per unit, so each
    unit must hold one part's weights only (the plan guarantees it; an edited plan that
    merges two parts is refused here).
    """
    lrs = part_learning_rates(train_cfg)
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in PART_NAMES}
    for name, param, held in parameters_by_part(model):
        if not param.requires_grad:
            continue
        if len(held) > 1:
            detail = "; ".join(f"{part}: {few(names)}" for part, names in held.items())
            raise WrapPlanError(
                f"{name} holds weights of {len(held)} parts, which then cannot have their "
                f"own learning rates ({detail}). Give each part its own units in WRAP_PLAN "
                "(ft/fsdp_wrap.py)."
            )
        groups[next(iter(held))].append(param)
    return [{"name": name, "params": ps, "lr": lrs[name]} for name, ps in groups.items() if ps]


def few(names: list[str], n: int = 3) -> str:
    """The first `n` names, and how many more there are."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
