"""ft's Adafactor: HF Adafactor's update per original parameter, whatever the sharding.

For every original parameter it performs exactly the update of single-process
`transformers.optimization.Adafactor(params, lr, scale_parameter=False,
relative_step=False, warmup_init=False)` applied to the whole unsharded parameter,
whatever the world size and wrap plan: on plain tensors (an unwrapped model) it gives HF's
result bit for bit; under FSDP1 (`use_orig_params=False`) the sums are reduced across
ranks, so results agree to float rounding.

FSDP1 hands the optimizer one 1-D flat shard per unit: each rank holds an
equal slice of the unit's padded, flattened parameters, which may begin or end in the
middle of a matrix row, and may hold nothing of some parameter. FSDP's own metadata on
each flat parameter (private fields, read only by `ft.fsdp1`) says which
elements of which original parameter a shard holds; `ft.fsdp1.shard_layout` turns it
into `ft.shards.ParamSlice`s, the only form this module reads. With
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

Under FSDP2 each parameter is a DTensor whose local shard is a dim-0 chunk, i.e. one
run of whole rows: `ft.fsdp2.shard_layout` describes it as one `ParamSlice`, and step()
reads and writes the local tensors (`ft.shards.local`); the rest is the same.

State per rank: the row and column factors of every matrix it holds a slice of, and its
slice of each 1-D parameter's second moment, all fp32 (with fp32 master weights FSDP
hands the optimizer fp32 shards; bf16 master weights and gradients are computed in fp32
as HF does, but HF would keep such a gradient's state in its dtype, and the result is
written back with `ft.rounding`'s stochastic rounding, keyed by the parameter's name and
each element's index in it, so the rounding too is the same at any sharding); steps are
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

import torch
from torch import nn

from ft.backends import BACKENDS, DEFAULT, backend_of
from ft.rounding import WriteBack
from ft.shards import ParamSlice, local


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
    eps[1] only matters with scale_parameter=True. `write_back` stores each fp32 result
    into a bf16 (or fp16) weight (`ft.rounding.WriteBack`; default round-to-nearest, as
    HF does); fp32 weights are updated in place.
    """

    def __init__(self, params, model: nn.Module, lr: float, eps: float = 1e-30,
                 clip_threshold: float = 1.0, decay_rate: float = -0.8,
                 weight_decay: float = 0.0, process_group=None, write_back: WriteBack | None = None):
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        tensors = [p for g in self.param_groups for p in g["params"]]
        self._write = write_back or WriteBack(stochastic=False)
        self._map = backend_of(model).shard_layout(model, tensors, process_group)
        # Fixed buffer layouts, identical on every rank: the tensors and each flat parameter's
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
        mats, vecs = self._with_grads()
        # 1. Row and column sums of grad² + eps of every matrix: one all-reduce.
        sq = self._map.all_reduce(self._sq_sums(mats, device))
        # 2. Moments, then each parameter's squared update norm: the second all-reduce.
        norms = torch.zeros(len(self._all), device=device)
        factors = self._matrix_moments(mats, sq, norms)
        vec_updates = self._vector_moments(vecs, norms)
        sumsq = self._map.all_reduce(norms ** 2)
        # 3. Apply: clip by the RMS of the update over the whole parameter, scale, decay
        # (HF's weight decay), apply; fp16/bf16 parameters are updated in fp32 and written
        # back (HF: round-to-nearest; here `self._write`, stochastic rounding for bf16
        # master weights).
        divisors = self._clip_divisors(sumsq)
        self._apply_matrices(mats, factors, divisors)
        del factors
        self._apply_vectors(vec_updates, divisors)
        return loss

    def _with_grads(self) -> tuple[list, list]:
        """What has a grad this step: (group, param, held slice, its grad piece, its
        state), matrices (factored) and vectors apart. The grad piece stays in the grad's
        dtype (`.float()` at each use: no copy for fp32 grads, and no fp32 copy of a bf16
        grad held across the step)."""
        mats, vecs = [], []
        for group, plan in zip(self.param_groups, self._plan):
            for p, held in plan:
                if p.grad is None or not held:
                    continue
                # A DTensor's (FSDP2) local shard: the held slices index into it.
                grad, states, w = local(p.grad).reshape(-1), self.state[p], local(p)
                for e in held:
                    (mats if e.factored else vecs).append((group, w, e, grad[e.lo:e.hi], states[e.fqn]))
        return mats, vecs

    def _sq_sums(self, mats: list, device) -> torch.Tensor:
        """Step 1's reduce buffer: every held matrix's partial row and column sums."""
        sq = torch.zeros(self._sq_numel, device=device)
        for group, _, e, g, _ in mats:
            _sq_sums_into(sq, e, g.float(), group["eps"])
        return sq

    @staticmethod
    def _matrix_moments(mats: list, sq: torch.Tensor, norms: torch.Tensor) -> list:
        """Step 2 for the matrices: their moments from the reduced sums, and each one's
        unclipped update norm into `norms`. Returns their factors, kept for step 3.

        Moments are updated in batches of one beta2t (steps are per slice, but usually
        equal): each element still sees HF's `mul_(beta2t).add_(mean, alpha=1 - beta2t)`."""
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
        return factors

    @staticmethod
    def _vector_moments(vecs: list, norms: torch.Tensor) -> list:
        """Step 2 for the 1-D (and 0-D) parameters, batched per (group, beta2t): moments,
        updates and their norms into `norms`. Their updates (the size of their second
        moments: biases and norms) are returned for step 3."""
        vec_batches: dict[tuple[int, float], tuple[dict, list, list, list, list]] = {}
        for group, p, e, g, st in vecs:
            st["step"] += 1
            beta2t = 1.0 - math.pow(st["step"], group["decay_rate"])
            b = vec_batches.setdefault((id(group), beta2t), (group, [], [], [], [], []))
            b[1].append(st["exp_avg_sq"])
            b[2].append(g.float())
            b[3].append(e)
            b[4].append(p)
            b[5].append(st["step"])
        vec_updates = []
        for (_, beta2t), (group, avg, gs, es, ps, steps) in vec_batches.items():
            new = torch._foreach_mul(gs, gs)  # g.square(): x * x per element
            torch._foreach_add_(new, group["eps"])
            torch._foreach_mul_(avg, beta2t)
            torch._foreach_add_(avg, new, alpha=1.0 - beta2t)
            del new
            updates = torch._foreach_rsqrt(avg)
            torch._foreach_mul_(updates, gs)
            for e, u in zip(es, updates):
                torch.linalg.vector_norm(u, out=norms[e.slot])
            vec_updates.append((group, es, ps, steps, updates))
        return vec_updates

    def _apply_matrices(self, mats: list, factors: list, divisors: torch.Tensor) -> None:
        """Step 3 for the matrices: the update recomputed from its factors, clipped,
        scaled, decayed, applied and written back."""
        for (group, p, e, g, st), (r_factor, c_factor) in zip(mats, factors):
            update = _factored_direction(e, r_factor, c_factor, g.float())
            update.div_(divisors[e.slot]).mul_(group["lr"])
            w = p.detach().view(-1)[e.lo:e.hi]
            w32 = w.float()
            if group["weight_decay"] != 0:
                w32.add_(w32, alpha=-group["weight_decay"] * group["lr"])
            w32.sub_(update)  # == add_(-update): round(w - u) either way
            self._write(w, w32, st["step"], e.fqn, e.sl.start)

    def _apply_vectors(self, vec_updates: list, divisors: torch.Tensor) -> None:
        """Step 3 for the 1-D parameters, batched as in step 2."""
        for group, es, ps, steps, updates in vec_updates:
            torch._foreach_div_(updates, [divisors[e.slot] for e in es])
            torch._foreach_mul_(updates, group["lr"])
            ws = [p.detach().view(-1)[e.lo:e.hi] for e, p in zip(es, ps)]
            w32s = [w.float() for w in ws]
            if group["weight_decay"] != 0:
                torch._foreach_add_(w32s, w32s, alpha=-group["weight_decay"] * group["lr"])
            torch._foreach_sub_(w32s, updates)
            for w, w32, e, step in zip(ws, w32s, es, steps):
                self._write(w, w32, step, e.fqn, e.sl.start)

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
        # torch.distributed.checkpoint's optimizer state dict fails on FSDP1 with
        # state not shaped like the flat shard (gloo: "invalid tensor size");
        # and a per-rank dict would tie the checkpoint to the world size anyway.
        raise RuntimeError(
            "ft.optim.Adafactor: checkpoint with fqn_state_dict() / load_fqn_state_dict(); "
            "state_dict() would be per-rank and is not supported by torch.distributed.checkpoint")

    def load_state_dict(self, state_dict):
        raise RuntimeError("ft.optim.Adafactor: use load_fqn_state_dict()")


def adafactor_state_bytes(units, world_size: int, rank: int, backend: str = DEFAULT) -> int:
    """`Adafactor`'s state bytes on `rank` for the wrap plan `units`
    (`ft.fsdp_wrap.plan_units`) under `backend`, without wrapping anything: meta-device
    models work.
    The rank keeps full fp32 row + column factors of each matrix it holds any element
    of, and its fp32 elements of the other parameters' second moments. Frozen
    parameters count nothing."""
    total = 0
    for unit in units:
        for sl, p in zip(BACKENDS[backend].planned_slices(unit.params, world_size, rank), unit.params.values()):
            if sl.numel and p.requires_grad:
                if sl.factored:
                    total += 4 * (p.shape[:-1].numel() + (p.shape[:-2] + p.shape[-1:]).numel())
                else:
                    total += 4 * sl.numel
    return total
