"""Fault injection for tests (tests/test_resume.py), off unless FT_TEST_FAULT is set.

    FT_TEST_FAULT=kind:step:rank

fires once, on torchrun's first attempt only (so a restart gets past it), on that rank:

    crash         right after optimizer step `step`: the rank dies (exit 13) without warning
    kill_in_save  while saving step `step`'s checkpoint, after the shards and before the
                  completion marker: the rank is SIGKILLed
    nan           the loss of step `step` becomes NaN on that rank
    bad_sample    a micro-batch of step `step` fails to load (DataError)
    bad_eval      eval batch `step` (0-based) fails to load (DataError)
    skip_collective  the rank leaves out step `step`'s all-reduce (`agree`): the ranks fall
                  out of step, and the others wait in it (the hang watchdog's case)
    stall         the rank sleeps FT_TEST_STALL_S seconds (default 5) before step `step`'s
                  all-reduce: slow, not stuck
    freeze        the rank stops itself (SIGSTOP) before step `step`'s all-reduce, as a
                  wedged GPU or loader would: it can no longer report

The production path calls `hook(kind, step, rank)` once per fault point, and
`poison_loss` for `nan`; with FT_TEST_FAULT unset both return at once.
"""

from __future__ import annotations

import os
import signal
import time

import torch

from ft.rows import DataError

KINDS = ("crash", "kill_in_save", "nan", "bad_sample", "bad_eval", "skip_collective", "stall", "freeze")
_fired: set[str] = set()


def fires(kind: str, step: int, rank: int) -> bool:
    """Whether the configured fault is `kind` at `step` on `rank` (and has not fired)."""
    spec = os.environ.get("FT_TEST_FAULT")
    if not spec or spec in _fired or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    k, s, r = spec.split(":")
    if k not in KINDS:
        raise ValueError(f"FT_TEST_FAULT={spec}: unknown kind {k!r} ({', '.join(KINDS)})")
    if k == kind and int(s) == step and int(r) == rank:
        _fired.add(spec)  # once: a skipped step is retried with the same step number
        return True
    return False


def hook(kind: str, step: int, rank: int) -> None:
    """Act out fault `kind` here if it is the configured one."""
    if not fires(kind, step, rank):
        return
    if kind == "crash":
        os._exit(13)  # a rank dies without warning: torchrun restarts the group
    if kind == "kill_in_save":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "freeze":
        os.kill(os.getpid(), signal.SIGSTOP)
    if kind == "stall":
        time.sleep(float(os.environ.get("FT_TEST_STALL_S", "5")))
    if kind in ("bad_sample", "bad_eval"):
        raise DataError(f"test fault: stands for a sample whose image was deleted after the data check ({kind})")


def poison_loss(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """`loss`, or NaN when the `nan` fault fires here."""
    return loss * float("nan") if fires("nan", step, rank) else loss
