"""Where every rank is, and a watchdog that turns a hang into a report and an exit.

Every collective the loop runs is marked `SYNC` in the code, and the marked calls run
inside ``at(label)``: each rank records the step, the label (``step/agree``,
``eval/forward 3``, ``save/checkpoint``...) and when it entered and left. Recording is
a few attribute writes, no collective and no I/O.

A daemon thread per rank (:class:`Watchdog`) copies that record to torchrun's store
every second, through its own connection (so it works whatever the main thread is
stuck in). When this rank has waited inside one watched label longer than
``train.hang_timeout_s``, it reads every rank's last record from the store, prints
the table, names the ranks that are behind or elsewhere, dumps its own Python stack and
exits non-zero: torchrun then restarts the group (``MAX_RESTARTS``), which resumes from
the newest complete checkpoint, instead of the job burning hours in a collective that
cannot finish. A frozen rank (SIGSTOP, a wedged GPU) cannot report, but its record stops
updating, and the other ranks name it from what it last wrote.

Labels can be watched or not: a rank waiting while rank 0 reads a large checkpoint from
disk is slow, not stuck, so the start-up phases are recorded (they show in a report)
but only the process group's own timeout bounds them.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field

HANG_EXIT = 3
"""Exit status of a rank whose watchdog found a hang (torchrun restarts the group)."""

PERIOD_S = 1.0
"""How often each rank's record reaches the store."""

STALE_S = 5 * PERIOD_S
"""A record older than this belongs to a rank that cannot run its watchdog thread:
frozen, or dead."""


@dataclass
class RankPosition:
    """One rank's position: the step it is on, the last label it entered, whether it is
    still inside, and since when (wall clock, seconds since the epoch)."""

    rank: int = 0
    step: int = 0
    label: str = "start"
    inside: bool = False
    watched: bool = False
    since: float = field(default_factory=time.time)
    entered: int = 0  # labels entered so far (the recording's cost per step: see benchmarks)


HERE = RankPosition()
"""This process's record; `at` writes it, the watchdog thread reads it."""


@contextlib.contextmanager
def at(label: str, watch: bool = True):
    """Mark the collective(s) run in this block with `label` (see the module doc)."""
    HERE.label, HERE.inside, HERE.watched, HERE.since = label, True, watch, time.time()
    HERE.entered += 1
    try:
        yield
    finally:
        HERE.inside, HERE.since = False, time.time()


def set_step(step: int) -> None:
    """The step the rank is working on (the next optimizer step's number)."""
    HERE.step = step


class Watchdog:
    """The per-rank thread described in the module doc. `store` makes a store client
    (called in the thread: the connection is the thread's own)."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, store, out=sys.stderr):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.make_store, self.out = store, out
        self.stopped = threading.Event()
        HERE.rank = rank
        self.thread = threading.Thread(target=self._run, name="ft-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        store = self._connect()
        while True:
            now = time.time()
            if store is not None:
                try:
                    store.set(f"where/{self.rank}", json.dumps({**asdict(HERE), "written": now}))
                except Exception as e:  # the store went away: keep watching this rank alone
                    print(f"[ft rank {self.rank}] watchdog: torchrun's store is unreachable ({e}); "
                          "a hang report will show this rank only", file=self.out)
                    store = None
            if HERE.inside and HERE.watched and now - HERE.since > self.timeout_s:
                self.report(store, now)
                self.out.flush()
                os._exit(HANG_EXIT)
            if self.stopped.wait(PERIOD_S):
                return

    def _connect(self):
        try:
            return self.make_store()
        except Exception as e:
            print(f"[ft rank {self.rank}] watchdog: cannot reach torchrun's store ({e}); "
                  "a hang report will show this rank only", file=self.out)
            return None

    def report(self, store, now: float) -> None:
        records = {r: None for r in range(self.world_size)}
        try:
            records.update(read_records(store, self.world_size) if store is not None else {})
        except Exception as e:
            print(f"[ft rank {self.rank}] watchdog: cannot read the other ranks' records ({e})", file=self.out)
        records[self.rank] = {**asdict(HERE), "written": now}
        print(format_report(records, self.rank, self.timeout_s, now), file=self.out)
        main = sys._current_frames().get(threading.main_thread().ident)
        stack = "".join(traceback.format_stack(main)) if main is not None else "(not found)\n"
        print(f"[ft rank {self.rank}] where its main thread waits (most recent call last):\n{stack}",
              end="", file=self.out)


def read_records(store, world_size: int) -> dict[int, dict | None]:
    """Every rank's last record in `store` (None for a rank that wrote none)."""
    records = {}
    for r in range(world_size):
        key = f"where/{r}"
        records[r] = json.loads(store.get(key)) if store.check([key]) else None
    return records


