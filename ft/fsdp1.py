"""Everything ft knows about FSDP1 (`torch.distributed.fsdp.FullyShardedDataParallel`),
in one place. No other module reads FSDP1's private fields or unwraps its modules: they
ask this one (through `ft.backends.backend_of(model)`). The second backend, FSDP2
(`ft.fsdp2`), is a module beside this one with the same functions.

What is FSDP1-specific, and lives here:

- **The wrap call** (`wrap`): the recipe's knobs (FULL_SHARD, BACKWARD_PRE,
  limit_all_gathers, sync_module_states, use_orig_params=False, no CPU offload), the
  mixed-precision policy, and the order of the transforms: rank 0's weights are
  broadcast, the planned units are wrapped (the root last, by FSDP itself), then
  activation checkpointing is applied *inside* the units (FSDP1's order: in backward
  FSDP gathers a unit once, then its forward is recomputed on the gathered weights).
- **Flat parameters.** With use_orig_params=False a unit is one 1-D `FlatParameter`,
  each rank holding an equal slice of it, padded to a multiple of the world size
  (`shard_numel`). A flat tensor has one `requires_grad`, so a unit cannot mix frozen
  and trainable weights (`flattens_units`). Its private fields `_fqns`, `_shapes`,
  `_numels`, `_shard_param_infos` and `_param_infos` (present from torch 2.1 to 2.13,
  checked on 2.11 too) say which elements of which original parameter a rank's shard
  holds: `original_params` and `shard_layout` turn them into plain data.
- **Names**: FSDP and checkpoint wrappers add `_fsdp_wrapped_module.` and
  `_checkpoint_wrapped_module.` to module paths (`clean_name`), and the HF model sits
  under the root unit (`unwrap`).
- **State dicts** through `torch.distributed.checkpoint.state_dict` (FSDP1's own
  `state_dict_type()` is deprecated): sharded for checkpoints, full for exports.
  `get_optimizer_state_dict` fails on state not shaped like the flat shard (gloo:
  "invalid tensor size"), which is why ft's Adafactor saves its own state.
- **Gradient clipping** through the root's `clip_grad_norm_`: torch's plain
  `clip_grad_norm_` would see only this rank's shards.

Every function also takes a plain, unwrapped model (one process, no FSDP): nothing is
sharded then.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
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
from torch.distributed.fsdp import (
    BackwardPrefetch,
    CPUOffload,
    FullyShardedDataParallel as FSDP,
    MixedPrecision,
    ShardingStrategy,
)
from torch.distributed.fsdp._flat_param import FlatParameter
from torch.distributed.fsdp.wrap import CustomPolicy

from ft.dist import DistInfo, broadcast_module_state
from ft.shards import ParamSlice, ShardLayout, clip_fp32

NAME = "fsdp1"


# =====================================================================================
# Names and unwrapping
# =====================================================================================
def owns(model: nn.Module) -> bool:
    """Whether `model` was wrapped by this backend."""
    return isinstance(model, FSDP)


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model under the root unit (or `model` itself when it is not wrapped)."""
    return model.module if isinstance(model, FSDP) else model


def clean_name(name: str) -> str:
    """A parameter or module path without the wrappers' prefixes: the HF name. (What
    torch's private `_common_utils.clean_tensor_name` does.)"""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def original_params(model: nn.Module) -> list[tuple[str, nn.Parameter, list[tuple[nn.Module, str]]]]:
    """Each parameter tensor of `model` once (tied weights once): (its clean name, it,
    [(owning module, clean name) of every original parameter it holds]). A plain
    parameter holds itself; a FlatParameter all the original parameters of its unit,
    found through its `_param_infos` (owning modules) and `_fqns`."""
    result = []
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = clean_name(f"{mod_name}.{p_name}" if mod_name else p_name)
            if isinstance(p, FlatParameter):
                prefix = clean_name(f"{mod_name}.") if mod_name else ""
                held = [(info.module, prefix + fqn) for info, fqn in zip(p._param_infos, p._fqns)]
            else:
                held = [(mod, name)]
            result.append((name, p, held))
    return result


