"""Which elements of which original parameter a local tensor holds.

A sharding backend (`ft.fsdp1`, `ft.fsdp2`) hands the optimizer local tensors: under
FSDP1 one 1-D flat shard per unit, holding runs of several original parameters,
possibly starting or ending in the middle of a matrix row, possibly holding nothing of
some parameter; under FSDP2 one DTensor per parameter whose local shard (`local`) is a
dim-0 chunk, i.e. one run of whole rows, possibly empty. The backend describes each tensor as a list of `ParamSlice`s, one per
original parameter, and gives a `ShardLayout`: those lists and the process group over
which per-parameter sums must be reduced. This module is backend-neutral: it reads no
FSDP internals, and ft's Adafactor (`ft.adafactor`) needs nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


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



def local(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this rank holds: a DTensor's local shard (FSDP2), else `t`. Under
    no_grad it shares `t`'s storage, so writing it updates `t`."""
    return t.to_local() if isinstance(t, DTensor) else t


def clip_fp32(grads: list[torch.Tensor], max_norm: float, group=None) -> float:
    """Clip local gradient tensors (plain tensors or DTensors' local shards) to `max_norm`
    (0: no clipping) by their global 2-norm, taken in fp32 whatever their dtype, and
    return it: each tensor's fp32 norm, the local norm of those, its square summed over
    `group` when the tensors are shards of it (a collective then), and each gradient
    scaled by the coefficient cast to its dtype. That is FSDP1's sharded computation;
    torch's `clip_grad_norm_` would take bf16 gradients' norms in bf16 (0.4 % off), so
    bf16 gradients would clip differently at world size 1 than under sharding."""
    local_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32)
                                                       for g in grads]))
    sq = local_norm ** 2
    if group is not None:
        dist.all_reduce(sq, group=group)  # SYNC
    total = sq ** 0.5
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return float(total)


@dataclass
class ShardLayout:
    """Every optimized tensor's `ParamSlice`s (by `id(tensor)`), and where sums over
    whole parameters are reduced: `group` (None: every rank holds whole parameters, so
    nothing is reduced) on `device` (NCCL needs CUDA tensors even when parameters are
    offloaded to the CPU)."""

    slices: dict[int, list[ParamSlice]]
    group: object | None
    device: torch.device | None

    def all_reduce(self, buf: torch.Tensor) -> torch.Tensor:
        """Sum `buf` over the group; a collective when anything is sharded."""
        if self.group is None:
            return buf
        comm = buf.to(self.device)
        dist.all_reduce(comm, group=self.group)
        return comm.to(buf.device)
