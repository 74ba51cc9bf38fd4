"""End to end through ./launch.sh on the tiny model, checked against a hand-written
single-process reference.

The reference is deliberately not ft code: a plain (unwrapped) HF model, HF's own
token-mean loss over the whole global batch collated into one batch, torch AdamW, HF's
constant_with_warmup schedule and torch's clip_grad_norm_. Four ft runs with the same
global batch of 2 — (2 ranks x batch 1) on FSDP1 and on FSDP2, (1 rank x batch 1 x 2
accumulation steps), (1 rank x batch 2) — must each reproduce its per-step losses,
gradient norms and final weights (and the two backends each other's). That proves sharded == unsharded and that the loss is token-weighted over the
whole optimizer step, whatever the split.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DistributedSampler
from transformers import Qwen2_5_VLForConditionalGeneration, get_constant_schedule_with_warmup
from transformers.optimization import Adafactor

from ft.config import DataConfig
from ft.collate import Collator
from ft.dataset import ConversationDataset
from ft.families import read_family
from ft.rows import load_rows
from ft.processor import load_processor
from conftest import as_dataset, free_port, write_test_image, write_test_video

REPO = Path(__file__).resolve().parent.parent
RUN_NUMBERS = iter(range(1 << 30))  # run-0, run-1, ...: unique names, also for runs started together
STEPS, LR, WARMUP, CLIP, SEED, MAX_LEN = 3, 2e-3, 0.34, 0.5, 7, 512

# Every test here runs the real ./launch.sh (torchrun, 1-2 gloo ranks) or reads such a run:
# the slow tier.
pytestmark = pytest.mark.slow


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def image_row(img: str, question: str, answer: str) -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": answer},
    ]}


def text_row(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Rows of very different label lengths (token weighting matters), images of three
    sizes, videos (a file at 4 fps, a file with an image, a list of frames) and
    text-only rows, placed so that on 2 ranks rank 0 always has an image and rank 1
    has, by step, text only (step 1: the dummy image and the dummy video), a video
    (step 2: rank 0 gets the dummy video, rank 1 the dummy image) and an image with a
    video. Without the collator's dummies the 2-rank run aborts at step 1."""
    d = tmp_path_factory.mktemp("data")
    for name, size, seed in (("a.png", (56, 56), 1), ("b.png", (84, 56), 2), ("c.png", (112, 84), 3)):
        write_test_image(d / name, size=size, seed=seed)
    write_test_video(d / "clip.mp4", frames=10, size=(64, 48), fps=4, seed=4)
    (d / "frames").mkdir()
    for k in range(4):
        write_test_image(d / "frames" / f"{k}.png", size=(56, 42), seed=10 + k)
    frames_row = {"messages": [
        {"role": "user", "content": [{"type": "video", "video": [f"frames/{k}.png" for k in range(4)]},
                                     {"type": "text", "text": "What changes?"}]},
        {"role": "assistant", "content": "The noise moves a little from frame to frame."}]}
    image_rows = [
        image_row("a.png", "What is this?", "A picture."),
        image_row("b.png", "Describe the image in detail.",
                  "A smooth gradient of colours runs from left to right, with fine noise over it, "
                  "and a brighter band near the bottom edge of the frame."),
        image_row("c.png", "Which colour dominates?", "Mostly green, fading into blue at the top."),
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nCaption it."},
                                             {"from": "gpt", "value": "Noise on a gradient."}]},
    ]
    text_rows = [
        text_row("Say hi.", "Hi."),
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"},
                                                   {"type": "text", "text": "Count the frames."}]},
                      {"role": "assistant", "content": "One, two, three, four, five, six, seven, eight, nine, ten."}]},
        {"image": "c.png", "video": "clip.mp4",
         "conversations": [{"from": "human", "value": "<image>\n<video>\nIs the picture in the clip?"},
                           {"from": "gpt", "value": "No: the clip only gets brighter."}]},
        text_row("Name a colour.", "Blue."),
    ]
    # Order the file so that DistributedSampler's shuffled order starts image, text.
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(SEED)).tolist()
    rows: list = [None] * 8
    for k, idx in enumerate(perm):
        rows[idx] = (image_rows if k % 2 == 0 else text_rows)[k // 2]
    write_rows(d / "train.jsonl", rows)
    write_rows(d / "eval.jsonl", [image_rows[1], text_rows[1], image_rows[2], frames_row])
    write_rows(d / "eval_one_row.jsonl", [image_rows[2]])
    return d


def launch(tmp: Path, model_dir: str, data: Path, nproc: int, *overrides: str) -> Path:
    return finish(*start(tmp, model_dir, data, nproc, *overrides))


def start(tmp: Path, model_dir: str, data: Path, nproc: int, *overrides: str) -> tuple[Path, subprocess.Popen]:
    """Start a run and return (its output folder, the launch.sh process); `finish` waits."""
    out = tmp / f"run-{next(RUN_NUMBERS)}"
    env = {
        **os.environ,
        "NPROC_PER_NODE": str(nproc),
        "MASTER_PORT": str(free_port()),
        "PYTHON": sys.executable,
        "WANDB_MODE": "disabled",
    }
    cmd = [
        str(REPO / "launch.sh"), str(REPO / "configs/demo.yaml"),
        f"model.path={model_dir}", "model.build_tiny_if_missing=false",
        f"data.train_file={data / 'train.jsonl'}", f"data.eval_file={data / 'eval.jsonl'}",
        f"data.max_length={MAX_LEN}",
        f"train.output_dir={out}", f"train.max_steps={STEPS}", f"train.learning_rate={LR}",
        f"train.warmup_ratio={WARMUP}", f"train.max_grad_norm={CLIP}", f"train.seed={SEED}",
        "train.optim=adamw", "train.precision=fp32", "train.logging_steps=1",
        "train.eval_steps=0", f"train.save_steps={STEPS}",
        # The settings these tests were written for, whatever the demo's own are now.
        "train.per_device_train_batch_size=2", "fsdp.activation_checkpointing=true", *overrides,
    ]
    return out, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(out: Path, proc: subprocess.Popen) -> Path:
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, f"launch.sh failed:\n{stdout[-4000:]}\n{stderr[-6000:]}"
    return out


def reference(model_dir: str, data: Path, freeze_vision_tower: bool = False, optim: str = "adamw",
              aux_coef: float = 0.0, auxes: list | None = None):
    """`optim`: torch's AdamW, or HF's Adafactor as the Trainer recipe builds it
    (`optim="adafactor"`: scale_parameter, relative_step and warmup_init off).

    An MoE model with `aux_coef` > 0 adds that times transformers' load-balancing loss
    of the whole step's batch, its sample tokens only (the collator's dummies are not
    samples), and appends each step's to `auxes`; the returned losses stay the
    language model's."""
    torch.manual_seed(SEED)
    family = read_family(model_dir)
    model = family.model_class().from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    if aux_coef:
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import load_balancing_loss_func

        model.config.text_config.router_aux_loss_coef = 0.0  # the model's own term: added below instead
        moe = family.moe_shape(model.config.text_config)
    if freeze_vision_tower:  # the tower, not the merger (its projector into the LLM)
        model.model.visual.requires_grad_(False)
        model.model.visual.merger.requires_grad_(True)
    # The run's defaults for video frames (the tiny model's saved bounds are the image ones).
    defaults = DataConfig()
    processor = load_processor(model_dir, video_min_pixels=defaults.video_min_pixels,
                               video_max_pixels=defaults.video_max_pixels)
    ds = ConversationDataset(load_rows(data / "train.jsonl"), processor, MAX_LEN)
    collate = Collator(processor)
    order = list(DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=SEED, drop_last=True))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optim == "adafactor":
        opt = Adafactor(trainable, lr=LR, scale_parameter=False, relative_step=False, warmup_init=False)
    else:
        opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_constant_schedule_with_warmup(opt, int(-(-STEPS * WARMUP // 1)))
    losses, norms = [], []
    for step in range(STEPS):
        collated = collate([ds[i] for i in order[2 * step: 2 * step + 2]])
        batch = collated.inputs
        out = model(**batch, output_router_logits=True) if aux_coef else model(**batch)
        loss = out.loss  # HF's mean over every label token of the global batch
        if aux_coef:
            aux = load_balancing_loss_func(out.router_logits, moe.experts, moe.top_k, collated.real)
            auxes.append(aux.item())
            (loss + aux_coef * aux).backward()
        else:
            loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(trainable, CLIP).item())
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    # Token-weighted eval loss and token accuracy of the final weights over the whole
    # eval set, by hand: argmax of the logits at t against the label at t+1.
    model.eval()
    eval_ds = ConversationDataset(load_rows(data / "eval.jsonl"), processor, MAX_LEN)
    with torch.no_grad():
        batch = collate(list(eval_ds)).inputs
        out = model(**batch)
        targets = batch["labels"][:, 1:]
        learned = targets != -100
        accuracy = ((out.logits[:, :-1].argmax(-1) == targets) & learned).sum().item() / learned.sum().item()
    return losses, norms, (out.loss.item(), accuracy), {k: v.detach() for k, v in model.state_dict().items()}


def read_metrics(out: Path):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


@pytest.fixture(scope="module")
def ref(tiny_model_dir, dataset):
    """The single-process reference on the JSONL rows."""
    return reference(tiny_model_dir, dataset)


def test_sharded_equals_unsharded_and_token_weighting(tiny_model_dir, dataset, ref, tmp_path):
    ref_losses, ref_norms, ref_eval, ref_weights = ref
    assert ref_eval[1] > 0  # some eval tokens are right: the accuracy comparison means something
    # The two one-process runs go at once (a core each); the 2-rank runs one at a time.
    one_rank = {
        "1 rank x batch 1 x 2 accumulation": start(
            tmp_path, tiny_model_dir, dataset, 1, "train.per_device_train_batch_size=1",
            "train.gradient_accumulation_steps=2", "fsdp.activation_checkpointing=false"),
        "1 rank x batch 2": start(
            tmp_path, tiny_model_dir, dataset, 1, "train.per_device_train_batch_size=2",
            "fsdp.activation_checkpointing=false"),
    }
    runs = {name: finish(*run) for name, run in one_rank.items()}
    runs |= {
        "2 ranks x batch 1 (activation checkpointing)": launch(
            tmp_path, tiny_model_dir, dataset, 2, "train.per_device_train_batch_size=1",
            "fsdp.activation_checkpointing=true"),
        "fsdp2, 2 ranks x batch 1 (activation checkpointing)": launch(
            tmp_path, tiny_model_dir, dataset, 2, "train.per_device_train_batch_size=1",
            "fsdp.activation_checkpointing=true", "fsdp.backend=fsdp2"),
    }
    for name, out in runs.items():
        train, evals = read_metrics(out)
        assert [r["step"] for r in train] == [1, 2, 3], name
        assert [r["loss"] for r in train] == pytest.approx(ref_losses, abs=1e-5), name
        assert [r["grad_norm"] for r in train] == pytest.approx(ref_norms, rel=1e-4), name
        assert [e["step"] for e in evals] == [STEPS], name  # eval_steps=0: one eval, at the end
        assert evals[0]["eval_loss"] == pytest.approx(ref_eval[0], abs=1e-5), name
        assert evals[0]["eval_token_accuracy"] == pytest.approx(ref_eval[1], abs=1e-9), name
        exported = load_file(str(out / "best" / "model.safetensors"))
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "best", dtype=torch.float32)
        got = model.state_dict()
        assert set(got) == set(ref_weights), name
        worst = max((got[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
        assert worst <= 1e-5, f"{name}: weights differ from the reference by {worst:.2e}"
        assert exported, name
    # FSDP2 and FSDP1 on the same 2-rank run: the same losses and the same best/ export.
    fsdp1, fsdp2 = (runs[f"{b}2 ranks x batch 1 (activation checkpointing)"] for b in ("", "fsdp2, "))
    assert [r["loss"] for r in read_metrics(fsdp2)[0]] == pytest.approx(
        [r["loss"] for r in read_metrics(fsdp1)[0]], abs=1e-6)
    one, two = (load_file(str(out / "best" / "model.safetensors")) for out in (fsdp1, fsdp2))
    assert set(one) == set(two) and max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-6
    # The weights moved at all (otherwise equality above would be vacuous).
    initial = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).state_dict()
    assert max((initial[k] - ref_weights[k]).abs().max().item() for k in ref_weights) > 1e-3


def test_hf_datasets_train_like_jsonl(tiny_model_dir, dataset, ref, tmp_path):
    """The training rows as a save_to_disk folder (TRL format, images embedded) and the
    eval rows as Parquet: 2 ranks give the reference's per-step losses, gradient norms
    and final weights, computed on the JSONL rows."""
    ref_losses, ref_norms, _, ref_weights = ref
    as_dataset(dataset / "train.jsonl").save_to_disk(str(tmp_path / "train-ds"))
    out = launch(tmp_path, tiny_model_dir, dataset, 2, "train.per_device_train_batch_size=1",
                 f"data.train_file={tmp_path / 'train-ds'}", f"data.eval_file={_parquet(dataset, tmp_path)}")
    train, evals = read_metrics(out)
    assert [r["loss"] for r in train] == pytest.approx(ref_losses, abs=1e-5)
    assert [r["grad_norm"] for r in train] == pytest.approx(ref_norms, rel=1e-4)
    assert len(evals) == 1 and evals[0]["eval_loss"] > 0
    got = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "best", dtype=torch.float32).state_dict()
    assert max((got[k] - ref_weights[k]).abs().max().item() for k in ref_weights) <= 1e-5


def _parquet(dataset: Path, tmp_path: Path) -> Path:
    """The first three eval rows (the fourth's list of frames does not fit the schema)."""
    rows = (dataset / "eval.jsonl").read_text().splitlines()[:3]
    (dataset / "eval3.jsonl").write_text("\n".join(rows) + "\n")
    path = tmp_path / "eval.parquet"
    as_dataset(dataset / "eval3.jsonl").to_parquet(str(path))
    return path


def test_sharded_equals_unsharded_with_frozen_vision_tower(tiny_model_dir, dataset, tmp_path):
    """Freezing keeps the equivalence: 2 FSDP ranks with the vision tower frozen match a
    single-process reference that freezes the same parameters (rank 1's step-1 batch has
    no image, so the frozen tower also runs on the dummy image there)."""
    ref_losses, ref_norms, _, ref_weights = reference(tiny_model_dir, dataset, freeze_vision_tower=True)
    out = launch(tmp_path, tiny_model_dir, dataset, 2, "train.per_device_train_batch_size=1",
                 "model.freeze_vision_tower=true")
    train, _ = read_metrics(out)
    assert [r["loss"] for r in train] == pytest.approx(ref_losses, abs=1e-5)
    assert [r["grad_norm"] for r in train] == pytest.approx(ref_norms, rel=1e-4)
    got = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "best", dtype=torch.float32).state_dict()
    initial = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).state_dict()
    for k in ref_weights:
        assert (got[k] - ref_weights[k]).abs().max().item() <= 1e-5, k
        frozen = k.startswith("model.visual.") and not k.startswith("model.visual.merger.")
        assert torch.equal(got[k], initial[k]) == frozen, k  # frozen: bit-identical; others moved


