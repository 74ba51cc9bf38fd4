"""ft.rng: exact, pickle-free round trips of the per-rank RNG state."""

import random

import numpy as np
import pytest
import torch

from ft import rng

CPU = torch.device("cpu")


def _draw(n=20):
    """n draws from each generator, and an even number of gaussians (the cached one stays as it was)."""
    return (
        [random.random() for _ in range(n)] + [random.gauss(0, 1) for _ in range(4)],
        np.concatenate([np.random.rand(n), np.random.randn(4), np.random.randint(0, 2**31, n)]).tolist(),
        torch.cat([torch.rand(n, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]).tolist(),
    )


@pytest.mark.parametrize("odd_gauss", [True, False], ids=["gauss-cached", "gauss-none"])
@pytest.mark.parametrize("via_file", [True, False], ids=["save-load", "capture-restore"])
def test_round_trip_is_exact(tmp_path, odd_gauss, via_file):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draw()
    if odd_gauss:  # an odd number of gauss draws leaves the second value of a pair cached
        random.gauss(0, 1)
        np.random.standard_normal()
    else:
        random.seed(4)  # gauss_next back to None
        np.random.seed(5)  # has_gauss back to 0
    assert (random.getstate()[2] is not None) == odd_gauss
    assert np.random.get_state()[3] == int(odd_gauss)

    path = str(tmp_path / "rank-0.pt")
    if via_file:
        rng.save(path, CPU)
    else:
        state = rng.capture(CPU)
    first = _draw()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    if via_file:
        rng.load(path, CPU)
    else:
        rng.restore(state, CPU)
    assert _draw() == first


def test_file_holds_only_tensors(tmp_path):
    path = str(tmp_path / "rank-0.pt")
    rng.save(path, CPU)
    state = torch.load(path, weights_only=True)
    assert isinstance(state, dict) and state
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert "cuda" not in state  # a CPU device has no CUDA state


class _Payload:
    """Would create `marker` if ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("content", ["payload", "old-format"])
def test_pickled_objects_are_refused_without_running(tmp_path, content):
    marker = tmp_path / "ran"
    path = str(tmp_path / "rank-0.pt")
    if content == "payload":
        torch.save({"python": random.getstate(), "obj": _Payload(str(marker))}, path)
    else:  # what ft.ckpt wrote before ft.rng
        torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}, path)
    before = random.getstate()
    with pytest.raises(ValueError, match="refusing to load") as info:
        rng.load(path, CPU)
    assert path in str(info.value)
    assert not marker.exists()
    assert random.getstate() == before  # nothing was restored
    if content == "payload":  # the payload does work when unpickled: the check above means something
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_corrupt_file_is_not_reported_as_pickles(tmp_path):
    path = tmp_path / "rank-0.pt"
    rng.save(str(path), CPU)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeError) as info:
        rng.load(str(path), CPU)
    assert "refusing" not in str(info.value)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("numpy_keys", torch.zeros(10, dtype=torch.int64), "'numpy_keys' has shape (10,), expected (624,)"),
        ("python_state", torch.zeros(625, dtype=torch.int32), "'python_state' has dtype torch.int32"),
        ("python_gauss", torch.zeros(1, dtype=torch.float64), "'python_gauss' has shape (1,), expected ()"),
        ("torch", torch.zeros(2, 3, dtype=torch.uint8), "'torch' has shape (2, 3)"),
        ("numpy_pos", 3, "'numpy_pos' is a int, expected a tensor"),
        ("python_version", None, "missing 'python_version'"),
        ("numpy_keys", torch.full((624,), 2**32, dtype=torch.int64), "'numpy_keys' holds values outside uint32"),
    ],
)
def test_restore_validates(key, value, message):
    state = rng.capture(CPU)
    if value is None:
        del state[key]
    else:
        state[key] = value
    before = (random.getstate(), torch.get_rng_state())
    with pytest.raises(ValueError) as info:
        rng.restore(state, CPU)
    assert message in str(info.value)
    assert random.getstate() == before[0] and torch.equal(torch.get_rng_state(), before[1])


def test_derived_state_is_a_function_of_seed_step_and_rank():
    """At another world size each rank's RNG is derived from (seed, step, rank): the same
    numbers on every call, different for another rank or step."""
    def draws(seed, step, rank):
        rng.derive(seed, step, rank, CPU)
        return _draw(5)

    assert draws(42, 10, 1) == draws(42, 10, 1)
    assert draws(42, 10, 1) != draws(42, 10, 0)
    assert draws(42, 10, 1) != draws(42, 11, 1)
    assert draws(42, 10, 1) != draws(43, 10, 1)
