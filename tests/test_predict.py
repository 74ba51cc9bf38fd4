"""ft.predict: one line per row, in row order, the same predictions on 1 and 2 ranks, and
the same tokens as calling generate on the row's prompt."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from conftest import free_port
from ft.dataset import ConversationDataset
from ft.messages import parse
from ft.rows import load_rows
from ft.predict import build_batches, collate
from ft.processor import load_processor, saved_video_sampling

REPO = Path(__file__).resolve().parent.parent
EVAL = REPO / "data/demo/eval.jsonl"
NEW = 6

# ft.predict through its command line, on 1 rank and on 2 (torchrun): fresh processes, the
# slow tier.
pytestmark = pytest.mark.slow


def start(model_dir, out, nproc) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    args = [str(model_dir), str(EVAL), "--out", str(out), "--max-new-tokens", str(NEW), "--batch-size", "4"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "ft.predict", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "-m", "ft.predict", *args]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(out, proc: subprocess.Popen):
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, stderr[-4000:]
    return [json.loads(line) for line in out.read_text().splitlines()], stderr


@pytest.fixture(scope="module")
def predictions(tiny_model_dir, tmp_path_factory):
    """The 1-rank and the 2-rank run, started together (they share nothing)."""
    tmp = tmp_path_factory.mktemp("predict")
    one, two = (start(tiny_model_dir, tmp / name, nproc) for name, nproc in (("one.jsonl", 1), ("two.jsonl", 2)))
    return finish(tmp / "one.jsonl", one), finish(tmp / "two.jsonl", two)


def test_one_line_per_row_in_order_same_on_one_and_two_ranks(predictions):
    (one, log), (two, _) = predictions
    rows = [line for line in EVAL.read_text().splitlines() if line.strip()]
    assert [r["index"] for r in one] == list(range(len(rows)))
    assert [r["id"] for r in one] == [f"{EVAL}:{n}" for n in range(1, len(rows) + 1)]
    assert one == two
    assert all(r["prediction"] is not None and "error" not in r for r in one)
    source = load_rows(EVAL)
    for r in one:  # the reference is the row's last assistant turn
        last = [m for m in parse(source, r["index"]) if m["role"] == "assistant"][-1]
        assert r["reference"] == "".join(part["text"] for part in last["content"])
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in one)
    assert "tokens/s" in log


def test_predictions_are_what_generate_gives_for_the_row(predictions, tiny_model_dir):
    (one, _), _ = predictions
    processor = load_processor(tiny_model_dir)
    ds = ConversationDataset(load_rows(EVAL), processor, 1 << 30, saved_video_sampling(tiny_model_dir))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                               attn_implementation="sdpa").eval()
    pad = processor.tokenizer.pad_token_id
    lengths = [len(ds.prompt(i)[0]["input_ids"]) for i in range(len(ds))]
    # ft.predict batches by lengths counted without pixels: they must be these.
    assert [ds.prompt_length(i) for i in range(len(ds))] == lengths
    batch = build_batches(lengths, 4)[0]  # the longest prompts, as ft.predict batched them
    inputs = collate([ds.prompt(i)[0] for i in batch], pad)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=pad)
    for i, answer in zip(batch, out[:, inputs["input_ids"].shape[1]:]):
        assert one[i]["prediction"] == processor.tokenizer.decode(answer, skip_special_tokens=True), i


def test_a_bad_model_folder_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ft.predict", str(tmp_path), str(EVAL), "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no config.json" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