@pytest.fixture(scope="module")
def demo_run(tiny_model_dir, dataset, tmp_path_factory):
    """The real entry point with the demo config's defaults (Adafactor, FSDP, activation
    checkpointing), 4 steps with evals and saves every 2."""
    # One eval row on two ranks: rank 1 has none of its own and must still run the forward.
    return launch(tmp_path_factory.mktemp("demo"), tiny_model_dir, dataset, 2, "train.optim=adafactor",
                  "train.eval_steps=2", "train.save_steps=2", "train.max_steps=4",
                  f"data.eval_file={dataset / 'eval_one_row.jsonl'}")


def test_launch_demo_config_end_to_end(demo_run):
    out = demo_run
    train, evals = read_metrics(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert set(r) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device",
                          "step_time_s", "data_s", "fwd_bwd_s", "optim_s", "peak_rss_gib"}
        assert "mfu" not in r  # no peak FLOP/s on CPU: not shown rather than wrong
        assert r["tokens_per_s"] == pytest.approx(2 * r["tokens_per_s_per_device"])
        assert r["step_time_s"] == pytest.approx(r["data_s"] + r["fwd_bwd_s"] + r["optim_s"])
        assert r["peak_rss_gib"] > 0.1
    assert [e["step"] for e in evals] == [2, 4]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (summary,) = [r for r in rows if r.get("summary")]
    assert summary["step"] == 4 and summary["warmup_steps"] == 2
    # Averages over steps 3 and 4 only (the first two are warm-up).
    assert summary["avg_step_time_s"] == pytest.approx(sum(r["step_time_s"] for r in train[2:]) / 2)
    assert summary["avg_tokens_per_s_per_device"] > 0 and summary["peak_rss_gib"] > 0.1
    best = min(evals, key=lambda e: e["eval_loss"])
    info = json.loads((out / "best" / "ft_export.json").read_text())
    assert info == {"step": best["step"], "eval_loss": pytest.approx(best["eval_loss"]),
                    "eval_token_accuracy": pytest.approx(best["eval_token_accuracy"])}
    assert (out / "config.yaml").is_file()
    for step in (2, 4):
        ck = out / "checkpoints" / f"step-{step}"
        assert (ck / ".metadata").is_file()
        assert json.loads((ck / "train_state.json").read_text())["train_state"]["step"] == step
    # The export loads with the standard HF classes.
    from transformers import AutoTokenizer

    Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "best")
    tok = AutoTokenizer.from_pretrained(out / "best")
    assert tok.convert_tokens_to_ids("<|image_pad|>") == json.loads(
        (out / "best" / "config.json").read_text())["image_token_id"]
    load_processor(out / "best")
    assert json.loads((out / "best" / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"


def test_export_loads_with_auto_processor(demo_run, dataset):
    """Real tooling loads exports with AutoProcessor: the official processor, with its
    image and video processors."""
    from transformers import AutoProcessor

    dataset_dir = dataset

    processor = AutoProcessor.from_pretrained(demo_run / "best")
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert type(processor.video_processor).__name__ == "Qwen2VLVideoProcessor"
    # It processes an image and a video as inference will, and the model runs on them.
    image = Image.open(next(dataset_dir.glob("*.png"))).convert("RGB")
    frames = torch.stack([torch.from_numpy(numpy.array(image.resize((56, 56))))] * 4).permute(0, 3, 1, 2)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Same?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], videos=[frames], return_tensors="pt",
                       videos_kwargs={"do_sample_frames": False})
    # The export carries the run's frame bounds: 56x56 frames upscaled to 112x112
    # (data.video_min_pixels 12544), 4 frames in 2 temporal patches.
    assert processor.video_processor.size["shortest_edge"] == DataConfig().video_min_pixels
    assert inputs["video_grid_thw"].tolist() == [[2, 8, 8]] and len(inputs["second_per_grid_ts"]) == 1
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(demo_run / "best")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


