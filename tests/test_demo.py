"""The demo learns to see: its data, its scoring, and (slow) the demo run and its control.

The slow tests run `configs/demo.yaml` through launch.sh on 2 ranks, then `ft.predict` on
the export and `ft.score` on the predictions, exactly as `make demo` does: once on the
bundled shapes set, once on its control (every picture the same grey, every clip's
frames shuffled), both starting from the same tiny model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import free_port
from ft.rows import load_rows
from ft.score import examples, normalise, render, score
from ft.score import main as score_main

REPO = Path(__file__).resolve().parent.parent
SHAPES = REPO / "data" / "demo" / "shapes"


def make_shapes():
    spec = importlib.util.spec_from_file_location("make_shapes", REPO / "data" / "demo" / "make_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pixels(path: Path) -> bytes:
    return Image.open(path).convert("RGB").tobytes()


def media(row: dict) -> list[str]:
    part = row["messages"][0]["content"][0]
    return part["video"] if part["type"] == "video" else [part["image"]]


def test_bundled_shapes_are_what_the_script_makes(tmp_path):
    """The committed set is the script's output: same rows, same pixels."""
    made = make_shapes().make(tmp_path / "shapes")
    for split, rows in made.items():
        assert rows_of(SHAPES / f"{split}.jsonl") == rows
        for row in rows:
            for name in media(row):
                assert pixels(SHAPES / name) == pixels(tmp_path / "shapes" / name), name


def test_every_answer_of_a_kind_is_equally_common(tmp_path):
    ms = make_shapes()
    for split, rows in ms.make(tmp_path / "s").items():
        for kind, answers in ms.ANSWERS.items():
            got = [r["messages"][1]["content"] for r in rows if r["kind"] == kind]
            assert {a: got.count(a) for a in answers} == {a: len(got) // len(answers) for a in answers}, (split, kind)
    # New pictures and clips in the eval split: none is a training one, pixel for pixel.
    def items(split):
        return {tuple(pixels(tmp_path / "s" / n) for n in media(r)) for r in rows_of(tmp_path / "s" / f"{split}.jsonl")}

    assert not items("train") & items("eval")


def test_a_clip_moving_left_is_one_moving_right_played_backwards(tmp_path):
    """Only the order of a clip's frames tells its way."""
    ms = make_shapes()
    ms.make(tmp_path / "s")
    for row in rows_of(tmp_path / "s" / "train.jsonl"):
        if row["kind"] == "motion":
            frames = [Image.open(tmp_path / "s" / n).convert("L") for n in media(row)]
            centres = [sum(x for x in range(f.width) if f.crop((x, 0, x + 1, f.height)).getextrema()[1] > 200)
                       for f in frames]
            moving_right = centres == sorted(centres)
            assert moving_right != (centres == sorted(centres, reverse=True))
            assert (row["messages"][1]["content"] == "right") == moving_right


def test_control_takes_the_pixels_and_the_order_out(tmp_path):
    ms = make_shapes()
    real, control = ms.make(tmp_path / "real"), ms.make(tmp_path / "control", control=True)
    assert [r["messages"] for r in real["eval"]] == [r["messages"] for r in control["eval"]]
    shuffled = 0
    for row in control["train"]:
        if row["kind"] == "motion":
            got = [pixels(tmp_path / "control" / n) for n in media(row)]
            want = [pixels(tmp_path / "real" / n) for n in media(row)]
            assert sorted(got) == sorted(want)  # the same frames
            shuffled += got != want
        else:
            assert pixels(tmp_path / "control" / media(row)[0]) == bytes(ms.GREY) * ms.SIZE ** 2
    assert shuffled > 0.6 * sum(r["kind"] == "motion" for r in control["train"])


def test_score_counts_per_kind_against_chance(tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"kind": "colour", "messages": [{"role": "user", "content": "Colour?"},
                                            {"role": "assistant", "content": c}]} for c in ("red", "blue", "red", "green")]
    rows.append({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yes."}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = [" Red.", "red", "blue", "green", "yes"]
    preds = [{"index": i, "id": f"d:{i + 1}", "reference": r["messages"][1]["content"], "prediction": a}
             for i, (r, a) in enumerate(zip(rows, answers))]
    result = score(preds, load_rows(data), "kind")
    assert result["groups"] == {
        "all": {"rows": 1, "right": 1, "accuracy": 1.0, "chance": 1.0},
        "colour": {"rows": 4, "right": 2, "accuracy": 0.5, "chance": pytest.approx(1 / 3)},
    }
    assert normalise(" Red.") == "red"
    assert [r["group"] for r in examples(result["rows"], 3)] == ["colour", "all", "colour"]
    table = render(result, "kind", 2)
    assert "colour      4       50%     33%" in table and "Colour?" in table


def test_score_refuses_predictions_of_another_file(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Q"},
                                             {"role": "assistant", "content": "A"}]}) + "\n")
    preds = tmp_path / "p.jsonl"
    preds.write_text("")
    assert score_main([str(preds), str(data)]) == 2
    assert "0 predictions for the 1 rows" in capsys.readouterr().err


