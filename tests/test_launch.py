"""Starting jobs: launch.sh's usage, two launch.sh jobs on one node without MASTER_PORT,
and a model.path typo refused before anything is created."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_test_image

REPO = Path(__file__).resolve().parent.parent


# slow: it starts launch.sh, a shell script (only bash runs: it answers before any Python)
@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_exits_zero(flag):
    """Fast: no torchrun, no Python. The usage names the config, the overrides and every
    environment variable the script reads."""
    proc = subprocess.run([str(REPO / "launch.sh"), flag], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    usage = proc.stdout
    assert usage.startswith("Launch ft under torchrun") and "./launch.sh CONFIG.yaml [section.key=value ...]" in usage
    read = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):-", (REPO / "launch.sh").read_text()))
    assert {"NPROC_PER_NODE", "NNODES", "MASTER_PORT", "PYTHON", "MAX_RESTARTS"} <= read
    assert sorted(v for v in read if v not in usage) == []
    assert "set -euo" not in usage and not any(line.startswith("#") for line in usage.splitlines())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = []
    for i in range(4):
        write_test_image(d / f"img{i}.png", seed=i)
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"img{i}.png"},
                                         {"type": "text", "text": f"Describe picture {i}."}]},
            {"role": "assistant", "content": f"Picture number {i}."}]})
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def start(out: Path, model_dir: str, data: Path, max_steps: int) -> subprocess.Popen:
    env = {**os.environ, "NPROC_PER_NODE": "1", "PYTHON": sys.executable, "WANDB_MODE": "disabled",
           "MAX_RESTARTS": "0"}
    env.pop("MASTER_PORT", None)  # the point: launch.sh must find a free port itself
    env.pop("NNODES", None)
    cmd = [
        str(REPO / "launch.sh"), str(REPO / "configs/demo.yaml"),
        f"model.path={model_dir}", "model.build_tiny_if_missing=false",
        f"data.train_file={data / 'train.jsonl'}", "data.eval_file=",
        f"train.output_dir={out}", f"train.max_steps={max_steps}", "train.eval_steps=0",
        "train.save_steps=0", "train.logging_steps=1", "train.precision=fp32",
        "train.per_device_train_batch_size=2",
    ]
    with open(out.parent / f"{out.name}.log", "w") as log:  # the child keeps its own copy
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def log_of(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text()


# slow: two real launch.sh jobs (torchrun and its workers) side by side
@pytest.mark.slow
def test_two_jobs_on_one_node_without_master_port(tiny_model_dir, data, tmp_path):
    """The first job holds its rendezvous port for as long as it runs (before launch.sh
    picked a free one, both used 29500 and the second died with EADDRINUSE). It is
    given far more steps than it gets: once the second job has finished, it must still
    be running, and is stopped with SIGTERM (checkpoint and exit 0)."""
    first, second = tmp_path / "first", tmp_path / "second"
    p1 = start(first, tiny_model_dir, data, max_steps=100_000)
    try:
        deadline = time.monotonic() + 60
        while "[ft] step 1/" not in log_of(first):  # its torchrun and workers are up
            assert p1.poll() is None, log_of(first)[-6000:]
            assert time.monotonic() < deadline, log_of(first)[-6000:]
            time.sleep(0.2)
        p2 = start(second, tiny_model_dir, data, max_steps=3)
        assert p2.wait(timeout=120) == 0, log_of(second)[-6000:]
        assert p1.poll() is None, "the first job ended before the second one ran:\n" + log_of(first)[-6000:]
        p1.send_signal(signal.SIGTERM)
        assert p1.wait(timeout=60) == 0, log_of(first)[-6000:]
    finally:
        if p1.poll() is None:
            p1.kill()
    for out in (first, second):
        assert "master localhost:free port" in log_of(out)
        assert "EADDRINUSE" not in log_of(out)
        steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps and steps[0] == 1, steps
    assert "stop signal" in log_of(first)
    assert [json.loads(line)["step"] for line in (second / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)] == [1, 2, 3]


# torchrun's @record on the entry point cannot enable its fault handler under capsys.
@pytest.mark.filterwarnings("ignore:Unable to enable fault handler:UserWarning")
@pytest.mark.parametrize("make", ["missing", "empty"])
def test_model_path_typo_is_refused_and_creates_nothing(tmp_path, make, monkeypatch, capsys):
    """Under the demo config (build_tiny_if_missing: true) a model.path other than the
    demo model's default place is never built: a missing folder, or one without
    config.json, is a config error naming it, and nothing is created. The training entry
    point (what `python -m ft.loop` runs) in this process: the refusal comes before any
    process group or output exists, so it needs no fresh process."""
    from ft.loop import main as train_main

    model = tmp_path / "nonexistent"
    if make == "empty":
        model.mkdir()
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit:
        train_main([str(REPO / "configs/demo.yaml"), f"model.path={model}", f"train.output_dir={tmp_path / 'out'}"])
    stdout, stderr = capsys.readouterr()
    assert exit.value.code == 2, stderr[-4000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and str(model) in lines[0], stderr[-4000:]
    problem = "does not exist" if make == "missing" else "has no config.json"
    assert f"model.path: '{model}' {problem}" in lines[0]
    assert "config.json and weights" in lines[0] and "runs/tiny-qwen2.5-vl" in lines[0]
    assert stdout == ""
    assert model.exists() == (make == "empty") and not (model / "config.json").exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler:UserWarning")
def test_a_model_of_another_family_is_refused_by_name(tmp_path, monkeypatch, capsys):
    """A checkpoint whose config.json names a model_type ft does not train (Qwen3.5,
    here) is refused in one line naming the file, the model_type and the families ft
    trains, before anything is created; so are `ft.chat` and `ft.predict` on it."""
    from ft.chat import main as chat_main
    from ft.loop import main as train_main

    model = tmp_path / "qwen3_5"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit:
        train_main([str(REPO / "configs/demo.yaml"), f"model.path={model}", f"train.output_dir={tmp_path / 'out'}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(lines) == 1, lines
    assert (f"{model / 'config.json'}: model_type is 'qwen3_5': ft trains qwen2_vl (Qwen2-VL), "
            "qwen2_5_vl (Qwen2.5-VL), qwen3_vl (Qwen3-VL), qwen3_vl_moe (Qwen3-VL-MoE)") in lines[0]
    assert not (tmp_path / "out").exists()
    assert chat_main([str(model), "Hi"]) == 2
    assert "model_type is 'qwen3_5'" in capsys.readouterr().err


FAKE_SRUN = r"""#!/bin/bash
# Fake srun: runs the command once per node ($SLURM_NNODES) on this machine, with
# SLURM_NODEID set, and sends a signal it gets to every process under it, as
# slurmstepd signals every process of a job step. Options are skipped.
while [[ $1 == --* ]]; do shift; done
pids=()
for ((n = 0; n < SLURM_NNODES; n++)); do
  SLURM_NODEID=$n SLURM_PROCID=$n "$@" &
  pids+=($!)