# A typo in a key: refused in one line, exit 2, before torchrun starts, by
# tests/test_resume.py::test_config_typo_fails_fast_and_once (through launch.sh); the
# `python -m ft.loop` refusal path (exit 2, one line, no traceback) by
# tests/test_launch.py::test_model_path_typo_is_refused_and_creates_nothing.


def test_best_export_follows_token_accuracy_when_asked(tiny_model_dir, dataset, tmp_path):
    """metric_for_best=eval_token_accuracy exports the step with the highest accuracy
    (the first of equals), whatever the loss says."""
    out = launch(tmp_path, tiny_model_dir, dataset, 2, "train.per_device_train_batch_size=1",
                 "train.max_steps=8", "train.eval_steps=1", "train.save_steps=0", "train.learning_rate=5e-3",
                 "train.metric_for_best=eval_token_accuracy")
    _, evals = read_metrics(out)
    accuracy = [e["eval_token_accuracy"] for e in evals]
    assert len(set(accuracy)) > 1, accuracy  # it moved, so the choice means something
    best = max(evals, key=lambda e: e["eval_token_accuracy"])
    info = json.loads((out / "best" / "ft_export.json").read_text())
    assert info["step"] == best["step"] and info["eval_token_accuracy"] == pytest.approx(max(accuracy))
    # Here the loss keeps falling after the accuracy peaks (measured: best accuracy at
    # step 2, lowest loss at step 8), so the two metrics pick different models.
    assert info["step"] != min(evals, key=lambda e: e["eval_loss"])["step"]


