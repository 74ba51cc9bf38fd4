"""Resume exactly and survive faults: every test runs the real ./launch.sh (torchrun,
2 gloo ranks, tiny model) and compares against one uninterrupted run of the same job.

The faults are injected through FT_TEST_FAULT=kind:step:rank (see ft.faults),
which fires on torchrun's first attempt only.
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port, write_test_image

REPO = Path(__file__).resolve().parent.parent
STEPS = 8

# Every test here runs the real ./launch.sh (torchrun, 1-3 gloo ranks) or reads such a run:
# faults, signals, restarts and resumes need jobs of their own. The slow tier.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 rows (images and text): at a global batch of 4 (2 ranks x batch 1 x accumulation
    2) an epoch is 3 steps, so step 4 ends mid-epoch; at a global batch of 6 it is 2."""
    d = tmp_path_factory.mktemp("data")
    rows = []
    for i in range(12):
        if i % 2 == 0:
            write_test_image(d / f"img{i}.png", size=(56 + 28 * (i % 3), 56), seed=i)
            user = [{"type": "image", "image": f"img{i}.png"}, {"type": "text", "text": f"Describe picture {i}."}]
        else:
            user = f"Question number {i}: what comes after {i}?"
        answer = " ".join(["word"] * (3 + 2 * i)) + f" {i + 1}."
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def start(out: Path, model_dir: str, data: Path, *overrides: str, env: dict | None = None,
          nproc: int = 2) -> subprocess.Popen:
    env = {
        **os.environ, "NPROC_PER_NODE": str(nproc), "MASTER_PORT": str(free_port()),
        "PYTHON": sys.executable, "WANDB_MODE": "disabled", "MAX_RESTARTS": "0", **(env or {}),
    }
    cmd = [
        str(REPO / "launch.sh"), str(REPO / "configs/demo.yaml"),
        f"model.path={model_dir}", "model.build_tiny_if_missing=false",
        f"data.train_file={data / 'train.jsonl'}", "data.eval_file=", "data.max_length=512",
        f"train.output_dir={out}", f"train.max_steps={STEPS}", "train.learning_rate=2e-3",
        "train.warmup_ratio=0.25", "train.max_grad_norm=0.5", "train.seed=3",
        "train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=2",
        "train.precision=fp32", "train.logging_steps=1", "train.eval_steps=0",
        "train.save_steps=4", "train.keep_last_n=0", "fsdp.activation_checkpointing=true", *overrides,
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(out: Path, model_dir: str, data: Path, *overrides: str, env: dict | None = None,
        expect_rc: int = 0, nproc: int = 2) -> str:
    return wait(start(out, model_dir, data, *overrides, env=env, nproc=nproc), expect_rc)


def wait(proc: subprocess.Popen, expect_rc: int = 0) -> str:
    """The output of a job `start`ed earlier, once it has exited with `expect_rc`. Jobs
    that share nothing are started together and waited for in turn: a launch spends part
    of its time on one core (torchrun's start-up, the exit), which the other job uses."""
    try:
        output, _ = proc.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == expect_rc, f"exit {proc.returncode}, expected {expect_rc}:\n{output[-8000:]}"
    return output


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "best" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, tol: float = 1e-6) -> float:
    assert set(a) == set(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, f"weights differ by {worst:.2e}"
    return worst


def train_state(ckpt_dir: Path) -> dict:
    return json.loads((ckpt_dir / "train_state.json").read_text())["train_state"]


# The shared reference: one uninterrupted 8-step run of the default job, made once for
# the module. The resume and fault tests below each start their own launch.sh (a fault
# is injected into a fresh job, or a job is stopped, relaunched or resumed) and compare
# their losses and final weights against it.
STALL = {"FT_TEST_FAULT": "stall:3:1", "FT_TEST_STALL_S": "4"}


@pytest.fixture(scope="module")
def straight(tiny_model_dir, data, tmp_path_factory):
    """The uninterrupted run everything else must reproduce. It is also the slow-rank
    case (a slow rank changes no number, so one run serves both): rank 1 is 4 s late to
    step 3's all-reduce, under a 10 s hang timeout; `test_a_slow_rank_is_not_a_hang`
    reads its log."""
    out = tmp_path_factory.mktemp("straight") / "run"
    log = run(out, tiny_model_dir, data, "train.hang_timeout_s=10", env=STALL)
    (out.parent / "log.txt").write_text(log)
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
    st = train_state(out / "checkpoints" / "step-4")
    assert (st["step"], st["epoch"], st["epoch_steps"]) == (4, 1, 1)  # mid-epoch
    return out


# Exact resume of the default job from a mid-epoch checkpoint (per-step losses within
# 1e-6, final weights) is `test_kill_during_save_then_elastic_restart`'s second launch
# (from step 2, then from step 6 after torchrun's restart); `train.resume=PATH` is the
# packing, optimizer and world-size tests' path.


@pytest.mark.parametrize("optim, master, backend", [("hf_adafactor", "fp32", "fsdp1"), ("adamw", "fp32", "fsdp1"),
                                                     ("adamw", "bf16", "fsdp2")])
def test_exact_resume_with_other_optimizers(optim, master, backend, tiny_model_dir, data, tmp_path):
    """The recipe's HF Adafactor and AdamW checkpoint through FSDP's optimizer state dict
    (ft's Adafactor through its own: the default job, `test_kill_during_save_then_elastic_restart`):
    both resume to the same weights. AdamW's
    state reshards too: the 2-rank checkpoint continues on 1 rank x accumulation 4 to
    the same weights up to float rounding (HF Adafactor's updates depend on the world
    size: it is not compared there). bf16 master weights with stochastic rounding
    resume bit for bit (the rounding's bits are a function of the step, not a
    generator's state), here on fsdp2 with AdamW's fp32 moments as DTensors (fsdp1 with
    bf16 weights: `tests/test_bf16_weights.py`); `test_refusals_before_any_step` has the
    dtype refusal."""
    args = (f"train.optim={optim}", "train.max_steps=4", "train.save_steps=2", f"train.master_weights={master}",
            f"fsdp.backend={backend}")
    run(tmp_path / "straight", tiny_model_dir, data, *args)
    step2 = tmp_path / "straight" / "checkpoints" / "step-2"
    resumed = start(tmp_path / "resumed", tiny_model_dir, data, *args, f"train.resume={step2}")
    one = tmp_path / "one-rank"
    if optim == "adamw" and master == "fp32":  # at the same time: one process beside the two
        one_rank = start(one, tiny_model_dir, data, *args, "train.gradient_accumulation_steps=4",
                         f"train.resume={step2}", nproc=1)
    wait(resumed)
    assert_same_weights(weights(tmp_path / "resumed"), weights(tmp_path / "straight"),
                        tol=0.0 if master == "bf16" else 1e-6)
    if master == "bf16":  # export_dtype auto: the source's (the tiny model is saved fp32)
        assert json.loads((tmp_path / "straight" / "best" / "config.json").read_text())["dtype"] == "float32"
    if optim == "adamw" and master == "fp32":
        wait(one_rank)
        got, want = losses(one), losses(tmp_path / "straight")
        assert sorted(got) == [3, 4] and all(got[s] == pytest.approx(want[s], abs=1e-5) for s in got)
        assert_same_weights(weights(one), weights(tmp_path / "straight"), tol=1e-5)


def test_exact_resume_with_packing(tiny_model_dir, data, tmp_path):
    """Packed batches resume exactly mid-epoch: which samples share a row is a function
    of (seed, epoch), like the order. 192-token packs hold one or two of the 12 rows (8
    packs, 4 steps an epoch); step 3 ends mid-epoch and step 6 is in a later epoch."""
    args = ("data.packing=true", "data.max_length=128", "data.pack_length=192", "train.gradient_accumulation_steps=1",
            "train.max_steps=6", "train.save_steps=3")
    log = run(tmp_path / "straight", tiny_model_dir, data, *args)
    rows, packs = map(int, re.search(r"\[ft\] packing: epoch 0 packs (\d+) rows into (\d+) rows", log).groups())
    st = train_state(tmp_path / "straight" / "checkpoints" / "step-3")
    assert st["step"] == 3 and 0 < st["epoch_steps"] < packs // 2  # mid-epoch (2 ranks, 1 pack each)
    assert train_state(tmp_path / "straight" / "checkpoints" / "step-6")["epoch"] >= 1  # and past it
    resumed = tmp_path / "resumed"
    run(resumed, tiny_model_dir, data, *args, f"train.resume={tmp_path / 'straight' / 'checkpoints' / 'step-3'}")
    got, want = losses(resumed), losses(tmp_path / "straight")
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    assert_same_weights(weights(resumed), weights(tmp_path / "straight"))


def test_exact_resume_with_sequence_parallelism(tiny_model_dir, data, tmp_path):
    """parallel.sequence_parallel_size=2 on 2 ranks (one group reading the global batch of
    2: batch 1 x accumulation 2) stops at step 2 (mid-epoch) and resumes: the straight
    run's losses and weights. The same checkpoint continues on 1 rank without the split:
    the data position counts groups, so the steps hold the same samples, up to float
    rounding."""
    args = ("parallel.sequence_parallel_size=2", "train.max_steps=4", "train.save_steps=2")
    straight, resumed, one = tmp_path / "straight", tmp_path / "resumed", tmp_path / "one"
    run(straight, tiny_model_dir, data, *args)
    step2 = straight / "checkpoints" / "step-2"
    assert 0 < train_state(step2)["epoch_steps"] < 6  # 12 rows, 2 a step: mid-epoch
    second = start(resumed, tiny_model_dir, data, *args, f"train.resume={step2}")
    log = run(one, tiny_model_dir, data, *args, "parallel.sequence_parallel_size=1", f"train.resume={step2}",
              nproc=1)
    wait(second)
    assert "resumed on 1 rank a run of 2: global batch 2" in log
    want = losses(straight)
    for out, tol in ((resumed, 1e-6), (one, 1e-5)):
        got = losses(out)
        assert sorted(got) == [3, 4] and all(got[s] == pytest.approx(want[s], abs=tol) for s in got), out.name
        assert_same_weights(weights(out), weights(straight), tol=tol)


@pytest.mark.parametrize("backend, optim", [("fsdp1", "adafactor"), ("fsdp2", "adamw")])
def test_resume_on_another_number_of_ranks(backend, optim, tiny_model_dir, data, tmp_path):
    """2 ranks x accumulation 3 stop at step 3 (mid-epoch) and continue on 3 ranks x
    accumulation 2; (fsdp1) its step-4 checkpoint (an epoch's end) continues on 1 rank x
    accumulation 6. The global batch stays 6, so every step trains on the same samples
    (the same token count per step), and the losses and final weights are the
    uninterrupted run's up to float rounding. The optimizer state reshards: ft's
    Adafactor (full tensors by name) on fsdp1, AdamW's DTensor state on fsdp2 (and FSDP1's
    sharded AdamW state in `test_exact_resume_with_other_optimizers`)."""
    args = ("train.max_steps=6", "train.save_steps=3", "train.gradient_accumulation_steps=3",
            f"fsdp.backend={backend}", f"train.optim={optim}")
    straight, three, one = tmp_path / "straight", tmp_path / "three", tmp_path / "one"
    run(straight, tiny_model_dir, data, *args)
    log = run(three, tiny_model_dir, data, *args, "train.gradient_accumulation_steps=2", "train.save_steps=1",
              f"train.resume={straight / 'checkpoints' / 'step-3'}", nproc=3)
    assert ("resumed on 3 ranks a run of 2: global batch 6 (2 ranks x 1 per device x 3 accumulation) -> "
            "6 (3 ranks x 1 per device x 2 accumulation); the same samples per step; each rank's RNG state "
            "derived from (seed 3, step 3, rank), not restored") in log
    assert train_state(three / "checkpoints" / "step-4")["epoch_steps"] == 2  # the end of epoch 1
    continued = [(three, [4, 5, 6])]
    if backend == "fsdp1":
        log = run(one, tiny_model_dir, data, *args, "train.gradient_accumulation_steps=6",
                  f"train.resume={three / 'checkpoints' / 'step-4'}", nproc=1)
        assert "resumed on 1 rank a run of 3" in log
        continued.append((one, [5, 6]))
    want, end = losses(straight), train_state(straight / "checkpoints" / "step-6")
    assert end["samples_seen"] == 36
    for out, steps in continued:
        got = losses(out)
        assert sorted(got) == steps
        for step in steps:
            assert got[step] == pytest.approx(want[step], abs=1e-5), (out.name, step)
        st = train_state(out / "checkpoints" / "step-6")
        assert (st["samples_seen"], st["tokens_seen"]) == (end["samples_seen"], end["tokens_seen"])
        assert_same_weights(weights(out), weights(straight), tol=1e-5)



def test_kill_during_save_then_elastic_restart(straight, tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    # Rank 1 is killed after writing its step-4 shards, before the checkpoint is marked
    # complete; with no restarts allowed the job fails.
    log = run(out, tiny_model_dir, data, "train.save_steps=2",
              env={"FT_TEST_FAULT": "kill_in_save:4:1"}, expect_rc=1)
    ckpts = out / "checkpoints"
    assert (ckpts / "step-2" / "train_state.json").is_file()
    assert (ckpts / "step-4").is_dir() and not (ckpts / "step-4" / "train_state.json").exists()

    # Relaunch with restarts: the partial step-4 is ignored (step 2 is the newest complete
    # one); then rank 0 dies at step 7 and torchrun restarts the group, which resumes from
    # step 6 by itself. The result equals the uninterrupted run.
    log = run(out, tiny_model_dir, data, "train.save_steps=2",
              env={"FT_TEST_FAULT": "crash:7:0", "MAX_RESTARTS": "1"})
    assert "ignoring incomplete checkpoint" in log and "step-4" in log
    assert f"resumed from {ckpts / 'step-2'} (step 2" in log
    assert f"resumed from {ckpts / 'step-6'} (step 6" in log  # after torchrun's restart
    assert (ckpts / "step-4" / "train_state.json").is_file()  # rewritten, complete
    assert_same_weights(weights(out), weights(straight))
    got, want = losses(out), losses(straight)
    assert sorted(got) == list(range(1, STEPS + 1))  # metrics.jsonl has no duplicates
    assert all(got[s] == pytest.approx(want[s], abs=1e-6) for s in got)


def test_sigterm_checkpoints_and_exits_zero(straight, tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    proc = start(out, tiny_model_dir, data, "train.save_steps=0")
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"loss"') >= 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-6000:]
    assert "stop signal" in output
    saved = sorted((out / "checkpoints").iterdir())
    assert len(saved) == 1, "save_steps=0: the only checkpoint is the one the signal asked for"
    stopped_at = train_state(saved[0])["step"]
    assert 1 <= stopped_at < STEPS, f"the job stopped at step {stopped_at}"
    assert not (out / "best").exists()  # a stopped job does not export

    log = run(out, tiny_model_dir, data, "train.save_steps=0")
    assert f"(step {stopped_at}" in log
    assert_same_weights(weights(out), weights(straight))


def test_two_nodes_match_one_node(straight, tiny_model_dir, data, tmp_path):
    """Two launch.sh invocations, one process each, rendezvous on localhost as two nodes."""
    out = tmp_path / "run"
    port = str(free_port())
    procs = [
        start(out, tiny_model_dir, data, nproc=1,
              env={"NNODES": "2", "NODE_RANK": str(r), "MASTER_PORT": port})
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, o in zip(procs, outputs):
        assert p.returncode == 0, o[-6000:]
    assert "2 node(s) x 1 process(es)" in outputs[0]
    assert_same_weights(weights(out), weights(straight))


def test_missed_collective_is_reported_then_the_job_recovers(straight, tiny_model_dir, data, tmp_path):
    """Rank 1 leaves out step 6's all-reduce and runs on into the forward's all-gathers,
    where nothing matches it: with gloo (and NCCL) both ranks would wait until the
    process group's timeout. The watchdog reports within train.hang_timeout_s, naming
    rank 1, step 6 and where rank 0 waits; the ranks exit 3, torchrun restarts the
    group, which resumes from step 4's checkpoint and ends with the uninterrupted run's
    weights.

    Both ranks wait past the timeout, and whichever watchdog checks first reports and
    exits, which ends the group: the checks run once a second at phases the two threads
    do not share, so either rank may be the one. Its report names the other rank and
    where each waits."""
    t0 = time.monotonic()
    log = run(tmp_path / "run", tiny_model_dir, data, "train.hang_timeout_s=8",
              env={"FT_TEST_FAULT": "skip_collective:6:1", "MAX_RESTARTS": "1"})
    seconds = time.monotonic() - t0
    where = {0: "step/agree", 1: "step/forward-backward 0"}  # rank 1 skipped the agree
    hang = re.search(r"\[ft rank ([01])\] HANG: waited (\d+) s \(train.hang_timeout_s=8\) in (.+?) at step 6\.", log)
    assert hang, log[-6000:]
    me, other, report = int(hang[1]), 1 - int(hang[1]), log[hang.start():]
    assert hang[3] == where[me]
    assert 8 <= int(hang[2]) <= 10  # checked once a second
    assert f"rank {other}: in another collective: {where[other]}, while rank {me} waits in {where[me]}" in report
    assert "where its main thread waits" in report and "in train_step" in report
    assert "(exitcode: 3)" in log  # torchrun's line before it restarts the group
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / 'step-4'} (step 4" in log
    assert sorted(losses(tmp_path / "run"))[-1] == STEPS
    assert_same_weights(weights(tmp_path / "run"), weights(straight))
    assert seconds < 150, seconds  # two launches, the first cut short by the 8 s timeout


def test_a_slow_rank_is_not_a_hang(straight):
    """A rank 4 s late to step 3's all-reduce, with a 10 s timeout: no report, no exit.
    The shared reference run is that run (see `straight`)."""
    log = (straight.parent / "log.txt").read_text()
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step_time_s"] >= 3.5 for r in rows if "loss" in r][2]  # step 3 waited for rank 1
    assert "HANG" not in log
    assert sorted(losses(straight)) == list(range(1, STEPS + 1))


def test_nan_step_is_skipped_on_all_ranks(tiny_model_dir, data, tmp_path):
    out, out2 = tmp_path / "run", tmp_path / "run2"
    skipping = start(out, tiny_model_dir, data, env={"FT_TEST_FAULT": "nan:3:1"})
    # With max_skipped_steps=1 the first skip stops the job (checked below; started now).
    stopping = start(out2, tiny_model_dir, data, "train.save_steps=2", "train.max_skipped_steps=1",
                     env={"FT_TEST_FAULT": "nan:3:1"})
    log = wait(skipping)
    assert "step 3 skipped on all ranks: non-finite loss" in log
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # 8 real updates
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert rows[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(w).all() for w in weights(out).values())
    st = train_state(out / "checkpoints" / "step-8")
    assert (st["skipped_steps"], st["skipped_samples"]) == (1, 4)

    # With max_skipped_steps=1 the first skip stops the job; the step-2 checkpoint stays.
    log = wait(stopping, expect_rc=1)
    assert "1 steps in a row were skipped" in log
    assert (out2 / "checkpoints" / "step-2" / "train_state.json").is_file()


def test_sample_failing_mid_training(tiny_model_dir, data, tmp_path):
    """A sample that fails to load on one rank only (its image vanished after the data
    check): with skip, every rank skips that step and training goes on; with error,
    every rank stops (none is left waiting in a collective)."""
    out = tmp_path / "skip"
    skip = start(out, tiny_model_dir, data, "data.on_bad_sample=skip", "train.max_steps=4",
                 env={"FT_TEST_FAULT": "bad_sample:2:1"})
    error = start(tmp_path / "error", tiny_model_dir, data, env={"FT_TEST_FAULT": "bad_sample:2:1", "MAX_RESTARTS": "2"})
    log = wait(skip)
    assert "[ft rank 1] step 2 skipped (data.on_bad_sample=skip)" in log
    st = train_state(out / "checkpoints" / "step-4")
    assert (st["step"], st["skipped_steps"], st["skipped_samples"]) == (4, 1, 4)  # the whole step: 2 ranks x 2 micro-batches
    assert st["samples_seen"] == 5 * 4  # the skipped step's rows count as seen

    log = wait(error, expect_rc=2)
    assert "test fault: stands for a sample" in log
    assert_refused_once(log, "ft: data error: step 2: 1 rank(s) could not load a sample")

    # The same in eval: rank 1's first eval batch fails, with no good batch yet to repeat;
    # it moves on to its next one and repeats its last at the end, so both ranks still
    # run the same number of forwards.
    evals = ("train.max_steps=2", "train.eval_steps=2", f"data.eval_file={data / 'train.jsonl'}")
    eval_skip = start(tmp_path / "eval-skip", tiny_model_dir, data, *evals, "data.on_bad_sample=skip",
                      env={"FT_TEST_FAULT": "bad_eval:0:1"})
    eval_error = start(tmp_path / "eval-error", tiny_model_dir, data, *evals, env={"FT_TEST_FAULT": "bad_eval:0:1"})
    log = wait(eval_skip)
    assert "[ft rank 1] eval: test fault" in log and "step 2: eval_loss" in log
    log = wait(eval_error, expect_rc=2)
    assert_refused_once(log, "eval: 1 batch(es) could not be loaded")


def test_refusals_before_any_step(straight, tiny_model_dir, data, tmp_path):
    """Each refusal exits 2 with one message, before any step, without touching the run it
    refuses, and is not retried by torchrun's restarts."""
    # Two refusals at a time (they share nothing; the first leaves `straight` untouched).
    # resume=none on a folder that holds a run
    none = start(straight, tiny_model_dir, data, "train.resume=none", env={"MAX_RESTARTS": "3"})
    # a different global batch (another world size is fine with the same one: below)
    other_batch = start(tmp_path / "a", tiny_model_dir, data, f"train.resume={straight / 'checkpoints/step-4'}",
                        nproc=1)
    # a checkpoint whose weights were saved in another dtype
    bad = tmp_path / "bf16-ckpt"
    convert_checkpoint(straight / "checkpoints" / "step-4", bad, "model.model.language_model.norm.weight", torch.bfloat16)
    # a checkpoint whose RNG file holds a pickled object: refused, never unpickled
    pickled = tmp_path / "pickled-ckpt"
    shutil.copytree(straight / "checkpoints" / "step-4", pickled)
    torch.save({"numpy": np.random.get_state()}, pickled / "rng" / "rank-1.pt")  # rank 1's only: older ft's format

    log = wait(none, expect_rc=2)
    assert_refused_once(log, "already holds a run")
    assert "overwrite_output_dir" in log
    assert sorted(losses(straight)) == list(range(1, STEPS + 1))  # untouched
    log = wait(other_batch, expect_rc=2)
    assert_refused_once(log, "global batch 4 (2 ranks x 1 per device x 2 accumulation) -> "
                             "2 (1 rank x 1 per device x 2 accumulation)")
    dtype, unpickled = (start(tmp_path / out, tiny_model_dir, data, f"train.resume={ckpt}")
                        for out, ckpt in (("b", bad), ("c", pickled)))
    log = wait(dtype, expect_rc=2)
    assert_refused_once(log, "model.model.language_model.norm.weight was saved as torch.bfloat16")
    assert "torch.float32" in log and "resume with train.master_weights=bf16" in log
    log = wait(unpickled, expect_rc=2)
    assert_refused_once(log, "holds pickled Python objects")


def assert_refused_once(log: str, message: str) -> None:
    """A refusal: printed once, by rank 0, without a traceback or torchrun's summary."""
    assert log.count(message) == 1, log[-4000:]
    assert "Traceback" not in log and "ChildFailedError" not in log, log[-4000:]


def test_config_typo_fails_fast_and_once(tmp_path):
    """A typo in a key is refused by launch.sh before torchrun starts: one message, exit 2."""
    env = {**os.environ, "PYTHON": sys.executable, "MAX_RESTARTS": "3"}
    proc = subprocess.run([str(REPO / "launch.sh"), str(REPO / "configs/demo.yaml"), "train.lerning_rate=1e-4",
                           f"train.output_dir={tmp_path}"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    assert out.count("unknown key 'train.lerning_rate'; did you mean 'train.learning_rate'?") == 1, out
    assert "torch.distributed.run" not in out and "[launch]" not in out and "Traceback" not in out


def convert_checkpoint(src: Path, dst: Path, key: str, dtype: torch.dtype) -> None:
    """Copy a DCP checkpoint, storing tensor `key` as `dtype` (one process, no group)."""
    import shutil

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

    flat = dst.parent / "flat.pt"
    dcp_to_torch_save(str(src), str(flat))
    sd = torch.load(flat, weights_only=False)
    section, name = key.split(".", 1)
    sd[section][name] = sd[section][name].to(dtype)
    torch.save(sd, flat)
    torch_save_to_dcp(str(flat), str(dst))
    shutil.copytree(src / "rng", dst / "rng")
    shutil.copy(src / "train_state.json", dst / "train_state.json")
