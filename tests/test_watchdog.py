"""ft.watchdog: what a rank records, and how a hang report names the ranks out of step.
The end-to-end hang, recovery and slow-rank runs are in tests/test_resume.py."""

import io
import time

from ft import watchdog
from ft.watchdog import HERE, at, format_report, process_group_timeout, suspects


def record(rank, step, label, inside=True, since=0.0, written=100.0):
    return {"rank": rank, "step": step, "label": label, "inside": inside, "watched": True,
            "since": since, "written": written, "entered": 0}


def test_at_records_label_inside_and_time():
    before = HERE.entered
    with at("step/agree"):
        assert (HERE.label, HERE.inside, HERE.watched) == ("step/agree", True, True)
        entered = HERE.since
    assert not HERE.inside and HERE.since >= entered and HERE.entered == before + 1

    @at("setup/model", watch=False)
    def build():
        return HERE.label, HERE.watched

    assert build() == ("setup/model", False)
    watchdog.set_step(7)
    assert HERE.step == 7


def test_suspects_name_who_is_elsewhere_and_why():
    now = 100.0
    records = {
        0: record(0, 3, "step/agree"),
        1: record(1, 3, "step/forward-backward 0"),  # ran past the all-reduce
        2: record(2, 2, "step/optimizer", inside=False, since=10.0),  # behind
        3: record(3, 3, "step/agree", written=now - 60),  # frozen: its record stopped
        4: record(4, 3, "step/agree"),  # where rank 0 is
        5: None,
    }
    why = suspects(records, 0, now)
    assert set(why) == {1, 2, 3, 5}
    assert "step/forward-backward 0" in why[1] and "waits in step/agree" in why[1]
    assert why[2].startswith("behind: on step 2")
    assert why[3].startswith("silent for 60 s")
    assert why[5].startswith("never reported")
    report = format_report(records, 0, 10, now)
    assert "HANG" in report and "in step/agree at step 3" in report
    assert "rank 1: in another collective" in report and "rank 4:" not in report


def test_all_in_the_same_collective_is_said_so():
    records = {0: record(0, 5, "step/forward-backward 1"), 1: record(1, 5, "step/forward-backward 1")}
    assert suspects(records, 0, 100.0) == {}
    assert "every rank waits in the same collective" in format_report(records, 0, 10, 100.0)


def test_process_group_timeout_comes_after_the_report_and_never_below_torchs_default():
    assert process_group_timeout(900) == 1800
    assert process_group_timeout(3600) == 3720
    assert process_group_timeout(0) == 1800


def test_no_watchdog_without_torchrun_or_a_timeout(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    watchdog.start(0, 2, 10)
    assert watchdog._DOG is None
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    watchdog.start(0, 2, 0)
    watchdog.start(0, 1, 10)
    assert watchdog._DOG is None
    watchdog.stop()


def test_report_without_the_store_shows_this_rank_and_its_stack():
    out = io.StringIO()
    dog = watchdog.Watchdog(0, 2, 10, store=lambda: None, out=out)
    with at("step/agree"):
        dog.report(None, time.time() + 11)
    text = out.getvalue()
    assert "HANG: waited 11 s" in text and "in step/agree" in text
    assert "rank 1: never reported" in text
    assert "where its main thread waits" in text and "test_watchdog.py" in text