done
tree() { echo "$1"; local c; for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do tree "$c"; done; }
forward() { echo "[fake srun] SIG$1 to every process of the step" >&2
            for p in "${pids[@]}"; do for q in $(tree "$p"); do kill -"$1" "$q" 2>/dev/null; done; done; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
rc=0
for p in "${pids[@]}"; do
  while kill -0 "$p" 2>/dev/null; do wait "$p" || true; done
  wait "$p" || rc=$?
done
exit $rc
"""

FAKE_SCONTROL = r"""#!/bin/bash
case "$1" in
  show) echo 127.0.0.1 ;;
  requeue) echo "requeue $2" >> "$FAKE_SLURM_LOG" ;;
  *) exit 1 ;;
esac
"""


# slow: examples/slurm.sbatch under a fake srun: launch.sh on two "nodes", twice
@pytest.mark.slow
def test_slurm_script_checkpoints_and_requeues(tiny_model_dir, data, tmp_path):
    """examples/slurm.sbatch under a fake srun and scontrol: two "nodes" on this machine.
    SIGUSR1 to the batch script (what --signal=B:USR1@120 does) reaches every process of
    the step, torchrun included, as under SLURM; the job checkpoints, exits 0 and the
    script requeues it. The requeued attempt resumes from that checkpoint and finishes
    without requeueing. Not tested: real SLURM (signal timing, srun options, requeue)."""
    import socket

    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    for job_id in range(4242, 14242, 97):  # the script derives MASTER_PORT from the job id
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job_id % 10000))
                break
            except OSError:
                continue
    slurm_log, out = tmp_path / "slurm.log", tmp_path / "out"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO),
           "SLURM_JOB_ID": str(job_id), "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[0-1]",
           "SLURM_CPUS_PER_TASK": "1", "NPROC_PER_NODE": "1", "PYTHON": sys.executable,
           "WANDB_MODE": "disabled", "MAX_RESTARTS": "0", "FAKE_SLURM_LOG": str(slurm_log)}
    for key in ("MASTER_PORT", "MASTER_ADDR", "NNODES", "NODE_RANK", "SLURM_RESTART_COUNT"):
        env.pop(key, None)

    def sbatch(log: Path, max_steps: int, restart_count: int) -> subprocess.Popen:
        cmd = ["bash", str(REPO / "examples/slurm.sbatch"), str(REPO / "configs/demo.yaml"),
               f"model.path={tiny_model_dir}", "model.build_tiny_if_missing=false",
               f"data.train_file={data / 'train.jsonl'}", "data.eval_file=", f"train.output_dir={out}",
               f"train.max_steps={max_steps}", "train.eval_steps=0", "train.save_steps=0",
               "train.per_device_train_batch_size=1", "train.precision=fp32", "train.logging_steps=1"]
        with open(log, "w") as f:
            return subprocess.Popen(cmd, env={**env, "SLURM_RESTART_COUNT": str(restart_count)},
                                    stdout=f, stderr=subprocess.STDOUT)

    first = tmp_path / "attempt1.log"
    job = sbatch(first, max_steps=100_000, restart_count=0)
    try:
        deadline = time.monotonic() + 90
        while "[ft] step 1/" not in first.read_text():
            assert job.poll() is None, first.read_text()[-6000:]
            assert time.monotonic() < deadline, first.read_text()[-6000:]
            time.sleep(0.2)
        job.send_signal(signal.SIGUSR1)
        assert job.wait(timeout=90) == 0, first.read_text()[-6000:]
    finally:
        if job.poll() is None:
            job.kill()
    log = first.read_text()
    assert "2 node(s) x 1 process(es)" in log and f"master 127.0.0.1:{20000 + job_id % 10000}" in log
    assert "(stop signal; relaunch to continue)" in log, log[-6000:]
    assert "srun exited with 0" in log
    assert slurm_log.read_text() == f"requeue {job_id}\n"
    stopped = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))

    second = tmp_path / "attempt2.log"
    job = sbatch(second, max_steps=stopped + 2, restart_count=1)
    assert job.wait(timeout=120) == 0, second.read_text()[-6000:]
    log = second.read_text()
    assert "attempt 2" in log and f"resumed from {out / 'checkpoints' / f'step-{stopped}'} " in log, log[-6000:]
    assert slurm_log.read_text() == f"requeue {job_id}\n"  # finished: not requeued again
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps[-1] == stopped + 2 and steps == sorted(set(steps)), steps