def suspects(records: dict[int, dict | None], me: int, now: float) -> dict[int, str]:
    """The ranks not where rank `me` is, each with why: no record, a stale record
    (frozen or dead), an earlier step, a different label, or not in a collective."""
    mine = records[me]
    why = {}
    for r, rec in records.items():
        if rec is None:
            why[r] = "never reported: it did not reach the loop"
        elif now - rec["written"] > STALE_S:
            why[r] = f"silent for {now - rec['written']:.0f} s: frozen or dead (its last record is shown)"
        elif rec["step"] < mine["step"]:
            why[r] = f"behind: on step {rec['step']}, this rank is on step {mine['step']}"
        elif rec["step"] > mine["step"]:
            why[r] = f"ahead: on step {rec['step']}, this rank is on step {mine['step']}"
        elif not rec["inside"]:
            why[r] = f"not in a collective: left {rec['label']} {now - rec['since']:.0f} s ago"
        elif rec["label"] != mine["label"]:
            why[r] = (f"in another collective: {rec['label']}, while rank {me} waits in {mine['label']}: "
                      "one of them left a collective out or ran an extra one")
    return why


def format_report(records: dict[int, dict | None], me: int, timeout_s: float, now: float) -> str:
    mine = records[me]
    lines = [f"[ft rank {me}] HANG: waited {now - mine['since']:.0f} s (train.hang_timeout_s={timeout_s:g}) "
             f"in {mine['label']} at step {mine['step']}. Where every rank is (from torchrun's store):",
             "  rank  step  label                         state    for s  record age s"]
    for r, rec in records.items():
        if rec is None:
            lines.append(f"  {r:>4}  {'-':>4}  {'(no record)':<28}")
            continue
        state = "inside" if rec["inside"] else "left"
        lines.append(f"  {r:>4}  {rec['step']:>4}  {rec['label']:<28}  {state:<7}  {now - rec['since']:>5.0f}  "
                     f"{max(now - rec['written'], 0.0):>12.0f}")
    named = suspects(records, me, now)
    if named:
        lines += [f"  rank {r}: {why}" for r, why in named.items()]
    else:
        lines.append("  every rank waits in the same collective: one inside it (FSDP's all-gathers in "
                     "a forward) differs between ranks, or the interconnect is stuck")
    lines.append("  Each label is written next to its collective in the code (grep ft/ for it); this rank "
                 f"exits with status {HANG_EXIT} so that torchrun restarts the group from the last checkpoint.")
    return "\n".join(lines)


_DOG: Watchdog | None = None


def start(rank: int, world_size: int, timeout_s: float) -> None:
    """Start this rank's watchdog, when there is something to watch: several ranks
    under torchrun and a timeout."""
    global _DOG
    if world_size > 1 and timeout_s > 0 and os.environ.get("MASTER_ADDR"):
        _DOG = Watchdog(rank, world_size, timeout_s, store_client).start()


def stop() -> None:
    """Stop the watchdog (before the process group goes down)."""
    global _DOG
    if _DOG is not None:
        _DOG.stop()
        _DOG.thread.join(timeout=2 * PERIOD_S)
        _DOG = None


def process_group_timeout(hang_timeout_s: float) -> float:
    """The process group's own timeout: later than ft's report (which then comes first),
    and never shorter than torch's 30-minute default (start-up is not watched, and rank
    0 reading a large checkpoint keeps the others waiting in a broadcast)."""
    return max(1800.0, hang_timeout_s + 120.0)


def store_client():
    """A new connection to torchrun's store, in the key space of this attempt (what
    `ft.dist` uses for the process group), or None when not under torchrun."""
    import torch.distributed as td

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    store = td.TCPStore(addr, int(port), is_master=False, timeout=datetime.timedelta(seconds=60),
                        wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return td.PrefixStore(f"ft/attempt_{attempt}/watchdog", store)
