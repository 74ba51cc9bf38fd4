"""Shared test setup: offline, isolated caches, and tiny checkpoints (Qwen2.5-VL, and one
per family of ft.families).

The environment is set at import time, before any test module imports transformers
or datasets, because those libraries read it when they are first imported.
"""

import atexit
import json
import os
import shutil
import socket
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="ft-tests-hf-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ.update(
    {
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # A fresh HF_HOME keeps tests off ~/.cache and away from anything cached there.
        "HF_HOME": _HF_HOME,
        # The tokenizers library warns (and can deadlock) when a process forks after
        # using its thread pool, as torchrun and DataLoader workers do.
        "TOKENIZERS_PARALLELISM": "false",
    }
)
# Worker processes (mp.spawn, torchrun) start one intra-op thread each, as launch.sh
# does: two ranks with a thread pool each on a 2-core machine run ~10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from ft.tinymodel import save_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Tiny model, small (~800-token) vocabulary, tied embeddings: the fast default."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "small", vocab="small", seed=0)["path"]


@pytest.fixture(scope="session")
def tiny_model_dir_untied(tmp_path_factory):
    """Like tiny_model_dir but with a separate lm_head, as in the 7B model."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "small-untied", vocab="small", seed=0,
                     tie_word_embeddings=False)["path"]


@pytest.fixture(scope="session")
def tiny_model_dir_real(tmp_path_factory):
    """Tiny model with Qwen2's real 151,936-row vocabulary (slower: ~2 s per CPU step)."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "real", vocab="real", seed=0)["path"]


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory):
    """`tiny_family_dir(model_type, vocab="small")`: that family's tiny model (tied
    embeddings, as `tiny_model_dir`), built once per session."""
    built: dict[tuple[str, str], str] = {}

    def get(family: str, vocab: str = "small") -> str:
        if (family, vocab) not in built:
            built[family, vocab] = save_tiny(tmp_path_factory.mktemp("tiny") / f"{family}-{vocab}", vocab=vocab,
                                             seed=0, family=family)["path"]
        return built[family, vocab]

    return get


def write_test_image(path, size=(56, 56), seed=0):
    """Write a deterministic RGB image of ``size`` = (width, height) pixels to ``path``.

    Smooth colour gradients plus seeded noise: not constant (so the vision tower sees
    varied patches) and compressible enough for JPEG or PNG.
    """
    width, height = size
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 / max(width - 1, 1), ys * 255 / max(height - 1, 1),
                     np.full((height, width), rng.integers(0, 256))], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return path


def write_test_video(path, frames=8, size=(64, 48), fps=4, seed=0, codec="mpeg4"):
    """Write a deterministic video file of `frames` frames of ``size`` = (width, height)
    at `fps` frames per second to ``path`` (PyAV; mpeg4 by default, ``"libx264"`` for
    H.264). Frame k is a smooth gradient whose brightness grows with k (frame k's mean
    is about 40 + 20·k for k < 10), so a test can tell which frames were read."""
    import av

    width, height = size
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(frames):
            level = 40 + 20 * min(k, 10)
            base = np.stack([np.full((height, width), level), level + 10 * np.sin(xs / 7),
                             level + 10 * np.cos(ys / 5)], axis=-1)
            pixels = np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture
def make_image():
    """``make_image(path, size=(56, 56), seed=0)`` writes a test image and returns its path."""
    return write_test_image


def chat_row(user, answer: str) -> dict:
    """One conversation row: a user turn (text, or a list of content parts) and the answer."""
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def write_jsonl(path, rows: list[dict]):
    """`rows` as a JSONL file at `path`; returns the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def free_port() -> int:
    """A TCP port nobody listens on right now, for a test's process-group rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def as_dataset(jsonl_path):
    """The rows of a JSONL data file as a ``datasets.Dataset`` in TRL's vision format:
    ``messages`` whose parts are all lists of ``{"type", "text", "video"}`` (images as
    ``{"type": "image"}`` placeholders) and an ``images`` column of ``datasets.Image``
    with the image files' bytes embedded. Videos stay paths (absolute). ft normalises
    both forms to the same messages, so the samples must come out identical."""
    import datasets

    from ft.messages import parse
    from ft.rows import load_rows

    rows = load_rows(jsonl_path)
    records = []
    for i in range(len(rows)):
        messages, images = [], []
        for message in parse(rows, i):
            parts = []
            for part in message["content"]:
                if part["type"] == "video" and not isinstance(part["video"], str):
                    raise ValueError("a list of frames does not fit this schema")
                parts.append({"type": part["type"], "text": part.get("text"),
                              "video": part.get("video") if part["type"] == "video" else None})
                if part["type"] == "image":
                    images.append({"bytes": open(part["image"], "rb").read(), "path": None})
            messages.append({"role": message["role"], "content": parts})
        records.append({"messages": messages, "images": images})
    part = {"type": datasets.Value("string"), "text": datasets.Value("string"), "video": datasets.Value("string")}
    features = datasets.Features({
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(part)}),
        "images": datasets.List(datasets.Image()),
    })
    return datasets.Dataset.from_list(records, features=features)