# =====================================================================================
# Wrapping
# =====================================================================================
def config_refusals(cfg) -> list[str]:
    """Every config runs on FSDP1 (its knobs are FSDP1's own)."""
    return []


def describe(fsdp_cfg, precision: str, master: str = "fp32") -> str:
    """One log line: the backend and its knobs, passed to FSDP as they are."""
    knobs = ", ".join(f"{k}={getattr(fsdp_cfg, k)}" for k in (
        "sharding_strategy", "backward_prefetch", "forward_prefetch", "limit_all_gathers",
        "sync_module_states", "use_orig_params", "cpu_offload"))
    mp = ("no mixed precision" if precision == master == "fp32"
          else f"MixedPrecision(param {precision}, reduce {fsdp_cfg.reduce_dtype if precision == 'bf16' else 'fp32'}; "
               f"{master} shards)")
    return f"sharding backend fsdp1 (FullyShardedDataParallel, {knobs}; {mp})"


def shard_numel(numel: int, world_size: int) -> int:
    """Elements of one unit's flat parameter held by each rank: FSDP1 pads the flat
    parameter to a multiple of the world size, then gives each rank an equal slice."""
    return math.ceil(numel / world_size)


def flattens_units(fsdp_cfg) -> bool:
    """Whether each unit becomes one flat tensor with one `requires_grad` (so a unit must
    not mix frozen and trainable weights): yes unless use_orig_params."""
    return not fsdp_cfg.use_orig_params


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


