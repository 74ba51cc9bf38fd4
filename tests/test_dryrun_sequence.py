"""The fit check with sequence parallelism (`--sequence-parallel N`,
parallel.sequence_parallel_size): per rank, the language model's per-token activations
on 1/N of the tokens, attention on all of them with 1/N of the (repeated) heads, the
all-to-alls' buffers; the refusals a run would make; the report. The 3B and 7B shapes
of configs/ on the meta device, no processes."""

import os
import re

import pytest

from ft.activations import _decoder_layer_bytes, estimate_activations
from ft.config import ConfigError
from ft.dryrun import build_on_meta, check_sequence, main as dry_run, sequence_sizes
from ft.fsdp_wrap import plan_units

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEVEN_B = os.path.join(REPO, "configs", "qwen2_5_vl_7b")
THREE_B = os.path.join(REPO, "configs", "qwen2_5_vl_3b")
TOKENS, BF16 = 8192, 2


@pytest.fixture(scope="module")
def seven_b():
    model = build_on_meta(SEVEN_B)
    return model, plan_units(model)


def _act(seven_b, size, tokens=TOKENS):
    """No vision patches: the recomputed layer is the decoder layer."""
    model, units = seven_b
    return estimate_activations(model.config, units, tokens, "bf16", vision_patches=0, sequence_parallel=size)