# -------------------------------------------------------------------------------------
# Test tiers. A test that starts processes (launch.sh, torchrun, mp.spawn, a Python
# subprocess) pays ~6 s of importing torch and transformers per process, so it carries
# the `slow` marker (registered in setup.cfg) and `make test-fast` (-m "not slow")
# leaves it out. The guard below keeps the tiers honest: every such process start,
# whether from the test itself or from a fixture it asked for, checks that the test
# being run is marked slow and fails it loudly if not. See tests/README.md.
# -------------------------------------------------------------------------------------
_RUNNING = []  # the test whose setup, call or teardown runs now (fixtures included)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _RUNNING.append(item)
    try:
        yield
    finally:
        _RUNNING.pop()


def require_slow(what: str) -> None:
    """Fail the running test unless it is marked slow: it is about to start `what`."""
    if _RUNNING and _RUNNING[-1].get_closest_marker("slow") is None:
        pytest.fail(f"{_RUNNING[-1].nodeid} starts {what} but is not marked slow: add "
                    "@pytest.mark.slow (or `pytestmark = pytest.mark.slow` for a whole module); "
                    "see tests/README.md", pytrace=False)


def _launcher(args) -> str | None:
    """What `subprocess.Popen(args)` starts, if it is a process the slow tier is for: a
    Python interpreter (python -m ft..., torchrun through torch.distributed.run), torchrun,
    or a shell script (launch.sh, examples/slurm.sbatch). Other tools (git) are cheap."""
    import re
    import sys

    if isinstance(args, (str, bytes, os.PathLike)):
        words = os.fsdecode(args).split()
    else:
        words = [os.fsdecode(a) for a in args]
    for word in words[:2]:
        name = os.path.basename(word)
        if (word == sys.executable or re.fullmatch(r"python[\d.]*", name) or name == "torchrun"
                or name.endswith((".sh", ".sbatch"))):
            return f"a process ({' '.join(words[:4])} ...)"
    return None


def _install_slow_guard() -> None:
    import functools
    import importlib
    import subprocess

    popen_init = subprocess.Popen.__init__

    @functools.wraps(popen_init)
    def init(self, args, *rest, **kwargs):
        what = _launcher(args)
        if what:
            require_slow(what)
        popen_init(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = init
    # mp.spawn (any multiprocessing "spawn" child) starts a fresh interpreter that imports
    # the test module; forked children (DataLoader workers) do not, and are not checked.
    cls = importlib.import_module("multiprocessing.popen_spawn_posix").Popen
    spawn_launch = cls._launch

    def launch(self, process_obj):
        require_slow("a multiprocessing spawn child (as mp.spawn starts)")
        return spawn_launch(self, process_obj)

    cls._launch = launch


_install_slow_guard()


def loss_and_grads(model, batches) -> tuple[float, dict]:
    """The summed loss (`ft.model.loss_sum`, plain path) of `batches` and the gradients it
    leaves on `model`'s parameters: what packed and padded batches of the same samples
    must agree on."""
    from ft.model import loss_sum

    model.zero_grad()
    total = 0.0
    for batch in batches:
        loss, _ = loss_sum(model, batch, 0)
        loss.backward()
        total += loss.item()
    return total, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(a: tuple[float, dict], b: tuple[float, dict]) -> float:
    """Losses within 1e-6 (relative), each gradient within 1e-5 of its largest element
    (at least 1e-5); returns the largest gradient difference."""
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        scale = grads_a[k].abs().max().item()
        assert (grads_a[k] - grads_b[k]).abs().max().item() <= 1e-5 * max(scale, 1.0), k
    return max((grads_a[k] - grads_b[k]).abs().max().item() for k in grads_a)