# ----------------------------------------------------------------------------- slow


def demo(tmp: Path, model_dir: str, data: Path, *overrides: str) -> dict:
    """`make demo`'s three commands on `data` (the run's config `overrides` after the
    demo's); the per-kind figures of ft.score."""
    out = tmp / "run"
    env = {**os.environ, "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port()), "PYTHON": sys.executable,
           "WANDB_MODE": "disabled"}
    steps = [
        [str(REPO / "launch.sh"), str(REPO / "configs/demo.yaml"), f"model.path={model_dir}",
         "model.build_tiny_if_missing=false", f"data.train_file={data / 'train.jsonl'}",
         f"data.eval_file={data / 'eval.jsonl'}", f"train.output_dir={out}", *overrides],
        [sys.executable, "-m", "ft.predict", str(out / "best"), str(data / "eval.jsonl"),
         "--out", str(tmp / "predictions.jsonl"), "--max-new-tokens", "4"],
        [sys.executable, "-m", "ft.score", str(tmp / "predictions.jsonl"), str(data / "eval.jsonl"),
         "--json", str(tmp / "score.json")],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert done.returncode == 0, f"{cmd[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    print(done.stdout)
    return json.loads((tmp / "score.json").read_text())


# Each family's tiny model with the real vocabulary, as the demo builds it, and the demo's
# run: Qwen2.5-VL (the demo's default); Qwen3-VL, whose DeepStack and timestamps must
# carry what the answers need; Qwen3-VL-MoE, with its load-balancing loss, trained 450
# steps ("which way does the ball move" was at 90 % after 300, 100 % after 450); Qwen2-VL,
# trained twice as long. Its vision tower has no windowed attention (Qwen2.5-VL) and no
# learned positions (Qwen3-VL), only relative rotary ones, so where the ball is reaches
# it through the language model's M-RoPE alone: "top or bottom" was at 60 % after the
# demo's 300 steps, at 100 % after 600.
DEMO_FAMILIES = {"qwen2_5_vl": (), "qwen3_vl": (), "qwen2_vl": ("train.max_steps=600", "train.save_steps=600"),
                 "qwen3_vl_moe": ("train.max_steps=450", "train.save_steps=450")}


@pytest.mark.slow
@pytest.mark.parametrize("family", DEMO_FAMILIES)
def test_demo_answers_held_out_questions(family, tiny_family_dir, tmp_path):
    groups = demo(tmp_path, tiny_family_dir(family, "real"), SHAPES, *DEMO_FAMILIES[family])
    assert set(groups) == {"colour", "position", "motion"}
    for kind, g in groups.items():
        assert g["accuracy"] >= 0.9, (kind, groups)


@pytest.mark.slow
def test_demo_learns_with_sequence_parallelism(tiny_family_dir, tmp_path):
    """The demo with its 2 ranks in one sequence-parallel group, each running the language
    model on half of every row's tokens; 8 rows per micro-batch keep the demo's global
    batch (and so its data order). The same bar as without the split."""
    groups = demo(tmp_path, tiny_family_dir("qwen2_5_vl", "real"), SHAPES, "parallel.sequence_parallel_size=2",
                  "train.per_device_train_batch_size=8")
    assert set(groups) == {"colour", "position", "motion"}
    for kind, g in groups.items():
        assert g["accuracy"] >= 0.9, (kind, groups)


@pytest.mark.slow
@pytest.mark.parametrize("family", DEMO_FAMILIES)
def test_control_stays_at_chance(family, tiny_family_dir, tmp_path):
    make_shapes().make(tmp_path / "control", control=True)
    groups = demo(tmp_path, tiny_family_dir(family, "real"), tmp_path / "control", *DEMO_FAMILIES[family])
    assert set(groups) == {"colour", "position", "motion"}
    for kind, g in groups.items():
        assert abs(g["accuracy"] - g["chance"]) <= 0.1, (kind, groups)
