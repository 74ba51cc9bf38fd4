"""Optimizers, registered once; the learning-rate schedule; gradient clipping.

`OPTIMIZERS` is the registry: one `OptimizerSpec` per `train.optim` choice, saying how to
build it, how much state it keeps per rank (the dry run's memory estimate) and how its
state goes into and out of a checkpoint (`ft.ckpt`). Adding an optimizer is one entry
here plus its name and description in `TrainConfig.optim` (`ft/config.py`).

- `build_optimizer(param_groups, train_cfg, model=None)`: `param_groups` is a list of
  `{"params": [tensors], "lr": base_lr, "name": str}` (`ft.parts.param_groups`) or a plain
  iterable of tensors (one group "all" at `train_cfg.learning_rate`). Frozen tensors
  are dropped, then empty groups. Each group keeps its `lr` as `base_lr`.
- `lr_scale(step, max_steps, warmup_ratio)` and `set_lr(optimizer, scale)`: HF's
  "constant_with_warmup" as a multiplier of each group's `base_lr`, a pure function of
  the step (a resumed run follows the same curve without scheduler state).
- `clip_grad_norm(model, max_norm)`: the norm over all shards on all ranks, through the
  sharding backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.adam import adam

from ft.adafactor import Adafactor, adafactor_state_bytes
from transformers.optimization import Adafactor as HFAdafactor

from ft.backends import BACKENDS, backend_of
from ft.config import ConfigError, field_choices
from ft.config_load import HF_ADAFACTOR_CRASH, refuse_bf16_hf_adafactor
from ft.rounding import WriteBack
from ft.shards import local


# =====================================================================================
# How an optimizer's state is checkpointed
# =====================================================================================
class TorchState:
    """A torch optimizer's per-tensor state, sharded like the parameters: through the
    backend's optimizer state dict, checked tensor by tensor against the checkpoint."""

    check_saved = True  # ft.ckpt compares saved and expected shapes and dtypes
    # DCP stores each state tensor by original parameter with its global shape, so any
    # world size can load it.
    reshards = True
    why_not_reshard = ""

    @staticmethod
    def state_dict(model: nn.Module, optimizer) -> dict:
        return backend_of(model).optimizer_state_dict(model, optimizer)

    @staticmethod
    def template(model: nn.Module, optimizer, saved: dict) -> dict:
        # Builds the optimizer's state (a zero-lr step) so there is something to load into.
        return backend_of(model).optimizer_state_dict(model, optimizer)

    @staticmethod
    def load(model: nn.Module, optimizer, state_dict: dict) -> None:
        backend_of(model).load_optimizer_state_dict(model, optimizer, state_dict)


class FqnState:
    """ft's Adafactor: full tensors keyed by parameter name, the same on every rank and
    independent of world size and wrap plan (`Adafactor.fqn_state_dict`). FSDP1's
    optimizer state dict cannot hold its row and column factors (they are not shaped
    like the flat shard)."""

    check_saved = False  # the template is made from the checkpoint's own metadata
    reshards = True  # full tensors by name: loads at any world size
    why_not_reshard = ""

    @staticmethod
    def state_dict(model: nn.Module, optimizer) -> dict:
        return optimizer.fqn_state_dict()  # a collective under sharding

    @staticmethod
    def template(model: nn.Module, optimizer, saved: dict) -> dict:
        """`saved`: {key: DCP TensorStorageMetadata} of the checkpoint's optimizer part."""
        return {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in saved.items()}

    @staticmethod
    def load(model: nn.Module, optimizer, state_dict: dict) -> None:
        optimizer.load_fqn_state_dict(state_dict)


# =====================================================================================
# The registry
# =====================================================================================
@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    cls: type  # what it builds: how ft.ckpt finds the spec of an optimizer
    build: Callable[[list[dict], Any, nn.Module | None], torch.optim.Optimizer]
    state_bytes: Callable[[list, int, str], int]  # (plan units, world size, backend): worst rank
    memory_note: str  # what state_bytes counts, for the dry run
    checkpoint: type  # TorchState or FqnState


