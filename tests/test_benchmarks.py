"""The benchmark scripts' arithmetic, without training anything: reading ft's
metrics.jsonl (every format the loop has written), the HF baseline's averages, the
compare ratios, and the 3B-shaped config."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name):
    # compare.py imports bench by name, as it does when run as a script.
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load("bench")


def step_record(step, tokens_per_s, step_time_s, **extra):
    return {"step": step, "loss": 1.0, "lr": 1e-5, "grad_norm": 1.0, "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / 2, "step_time_s": step_time_s, "data_s": 0.1 * step_time_s,
            "fwd_bwd_s": 0.8 * step_time_s, "optim_s": 0.1 * step_time_s, **extra}


def test_summary_record_wins_and_memory_is_the_peak():
    records = [
        step_record(1, 100.0, 2.0, peak_rss_gib=1.0),
        step_record(2, 400.0, 1.0, peak_rss_gib=1.5),
        {"step": 2, "eval_loss": 3.0},
        {"step": 2, "summary": True, "warmup_steps": 1, "avg_tokens_per_s": 400.0,
         "avg_tokens_per_s_per_device": 200.0, "avg_step_time_s": 1.0, "avg_data_s": 0.1,
         "avg_fwd_bwd_s": 0.8, "avg_optim_s": 0.1, "peak_rss_gib": 1.25},
    ]
    r = bench.summarize(records, warmup=5, world=2)  # the summary's own warm-up counts
    assert r["source"] == "summary record"
    assert (r["warmup_steps"], r["steps_measured"], r["steps"]) == (1, 1, 2)
    assert r["tokens_per_s_per_device"] == 200.0 and r["step_time_s"] == 1.0 and r["mfu"] is None
    assert r["peak_rss_gib"] == 1.5


def test_per_step_fallback_weights_by_time():
    # Step 3: 300 tokens in 1 s; step 4: 100 tokens in 1 s; step 5: 600 tokens in 2 s.
    records = [step_record(s, 1e6, 0.001) for s in (1, 2)] + [
        step_record(3, 300.0, 1.0, mfu=0.3), step_record(4, 100.0, 1.0, mfu=0.1),
        step_record(5, 300.0, 2.0, mfu=0.3)]
    r = bench.summarize(records, warmup=2, world=2)
    assert r["source"] == "per-step records" and r["steps_measured"] == 3
    assert r["tokens_per_s_per_device"] == pytest.approx(1000 / 4 / 2)
    assert r["step_time_s"] == pytest.approx(4 / 3)
    assert r["fwd_bwd_s"] == pytest.approx(0.8 * 4 / 3)
    assert r["mfu"] == pytest.approx((0.3 + 0.1 + 0.6) / 4)


def test_windows_that_straddle_the_warmup_are_left_out():
    # logging_steps=2: the window ending at step 4 holds steps 3-4, after warm-up 2;
    # with warm-up 3 it straddles and only the window of steps 5-6 counts.
    records = [step_record(s, 100.0 * s, 1.0) for s in (2, 4, 6)]
    assert bench.summarize(records, warmup=2, world=1)["steps_measured"] == 4
    r = bench.summarize(records, warmup=3, world=1)
    assert r["steps_measured"] == 2 and r["tokens_per_s_per_device"] == pytest.approx(600.0)


def test_oldest_loop_format_gb_to_gib():
    records = [{"step": s, "loss": 1.0, "lr": 1e-5, "grad_norm": 1.0, "tokens_per_s": 10.0 * s,
                "peak_mem_gb": 2**30 / 1e9, "skipped_steps": 0} for s in (1, 2, 3)]
    r = bench.summarize(records, warmup=1, world=2)
    assert r["tokens_per_s_per_device"] == pytest.approx((20 + 30) / 2 / 2)
    assert r["step_time_s"] is None and r["peak_mem_gib"] == pytest.approx(1.0)
    assert "peak mem 1.00 GiB" in bench.format_result("ft", r)


def test_no_step_after_warmup_is_an_error():
    with pytest.raises(ValueError, match="warm-up"):
        bench.summarize([step_record(1, 1.0, 1.0)], warmup=1, world=1)


def test_hf_aggregate_matches_ft_definitions():
    hf = load("hf_trainer_baseline")
    steps = [{"data_s": 1.0, "fwd_bwd_s": 8.0, "optim_s": 1.0, "tokens": 1.0, "flops": 1.0}] + [
        {"data_s": 0.1, "fwd_bwd_s": 0.7, "optim_s": 0.2, "tokens": 400.0, "flops": 2e12}] * 2
    r = hf.aggregate(steps, warmup=1, world=2, peak_flops=1e12)
    assert r["steps_measured"] == 2 and r["step_time_s"] == pytest.approx(1.0)
    assert r["tokens_per_s_per_device"] == pytest.approx(800 / 2 / 2)
    assert r["mfu"] == pytest.approx(4e12 / 2 / (2 * 1e12))
    assert hf.aggregate(steps, warmup=1, world=2, peak_flops=None)["mfu"] is None


def test_compare_ratios_are_medians_of_rounds_per_path():
    compare = load("compare")
    runs = []
    for round_, (ft_tps, hf_tps) in enumerate([(120.0, 100.0), (150.0, 100.0), (90.0, 100.0)], 1):
        runs += [{"round": round_, "system": "ft padded", "tokens_per_s_per_device": ft_tps, "peak_rss_gib": 1.0},
                 {"round": round_, "system": "ft packed", "tokens_per_s_per_device": 2 * ft_tps},
                 {"round": round_, "system": "hf_trainer", "tokens_per_s_per_device": hf_tps, "peak_rss_gib": 2.0}]
    unpaired = {"round": 4, "system": "ft padded", "tokens_per_s_per_device": 1.0}  # no Trainer run that round
    r = compare.ratios(runs + [unpaired])
    assert r == {"ft padded": {"tokens_per_s_per_device": pytest.approx(1.2), "peak_rss_gib": pytest.approx(0.5)},
                 "ft packed": {"tokens_per_s_per_device": pytest.approx(2.4)}}
    assert compare.table(runs).count("\n") == len(runs) + 1
    assert "| ft packed | - | 240.0 | 2.40x | - | - |" in compare.ratio_table(runs)
    runs[-1]["step_time_s"] = 2.5  # round 3's Trainer run: 100 tokens/s for 2.5 s
    assert "| hf_trainer | 250 | 100.0 | 1.00x | 2.00 | 1.00x |" in compare.ratio_table(runs)


def test_compare_axes_refuse_unknown_values_by_name():
    compare = load("compare")
    assert compare.choose("backends", "fsdp2,fsdp1") == ["fsdp2", "fsdp1"]
    with pytest.raises(Exception, match="--weights: \\['fp16'\\] not among fp32, bf16"):
        compare.choose("weights", "fp32,fp16")
    with pytest.raises(Exception, match="'padded/fsdp3/fp32': backends 'fsdp3' not among fsdp1, fsdp2"):
        compare.parse_path("padded/fsdp3/fp32")


def test_compare_paths_are_the_axes_product_or_the_named_ones():
    compare = load("compare")
    every = compare.ft_paths(compare.parse_args(["--model", "m", "--batches", "padded"]))
    assert list(every) == ["ft padded fsdp1 fp32", "ft padded fsdp1 bf16", "ft padded fsdp2 fp32",
                           "ft padded fsdp2 bf16"]
    assert every["ft padded fsdp2 bf16"] == (2, ["fsdp.backend=fsdp2", "train.master_weights=bf16",
                                                 "model.attn_implementation=sdpa"])
    named = compare.ft_paths(compare.parse_args(["--model", "m", "--batch-size", "3", "--paths",
                                                 "padded/fsdp2/fp32/flash_attention_2"]))
    assert named == {"ft padded fsdp2 fp32 flash_attention_2": (
        3, ["fsdp.backend=fsdp2", "train.master_weights=fp32", "model.attn_implementation=flash_attention_2"])}


def test_baseline_drops_sync_module_states_on_cpu_by_condition_not_error_text():
    import torch

    baseline = load("hf_trainer_baseline")
    recipe = {"fsdp": "full_shard auto_wrap", "use_cpu": True,
              "fsdp_config": dict(baseline.FSDP_CONFIG)}
    dropped = {}
    fitted = baseline.fit_to_machine(recipe, dropped)
    assert fitted["fsdp_config"]["sync_module_states"] is False
    assert recipe["fsdp_config"]["sync_module_states"] is True  # the caller's recipe is left alone
    assert "no accelerator" in dropped["fsdp_config.sync_module_states"]
    if torch.cuda.is_available():
        on_gpu = dict(recipe, use_cpu=False)
        assert baseline.fit_to_machine(on_gpu, {}) is on_gpu
    no_fsdp = dict(recipe, fsdp="")
    assert baseline.fit_to_machine(no_fsdp, {}) is no_fsdp


@pytest.mark.slow
def test_compare_runs_ft_and_the_trainer_baseline(tiny_model_dir, tmp_path):
    """compare.py end to end for one round: ft (launch.sh) and the HF Trainer (torchrun,
    2 processes) on the tiny model. It fails when the installed transformers or
    accelerate stop accepting what the baseline passes, as accelerate 1.16 did with
    sync_module_states on the CPU."""
    import json
    import subprocess

    out = tmp_path / "compare.json"
    command = [sys.executable, str(BENCHMARKS / "compare.py"), "--model", str(tiny_model_dir),
               "--data", str(BENCHMARKS.parent / "data/demo/train.jsonl"), "--steps", "2", "--warmup", "1",
               "--rounds", "1", "--batches", "padded", "--backends", "fsdp1", "--weights", "fp32",
               "--workdir", str(tmp_path), "--json", str(out)]
    done = subprocess.run(command, cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["system"] for r in report["runs"]] == ["hf_trainer", "ft padded fsdp1 fp32"]
    hf = report["runs"][0]
    assert hf["steps"] == 2 and hf["tokens_per_s_per_device"] > 0 and hf["peak_rss_gib"] > 0
    assert all(loss == loss for loss in hf["losses"].values())  # finite losses, not NaN
    assert hf["ran"]["accelerate"] == report["environment"]["accelerate"]
    if not report["environment"]["gpu"]:
        assert "fsdp_config.sync_module_states" in hf["ran"]["dropped_args"]
    assert set(report["ratios_over_hf"]) == {"ft padded fsdp1 fp32"}
    assert "| ft padded fsdp1 fp32 |" in done.stdout.split("medians over 1 rounds")[0]


def test_backend_ratios_are_medians_of_rounds_per_optimizer():
    backends = load("backends")
    runs = []
    for round_, (one, two) in enumerate([(1.0, 1.1), (1.0, 1.3), (2.0, 1.8)], 1):
        for optim, scale in (("adafactor", 1.0), ("adamw", 2.0)):
            runs += [{"round": round_, "backend": "fsdp1", "optim": optim, "step_time_s": one, "optim_s": 0.1},
                     {"round": round_, "backend": "fsdp2", "optim": optim, "step_time_s": two * scale,
                      "optim_s": 0.2}]
    assert backends.ratios(runs, "adafactor") == {"step_time_s": pytest.approx(1.1), "optim_s": pytest.approx(2.0)}
    assert backends.ratios(runs, "adamw")["step_time_s"] == pytest.approx(2.2)


def test_shaped_config_keeps_layer_shapes():
    build_model = load("build_model")
    config = build_model.shaped_config(Path(__file__).resolve().parent.parent / "configs/qwen2_5_vl_3b/config.json",
                                       text_layers=2, vision_depth=10)
    text, vision = config.text_config, config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size, text.vocab_size) == (2, 2048, 11008, 151936)
    assert (vision.depth, vision.hidden_size, vision.fullatt_block_indexes) == (10, 1280, [7])
    assert config.tie_word_embeddings
    short = build_model.shaped_config(Path(__file__).resolve().parent.parent / "configs/qwen2_5_vl_3b/config.json",
                                      text_layers=None, vision_depth=4)
    assert short.text_config.num_hidden_layers == 36 and short.vision_config.fullatt_block_indexes == [3]


# slow: the benchmark starts a process per SP size (torchrun and 2 gloo ranks for SP=2)
@pytest.mark.slow
def test_sequence_parallel_benchmark_runs_tiny(capsys):
    """benchmarks/sequence.py end to end at tiny sizes (the 3B's widths, 1 decoder layer,
    1 vision block, a 2,048-row vocabulary, 256 tokens): both runs finish, the table
    prints, and splitting the row over 2 ranks lowers the activation peak per rank."""
    sequence = load("sequence")
    rows = sequence.main(["--sp", "1", "2", "--tokens", "256", "--video-tokens", "64", "--frame-side", "8",
                          "--labels", "32", "--text-layers", "1", "--vision-depth", "1", "--vocab", "2048"])
    out = capsys.readouterr().out
    assert "| SP | ranks | tokens per rank | live-tensor peak per rank GiB |" in out
    assert "190 text (the last 32 labelled) + 2 vision markers + 64 video tokens" in out
    one, two = rows
    assert (one["sp"], one["ranks"], one["tokens_per_rank"]) == (1, 1, 256)
    assert (two["sp"], two["ranks"], two["tokens_per_rank"]) == (2, 2, 128)
    assert 0 < two["activation_gib"] < one["activation_gib"]
    assert one["live_peak_gib"] == pytest.approx(one["baseline_gib"] + one["activation_gib"])
    assert f"| 2 | 2 | 128 | {two['live_peak_gib']:.2f} |" in out
