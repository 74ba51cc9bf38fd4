"""Optimizers, learning-rate schedule and gradient clipping.

API
---
- `build_optimizer(param_groups, train_cfg, model=None) -> torch.optim.Optimizer`
  `param_groups`: a list of dicts `{"params": [tensors], "lr": base_lr, "name": str}`,
  or a plain iterable of tensors (one group "all" at `train_cfg.learning_rate`).
  Frozen tensors are dropped, then groups left empty. Each group keeps its `lr` as
  `base_lr`. `train_cfg.optim` picks the optimizer:
    - `adafactor`: `Adafactor` below, ft's shard-invariant Adafactor. Needs `model`,
      the module whose parameters are optimized: the FSDP root, or the plain model.
    - `hf_adafactor`: HF's `Adafactor(lr, scale_parameter=False, relative_step=False,
      warmup_init=False)`, exactly as the HF Trainer recipe builds it. Under FSDP1 it sees
      each rank's 1-D flat shard, so it cannot factor its second moment and computes its
      update clipping per shard (FACTS.md): training then depends on the world size.
    - `adamw`: torch's AdamW with HF TrainingArguments' defaults.
- `lr_scale(step, max_steps, warmup_ratio) -> float` and `set_lr(optimizer, scale)`:
  HF's "constant_with_warmup" as a multiplier of each group's `base_lr`, a pure function
  of the step (a resumed run follows the same curve without scheduler state).
- `clip_grad_norm(model, max_norm) -> float`: through the FSDP root's `clip_grad_norm_`,
  which reduces the norm over all shards.
- `Adafactor(params, model, lr, eps=1e-30, clip_threshold=1.0, decay_rate=-0.8,
  weight_decay=0.0, process_group=None)`, with `.step()`, `.fqn_state_dict()` and
  `.load_fqn_state_dict(sd)`. Checkpoint it with those two: `state_dict()` refuses (see
  `Adafactor.state_dict`).
- `adafactor_state_bytes(units, world_size, rank) -> int`: `Adafactor`'s state on one
  rank for a wrap plan (`ft.fsdp_wrap.plan_units`), computed without building anything;
  `state_bytes(optimizer) -> int`: the bytes of the tensors an optimizer's state holds.

ft's Adafactor
--------------
For every original parameter it performs exactly the update of single-process
`transformers.optimization.Adafactor(params, lr, scale_parameter=False,
relative_step=False, warmup_init=False)` applied to the whole unsharded parameter,
whatever the world size and wrap plan: on plain tensors (an unwrapped model) it gives HF's
result bit for bit; under FSDP1 (`use_orig_params=False`) the sums are reduced across
ranks, so results agree to float rounding.

FSDP1 hands the optimizer one 1-D `FlatParameter` shard per unit: each rank holds an
equal slice of the unit's padded, flattened parameters, which may begin or end in the
middle of a matrix row, and may hold nothing of some parameter. FSDP's own metadata on
each FlatParameter (`_fqns`, `_shapes`, `_numels`, `_shard_param_infos`) says which
elements of which original parameter a shard holds (`ParamSlice`, `shard_slices`). With
that, per step:

1. each rank sums grad² + eps over the rows and columns of the elements it holds, for
   every matrix (parameters with >= 2 dims; for more dims HF factors the last two, the
   leading ones being a batch of matrices); ONE all-reduce of one flat buffer holding all
   these partial sums gives every rank the full row and column means;
2. every rank that holds part of a matrix updates the same full-size row and column
   factors (shapes shape[:-1] and shape[:-2] + shape[-1:], as in HF), then computes the
   unclipped update for its elements; 1-D (and 0-D) parameters keep an element-wise second
   moment for the elements this rank holds, as HF does (sharded, like the parameter);
3. a SECOND all-reduce sums each parameter's squared update norm: HF clips the update by
   its RMS over the whole parameter, which needs the factors from step 1 first;
4. every rank applies its part of the clipped update (and HF's weight decay).

HF's RMS of the parameter itself is only used with `scale_parameter=True`, so it is not
computed. No collective runs when nothing is sharded (plain tensors, NO_SHARD).

State per rank: the row and column factors of every matrix it holds a slice of, and its
slice of each 1-D parameter's second moment, all fp32 (under bf16 mixed precision FSDP
hands the optimizer fp32 master shards; bf16/fp16 gradients or parameters are computed
in fp32 as HF does, but HF would keep such a gradient's state in its dtype); steps are
Python ints. For Qwen2.5-VL-3B at world size 8 that is 6.3 MiB per rank where HF
Adafactor under FSDP keeps 1.75 GiB (`benchmarks/adafactor_memory.py`). The cost: two
all-reduces of ~11 MiB in all per step (3B; every matrix's row and column sums, one
float per parameter), and a Python loop over the original parameters instead of over
the flat shards.

A step is assumed to have gradients for a flat parameter on all ranks or on none, which
FSDP1's reduce-scatter guarantees; an original parameter that FSDP's flat gradient holds
zeros for (unused in forward while the rest of its unit is used) is stepped with a zero
gradient, where HF on the unwrapped model would skip it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP


# =====================================================================================
# Construction and schedule
# =====================================================================================
def build_optimizer(param_groups, train_cfg, model: nn.Module | None = None) -> torch.optim.Optimizer:
    groups = _normalize_groups(param_groups, train_cfg.learning_rate)
    if train_cfg.optim == "adafactor":
        if model is None:
            raise ValueError(
                "train.optim=adafactor (ft's shard-invariant Adafactor) needs "
                "build_optimizer(..., model=root): the FSDP root (or plain model) names "
                "the parameters")
        return Adafactor(groups, model, lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay)
    if train_cfg.optim == "hf_adafactor":
        from transformers.optimization import Adafactor as HFAdafactor

        return HFAdafactor(
            groups,
            lr=train_cfg.learning_rate,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=train_cfg.weight_decay,
        )
    if train_cfg.optim == "adamw":
        # HF TrainingArguments' AdamW defaults (betas 0.9/0.999, eps 1e-8).
        return torch.optim.AdamW(
            groups, lr=train_cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8,
            weight_decay=train_cfg.weight_decay,
        )
    raise ValueError(
        f"train.optim: unknown optimizer {train_cfg.optim!r} (adafactor | hf_adafactor | adamw)")


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
    limit = max_norm if max_norm > 0 else float("inf")
    if isinstance(model, FSDP):
        norm = model.clip_grad_norm_(limit)
    else:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
    return float(norm)


# =====================================================================================
# Shard bookkeeping: which elements of which original parameter a tensor holds
# =====================================================================================
@dataclass(frozen=True)
class ParamSlice:
    """The run of one original parameter's elements held by one local tensor: flat
    indices [start, stop) of the parameter, stored at [offset, offset + numel) of the
    tensor. start == stop when this rank holds none of it."""

    fqn: str  # clean name, as in the HF model's state dict
    shape: torch.Size  # the full parameter's shape
    start: int
    stop: int
    offset: int

    @property
    def numel(self) -> int:
        return self.stop - self.start

    @cached_property
    def full_numel(self) -> int:
        return self.shape.numel()

    @property
    def factored(self) -> bool:
        return len(self.shape) >= 2  # HF's rule

    @property
    def owner(self) -> bool:
        """This rank holds the parameter's first element: exactly one rank does, so it
        speaks for the parameter's replicated state when gathering."""
        return self.start == 0 and self.stop > 0

    # --- factored parameters: a stack of `n_matrices` matrices of `n_rows` x `n_cols`
    # (HF's row factor has n_matrices * n_rows entries, its column factor
    # n_matrices * n_cols); "row r" counts rows across the whole stack.
    @property
    def n_rows(self) -> int:
        return self.shape[-2]

    @property
    def n_cols(self) -> int:
        return self.shape[-1]

    @cached_property
    def n_matrices(self) -> int:
        return self.full_numel // (self.n_rows * self.n_cols)

    @cached_property
    def row_span(self) -> tuple[int, int]:
        """First row touched and one past the last one; partial at either end."""
        return self.start // self.n_cols, -(-self.stop // self.n_cols)

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The held elements `x` laid out as the rows they belong to, zero where a row is
        only partly held: shape (rows touched, n_cols)."""
        r0, r1 = self.row_span
        C = self.n_cols
        if self.start == r0 * C and self.stop == r1 * C:
            return x.view(r1 - r0, C)
        rows = x.new_zeros(r1 - r0, C)
        rows.view(-1)[self.start - r0 * C:self.stop - r0 * C] = x
        return rows

    def from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_rows`: the held elements of a (rows touched, n_cols) tensor."""
        r0 = self.row_span[0]
        return rows.reshape(-1)[self.start - r0 * self.n_cols:self.stop - r0 * self.n_cols]

    def col_sums(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-matrix column sums of `rows` (from `to_rows`): (n_matrices, n_cols), zero
        for matrices not touched. Whole matrices are reduced in one `sum` over their
        rows, the same reduction as HF's `mean(dim=-2)`, so an unsharded parameter gets
        HF's bits; a shard's partial first and last matrix are summed separately."""
        R, C = self.n_rows, self.n_cols
        out = rows.new_zeros(self.n_matrices, C)
        r0 = self.row_span[0]
        i, n = 0, rows.shape[0]
        while i < n:  # at most three rounds: partial head, whole matrices, partial tail
            m, row_in_m = divmod(r0 + i, R)
            if row_in_m == 0 and n - i >= R:
                k = (n - i) // R
                out[m:m + k] += rows[i:i + k * R].view(k, R, C).sum(1)
                i += k * R
            else:
                take = min(R - row_in_m, n - i)
                out[m] += rows[i:i + take].sum(0)
                i += take
        return out

    def cols_of_rows(self, col: torch.Tensor) -> torch.Tensor:
        """`col` is (n_matrices, n_cols): for each row touched, its matrix's row of it,
        as (rows touched, n_cols)."""
        r0, r1 = self.row_span
        if self.n_matrices == 1:
            return col.expand(r1 - r0, -1)
        return col[torch.arange(r0, r1, device=col.device) // self.n_rows]


def _clean(name: str) -> str:
    # What torch.distributed.fsdp._common_utils.clean_tensor_name does (private API):
    # the wrapper modules' prefixes are not part of the HF parameter names.
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


_FLAT_ATTRS = ("_fqns", "_shapes", "_numels", "_shard_param_infos")


def shard_slices(tensor: torch.Tensor, fsdp_prefix: str | None, plain_name: str | None) -> list[ParamSlice]:
    """The original parameters in `tensor`, in order: every parameter of a FlatParameter
    (held or not: the layout of the reduce buffers must be the same on every rank), or
    the single whole parameter of a plain tensor."""
    if fsdp_prefix is None:
        return [ParamSlice(plain_name, tensor.shape, 0, tensor.numel(), 0)]
    missing = [a for a in _FLAT_ATTRS if not hasattr(tensor, a)]
    if missing:
        raise RuntimeError(
            f"FSDP's FlatParameter in torch {torch.__version__} lacks {missing} (private "
            "attributes present in torch 2.1 to 2.13): ft's Adafactor cannot map flat "
            "shards to parameters; use train.optim=hf_adafactor or adamw")
    slices = []
    for fqn, shape, numel, info in zip(tensor._fqns, tensor._shapes, tensor._numels,
                                       tensor._shard_param_infos, strict=True):
        name = f"{fsdp_prefix}.{fqn}" if fsdp_prefix else fqn
        if info.in_shard:
            # intra_param_end_idx is inclusive
            slices.append(ParamSlice(name, torch.Size(shape), info.intra_param_start_idx,
                                     info.intra_param_end_idx + 1, info.offset_in_shard))
        else:
            slices.append(ParamSlice(name, torch.Size(shape), 0, 0, 0))
        assert slices[-1].full_numel == numel
    return slices


class _ShardMap:
    """Every optimized tensor's `ParamSlice`s, and the process group over which the
    per-parameter sums are reduced (None: every rank holds whole parameters)."""

    def __init__(self, model: nn.Module, tensors: list[torch.Tensor], process_group):
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
                    flat_owner[id(handle.flat_param)] = (_clean(name + ".").rstrip("."), module)
        plain = {id(p): _clean(n) for n, p in model.named_parameters()}

        self.slices: dict[int, list[ParamSlice]] = {}
        groups = set()
        for t in tensors:
            if id(t) in flat_owner:
                prefix, module = flat_owner[id(t)]
                self.slices[id(t)] = shard_slices(t, prefix, None)
                if module._handle.uses_sharded_strategy:
                    # The shard group (intra-node under HYBRID_SHARD).
                    groups.add(module.process_group)
            elif id(t) in plain:
                self.slices[id(t)] = shard_slices(t, None, plain[id(t)])
            else:
                raise ValueError(
                    f"a tensor of shape {tuple(t.shape)} given to Adafactor is not a "
                    "parameter of `model`: pass the FSDP root (or the plain model) as model")
        if len(groups) > 1:
            raise ValueError("FSDP units with different process groups: pass process_group")
        if not groups:
            self.group = None
        else:
            self.group = process_group if process_group is not None else groups.pop()
        # Where reduce buffers live: FSDP's compute device (NCCL needs CUDA tensors even
        # when parameters are offloaded to CPU), else the parameters' device.
        unit = next((m for _, m in flat_owner.values()), None)
        self.device = getattr(unit, "compute_device", None) or (tensors[0].device if tensors else None)

    def all_reduce(self, buf: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return buf
        comm = buf.to(self.device)
        dist.all_reduce(comm, group=self.group)
        return comm.to(buf.device)


# =====================================================================================
# The math, per original parameter: HF Adafactor's step, split where sums over the whole
# parameter are needed (they are reduced across ranks in between).
#
# Per-step cost is mostly the number of small ops per parameter (kernel launches on a GPU),
# so the shard layout is turned into `_Held` records once, at construction, and step()
# batches what it can without changing any element's arithmetic: the 1-D parameters'
# element-wise ops go through torch._foreach_* (the same op per element, in the same
# order), and the clip divisors are computed per (group, parameter size) in one go (the
# same scalar ops per element). Reductions (row/column sums, norms) stay per parameter.
# =====================================================================================
class _Held:
    """A `ParamSlice` this rank holds elements of (numel > 0), with what step() needs
    precomputed: the shard layout is fixed."""

    __slots__ = ("sl", "fqn", "lo", "hi", "slot", "factored", "whole", "R", "C", "k",
                 "r0", "r1", "row_at", "col_at", "col_end")

    def __init__(self, sl: ParamSlice, slot: int, sq_at: int | None):
        self.sl, self.fqn, self.slot = sl, sl.fqn, slot  # slot: its entry in the norm buffer
        self.lo, self.hi = sl.offset, sl.offset + sl.numel  # where the tensor holds it
        self.factored = sl.factored
        self.whole = sl.start == 0 and sl.stop == sl.full_numel
        if self.factored:
            self.R, self.C, self.k = sl.n_rows, sl.n_cols, sl.n_matrices
            self.r0, self.r1 = sl.row_span
            # Its row sums in the reduce buffer at [row_at, col_at), column sums up to col_end.
            self.row_at = sq_at
            self.col_at = sq_at + self.k * self.R
            self.col_end = self.col_at + self.k * self.C


def _sq_sums_into(sq: torch.Tensor, e: _Held, g: torch.Tensor, eps: float) -> None:
    """Write the partial row and column sums of grad² + eps over the held elements into
    their places in `sq` (zero elsewhere). A whole matrix's sums are written in place
    (`out=`), the same reductions as HF's `mean(dim=-1)` / `mean(dim=-2)` sums; a shard's
    partial matrices go through `ParamSlice.to_rows` / `col_sums`."""
    x = g.square().add_(eps)
    if e.whole:
        torch.sum(x.view(-1, e.C), -1, out=sq[e.row_at:e.col_at])
        torch.sum(x.view(e.k, e.R, e.C), 1, out=sq[e.col_at:e.col_end].view(e.k, e.C))
    else:
        rows = e.sl.to_rows(x)
        sq[e.row_at + e.r0:e.row_at + e.r1] = rows.sum(-1)
        sq[e.col_at:e.col_end] = e.sl.col_sums(rows).view(-1)


def _factors(st: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's `_approx_sq_grad` factors, before their outer product."""
    row = st["exp_avg_sq_row"]
    return (row / row.mean(dim=-1, keepdim=True)).rsqrt_(), st["exp_avg_sq_col"].rsqrt()


def _factored_direction(e: _Held, r_factor: torch.Tensor, c_factor: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The unclipped update for the held elements of a matrix (HF's
    `_approx_sq_grad(...) * grad`): each element is r_factor[row] * c_factor[col] * grad."""
    if e.whole:  # HF's broadcast: r.unsqueeze(-1) * c.unsqueeze(-2)
        outer = torch.mul(r_factor.view(e.k, e.R, 1), c_factor.view(e.k, 1, e.C))
        return outer.view(-1).mul_(g)
    sl = e.sl
    rows = torch.mul(r_factor.view(-1)[e.r0:e.r1, None], sl.cols_of_rows(c_factor.view(e.k, e.C)))
    return sl.from_rows(rows).mul(g)  # (from_rows may be a view of a larger buffer)


# =====================================================================================
# The optimizer
# =====================================================================================
class Adafactor(torch.optim.Optimizer):
    """HF Adafactor (scale_parameter=False, relative_step=False, beta1=None) computed per
    original parameter, whatever the sharding: see the module docstring.

    `model` names the parameters and finds FSDP's flat-shard metadata: the FSDP root, or
    the plain model. `process_group` overrides the group sums are reduced over when
    anything is sharded (default: the FSDP units' shard group, the world under
    FULL_SHARD). `eps` is HF's eps[0]; HF's
    eps[1] only matters with scale_parameter=True.
    """

    def __init__(self, params, model: nn.Module, lr: float, eps: float = 1e-30,
                 clip_threshold: float = 1.0, decay_rate: float = -0.8,
                 weight_decay: float = 0.0, process_group=None):
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        tensors = [p for g in self.param_groups for p in g["params"]]
        self._map = _ShardMap(model, tensors, process_group)
        # Fixed buffer layouts, identical on every rank: the tensors and each FlatParameter's
        # list of parameters are. The row and column sums of every matrix, in order, make
        # the first reduce buffer (_sq_numel); one slot per slice the second.
        self._all = [(p, sl) for p in tensors for sl in self._map.slices[id(p)]]
        sq_at, n = [], 0
        for _, sl in self._all:
            sq_at.append(n if sl.factored else None)
            if sl.factored:
                n += sl.n_matrices * (sl.n_rows + sl.n_cols)
        self._sq_numel = n
        # Per group, per tensor: its held slices. Clip buckets: the slots of the slices of
        # one group with one parameter size, whose clip divisors step() computes together.
        self._plan: list[list[tuple[torch.Tensor, list[_Held]]]] = []
        buckets: dict[tuple[int, int], list[int]] = {}
        slot = 0
        for gi, group in enumerate(self.param_groups):
            plan = []
            for p in group["params"]:
                held = []
                for sl in self._map.slices[id(p)]:
                    if sl.numel:
                        held.append(_Held(sl, slot, sq_at[slot]))
                    buckets.setdefault((gi, sl.full_numel), []).append(slot)
                    slot += 1
                plan.append((p, held))
            self._plan.append(plan)
        self._buckets = [(gi, numel, slots) for (gi, numel), slots in buckets.items()]
        self._bucket_index: tuple = (None, [])  # (device, index tensors), made at first use
        # State of the parameters this rank holds elements of, made now rather than at the
        # first step (zeros and step 0 are what HF's first step starts from).
        for p in tensors:
            self.state[p] = {sl.fqn: self._fresh_state(sl, p.device) for sl in self._map.slices[id(p)] if sl.numel}

    @staticmethod
    def _fresh_state(sl: ParamSlice, device) -> dict:
        if sl.factored:
            return {"step": 0,
                    "exp_avg_sq_row": torch.zeros(sl.shape[:-1], device=device),
                    "exp_avg_sq_col": torch.zeros(sl.shape[:-2] + sl.shape[-1:], device=device)}
        return {"step": 0, "exp_avg_sq": torch.zeros(sl.numel, device=device)}

    def _clip_divisors(self, sumsq: torch.Tensor) -> torch.Tensor:
        """Per slot, HF's `(rms(update) / clip_threshold).clamp_(min=1.0)` with rms =
        sqrt(sum of squares) / numel**0.5: per element the same ops on the same scalars as
        one parameter at a time, done for all the slices of one (group, size) at once."""
        device, index = self._bucket_index
        if device != sumsq.device:
            index = [torch.tensor(slots, device=sumsq.device) for _, _, slots in self._buckets]
            self._bucket_index = (sumsq.device, index)
        roots = sumsq.sqrt()
        out = torch.empty_like(sumsq)
        for (gi, numel, _), idx in zip(self._buckets, index):
            clip = self.param_groups[gi]["clip_threshold"]
            out[idx] = (roots[idx] / (numel ** 0.5) / clip).clamp_(min=1.0)
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._all:
            return loss
        device = self._all[0][0].device

        # What has a grad this step: (group, param, held slice, its grad piece, its state).
        # The grad piece stays in the grad's dtype (`.float()` at each use: no copy for fp32
        # grads, and no fp32 copy of a bf16 grad held across the step).
        mats, vecs = [], []
        for group, plan in zip(self.param_groups, self._plan):
            for p, held in plan:
                if p.grad is None or not held:
                    continue
                grad, states = p.grad.reshape(-1), self.state[p]
                for e in held:
                    (mats if e.factored else vecs).append((group, p, e, grad[e.lo:e.hi], states[e.fqn]))

        # 1. Row and column sums of grad² + eps of every matrix: one all-reduce.
        sq = torch.zeros(self._sq_numel, device=device)
        for group, _, e, g, _ in mats:
            _sq_sums_into(sq, e, g.float(), group["eps"])
        sq = self._map.all_reduce(sq)

        # 2. Moments, then each parameter's squared update norm: the second all-reduce.
        # Moments are updated in batches of one beta2t (steps are per slice, but usually
        # equal): each element still sees HF's `mul_(beta2t).add_(mean, alpha=1 - beta2t)`.
        norms = torch.zeros(len(self._all), device=device)
        moments: dict[float, tuple[list, list]] = {}
        for group, _, e, _, st in mats:
            st["step"] += 1
            beta2t = 1.0 - math.pow(st["step"], group["decay_rate"])
            avg, new = moments.setdefault(beta2t, ([], []))
            row, col = st["exp_avg_sq_row"], st["exp_avg_sq_col"]
            # Sums over the full rows/columns; HF's means over the last and second-last dim.
            avg += (row, col)
            new += (sq[e.row_at:e.col_at].view_as(row) / e.C, sq[e.col_at:e.col_end].view_as(col) / e.R)
        for beta2t, (avg, new) in moments.items():
            torch._foreach_mul_(avg, beta2t)
            torch._foreach_add_(avg, new, alpha=1.0 - beta2t)
        del moments, new
        # The matrices' factors are kept for step 3 (the size of the factored state); their
        # shard-sized update is not: it is recomputed there (two element-wise ops, same
        # bits) rather than held across the all-reduce.
        factors = []
        for _, _, e, g, st in mats:
            r_factor, c_factor = _factors(st)
            factors.append((r_factor, c_factor))
            # vector_norm, squared below, not a sum of squares: for a whole parameter sqrt()
            # of it gives back HF's update.norm(2) exactly.
            torch.linalg.vector_norm(_factored_direction(e, r_factor, c_factor, g.float()), out=norms[e.slot])
        # 1-D (and 0-D) parameters, batched per (group, beta2t); their updates (the size of
        # their second moments: biases and norms) are kept for step 3.
        vec_batches: dict[tuple[int, float], tuple[dict, list, list, list, list]] = {}
        for group, p, e, g, st in vecs:
            st["step"] += 1
            beta2t = 1.0 - math.pow(st["step"], group["decay_rate"])
            b = vec_batches.setdefault((id(group), beta2t), (group, [], [], [], []))
            b[1].append(st["exp_avg_sq"])
            b[2].append(g.float())
            b[3].append(e)
            b[4].append(p)
        vec_updates = []
        for (_, beta2t), (group, avg, gs, es, ps) in vec_batches.items():
            new = torch._foreach_mul(gs, gs)  # g.square(): x * x per element
            torch._foreach_add_(new, group["eps"])
            torch._foreach_mul_(avg, beta2t)
            torch._foreach_add_(avg, new, alpha=1.0 - beta2t)
            del new
            updates = torch._foreach_rsqrt(avg)
            torch._foreach_mul_(updates, gs)
            for e, u in zip(es, updates):
                torch.linalg.vector_norm(u, out=norms[e.slot])
            vec_updates.append((group, es, ps, updates))
        sumsq = self._map.all_reduce(norms ** 2)

        # 3. Apply: clip by the RMS of the update over the whole parameter, scale, decay
        # (HF's weight decay), apply; fp16/bf16 parameters are updated in fp32 and copied
        # back, as HF does.
        divisors = self._clip_divisors(sumsq)
        for (group, p, e, g, _), (r_factor, c_factor) in zip(mats, factors):
            update = _factored_direction(e, r_factor, c_factor, g.float())
            update.div_(divisors[e.slot]).mul_(group["lr"])
            w = p.detach().view(-1)[e.lo:e.hi]
            w32 = w.float()
            if group["weight_decay"] != 0:
                w32.add_(w32, alpha=-group["weight_decay"] * group["lr"])
            w32.sub_(update)  # == add_(-update): round(w - u) either way
            if w32 is not w:
                w.copy_(w32)
        del factors
        for group, es, ps, updates in vec_updates:
            torch._foreach_div_(updates, [divisors[e.slot] for e in es])
            torch._foreach_mul_(updates, group["lr"])
            ws = [p.detach().view(-1)[e.lo:e.hi] for e, p in zip(es, ps)]
            w32s = [w.float() for w in ws]
            if group["weight_decay"] != 0:
                torch._foreach_add_(w32s, w32s, alpha=-group["weight_decay"] * group["lr"])
            torch._foreach_sub_(w32s, updates)
            for w, w32 in zip(ws, w32s):
                if w32 is not w:
                    w.copy_(w32)
        return loss

    # ---------------------------------------------------------------------------------
    # World-size independent state
    # ---------------------------------------------------------------------------------
    def _state_layout(self):
        """(slice, key, full shape) of every entry of fqn_state_dict, in a fixed order."""
        for _, sl in self._all:
            if sl.factored:
                yield sl, "exp_avg_sq_row", sl.shape[:-1]
                yield sl, "exp_avg_sq_col", sl.shape[:-2] + sl.shape[-1:]
            else:
                yield sl, "exp_avg_sq", sl.shape
            yield sl, "step", torch.Size()

    def fqn_state_dict(self) -> dict[str, torch.Tensor]:
        """The full state as CPU tensors keyed f"{fqn}.exp_avg_sq_row" / "_col" (matrices),
        f"{fqn}.exp_avg_sq" (full shape, other parameters) and f"{fqn}.step" (int64), fqn
        being the parameter's name in the HF model's state dict (tied weights: the first
        name). Identical on every rank and independent of world size and wrap plan.

        A collective under sharding (every rank must call it): one all-reduce of all the
        state (factors, the 1-D parameters' second moments, steps; small), to which each
        rank contributes its 1-D slices, and the rank holding a parameter's first element
        its factors and step. Sums with zeros in float64 keep it exact."""
        layout = list(self._state_layout())
        device = self._all[0][0].device if self._all else None
        buf = torch.zeros(sum(shape.numel() for *_, shape in layout), dtype=torch.float64, device=device)
        states = self._states()
        at = 0
        for sl, key, shape in layout:
            st = states.get(sl.fqn)
            if st is not None and key == "exp_avg_sq":
                buf[at + sl.start:at + sl.stop] = st[key]
            elif st is not None and sl.owner:
                buf[at:at + shape.numel()] = st[key] if key == "step" else st[key].reshape(-1)
            at += shape.numel()
        buf = self._map.all_reduce(buf).cpu()
        out, at = {}, 0
        for sl, key, shape in layout:
            piece = buf[at:at + shape.numel()].view(shape)
            out[f"{sl.fqn}.{key}"] = piece.long() if key == "step" else piece.float()
            at += shape.numel()
        return out

    def load_fqn_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load a `fqn_state_dict` (from any world size or wrap plan), keeping only what
        this rank holds. Keys and shapes must match exactly. Not a collective."""
        layout = list(self._state_layout())
        expected = {f"{sl.fqn}.{key}" for sl, key, _ in layout}
        if set(sd) != expected:
            missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
            raise KeyError(f"Adafactor state mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
        states = self._states()
        for sl, key, shape in layout:
            saved = sd[f"{sl.fqn}.{key}"]
            if saved.shape != shape:
                raise ValueError(f"{sl.fqn}.{key}: saved shape {tuple(saved.shape)}, expected {tuple(shape)}")
            st = states.get(sl.fqn)
            if st is None:
                continue
            if key == "step":
                st[key] = int(saved)
            elif key == "exp_avg_sq":
                st[key].copy_(saved.reshape(-1)[sl.start:sl.stop])
            else:
                st[key].copy_(saved)

    def _states(self) -> dict[str, dict]:
        """This rank's per-parameter states by name."""
        return {fqn: st for per_tensor in self.state.values() for fqn, st in per_tensor.items()}

    def state_dict(self):
        # torch.distributed.checkpoint's get_optimizer_state_dict fails on FSDP1 with
        # state not shaped like the flat shard (an obscure gloo size error, FACTS.md);
        # and a per-rank dict would tie the checkpoint to the world size anyway.
        raise RuntimeError(
            "ft.optim.Adafactor: checkpoint with fqn_state_dict() / load_fqn_state_dict(); "
            "state_dict() would be per-rank and is not supported by torch.distributed.checkpoint")

    def load_state_dict(self, state_dict):
        raise RuntimeError("ft.optim.Adafactor: use load_fqn_state_dict()")


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in an optimizer's state (nested dicts included)."""
    def walk(x):
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        return 0
    return sum(walk(st) for st in optimizer.state.values())


def adafactor_state_bytes(units, world_size: int, rank: int) -> int:
    """`Adafactor`'s state bytes on `rank` for the wrap plan `units`
    (`ft.fsdp_wrap.plan_units`; each unit's `params` are its own parameters in FSDP1's
    flat order), without wrapping anything: meta-device models work. FSDP1 pads each
    unit's flat parameter to a multiple of the world size and gives rank r the r-th equal
    slice; the rank keeps full fp32 row + column factors of each matrix it holds any
    element of, and its fp32 elements of the other parameters' second moments. Frozen
    parameters count nothing."""
    total = 0
    for unit in units:
        params = list(unit.params.values())
        per_rank = -(-sum(p.numel() for p in params) // world_size)
        lo, hi = rank * per_rank, (rank + 1) * per_rank
        at = 0
        for p in params:
            held = max(0, min(at + p.numel(), hi) - max(at, lo))
            at += p.numel()
            if held and p.requires_grad:
                if p.dim() >= 2:
                    total += 4 * (p.shape[:-1].numel() + (p.shape[:-2] + p.shape[-1:]).numel())
                else:
                    total += 4 * held
    return total