def mixed_precision(precision: str, reduce_dtype: str = "fp32", master: str = "fp32") -> MixedPrecision | None:
    """FSDP1's casts between the sharded `master` weights and compute in `precision`.

    fp32 master, bf16 compute: FSDP keeps the sharded fp32 parameters for the optimizer
    and casts a bf16 copy for each all-gather. bf16 master: the shards are bf16 already
    (no cast for bf16 compute; fp32 compute upcasts each gathered unit). Gradients are
    reduced in `reduce_dtype` under bf16 compute (fp32 by default: summing many ranks'
    bf16 gradients loses bits), in fp32 under fp32 compute, and stored in the master
    dtype. Buffers stay fp32: rotary `inv_freq` in bf16 visibly shifts long-context
    positions."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32' here, got {precision!r}")
    if precision == master == "fp32":
        return None
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    reduce = torch.float32 if precision == "fp32" or reduce_dtype == "fp32" else torch.bfloat16
    return MixedPrecision(param_dtype=compute, reduce_dtype=reduce, buffer_dtype=torch.float32)


def wrap(model: nn.Module, unit_modules: list[nn.Module], recompute: list[nn.Module],
         fsdp_cfg, precision: str, info: DistInfo, master: str = "fp32") -> FSDP:
    """Shard `model`: each of `unit_modules` becomes a unit, the rest the root (wrapped
    last); then the modules in `recompute` get non-reentrant activation checkpointing.
    A collective (the weights broadcast, FSDP's own set-up).

    `model` must hold rank 0's weights on rank 0; other ranks may hold garbage of the
    right shapes (see `ft.model.load_model`): the states are made equal here.
    """
    if fsdp_cfg.sync_module_states and not info.on_gpu:
        # FSDP refuses sync_module_states on CPU ("requires them to be on GPU"), so do the
        # same broadcast by hand before wrapping: identical result, one collective per tensor.
        broadcast_module_state(model, src=0)  # SYNC
    ids = {id(m) for m in unit_modules}
    wrapped = FSDP(  # SYNC (sync_module_states broadcasts on GPU)
        model,
        auto_wrap_policy=CustomPolicy(lambda m: id(m) in ids),
        sharding_strategy=_STRATEGIES[fsdp_cfg.sharding_strategy],
        backward_prefetch=_PREFETCH[fsdp_cfg.backward_prefetch],
        forward_prefetch=fsdp_cfg.forward_prefetch,
        limit_all_gathers=fsdp_cfg.limit_all_gathers,
        # On GPU, FSDP broadcasts rank 0's parameters and buffers unit by unit as it wraps.
        sync_module_states=fsdp_cfg.sync_module_states and info.on_gpu,
        use_orig_params=fsdp_cfg.use_orig_params,
        cpu_offload=CPUOffload(offload_params=True) if fsdp_cfg.cpu_offload else None,
        mixed_precision=mixed_precision(precision, fsdp_cfg.reduce_dtype, master),
        # FSDP on CPU needs device_id=cpu ("needs a non-CPU accelerator device" otherwise).
        device_id=info.device,
    )
    # FSDP must have built exactly the planned units: a silent mismatch would make the
    # memory figures printed at start-up wrong.
    built = {id(m.module) for m in FSDP.fsdp_modules(wrapped)}
    if built != ids | {id(model)}:
        raise RuntimeError(f"FSDP built {len(built)} units but the plan has {len(ids) + 1}: "
                           "a module matched twice or a nested unit was skipped")
    # Checkpointing after wrapping (FSDP1's order; FSDP2 does it the other way round).
    # Do not also call HF's gradient_checkpointing_enable(): layers would be recomputed twice.
    keep = {id(m) for m in recompute}
    if keep:
        apply_activation_checkpointing(
            wrapped,
            checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda m: id(m) in keep,
        )
    return wrapped


# =====================================================================================
# Shards as plain data, for the optimizer
# =====================================================================================
_FLAT_ATTRS = ("_fqns", "_shapes", "_numels", "_shard_param_infos")


def _flat_slices(flat: torch.Tensor, prefix: str) -> list[ParamSlice]:
    """Every original parameter of a FlatParameter, held or not (the layout of the
    reduce buffers must be the same on every rank)."""
    missing = [a for a in _FLAT_ATTRS if not hasattr(flat, a)]
    if missing:
        raise RuntimeError(
            f"FSDP's FlatParameter in torch {torch.__version__} lacks {missing} (private "
            "attributes present in torch 2.1 to 2.13): ft's Adafactor cannot map flat "
            "shards to parameters; use train.optim=hf_adafactor or adamw")
    slices = []
    for fqn, shape, numel, info in zip(flat._fqns, flat._shapes, flat._numels,
                                       flat._shard_param_infos, strict=True):
        name = f"{prefix}.{fqn}" if prefix else fqn
        if info.in_shard:  # intra_param_end_idx is inclusive
            slices.append(ParamSlice(name, torch.Size(shape), info.intra_param_start_idx,
                                     info.intra_param_end_idx + 1, info.offset_in_shard))
        else:
            slices.append(ParamSlice(name, torch.Size(shape), 0, 0, 0))
        assert slices[-1].full_numel == numel
    return slices


def shard_layout(model: nn.Module, tensors: list[torch.Tensor], process_group=None) -> ShardLayout:
    """The `ParamSlice`s of each of `tensors` (parameters of `model`: flat shards, or
    plain parameters of an unwrapped model) and the group over which per-parameter sums
    are reduced: the units' shard group (the world under FULL_SHARD; intra-node under
    HYBRID_SHARD), or `process_group` if given; None when nothing is sharded."""
    flat_owner: dict[int, tuple[str, FSDP]] = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDP):
            if getattr(module, "_use_orig_params", False):
                raise ValueError(
                    "ft's Adafactor needs FSDP1 with use_orig_params=False (flat "
                    "parameters); use train.optim=hf_adafactor or adamw otherwise")
            if not hasattr(module, "_handle"):
                raise RuntimeError(
                    f"FSDP in torch {torch.__version__} has no `_handle` (private, present "
                    "in torch 2.1 to 2.13): ft's Adafactor cannot find the flat parameters; "
                    "use train.optim=hf_adafactor or adamw")
            handle = module._handle
            if handle is not None:
                # (+ ".": the wrapper prefixes are matched with their trailing dot)
                flat_owner[id(handle.flat_param)] = (clean_name(name + ".").rstrip("."), module)
    plain = {id(p): clean_name(n) for n, p in model.named_parameters()}

    slices: dict[int, list[ParamSlice]] = {}
    groups = set()
    for t in tensors:
        if id(t) in flat_owner:
            prefix, module = flat_owner[id(t)]
            slices[id(t)] = _flat_slices(t, prefix)
            if module._handle.uses_sharded_strategy:
                groups.add(module.process_group)
        elif id(t) in plain:
            slices[id(t)] = [ParamSlice(plain[id(t)], t.shape, 0, t.numel(), 0)]
        else:
            raise ValueError(
                f"a tensor of shape {tuple(t.shape)} given to the optimizer is not a "
                "parameter of `model`: pass the FSDP root (or the plain model) as model")
    if len(groups) > 1:
        raise ValueError("FSDP units with different process groups: pass process_group")
    group = (process_group if process_group is not None else groups.pop()) if groups else None
    unit = next((m for _, m in flat_owner.values()), None)
    device = getattr(unit, "compute_device", None) or (tensors[0].device if tensors else None)
    return ShardLayout(slices, group, device)


# =====================================================================================
# Gradient clipping and state dicts
# =====================================================================================
def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip to `max_norm` (0 disables clipping) and return the norm *before* clipping,
    over the whole model on all ranks (a collective: every rank must call it).

    Sharded units: FSDP's own `clip_grad_norm_` (fp32 norms of the local shards, summed
    over the shard group; it returns the norm in the gradients' dtype, so bf16 gradients
    log a bf16 norm). When nothing is sharded (world size 1, or a plain model) FSDP hands
    over to torch's `clip_grad_norm_`: right for fp32 gradients, but it takes bf16
    gradients' norm in bf16, so those go through `ft.shards.clip_fp32`, the sharded
    path's computation."""
    limit = max_norm if max_norm > 0 else float("inf")
    if isinstance(model, FSDP) and any(h.uses_sharded_strategy for h in model._all_handles):
        return float(model.clip_grad_norm_(limit))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if all(g.dtype == torch.float32 for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), limit))
    return clip_fp32(grads, max_norm)


