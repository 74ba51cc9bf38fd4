"""Everything ft knows about FSDP2 (`torch.distributed.fsdp.fully_shard`), in one place,
with the same functions as `ft.fsdp1` (see `ft.backends`). `fsdp.backend=fsdp2` picks it.

How FSDP2 differs from FSDP1, and what that changes here:

- **No wrapper, no flat parameters.** `fully_shard(module)` changes the module's class
  in place and replaces each of its parameters by a `DTensor` sharded on dim 0
  (`Shard(0)`: rank r holds rows [r*c, (r+1)*c) with c = ceil(rows / world), so the
  last ranks may hold fewer rows or none). Names do not change (only the checkpoint
  wrapper's prefix remains, `clean_name`), the HF model *is* the root (`unwrap`), and
  each parameter keeps its own `requires_grad`: a unit may mix frozen and trainable
  parameters (`flattens_units` is False, so `ft.fsdp_wrap` does not refuse such plans).
- **The order of the transforms** (`wrap`): activation checkpointing is applied
  *before* sharding (FSDP2's order: a checkpointed unit is the checkpoint wrapper, whose
  recomputation in backward finds the unit already gathered by FSDP's pre-backward hook),
  then each planned unit is sharded bottom-up and the root last; then rank 0's weights
  are broadcast into every rank's shards (`set_model_state_dict(broadcast_from_rank0)`,
  one tensor at a time, as FSDP1's sync_module_states does unit by unit; buffers, which
  FSDP2 does not shard, are broadcast whole). Rank 0 keeps its full CPU copy until then.
- **The FSDP1 knobs** are each mapped onto fully_shard's arguments or refused, with the
  reason (`KNOBS`, checked by `config_refusals` before anything starts and logged by
  `describe` at start-up). Prefetching is explicit: each unit prefetches the unit before
  it in backward (`set_modules_to_backward_prefetch`, FSDP1's BACKWARD_PRE) and, with
  forward_prefetch, the unit after it in forward. The root keeps its parameters gathered
  from forward to backward, as FSDP1's does (ft's chunked loss reads lm_head's weight in
  a forward hook of the root, `ft.model._chunked_loss_hooks`, which runs after FSDP2's
  own post-forward hook).
- **Optimizers see DTensors.** torch's AdamW runs on them as they are. ft's Adafactor
  runs on the local shards (`ft.shards.local`): `shard_layout` describes each local shard
  as one `ParamSlice` (a dim-0 slice of a row-major tensor is one contiguous run of its
  flat elements), so the row/column sums and update norms are reduced exactly as under
  FSDP1. HF's Adafactor cannot run on DTensors (`config_refusals`).
- **Clipping**: the norm over DTensor gradients (`torch.nn.utils.get_total_norm`) is a
  DTensor with a pending reduction; `full_tensor()` makes it the global norm on every rank.
- **State dicts**: per-parameter DTensors through `torch.distributed.checkpoint`'s
  `get_model_state_dict` / `get_optimizer_state_dict` (sharded for checkpoints; full and
  on rank 0 only for exports).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from ft.config import ConfigError, field_choices
from ft.config_load import HF_ADAFACTOR_CRASH
from ft.dist import DistInfo
from ft.shards import ParamSlice, ShardLayout, clip_fp32, local

NAME = "fsdp2"


# =====================================================================================
# The FSDP1 knobs under FSDP2: one entry per value, `Mapped` or `Refused` (docs/sharding.md)
# =====================================================================================
@dataclass(frozen=True)
class Mapped:
    to: str  # what it becomes, for the start-up log line
    why: str = ""


@dataclass(frozen=True)
class Refused:
    why: str


KNOBS: dict[str, dict] = {
    "sharding_strategy": {
        "FULL_SHARD": Mapped("reshard_after_forward=True", "every unit but the root, which keeps its "
                             "parameters gathered from forward to backward, as under FSDP1"),
        "SHARD_GRAD_OP": Mapped("reshard_after_forward=False", "every unit stays gathered from forward "
                                "to backward"),
        "NO_SHARD": Refused("fully_shard always shards parameters; plain data parallelism would be "
                            "torch's replicate(), which ft does not wire: use fsdp.backend=fsdp1"),
        "HYBRID_SHARD": Refused("FSDP2's HYBRID_SHARD is a 2-D (replicate, shard) device mesh, which ft "
                                "does not build (its Adafactor reduces over one shard group): use "
                                "fsdp.backend=fsdp1"),
    },
    "backward_prefetch": {
        "BACKWARD_PRE": Mapped("set_modules_to_backward_prefetch(previous unit)", "explicit: in backward "
                               "each unit prefetches the unit before it in forward order, the root the "
                               "last unit"),
        "BACKWARD_POST": Refused("FSDP2 issues the next unit's all-gather before the current unit's "
                                 "gradient computation only (BACKWARD_PRE); it has no post-gradient "
                                 "prefetch: use BACKWARD_PRE"),
        "NONE": Refused("FSDP2 always prefetches the next unit in backward (its implicit default); "
                        "it cannot be turned off: use BACKWARD_PRE"),
    },
    "forward_prefetch": {
        True: Mapped("set_modules_to_forward_prefetch(next unit)", "explicit: each unit issues the "
                     "next unit's all-gather when its own is done"),
        False: Mapped("implicit", "FSDP2's default: the next all-gather is issued when the next unit runs"),
    },
    "limit_all_gathers": {
        True: Mapped("built in", "FSDP2 has no CPU-side rate limiter to set: its compute stream waits on "
                     "each all-gather's copy-out, so only the running and the prefetched units are "
                     "gathered"),
        False: Refused("FSDP2 has no all-gather rate limiter to turn off (its memory is bounded by "
                       "design): set fsdp.limit_all_gathers=true"),
    },
    "use_orig_params": {
        True: Mapped("always", "FSDP2 shards each original parameter as a DTensor"),
        False: Mapped("not applicable", "FSDP2 has no flat parameters: each original parameter is "
                      "sharded as a DTensor (what use_orig_params=true exposes under FSDP1)"),
    },
    "cpu_offload": {
        True: Refused("FSDP2's CPUOffloadPolicy is not wired in ft (clipping and ft's Adafactor "
                      "reductions on CPU-offloaded DTensors are unverified): use fsdp.backend=fsdp1"),
        False: Mapped("no offload"),
    },
    "sync_module_states": {
        True: Mapped("set_model_state_dict(broadcast_from_rank0)", "after sharding, rank 0's weights "
                     "are broadcast into every rank's shards one tensor at a time; buffers whole"),
        False: Refused("ft reads the weights on rank 0 only (ft.model.load_model: the other ranks hold "
                       "uninitialised memory), so fsdp2 must broadcast them: set fsdp.sync_module_states=true"),
    },
}
for _key, _values in KNOBS.items():  # every choice of a Literal knob has an entry
    _choices = field_choices(f"fsdp.{_key}") if isinstance(next(iter(_values)), str) else (True, False)
    if set(_values) != set(_choices):
        raise RuntimeError(f"ft.fsdp2.KNOBS[{_key!r}] covers {sorted(map(str, _values))}, "
                           f"fsdp.{_key} allows {sorted(map(str, _choices))}")

_TRAIN_REFUSALS = {
    ("optim", "hf_adafactor"): HF_ADAFACTOR_CRASH,  # the text lives with the config's refusals (ft.config_load)
}


def _knob_refusals(fsdp_cfg) -> list[str]:
    out = []
    for key, values in KNOBS.items():
        what = values[getattr(fsdp_cfg, key)]
        if isinstance(what, Refused):
            out.append(f"fsdp.{key}={getattr(fsdp_cfg, key)} with fsdp.backend=fsdp2: {what.why}")
    return out


def config_refusals(cfg) -> list[str]:
    """Why `cfg` cannot run on this backend, one message per key (empty: it can)."""
    out = _knob_refusals(cfg.fsdp)
    for (key, value), why in _TRAIN_REFUSALS.items():
        if getattr(cfg.train, key) == value:
            out.append(f"train.{key}={value} with fsdp.backend=fsdp2: {why}")
    return out


def describe(fsdp_cfg, precision: str, master: str = "fp32") -> str:
    """One log line: the backend and what each knob became."""
    knobs = ", ".join(f"{key}={getattr(fsdp_cfg, key)} -> {values[getattr(fsdp_cfg, key)].to}"
                      for key, values in KNOBS.items())
    mp = ("no mixed precision" if precision == master == "fp32"
          else f"MixedPrecisionPolicy(param {precision}, reduce "
               f"{fsdp_cfg.reduce_dtype if precision == 'bf16' else 'fp32'}; {master} shards)")
    return f"sharding backend fsdp2 (fully_shard per unit, root last; {mp}; {knobs})"


# =====================================================================================
# Names and unwrapping
# =====================================================================================
def owns(model: nn.Module) -> bool:
    """Whether `model` was sharded by this backend (fully_shard makes it an FSDPModule)."""
    return isinstance(model, FSDPModule)


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model: fully_shard changes modules in place, so the root is the model."""
    return model