def _assert_matches_reference(out: Path, ref, name: str) -> None:
    """Per-step losses (1e-5), gradient norms, the final eval and weights (1e-5) of a run
    with the reference's global batch of 2."""
    ref_losses, ref_norms, ref_eval, ref_weights = ref
    train, evals = read_metrics(out)
    assert [r["loss"] for r in train] == pytest.approx(ref_losses, abs=1e-5), name
    assert [r["grad_norm"] for r in train] == pytest.approx(ref_norms, rel=1e-4), name
    assert evals[-1]["eval_loss"] == pytest.approx(ref_eval[0], abs=1e-5), name
    assert evals[-1]["eval_token_accuracy"] == pytest.approx(ref_eval[1], abs=1e-9), name
    got = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "best", dtype=torch.float32).state_dict()
    worst = max((got[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
    assert worst <= 1e-5, f"{name}: weights differ from the reference by {worst:.2e}"


def test_sequence_parallel_equals_unsharded(tiny_model_dir, dataset, ref, tmp_path):
    """parallel.sequence_parallel_size=2: the 2 ranks of a group share each micro-batch of
    2 rows (video, images, text-only; with the dummies), each with half of every row's
    tokens in the language model; on 4 ranks, 2 groups of 2 take one row each. Both
    reproduce the one-process reference (as the 2-rank run without sequence parallelism
    does above), on fsdp1 and fsdp2, and count every token once."""
    runs = {
        "2 ranks, one group, batch 2": launch(tmp_path, tiny_model_dir, dataset, 2,
                                              "parallel.sequence_parallel_size=2"),
        "fsdp2, 2 ranks, one group, batch 2": launch(tmp_path, tiny_model_dir, dataset, 2,
                                                     "parallel.sequence_parallel_size=2", "fsdp.backend=fsdp2"),
        "4 ranks, 2 groups, batch 1": launch(tmp_path, tiny_model_dir, dataset, 4,
                                             "parallel.sequence_parallel_size=2",
                                             "train.per_device_train_batch_size=1"),
    }
    for name, out in runs.items():
        _assert_matches_reference(out, ref, name)
    plain = launch(tmp_path, tiny_model_dir, dataset, 2, "train.per_device_train_batch_size=1")
    assert [r["loss"] for r in read_metrics(runs["4 ranks, 2 groups, batch 1"])[0]] == pytest.approx(
        [r["loss"] for r in read_metrics(plain)[0]], abs=1e-5)  # and directly: 2 groups of 2 == 2 ranks
    tokens = [r["tokens_per_s"] * r["step_time_s"] for r in read_metrics(plain)[0]]
    for name, out in runs.items():  # tokens counted once, not once per rank of a group
        assert [r["tokens_per_s"] * r["step_time_s"] for r in read_metrics(out)[0]] == pytest.approx(tokens), name


def test_sequence_parallel_packed_equals_packed(tiny_model_dir, dataset, tmp_path):
    """Packed rows keep their samples apart across the split: the mask of each rank's
    heads is built from the whole row's positions. 2 ranks in one group against one
    process, with the same packs."""
    packed = ("data.packing=true", f"data.pack_length={2 * MAX_LEN}", "train.per_device_train_batch_size=1")
    one = launch(tmp_path, tiny_model_dir, dataset, 1, *packed)
    split = launch(tmp_path, tiny_model_dir, dataset, 2, *packed, "parallel.sequence_parallel_size=2")
    (want, want_eval), (got, got_eval) = read_metrics(one), read_metrics(split)
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-5)
    assert got_eval[-1]["eval_loss"] == pytest.approx(want_eval[-1]["eval_loss"], abs=1e-5)
    a, b = (load_file(str(out / "best" / "model.safetensors")) for out in (one, split))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
