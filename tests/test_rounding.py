"""Stochastic rounding to bf16 (ft.rounding): unbiased, exact on bf16 values, always a
neighbour, and the same bits whatever the split into shards."""

import math

import pytest
import torch

from ft import rounding
from ft.rounding import WriteBack, random_bits16, round_key, stochastic_round_


def _round(x: torch.Tensor, key=12345, start: int = 0) -> torch.Tensor:
    out = torch.empty(x.numel(), dtype=torch.bfloat16)
    stochastic_round_(out, x.reshape(-1), key, start)
    return out.view(x.shape)


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above |x| (towards zero / away from zero)."""
    bits = x.view(torch.int32).to(torch.int64)
    down = (bits & ~0xFFFF).to(torch.int32).view(torch.float32)
    up = ((bits & ~0xFFFF) + 0x10000).to(torch.int32).view(torch.float32)
    return down, up


def test_result_is_one_of_the_two_neighbours():
    x = torch.randn(100_000) * torch.logspace(-8, 3, 100_000)
    y = _round(x).float()
    down, up = _neighbours(x)
    assert torch.all((y == down) | (y == up))
    # both neighbours occur (it is not round-to-nearest or truncation)
    assert 0.3 < (y == up).double().mean() < 0.7


def test_exact_values_and_specials_stay():
    exact = torch.randn(10_000).to(torch.bfloat16).float()
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1.0, -2.0, 2.0**-133])
    x = torch.cat([exact, specials])
    for step in range(5):
        y = _round(x, round_key(0, step, "w"))
        assert torch.equal(y.float().view(torch.int32), x.view(torch.int32))
    assert torch.isnan(_round(torch.tensor([float("nan"), 1.0])))[0]


def test_unbiased():
    # Values spread between bf16 neighbours; the mean of n rounded copies (each with its
    # own step key) must equal the value within 5 standard errors.
    x = torch.tensor([0.02 + 3e-5, -0.1234567, 1.0 + 2.0**-9, 3.3333, -7e-6, 0.5 + 0.999 * 2.0**-8])
    n = 4000
    total = torch.zeros(x.shape, dtype=torch.float64)
    for step in range(n):
        total += _round(x, round_key(7, step, "p")).double()
    down, up = _neighbours(x)
    p = ((x - down) / (up - down)).double()
    stderr = (up - down).abs().double() * torch.sqrt(p * (1 - p) / n)
    err = (total / n - x.double()).abs()
    assert torch.all(err <= 5 * stderr + 1e-12), (err, stderr)
    # and it is not round-to-nearest: its error is larger for every value
    rtn_err = (x.to(torch.bfloat16).double() - x.double()).abs()
    far = rtn_err > 0.1 * (up - down).abs().double()  # values not almost on a bf16 value
    assert torch.all(err[far] < rtn_err[far] / 2)


@pytest.mark.parametrize("shape", [(37, 53), (4, 5, 7)])
def test_whole_equals_shards_bit_for_bit(shape, monkeypatch):
    # A small CHUNK makes the chunk loop's boundaries fall inside shards too.
    monkeypatch.setitem(rounding.CHUNK, "cpu", 64)
    x = torch.randn(shape) * 0.02
    flat = x.reshape(-1)
    key = round_key(42, 3, "model.layers.0.mlp.up_proj.weight")
    whole = _round(x, key).reshape(-1)
    n = flat.numel()
    row = shape[-1]
    splits = [[n // 2], [1, 2, n - 1], [row, 2 * row + 3], [row // 2, row + row // 2, 5 * row + 1],
              list(range(97, n, 97))]
    for cuts in splits:
        bounds = [0, *cuts, n]
        pieces = torch.empty(n, dtype=torch.bfloat16)
        for a, b in zip(bounds, bounds[1:]):
            stochastic_round_(pieces[a:b], flat[a:b], key, a)
        assert torch.equal(pieces, whole), cuts


def test_bits_depend_on_every_key_part():
    base = random_bits16(round_key(0, 1, "a"), 0, 4096, "cpu")
    for other in (round_key(1, 1, "a"), round_key(0, 2, "a"), round_key(0, 1, "b")):
        assert (random_bits16(other, 0, 4096, "cpu") == base).double().mean() < 0.01
    # uniform enough: every 16-bit value range equally likely
    hist = torch.bincount(base >> 12, minlength=16).double()
    assert hist.min() > 4096 / 16 * 0.7
    # the index matters, not the position in the tensor
    assert torch.equal(random_bits16(round_key(0, 1, "a"), 100, 50, "cpu"), base[100:150])


def test_write_back_modes():
    src = torch.full((10_000,), 1.0 + 2.0**-10)  # a quarter of the way to the next bf16 value
    rtn = torch.zeros(10_000, dtype=torch.bfloat16)
    WriteBack(stochastic=False)(rtn, src, 1, "w", 0)
    assert torch.all(rtn == 1.0)  # round-to-nearest loses the update entirely
    sr = torch.zeros(10_000, dtype=torch.bfloat16)
    WriteBack(seed=0, stochastic=True)(sr, src, 1, "w", 0)
    assert math.isclose(float(sr.float().mean()), 1.0 + 2.0**-10, rel_tol=0, abs_tol=2e-4)
    fp32 = torch.zeros(3)
    WriteBack()(fp32, torch.ones(3), 1, "w", 0)
    assert torch.equal(fp32, torch.ones(3))