def clean_name(name: str) -> str:
    """A parameter or module path without the checkpoint wrapper's prefix: the HF name."""
    return name.replace("_checkpoint_wrapped_module.", "")


def original_params(model: nn.Module) -> list[tuple[str, nn.Parameter, list[tuple[nn.Module, str]]]]:
    """Each parameter tensor of `model` once (tied weights once): (clean name, it,
    [(owning module, clean name)]). Every DTensor parameter is one original parameter."""
    result = []
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                name = clean_name(f"{mod_name}.{p_name}" if mod_name else p_name)
                result.append((name, p, [(mod, name)]))
    return result


# =====================================================================================
# Wrapping
# =====================================================================================
def shard_numel(numel: int, world_size: int) -> int:
    """Elements of a unit each rank holds, on average: ceil(numel / world). FSDP2 pads
    each parameter to a multiple of the world size in rows, not the unit in elements, so
    a rank's padded storage can exceed this by up to one row per parameter (exact
    per-rank counts: `planned_slices`)."""
    return math.ceil(numel / world_size)


def flattens_units(fsdp_cfg) -> bool:
    """FSDP2 keeps one requires_grad per parameter: units may mix frozen and trainable."""
    return False


_RESHARD = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}


def mixed_precision_policy(precision: str, reduce_dtype: str = "fp32", root: bool = False,
                           master: str = "fp32") -> MixedPrecisionPolicy:
    """Compute in `precision` over the sharded parameters the optimizer steps, whose
    dtype is `master` (`train.master_weights`): bf16 compute gathers bf16 copies of fp32
    shards (no cast for bf16 shards) and reduces gradients in `reduce_dtype`; fp32
    compute over bf16 shards upcasts each gathered unit and reduces in fp32; fp32 over
    fp32: no casting at all. Reduced gradients are stored in the shards' dtype. As
    FSDP1's policy in `ft.fsdp1`: only the root casts its floating-point inputs (pixel
    values) to the compute dtype; buffers are never cast (FSDP2 does not manage them),
    so rotary `inv_freq` stays fp32."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32' here, got {precision!r}")
    if precision == master == "fp32":
        return MixedPrecisionPolicy()
    if precision == "fp32":
        return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=root)
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                reduce_dtype=torch.float32 if reduce_dtype == "fp32" else torch.bfloat16,
                                cast_forward_inputs=root)


def wrap(model: nn.Module, unit_modules: list[nn.Module], recompute: list[nn.Module],
         fsdp_cfg, precision: str, info: DistInfo, master: str = "fp32") -> nn.Module:
    """Recompute the modules in `recompute` (non-reentrant checkpoint wrappers), then shard
    each of `unit_modules` (given in forward order) and the root last, set the explicit
    prefetch order, and broadcast rank 0's weights. A collective.

    `model` must hold rank 0's weights on rank 0; other ranks may hold garbage of the
    right shapes (see `ft.model.load_model`).
    """
    refused = _knob_refusals(fsdp_cfg)
    if refused:  # before any collective: every rank raises the same error
        raise ConfigError("; ".join(refused))
    # Rank 0's full weights outlive the sharding below (which replaces the parameters),
    # for the broadcast at the end. References, not copies.
    full = model.state_dict() if info.rank == 0 else {}

    keep = {id(m) for m in recompute}
    if keep:
        apply_activation_checkpointing(
            model,
            checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda m: id(m) in keep,
        )
    # A checkpointed unit is sharded as its wrapper (the module its parent calls).
    wrapper_of = {id(m._checkpoint_wrapped_module): m for m in model.modules() if isinstance(m, CheckpointWrapper)}
    targets = [wrapper_of.get(id(m), m) for m in unit_modules]

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    unit_policy = mixed_precision_policy(precision, fsdp_cfg.reduce_dtype, master=master)
    # Bottom-up: a nested unit must be sharded before the unit holding it, and
    # `unit_modules` are in module order (parents first).
    for target in reversed(targets):
        fully_shard(target, mesh=mesh, reshard_after_forward=_RESHARD[fsdp_cfg.sharding_strategy],
                    mp_policy=unit_policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=False,
                mp_policy=mixed_precision_policy(precision, fsdp_cfg.reduce_dtype, root=True, master=master))

    # BACKWARD_PRE: backward runs the units in reverse, so each prefetches its predecessor;
    # the root (lm_head) runs backward first and prefetches the last unit.
    order = [model] + targets
    for later, earlier in zip(order[1:], order[:-1]):
        if earlier is not model:
            later.set_modules_to_backward_prefetch([earlier])
    if targets:
        model.set_modules_to_backward_prefetch([targets[-1]])
    if fsdp_cfg.forward_prefetch:
        for earlier, later in zip(order[:-1], order[1:]):
            earlier.set_modules_to_forward_prefetch([later])

    # sync_module_states: rank 0's full tensors into every rank's shards, one at a time.
    set_model_state_dict(model, full,  # SYNC
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    if dist.is_initialized() and info.world_size > 1:
        with torch.no_grad():
            for buf in model.buffers():  # non-persistent ones (rotary inv_freq) are not in the state dict
                dist.broadcast(buf, src=0)  # SYNC
    return model


# =====================================================================================
# Shards as plain data, for the optimizer
# =====================================================================================
def _dim0_slice(name: str, shape: torch.Size, world_size: int, rank: int) -> ParamSlice:
    """The flat run rank `rank` holds of a parameter sharded on dim 0 (torch.chunk's split:
    ceil(rows / world) rows per rank, the last ranks fewer or none)."""
    if len(shape) == 0:
        return ParamSlice(name, shape, 0, 1, 0) if rank == 0 else ParamSlice(name, shape, 0, 0, 0)
    rows = shape[0]
    per_rank = -(-rows // world_size)
    lo, hi = min(rank * per_rank, rows), min((rank + 1) * per_rank, rows)
    row_numel = shape[1:].numel()
    if lo == hi:
        return ParamSlice(name, shape, 0, 0, 0)
    return ParamSlice(name, shape, lo * row_numel, hi * row_numel, 0)


def shard_layout(model: nn.Module, tensors: list[torch.Tensor], process_group=None) -> ShardLayout:
    """One `ParamSlice` per tensor: its local shard is one run of the full parameter's
    flat elements. Sums are reduced over the shard mesh's group (or `process_group`);
    None when nothing is sharded (world size 1, or a plain model)."""
    names = {id(p): clean_name(n) for n, p in model.named_parameters()}
    slices: dict[int, list[ParamSlice]] = {}
    groups = set()
    for t in tensors:
        if id(t) not in names:
            raise ValueError(
                f"a tensor of shape {tuple(t.shape)} given to the optimizer is not a "
                "parameter of `model`: pass the FSDP root (or the plain model) as model")
        if not isinstance(t, DTensor):
            slices[id(t)] = [ParamSlice(names[id(t)], t.shape, 0, t.numel(), 0)]
            continue
        mesh = t.device_mesh
        if mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
            raise ValueError(f"{names[id(t)]}: ft's Adafactor expects FSDP2's Shard(0) placement on a "
                             f"1-D mesh, got {t.placements} on a {mesh.ndim}-D mesh")
        sl = _dim0_slice(names[id(t)], t.shape, mesh.size(), mesh.get_local_rank())
        local = t.to_local()
        if local.numel() != sl.numel or (sl.numel and not local.is_contiguous()):
            raise RuntimeError(f"{names[id(t)]}: FSDP2's local shard {tuple(local.shape)} is not the dim-0 "
                               f"chunk ft expects ({sl.numel} elements) in torch {torch.__version__}")
        slices[id(t)] = [sl]
        if mesh.size() > 1:
            groups.add(mesh.get_group())
    if len(groups) > 1:
        raise ValueError("FSDP2 parameters on different meshes: pass process_group")
    group = (process_group if process_group is not None else groups.pop()) if groups else None
    device = tensors[0].device if tensors else None
    return ShardLayout(slices, group, device)


def planned_slices(unit_params: dict[str, nn.Parameter], world_size: int, rank: int) -> list[ParamSlice]:
    """The `ParamSlice`s rank `rank` will hold of a unit's parameters, without sharding
    anything (meta-device models work): each parameter's dim-0 chunk."""
    return [_dim0_slice(name, p.shape, world_size, rank) for name, p in unit_params.items()]


