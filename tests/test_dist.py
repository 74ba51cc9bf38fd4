"""ft.dist: the process group goes down while the interpreter still runs."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The test starts a fresh interpreter (its own process group, counted threads): slow tier.
pytestmark = pytest.mark.slow


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_cleanup_joins_the_gloo_threads_even_when_a_cycle_holds_the_group():
    """FSDP modules hold the process group in reference cycles. If the group survives
    `cleanup`, its gloo worker threads live into interpreter shutdown, where one that
    frees a collective's tensor aborts the process ("terminate called without an active
    exception": about one 2-rank run in four before the fix). After `cleanup` the
    process must be back to the threads it had before the group existed."""
    script = textwrap.dedent("""
        import os
        import torch
        import torch.distributed as td
        from ft import dist

        def threads():
            return len(os.listdir("/proc/self/task"))

        before = threads()
        info = dist.init_distributed()
        during = threads()

        class Holder:  # a reference cycle holding the group, as FSDP's modules make
            pass

        holder = Holder()
        holder.group, holder.me = td.group.WORLD, holder
        td.all_reduce(torch.ones(3))
        del holder
        dist.cleanup()
        print(before, during, threads())
    """)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    before, during, after = map(int, out.stdout.split()[-3:])
    assert during > before, "the gloo group started no threads: this test checks nothing"
    assert after == before, f"{after - before} thread(s) of the process group outlived cleanup()"
