"""The sharding backends, registered once. Code outside a backend module asks
`backend_of(model)` instead of testing `isinstance(model, FSDP)`.

A backend is a module (`ft.fsdp1`, `ft.fsdp2`) that satisfies the `Backend` protocol
below, chosen by `fsdp.backend` (whose choices are this registry's names); a test
(tests/test_structure.py) checks that each registered module has every member, with
the protocol's parameter names. Every function accepts a plain (unwrapped) model too.
"""

from __future__ import annotations

from types import ModuleType
from typing import Protocol

import torch
from torch import nn

from ft import fsdp1, fsdp2
from ft.config import FSDPConfig, field_choices
from ft.dist import DistInfo
from ft.shards import ParamSlice, ShardLayout


class Backend(Protocol):
    """What ft asks of a sharding backend. Implemented by modules, not classes: the
    methods below are the modules' functions (without `self`)."""

    NAME: str
    """Its name, one of `fsdp.backend`'s choices."""

    def config_refusals(self, cfg) -> list[str]:
        """Why a config cannot run on it (empty: it can)."""

    def describe(self, fsdp_cfg, precision: str, master: str = "fp32") -> str:
        """The start-up log line: what each knob became."""

    def owns(self, model: nn.Module) -> bool:
        """Was `model` wrapped by it?"""

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The HF model inside."""

    def clean_name(self, name: str) -> str:
        """A path without the wrappers' prefixes."""

    def original_params(self, model: nn.Module) -> list[tuple[str, nn.Parameter, list[tuple[nn.Module, str]]]]:
        """[(name, tensor, [(owning module, clean name)])]."""

    def shard_numel(self, numel: int, world_size: int) -> int:
        """Elements of a unit each rank holds."""

    def flattens_units(self, fsdp_cfg) -> bool:
        """One requires_grad per unit?"""

    def wrap(self, model: nn.Module, unit_modules: list[nn.Module], recompute: list[nn.Module],
             fsdp_cfg, precision: str, info: DistInfo, master: str = "fp32") -> nn.Module:
        """Shard and checkpoint: the units, the root last, the modules to recompute."""

    def shard_layout(self, model: nn.Module, tensors: list[torch.Tensor], process_group=None) -> ShardLayout:
        """`ft.shards.ShardLayout` for the optimizer."""

    def planned_slices(self, unit_params: dict[str, nn.Parameter], world_size: int, rank: int) -> list[ParamSlice]:
        """The `ParamSlice`s a rank will hold, unwrapped."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip the gradients; the global norm before clipping, on every rank."""

    def model_state_dict(self, model: nn.Module) -> dict:
        """The sharded model state for checkpoints."""

    def load_model_state_dict(self, model: nn.Module, state_dict: dict) -> None:
        """Load what `model_state_dict` gave."""

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The sharded optimizer state for checkpoints."""

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                                  state_dict: dict) -> None:
        """Load what `optimizer_state_dict` gave."""

    def full_state_dict(self, model: nn.Module, info: DistInfo) -> dict:
        """The full weights, for exports."""


BACKENDS: dict[str, Backend | ModuleType] = {m.NAME: m for m in (fsdp1, fsdp2)}
DEFAULT = FSDPConfig.backend
if tuple(BACKENDS) != field_choices("fsdp.backend"):
    raise RuntimeError(f"ft.backends.BACKENDS {tuple(BACKENDS)} and FSDPConfig.backend's choices "
                       f"{field_choices('fsdp.backend')} differ: register each backend in both")


def backend_of(model: nn.Module) -> Backend | ModuleType:
    """The backend that wrapped `model`; the default one for a plain model, which every
    backend treats as unsharded."""
    for backend in BACKENDS.values():
        if backend.owns(model):
            return backend
    return BACKENDS[DEFAULT]
