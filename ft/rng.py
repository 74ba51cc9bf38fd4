"""Per-rank RNG state for checkpoints, stored as tensors only: no pickles; and the
state a rank starts from when a run resumes on another number of ranks (`derive`).

A checkpoint folder often lives on a shared file system that others can write to. Loading
it with `torch.load(..., weights_only=False)` would unpickle whatever the file holds and so
could run arbitrary code on resume. This module stores every RNG state as tensors in a
flat dict and loads it with `weights_only=True`, which refuses anything else.

Stored (all CPU tensors; "int64" values are exact, "float64" values are exact doubles):

    python_version    int64 ()       `random.getstate()[0]`
    python_state      int64 (625,)   the Mersenne Twister words and position
    python_has_gauss  int64 ()       1 when `gauss_next` is set, 0 when it is None
    python_gauss      float64 ()     `gauss_next` (0.0 when None)
    numpy_keys        int64 (624,)   `np.random.get_state()` ('MT19937' is implied)
    numpy_pos         int64 ()
    numpy_has_gauss   int64 ()
    numpy_gauss       float64 ()     cached_gaussian
    torch             uint8 (N,)     `torch.get_rng_state()`
    cuda              uint8 (M,)     `torch.cuda.get_rng_state(device)`, CUDA devices only
"""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import torch

_I64, _F64, _U8 = torch.int64, torch.float64, torch.uint8
# key -> (dtype, shape); None as shape: any 1-D length (generator states vary by build).
_SPEC = {
    "python_version": (_I64, ()),
    "python_state": (_I64, (625,)),
    "python_has_gauss": (_I64, ()),
    "python_gauss": (_F64, ()),
    "numpy_keys": (_I64, (624,)),
    "numpy_pos": (_I64, ()),
    "numpy_has_gauss": (_I64, ()),
    "numpy_gauss": (_F64, ()),
    "torch": (_U8, None),
}


def capture(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's python / numpy / torch (/ CUDA of `device`) RNG state, as tensors."""
    version, words, gauss_next = random.getstate()
    algo, keys, pos, has_gauss, cached = np.random.get_state()
    if algo != "MT19937":
        raise ValueError(f"rng state: unsupported numpy bit generator {algo!r}")
    state = {
        "python_version": torch.tensor(version, dtype=_I64),
        "python_state": torch.tensor(words, dtype=_I64),
        "python_has_gauss": torch.tensor(int(gauss_next is not None), dtype=_I64),
        "python_gauss": torch.tensor(0.0 if gauss_next is None else gauss_next, dtype=_F64),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": torch.tensor(pos, dtype=_I64),
        "numpy_has_gauss": torch.tensor(has_gauss, dtype=_I64),
        "numpy_gauss": torch.tensor(cached, dtype=_F64),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _check(state: dict, key: str, dtype: torch.dtype, shape: tuple | None) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"rng state: missing {key!r}")
    t = state[key]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"rng state: {key!r} is a {type(t).__name__}, expected a tensor")
    if t.dtype != dtype:
        raise ValueError(f"rng state: {key!r} has dtype {t.dtype}, expected {dtype}")
    if (t.dim() != 1) if shape is None else (tuple(t.shape) != shape):
        want = "a 1-D shape" if shape is None else str(shape)
        raise ValueError(f"rng state: {key!r} has shape {tuple(t.shape)}, expected {want}")
    return t.cpu()


def restore(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Set the RNG states from `capture`'s dict. Raises ValueError (naming the key) on a
    missing key, wrong dtype or wrong shape. A missing "cuda" entry leaves CUDA as is."""
    if not isinstance(state, dict):
        raise ValueError(f"rng state: expected a dict of tensors, got {type(state).__name__}")
    s = {key: _check(state, key, dtype, shape) for key, (dtype, shape) in _SPEC.items()}
    keys = s["numpy_keys"]
    if keys.min() < 0 or keys.max() >= 2**32:
        raise ValueError("rng state: 'numpy_keys' holds values outside uint32")
    gauss = s["python_gauss"].item() if s["python_has_gauss"].item() else None
    random.setstate((s["python_version"].item(), tuple(s["python_state"].tolist()), gauss))
    keys = keys.numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, s["numpy_pos"].item(), s["numpy_has_gauss"].item(), s["numpy_gauss"].item()))
    torch.set_rng_state(s["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_check(state, "cuda", _U8, None), device)


def derive(seed: int, step: int, rank: int, device: torch.device) -> None:
    """Seed python, numpy and torch (and CUDA) from (seed, step, rank): for a run resumed
    at another world size, where a checkpoint holds no saved state for some ranks and
    the saved ones belong to other ranks' work. Deterministic, different per rank and
    per step, and unrelated to the streams of a fresh start (which seeds every rank with
    `seed` alone). The data order does not depend on it (`ft.sampler`)."""
    value = int(np.random.SeedSequence([seed % 2**64, step, rank]).generate_state(1, np.uint64)[0])
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)  # every CUDA device too


def save(path: str, device: torch.device) -> None:
    """Write `capture(device)` to `path`, flushed and fsync'd."""
    state = capture(device)
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def load(path: str, device: torch.device) -> None:
    """Restore the RNG state saved at `path`. Never unpickles Python objects: a file that
    holds any (an older ft's format, or a replaced file) raises ValueError."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        # torch (2.6+) wraps whatever its weights-only unpickler rejects into this.
        if "Weights only load failed" not in str(e):
            raise
        raise ValueError(
            f"{path}: refusing to load: it holds pickled Python objects, not only tensors "
            "(an RNG state file from an older ft, or a file someone replaced). Delete the "
            "checkpoint folder or resume from another one."
        ) from e
    restore(state, device)
