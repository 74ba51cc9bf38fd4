"""The sharding backends, registered once. Code outside a backend module asks
`backend_of(model)` instead of testing `isinstance(model, FSDP)`.

A backend is a module with these functions (`ft.fsdp1`, `ft.fsdp2`), chosen by
`fsdp.backend` (whose choices are this registry's names):

    NAME                                     its name
    config_refusals(cfg) -> [str]            why a config cannot run on it (empty: it can)
    describe(fsdp_cfg, precision) -> str     the start-up log line: what each knob became
    owns(model) -> bool                      was `model` wrapped by it?
    unwrap(model) -> nn.Module               the HF model inside
    clean_name(name) -> str                  a path without the wrappers' prefixes
    original_params(model)                   [(name, tensor, [(owning module, clean name)])]
    shard_numel(numel, world_size) -> int    elements of a unit each rank holds
    flattens_units(fsdp_cfg) -> bool         one requires_grad per unit?
    wrap(model, unit_modules, recompute, fsdp_cfg, precision, info)   shard + checkpointing
    shard_layout(model, tensors, group)      `ft.shards.ShardLayout` for the optimizer
    planned_slices(unit_params, world, rank) the `ParamSlice`s a rank will hold, unwrapped
    clip_grad_norm(model, max_norm) -> float
    model_state_dict / load_model_state_dict
    optimizer_state_dict / load_optimizer_state_dict
    full_state_dict(model, info)             for exports

Every function accepts a plain (unwrapped) model too.
"""

from __future__ import annotations

from types import ModuleType

from torch import nn

from ft import fsdp1, fsdp2
from ft.config import FSDPConfig, field_choices

BACKENDS: dict[str, ModuleType] = {m.NAME: m for m in (fsdp1, fsdp2)}
DEFAULT = FSDPConfig.backend
if tuple(BACKENDS) != field_choices("fsdp.backend"):
    raise RuntimeError(f"ft.backends.BACKENDS {tuple(BACKENDS)} and FSDPConfig.backend's choices "
                       f"{field_choices('fsdp.backend')} differ: register each backend in both")


def backend_of(model: nn.Module) -> ModuleType:
    """The backend that wrapped `model`; the default one for a plain model, which every
    backend treats as unsharded."""
    for backend in BACKENDS.values():
        if backend.owns(model):
            return backend
    return BACKENDS[DEFAULT]