def model_state_dict(model: nn.Module) -> dict:
    """This rank's shards of the model, keyed by clean names (for DCP). A collective."""
    return get_model_state_dict(model)


def load_model_state_dict(model: nn.Module, state_dict: dict) -> None:
    set_model_state_dict(model, state_dict)


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A torch optimizer's sharded state (for DCP). Builds the state first when the
    optimizer has none yet (a zero-lr step), so that a fresh optimizer can be loaded into."""
    return get_optimizer_state_dict(model, optimizer)


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    set_optimizer_state_dict(model, optimizer, state_dict)


def full_state_dict(model: nn.Module, info: DistInfo) -> dict:
    """The full, unsharded weights by clean name, for an export. A collective.

    On GPU the gathered tensors are offloaded to CPU as they arrive. On CPU offload must
    stay off: with the model already on CPU it crashes ("setStorage ... out of bounds"
    or a segfault, torch 2.13), so every rank gathers a full copy there.
    """
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=info.on_gpu))


def planned_slices(unit_params: dict[str, nn.Parameter], world_size: int, rank: int) -> list[ParamSlice]:
    """The `ParamSlice`s rank `rank` will hold of a unit whose own parameters (in FSDP1's
    flat order) are `unit_params`, computed without wrapping (meta-device models work):
    FSDP1 pads the unit's flat parameter to a multiple of the world size and gives rank
    r the r-th equal slice."""
    per_rank = shard_numel(sum(p.numel() for p in unit_params.values()), world_size)
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    slices, at = [], 0
    for name, p in unit_params.items():
        start, stop = max(lo - at, 0), min(hi - at, p.numel())
        if start < stop:
            slices.append(ParamSlice(name, p.shape, start, stop, at + start - lo))
        else:
            slices.append(ParamSlice(name, p.shape, 0, 0, 0))
        at += p.numel()
    return slices