def test_the_decoder_part_halves_at_two(seven_b):
    one, two = _act(seven_b, 1), _act(seven_b, 2)
    text = seven_b[0].config.text_config
    assert (two.tokens, two.rank_tokens, two.sequence_parallel) == (TOKENS, TOKENS // 2, 2)
    assert two.decoder_inputs * 2 == one.decoder_inputs
    assert one.exchange == 0 and two.exchange == 4 * (TOKENS // 2) * text.hidden_size * BF16
    # 7B's 4 key/value heads split over 2 ranks as they are: the layer without the
    # all-to-all buffers is exactly half.
    assert two.recompute_of == one.recompute_of == "decoder layer"
    assert (two.recompute - two.exchange) * 2 == one.recompute
    # The whole-row embeddings stay (they are built before the cut); the rest halves.
    whole = TOKENS * text.hidden_size * 2 * BF16
    assert (two.other - whole) * 2 == one.other - whole
    # The decoder part as a whole: half, plus the all-to-alls' 4 x tokens/N x hidden.
    decoder = [a.decoder_inputs + a.recompute for a in (one, two)]
    assert 0.5 < decoder[1] / decoder[0] < 0.55
    # The grad buffers are the plan's, not the tokens'.
    assert two.grad_buffers == one.grad_buffers


def test_attention_runs_on_the_whole_row_with_a_share_of_the_heads():
    """3B: 16 query and 2 key/value heads; at N 4 the key/value heads are repeated 2x, so
    a rank attends with 4 query and 1 key/value head over the whole row."""
    text = build_on_meta(THREE_B).config.text_config
    h, d, inner = text.hidden_size, text.hidden_size // text.num_attention_heads, text.intermediate_size
    assert (text.num_attention_heads, text.num_key_value_heads, d) == (16, 2, 128)
    rank = TOKENS // 4
    # This rank's tokens, all heads: normed input, q and k projections; the MLP.
    local = rank * (h + 16 * d + 2 * d + h + 6 * inner) * BF16
    # The kernel's rotated q, rotated k, v and output: all tokens, 4 query and 1 key/value head.
    kernel = TOKENS * (2 * 4 + 2 * 1) * d * BF16
    assert _decoder_layer_bytes(text, rank, BF16, size=4, repeat=2) == local + kernel
    # Without the repeat 2 key/value heads would not split over 4 ranks; 1/2 a head each.
    assert _decoder_layer_bytes(text, rank, BF16, size=4, repeat=1) == local + TOKENS * (2 * 4 + 1) * d * BF16


def test_sizes_the_heads_and_world_size_allow(seven_b):
    config = seven_b[0].config
    assert sequence_sizes(config, 8) == [1, 2, 4]  # 8 does not divide 28 query heads
    assert sequence_sizes(config, 14) == [1, 2, 7, 14]
    assert sequence_sizes(build_on_meta(os.path.join(REPO, "configs", "qwen2_5_vl_72b")).config, 8) == [1, 2, 4, 8]
    with pytest.raises(ConfigError, match="model.attn_implementation"):
        check_sequence(config, 2, 8, "eager")


@pytest.mark.parametrize("size, message", [
    ("3", "parallel.sequence_parallel_size=3 does not divide the world size 8"),
    ("8", "does not divide the 28 query heads of Qwen2.5-VL"),
    ("0", "parallel.sequence_parallel_size: 0 must be >= 1"),
])
def test_refusals_are_one_line_and_exit_2(size, message, capsys):
    with pytest.raises(SystemExit) as e:
        dry_run([SEVEN_B, "--world-size", "8", "--sequence-parallel", size])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def _activations_gib(out: str) -> float:
    number, unit = re.search(r"^  activations\s+(\S+) (\S+)", out, re.M).groups()
    return float(number) * {"MiB": 1 / 1024, "GiB": 1.0}[unit]


def test_the_flag_end_to_end(capsys):
    dry_run([SEVEN_B, "--world-size", "8", "--tokens", str(TOKENS)])
    off = capsys.readouterr().out
    assert "Sequence parallelism: off (parallel.sequence_parallel_size 1); --sequence-parallel N takes one of " \
           "[1, 2, 4] at world size 8" in off
    dry_run([SEVEN_B, "--world-size", "8", "--tokens", str(TOKENS), "--sequence-parallel", "4"])
    on = capsys.readouterr().out
    assert f"{TOKENS} tokens (2048 per rank in the language model, sequence parallel 4)" in on
    assert f"{4 * TOKENS} vision patches ({TOKENS} per rank) (assumed: every token an image token" in on
    assert (f"Sequence parallelism: groups of 4 ranks share each micro-batch (2 groups): 2048 of its {TOKENS} "
            f"tokens per rank in the language model; attention on all {TOKENS} with 7 query and 1 key/value heads "
            f"per rank; the vision tower on {TOKENS} of the {4 * TOKENS} patches per rank") in on
    assert _activations_gib(on) < _activations_gib(off)
    # The parameter, gradient and optimizer rows do not change with N.
    for row in ("parameters", "gradients", "optimizer"):
        assert re.search(rf"^  {row} .*$", on, re.M).group(0) == re.search(rf"^  {row} .*$", off, re.M).group(0)
    assert on.strip().splitlines()[-1].startswith("Fit check (80 GiB per GPU): fits:")
    # Few patches: the recomputed layer is the decoder layer, its all-to-all buffers in it.
    dry_run([SEVEN_B, "--world-size", "8", "--tokens", str(TOKENS), "--vision-patches", "1000",
             "--sequence-parallel", "4"])
    assert "the larger of one decoder layer recomputed" in (out := capsys.readouterr().out)
    assert re.search(r"all-to-all buffers \S+ MiB included", out)


def test_repeated_key_value_heads_are_reported(capsys):
    dry_run([THREE_B, "--world-size", "8", "--tokens", "4096", "--sequence-parallel", "4"])
    assert "4 query and 1 key/value heads per rank (key/value heads repeated 2x)" in capsys.readouterr().out


def test_run_config_sets_n_and_the_flag_wins(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  path: {SEVEN_B}\nparallel:\n  sequence_parallel_size: 2\n")
    dry_run([str(path), "--world-size", "8", "--tokens", "4096"])
    assert "groups of 2 ranks" in capsys.readouterr().out
    dry_run([str(path), "--world-size", "8", "--tokens", "4096", "--sequence-parallel", "4"])
    assert "groups of 4 ranks" in capsys.readouterr().out


def test_a_larger_group_is_suggested_when_activations_do_not_fit(capsys):
    """300,000 tokens of text on the 7B, the vision tower frozen: the language model's
    activations do not fit one rank at N 1 or 2, they do at 4."""
    args = [SEVEN_B, "--world-size", "8", "--tokens", "300000", "--vision-patches", "0", "--freeze-vision-tower"]
    dry_run(args)
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert "does NOT fit" in verdict and "parallel.sequence_parallel_size=4 (--sequence-parallel 4)" in verdict
    dry_run([*args, "--sequence-parallel", "4"])
    assert "fits:" in capsys.readouterr().out.strip().splitlines()[-1]