# =====================================================================================
# AdamW over bf16 master weights
# =====================================================================================
class MasterAdamW(torch.optim.AdamW):
    """torch's AdamW for bf16 master weights: its moments are fp32 (torch's own AdamW
    would make them bf16, like the parameter), its math is torch's (`torch.optim.adam.adam`,
    decoupled weight decay) on an fp32 copy of one parameter tensor at a time, and the
    result is written back through `write_back` (`ft.rounding`: stochastic rounding keyed
    by each original parameter's name and element index, found through the backend's
    shard layout). State per trainable element: 8 bytes, as with fp32 weights."""

    def __init__(self, params, model: nn.Module, write_back: WriteBack, **kwargs):
        super().__init__(params, foreach=False, **kwargs)
        tensors = [p for g in self.param_groups for p in g["params"]]
        self._slices = backend_of(model).shard_layout(model, tensors).slices
        self._write = write_back

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:  # shaped like p (a DTensor under FSDP2, so DCP can reshard it)
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                w = local(p.detach())  # the elements this rank holds (FSDP2: the DTensor's shard)
                w32 = w.float()
                adam(
                    [w32], [local(p.grad).float()], [local(st["exp_avg"])], [local(st["exp_avg_sq"])], [],
                    [st["step"]], foreach=False, decoupled_weight_decay=True, amsgrad=False, beta1=beta1,
                    beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                    maximize=False)
                step, dst, src = int(st["step"]), w.view(-1), w32.view(-1)
                for sl in self._slices[id(p)]:
                    if sl.numel:
                        at = slice(sl.offset, sl.offset + sl.numel)
                        self._write(dst[at], src[at], step, sl.fqn, sl.start)
        return loss

    def load_state_dict(self, state_dict):
        """torch's `load_state_dict` casts floating state to the parameter's dtype (bf16):
        put the saved fp32 moments back after it."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(i, {}).items():
                if key != "step" and torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32)


# =====================================================================================
# The builders
# =====================================================================================
def _write_back(train_cfg) -> WriteBack | None:
    """How a bf16 master weight receives the optimizer's fp32 result; None for fp32."""
    if train_cfg.master_weights == "fp32":
        return None
    return WriteBack(seed=train_cfg.seed, stochastic=train_cfg.stochastic_rounding)


def _needs_model(train_cfg, model, why: str) -> None:
    if model is None:
        raise ValueError(f"train.optim={train_cfg.optim} {why} needs build_optimizer(..., model=root): "
                         "the FSDP root (or plain model) names the parameters")


def _build_adafactor(groups, train_cfg, model):
    _needs_model(train_cfg, model, "(ft's shard-invariant Adafactor)")
    return Adafactor(groups, model, lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay,
                     write_back=_write_back(train_cfg))


def _build_hf_adafactor(groups, train_cfg, model):
    refuse_bf16_hf_adafactor(train_cfg)  # loading refused it already; a TrainConfig built in code
    # Exactly as the HF Trainer recipe builds it (optim="adafactor"). Under FSDP1 it sees
    # each rank's 1-D flat shard: it cannot factor its second moment and clips per shard,
    # so training depends on the world size (2 ranks vs 1: loss differs by 4.5e-2 after
    # 3 steps on the tiny model). Under FSDP2 it crashes on the DTensor parameters.
    if any(isinstance(p, DTensor) for g in groups for p in g["params"]):
        raise ConfigError(f"train.optim=hf_adafactor: {HF_ADAFACTOR_CRASH}")
    return HFAdafactor(groups, lr=train_cfg.learning_rate, scale_parameter=False, relative_step=False,
                       warmup_init=False, weight_decay=train_cfg.weight_decay)


def _build_adamw(groups, train_cfg, model):
    # HF TrainingArguments' AdamW defaults (betas 0.9/0.999, eps 1e-8).
    hyper = dict(lr=train_cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=train_cfg.weight_decay)
    write_back = _write_back(train_cfg)
    if write_back is None:
        return torch.optim.AdamW(groups, **hyper)
    _needs_model(train_cfg, model, "with bf16 master weights")
    return MasterAdamW(groups, model, write_back, **hyper)


