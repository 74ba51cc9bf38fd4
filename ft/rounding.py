"""Writing fp32 optimizer results back into bf16 weights: stochastic rounding that does
not depend on the sharding.

bf16 keeps 8 significant bits: near 0.02 neighbouring bf16 values are 2^-13 ~ 1.2e-4
apart. Round-to-nearest turns any update smaller than half that spacing back into the
old weight, and fine-tuning updates are that small (Adafactor at lr 1e-5 moves a weight
by ~1e-5 a step): the run trains nothing and its loss barely moves. Stochastic rounding
rounds x up to the next bf16 value with probability (x - below) / (above - below), so the
stored weight equals x in expectation and small updates accumulate.

The random bits must not depend on which rank holds an element, or a run's result would
depend on the world size and no resumed or resharded run could reproduce it. So the bits
for element i (its index in the flattened original parameter) of parameter `name` at
optimizer step `step` are a hash of (seed, step, name, i), computed on the device for the
indices a rank holds (`torch.arange(start, stop)`), in chunks: O(shard) work and memory,
never a full-size random tensor, and no generator state to checkpoint. Rounding a tensor
whole and rounding it in any split give the same bits (tested).

The hash: (seed, step, name) -> a 32-bit key (BLAKE2b, in Python, once per parameter and
step); per element, a 32-bit integer hash of the index XOR the key (`_hash32`). All
integer work stays inside int64 without overflow, so CPU and GPU give the same bits.

Rounding itself: fp32 and bf16 share sign and exponent layout, bf16 being fp32's upper
16 bits; adding 16 random bits below the cut and then dropping the
lower 16 bits rounds the magnitude up exactly with probability frac / 2^16, where frac is
the dropped part, i.e. with probability proportional to the distance from the lower
neighbour (for negative values "up" is away from zero, which is the same rule). Exact bf16
values have frac = 0 and never move. NaN stays NaN.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

MASTER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""`train.master_weights` -> the dtype the model's parameters are loaded and trained in."""

CHUNK = {"cpu": 1 << 16, "cuda": 1 << 22}
"""Elements rounded per pass, per device type (others take the cuda figure). The
integer temporaries (a few int64 values per element) of a CPU chunk stay in cache: at
2^16, 6.5 ns per element on one core against 57 ns at 2^22 (2^24 elements). On a GPU a
larger chunk amortises the ~20 kernel launches per chunk, and 2^22 bounds its
temporaries to ~100 MiB however large the shard."""

_M32 = 0xFFFFFFFF


def round_key(seed: int, step: int, name: str) -> int:
    """The 32-bit key of parameter `name` at optimizer step `step`."""
    digest = hashlib.blake2b(f"{seed}\0{step}\0{name}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


_MUL = 0x45D9F3B  # < 2^27: h * _MUL < 2^59 for h < 2^32, so int64 never overflows


def _hash32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two xorshift-multiply rounds and a final xorshift: every
    input bit flips each output bit with probability ~1/2) of h in [0, 2^32), in int64
    lanes. The multiplier is below 2^27, so the products stay inside int64 and CPU and
    GPU give the same bits."""
    h = ((h ^ (h >> 16)) * _MUL) & _M32
    h = ((h ^ (h >> 16)) * _MUL) & _M32
    return h ^ (h >> 16)


def random_bits16(key: int, start: int, n: int, device) -> torch.Tensor:
    """16 random bits (int32 in [0, 2^16)) for the indices start .. start+n-1 under the
    32-bit `key`: the upper half of hash32(index XOR key). For one element the key is
    fresh (uniform) every step, so its bits are uniform and independent across steps;
    within a step, distinct indices give distinct, avalanched hashes."""
    if start + n > 1 << 32:
        raise ValueError(f"stochastic rounding indexes up to 2^32 elements per parameter, got {start + n}")
    idx = torch.arange(start, start + n, dtype=torch.int64, device=device)
    return (_hash32(idx ^ key) >> 16).to(torch.int32)


def _round_chunk(x: torch.Tensor, key: int, start: int) -> torch.Tensor:
    # Adding < 2^16 to the bits of a finite float cannot overflow int32 (the largest
    # finite float is 0x7F7FFFFF); NaN inputs, which could, are restored below.
    bits = x.view(torch.int32) + random_bits16(key, start, x.numel(), x.device)
    rounded = (bits & -0x10000).view(torch.float32).to(torch.bfloat16)  # exact cast
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), rounded)


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, key: int, start: int = 0) -> None:
    """dst[k] = stochastic bf16 rounding of fp32 src[k], with the bits of index start + k.
    `dst` (bf16) and `src` (fp32) are 1-D with the same length; `dst` may be a view."""
    if dst.dtype != torch.bfloat16 or src.dtype != torch.float32:
        raise TypeError(f"stochastic rounding is fp32 -> bf16, got {src.dtype} -> {dst.dtype}")
    chunk = CHUNK.get(src.device.type, CHUNK["cuda"])
    for a in range(0, src.numel(), chunk):
        b = min(a + chunk, src.numel())
        dst[a:b].copy_(_round_chunk(src[a:b].contiguous(), key, start + a))


@dataclass(frozen=True)
class WriteBack:
    """How an optimizer stores its fp32 result `src` into a weight `dst`.

    fp32 weights are updated in place (`src` is `dst`) or copied. bf16 weights get
    stochastic rounding keyed by (seed, step, parameter name, element index) when
    `stochastic` is true, else round-to-nearest (kept for comparison: small updates are
    lost)."""

    seed: int = 0
    stochastic: bool = True

    def __call__(self, dst: torch.Tensor, src: torch.Tensor, step: int, name: str, start: int) -> None:
        """`dst`, `src`: the 1-D elements start .. start+n-1 of parameter `name`."""
        if src is dst:
            return
        if self.stochastic and dst.dtype == torch.bfloat16:
            stochastic_round_(dst, src, round_key(self.seed, step, name), start)
        else:
            dst.copy_(src)
