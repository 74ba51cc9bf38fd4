"""wandb mode resolution and the crash-safe swap of the best export."""

import json

import pytest

from ft import ckpt
from ft.config import WandbConfig
from ft.track import Tracker, resolve_wandb_mode


def test_wandb_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment always wins
    assert resolve_wandb_mode("online") == "disabled"


def test_tracker_writes_jsonl(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    t = Tracker(str(tmp_path), WandbConfig(), {}, "run")
    t.log({"step": 1, "loss": 2.5})
    t.log({"step": 1, "eval_loss": 2.0})
    t.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.5}, {"step": 1, "eval_loss": 2.0}]


def _export(path, step):
    path.mkdir()
    (path / "ft_export.json").write_text(json.dumps({"step": step}))


def test_swap_replaces_and_crash_leftovers_are_recovered(tmp_path):
    best = tmp_path / "best"
    _export(best, 1)
    tmp = tmp_path / "best.tmp"
    _export(tmp, 2)
    ckpt._swap_into_place(str(tmp), str(best))
    assert json.loads((best / "ft_export.json").read_text()) == {"step": 2}
    assert not tmp.exists() and not (tmp_path / "best.old").exists()

    # Crash after the old export was moved aside and before the new one moved in.
    best.rename(tmp_path / "best.old")
    _export(tmp_path / "best.tmp", 3)  # half-written new export
    ckpt.recover_export(str(best))
    assert json.loads((best / "ft_export.json").read_text()) == {"step": 2}
    assert not (tmp_path / "best.old").exists() and not (tmp_path / "best.tmp").exists()

    # Crash after the new one moved in, before the old one was deleted.
    _export(tmp_path / "best.old", 1)
    ckpt.recover_export(str(best))
    assert json.loads((best / "ft_export.json").read_text()) == {"step": 2}
    assert not (tmp_path / "best.old").exists()


def _fake_checkpoint(out, step, *, metadata=True, marker=True, ranks=2):
    path = out / "checkpoints" / f"step-{step}"
    (path / "rng").mkdir(parents=True)
    if metadata:
        (path / ".metadata").write_bytes(b"x")
    for r in range(ranks):
        (path / "rng" / f"rank-{r}.pt").write_bytes(b"x")
    if marker:
        (path / "train_state.json").write_text(json.dumps({"world_size": 2, "train_state": {"step": step}}))
    return path


def test_completeness_listing_and_pruning(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 4, marker=False)  # killed before rank 0's marker
    _fake_checkpoint(tmp_path, 6)
    _fake_checkpoint(tmp_path, 8, ranks=1)  # a rank's RNG file never arrived
    _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 12, metadata=False)  # the newest: DCP never finished
    (tmp_path / "best").mkdir()
    found = {c.step: c for c in ckpt.list_checkpoints(str(tmp_path))}
    assert [s for s, c in found.items() if c.complete] == [2, 6, 10]
    assert "train_state.json" in found[4].why_incomplete
    assert "rank(s) [1]" in found[8].why_incomplete
    assert ".metadata" in found[12].why_incomplete
    with pytest.raises(ckpt.CheckpointMismatch, match="not a complete checkpoint"):
        ckpt.load_checkpoint(None, None, found[4].path, None)

    # keep 2: steps 6 and 10 stay; 2 goes, and so do the incomplete 4 and 8 (older than
    # the newest complete one). 12 may be a save in progress: kept. best/ is never touched.
    deleted = ckpt.prune_checkpoints(str(tmp_path), keep_last_n=2)
    assert sorted(int(p.rsplit("-", 1)[1]) for p in deleted) == [2, 4, 8]
    assert sorted(c.step for c in ckpt.list_checkpoints(str(tmp_path))) == [6, 10, 12]
    assert (tmp_path / "best").is_dir()


def test_run_shape_allows_another_split_of_the_same_global_batch():
    shape = {"world_size": 2, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 3, "seed": 1,
             "train_file": "/d/train.jsonl", "train_rows": 12, "eval_fraction": 0.0, "group_by_length": False,
             "pack_length": 0}
    ckpt.check_run_shape("ck", shape, {**shape, "world_size": 3, "gradient_accumulation_steps": 2})
    ckpt.check_run_shape("ck", shape, {**shape, "world_size": 1, "per_device_train_batch_size": 2})
    with pytest.raises(ckpt.ResumeError) as e:
        ckpt.check_run_shape("ck", shape, {**shape, "world_size": 3, "gradient_accumulation_steps": 2, "seed": 2,
                                           "per_device_train_batch_size": 2})
    assert ("global batch 6 (2 ranks x 1 per device x 3 accumulation) -> 12 (3 ranks x 2 per device x 2 "
            "accumulation); seed: 1 -> 2") in str(e.value)
    assert "per_device_train_batch_size x gradient_accumulation_steps x world size" in str(e.value)