def _per_element(nbytes: int):
    """State of `nbytes` per trainable element a rank holds, worst rank."""
    def count(units, world_size: int, backend: str) -> int:
        shard = BACKENDS[backend].shard_numel
        return nbytes * sum(shard(u.numel, world_size) for u in units if u.trainable_numel)
    return count


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec for spec in [
        OptimizerSpec(
            "adafactor", Adafactor, _build_adafactor,
            lambda units, world, backend: max(adafactor_state_bytes(units, world, r, backend) for r in range(world)),
            "full fp32 row+col factors of the matrices a rank touches, worst rank", FqnState),
        OptimizerSpec(
            "hf_adafactor", HFAdafactor, _build_hf_adafactor, _per_element(4),
            "1 fp32 moment per trainable shard element (unfactored on flat shards)", TorchState),
        OptimizerSpec(
            "adamw", torch.optim.AdamW, _build_adamw, _per_element(8),
            "2 fp32 moments per trainable shard element (with bf16 master weights too)", TorchState),
    ]
}
if set(OPTIMIZERS) != set(field_choices("train.optim")):
    raise RuntimeError(f"ft.optim.OPTIMIZERS {sorted(OPTIMIZERS)} and TrainConfig.optim's choices "
                       f"{sorted(field_choices('train.optim'))} differ: register each optimizer in both")


def spec_of(optimizer: torch.optim.Optimizer) -> OptimizerSpec:
    """The registered spec of a built optimizer (`MasterAdamW` is AdamW's); any other
    torch optimizer is checkpointed like AdamW (its state through the backend)."""
    for spec in OPTIMIZERS.values():
        if isinstance(optimizer, spec.cls):
            return spec
    return OPTIMIZERS["adamw"]


def build_optimizer(param_groups, train_cfg, model: nn.Module | None = None) -> torch.optim.Optimizer:
    if train_cfg.optim not in OPTIMIZERS:
        raise ValueError(f"train.optim: unknown optimizer {train_cfg.optim!r} ({' | '.join(OPTIMIZERS)})")
    groups = _normalize_groups(param_groups, train_cfg.learning_rate)
    return OPTIMIZERS[train_cfg.optim].build(groups, train_cfg, model)


# =====================================================================================
# Schedule and clipping
# =====================================================================================
def _normalize_groups(param_groups, default_lr: float) -> list[dict]:
    param_groups = list(param_groups)
    if not param_groups or not isinstance(param_groups[0], dict):
        param_groups = [{"params": param_groups, "lr": default_lr, "name": "all"}]
    groups = []
    for group in param_groups:
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            lr = group.get("lr", default_lr)
            # base_lr: what set_lr scales; group["lr"] is the current value.
            groups.append({**group, "params": params, "lr": lr, "base_lr": lr})
    return groups


def warmup_steps(max_steps: int, warmup_ratio: float) -> int:
    """HF's rule: ceil(max_steps x warmup_ratio)."""
    return math.ceil(max_steps * warmup_ratio)


def lr_scale(step: int, max_steps: int, warmup_ratio: float) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based): HF's
    "constant_with_warmup" (linear from 0 at step 0, then 1). HF's plain "constant"
    ignores warmup_ratio; ft honours it."""
    n = warmup_steps(max_steps, warmup_ratio)
    return step / n if step < n else 1.0


def set_lr(optimizer: torch.optim.Optimizer, scale: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * scale


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip to `max_norm` (0 disables clipping) and return the norm *before* clipping,
    taken over the whole model on all ranks (a collective: every rank must call it)."""
    return backend_of(model).clip_grad_norm(model, max_norm)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in an optimizer's state (nested dicts included)."""
    def walk(x):
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        return 0
    return sum(walk(st) for st in optimizer.state.values())
