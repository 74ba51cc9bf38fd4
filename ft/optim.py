"""Optimizer, learning-rate schedule and gradient clipping.

The reference recipe (HF Trainer, `optim="adafactor"`, `lr_scheduler_type="constant"`,
`warmup_ratio`, `max_grad_norm`) in plain code:

- Adafactor exactly as the Trainer builds it: `Adafactor(lr, scale_parameter=False,
  relative_step=False, warmup_init=False)`, HF's defaults for everything else.
  Under FSDP1 it sees each rank's 1-D flat shard, so it cannot factor its second
  moment and its RMS/update clipping is per shard (FACTS.md) — the same as the recipe.
- Constant learning rate after a linear warmup over `warmup_ratio` of the steps. HF's
  "constant" ignores warmup_ratio; we honour it, which is HF's
  "constant_with_warmup" to the step (including a first step at lr 0 when warming up).
- Clipping through the FSDP root's `clip_grad_norm_`, which reduces the norm over all
  shards; `torch.nn.utils.clip_grad_norm_` would only see this rank's shard.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP


def build_optimizer(params, train_cfg) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if train_cfg.optim == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=train_cfg.learning_rate,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=train_cfg.weight_decay,
        )
    if train_cfg.optim == "adamw":
        # HF TrainingArguments' AdamW defaults (betas 0.9/0.999, eps 1e-8).
        return torch.optim.AdamW(
            params, lr=train_cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8,
            weight_decay=train_cfg.weight_decay,
        )
    raise ValueError(f"train.optim: unknown optimizer {train_cfg.optim!r} (adafactor | adamw)")


def warmup_steps(max_steps: int, warmup_ratio: float) -> int:
    """HF's rule: ceil(max_steps x warmup_ratio)."""
    return math.ceil(max_steps * warmup_ratio)


def lr_at(step: int, max_steps: int, base_lr: float, warmup_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based). A pure function of the step, so
    a resumed run follows the same curve without saving scheduler state."""
    n = warmup_steps(max_steps, warmup_ratio)
    if step < n:
        return base_lr * step / n
    return base_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip to `max_norm` (0 disables clipping) and return the norm *before* clipping,
    taken over the whole model on all ranks (a collective: every rank must call it)."""
    limit = max_norm if max_norm > 0 else float("inf")
    if isinstance(model, FSDP):
        norm = model.clip_grad_norm_(limit)
    else:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
    return float(norm)
