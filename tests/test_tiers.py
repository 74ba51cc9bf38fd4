"""The test tiers stay honest: a test that starts a process must carry the `slow` marker
(tests/README.md), or conftest's guard fails it. These tests are not marked, so each
attempt below is refused before any process starts."""

import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("cmd", [
    [sys.executable, "-c", "pass"],
    ["python3", "-m", "ft.config_load", "--reference"],
    [str(REPO / "launch.sh"), "configs/demo.yaml"],
    ["torchrun", "--nproc-per-node=2", "-m", "ft.loop"],
    ["bash", str(REPO / "examples/slurm.sbatch")],
    f"{sys.executable} -m ft.loop configs/demo.yaml",
])
def test_an_unmarked_test_cannot_start_a_process(cmd):
    with pytest.raises(pytest.fail.Exception, match="is not marked slow"):
        subprocess.run(cmd, shell=isinstance(cmd, str), timeout=5)


def test_an_unmarked_test_cannot_spawn_an_interpreter():
    """mp.spawn goes through multiprocessing's spawn start method."""
    process = multiprocessing.get_context("spawn").Process(target=print)
    with pytest.raises(pytest.fail.Exception, match="is not marked slow"):
        process.start()
    assert process.pid is None  # refused before anything started


def test_cheap_tools_are_not_processes_the_tier_is_for():
    assert subprocess.run(["git", "--version"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_marked_test_may_start_one():
    assert subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True).stdout == "42\n"


def test_the_slow_marker_is_registered(pytestconfig):
    assert any(line.startswith("slow:") for line in pytestconfig.getini("markers"))
