"""The dry run as a fit check: a run config (YAML + overrides) in, the memory table with
an activation row, a total and a verdict out; the activation estimate against a
measured peak on the CPU (benchmarks/fit_check.py)."""

import os
import re
import subprocess
import sys

import pytest

from ft.config import ModelConfig
from ft.dryrun import build_on_meta, estimate_memory, main as dry_run
from ft.fsdp_wrap import fmt_bytes, plan_units
from ft.parts import apply_freezing

from test_benchmarks import load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run_config(tmp_path, tiny_model_dir_untied):
    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  path: {tiny_model_dir_untied}\n  freeze_vision_tower: true\n"
                    "data:\n  max_length: 512\ntrain:\n  optim: hf_adafactor\n  precision: auto\n")
    return str(path)


def _row(out: str, name: str) -> str:
    return re.search(rf"^  {name}\s+(\S+ \S+)", out, re.M).group(1)


def test_run_config_with_overrides(run_config, tiny_model_dir_untied, capsys):
    dry_run([run_config, "--world-size", "2", "train.optim=adamw", "train.per_device_train_batch_size=3"])
    out = capsys.readouterr().out
    assert "world size 2, bf16 compute, fp32 master weights, adamw" in out  # precision auto -> bf16; the override wins
    assert "Tokens per micro-batch: 1536 (data.max_length 512 x train.per_device_train_batch_size 3)" in out
    assert "vision_tower" in out and "frozen" in out and "vision tower frozen: none" in out
    # The parameter, gradient and optimizer rows are estimate_memory's for the same inputs.
    model = build_on_meta(tiny_model_dir_untied)
    apply_freezing(model, ModelConfig(freeze_vision_tower=True))
    est = estimate_memory(plan_units(model), 2, "adamw", "bf16")
    assert _row(out, "parameters") == fmt_bytes(est.master)
    assert _row(out, "gradients") == fmt_bytes(est.gradients)
    assert _row(out, "optimizer") == fmt_bytes(est.optimizer)
    assert re.search(r"^  activations\s+\S+ \S+\s+1536 tokens", out, re.M)
    assert re.search(r"^Fit check \(80 GiB per GPU\): fits: .* to spare$", out, re.M)
    # --tokens and packing
    dry_run([run_config, "data.packing=true", "data.pack_length=4096"])
    assert "Tokens per micro-batch: 4096 (data.pack_length 4096)" in capsys.readouterr().out
    dry_run([run_config, "--tokens", "100"])
    assert "Tokens per micro-batch: 100 (--tokens)" in capsys.readouterr().out


def test_verdict_flips_when_the_gpu_is_smaller(run_config, capsys):
    dry_run([run_config, "--world-size", "2"])
    assert "fits:" in capsys.readouterr().out
    dry_run([run_config, "--world-size", "2", "--gpu-memory-gib", "0.001"])
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert verdict.startswith("Fit check (0.001 GiB per GPU): does NOT fit:") and "over" in verdict
    assert "To fit:" in verdict


@pytest.mark.parametrize("args, message", [
    (["train.optim=sgd"], "train.optim"),
    (["train.nope=1"], "unknown key 'train.nope'"),
    (["model.path=/no/such/model"], "model.path: '/no/such/model' does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(run_config, args, message, capsys):
    with pytest.raises(SystemExit) as e:
        dry_run([run_config, *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


# slow: `python -m ft.dryrun`, the command line as a user types it, in a fresh process
@pytest.mark.slow
def test_dryrun_main_takes_a_run_config(run_config):
    proc = subprocess.run([sys.executable, "-m", "ft.dryrun", run_config, "--world-size", "2",
                           "train.optim=adamw"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "adamw" in proc.stdout and "Fit check" in proc.stdout


def test_activation_estimate_within_stated_error_of_measured_peak():
    fit = load("fit_check")
    measured, est = fit.compare(tokens=1024, side=16)
    error = fit.compared(est) / measured - 1
    assert abs(error) <= fit.TOLERANCE, (measured, est)


@pytest.mark.parametrize("name, params", [("qwen2_5_vl_32b", 33.45e9), ("qwen2_5_vl_72b", 73.41e9),
                                          ("qwen2_vl_7b", 8.29e9), ("qwen3_vl_8b", 8.77e9), ("qwen3_vl_32b", 33.4e9),
                                          ("qwen3_vl_30b_a3b", 31.1e9), ("qwen3_vl_235b_a22b", 236e9)])
def test_large_configs_build_with_published_sizes(name, params, capsys):
    """Each shape in configs/ builds its family's model with the published parameter
    count, untied, and the fit check plans it (every family's roles found)."""
    folder = os.path.join(REPO, "configs", name)
    model = build_on_meta(folder)
    assert abs(sum(p.numel() for p in model.parameters()) - params) < 0.005 * params
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight
    dry_run([folder, "--world-size", "8", "--tokens", "8192"])
    out = capsys.readouterr().out
    layer = type(model.model.language_model.layers[0]).__name__
    assert "Fit check (80 GiB per GPU): " in out and f"layers.{{0..{model.config.text_config.num_hidden_layers - 1}}}" in out
    assert layer in out