# =====================================================================================
# Gradient clipping and state dicts
# =====================================================================================
def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip to `max_norm` (0 disables clipping) and return the norm *before* clipping,
    over the whole model on all ranks, as a float on every rank (a collective)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if all(p.grad.dtype == torch.float32 for p in params):
        total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if isinstance(total, DTensor):
            total = total.full_tensor()  # SYNC: the pending sum of squares over the shards
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return float(total)
    # bf16 gradients (train.master_weights=bf16): torch takes their norms in bf16.
    sharded = [p.grad for p in params if isinstance(p.grad, DTensor)]
    group = sharded[0].device_mesh.get_group() if sharded and dist.is_initialized() else None
    return clip_fp32([local(p.grad) for p in params], max_norm, group)  # SYNC when sharded


def model_state_dict(model: nn.Module) -> dict:
    """This rank's DTensor shards of the model, keyed by clean names (for DCP)."""
    return get_model_state_dict(model)


def load_model_state_dict(model: nn.Module, state_dict: dict) -> None:
    set_model_state_dict(model, state_dict)


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A torch optimizer's per-parameter DTensor state (for DCP); built first (a zero-lr
    step) when the optimizer has none yet, so that a fresh optimizer can be loaded into."""
    return get_optimizer_state_dict(model, optimizer)


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    set_optimizer_state_dict(model, optimizer, state_dict)


def full_state_dict(model: nn.Module, info: DistInfo) -> dict:
    """The full weights by clean name, on rank 0 only (CPU), for an export. A collective:
    each DTensor is gathered in turn and only rank 0 keeps it (on CPU too, unlike FSDP1)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
