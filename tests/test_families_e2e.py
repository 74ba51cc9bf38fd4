"""Qwen2-VL and Qwen3-VL end to end through ./launch.sh, as tests/test_train_e2e.py does
for Qwen2.5-VL, on the same rows (images, videos, text-only, ranks whose modalities
differ from step to step) and against the same hand-written single-process reference:

- 2 ranks on fsdp1 and on fsdp2 reproduce the reference's losses, gradient norms, eval
  loss and final weights (AdamW);
- ft's Adafactor on 2 ranks reproduces HF's Adafactor in one process (what the HF
  Trainer recipe trains with: the Trainer itself gives exactly that process's losses);
  with bf16 master weights it trains to the same losses up to the weights' rounding;
- a checkpoint of the 2-rank run resumes on 1 rank and ends at the same weights;
- frozen parts stay bit-identical;
- the export's processor prepares every training row as training did (pixel bounds
  included: Qwen3-VL's video processor once ignored them in training);
- the export loads with from_pretrained and AutoProcessor and generates from an image
  and from a video.
"""

import json

import numpy
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.video_utils import VideoMetadata

from ft.config import DataConfig
from ft.dataset import ConversationDataset
from ft.processor import load_processor
from ft.rows import load_rows
from conftest import write_test_image, write_test_video
from test_train_e2e import STEPS, dataset, launch, read_metrics, reference  # noqa: F401 (dataset: a fixture)

# Every test here runs ./launch.sh: the slow tier.
pytestmark = pytest.mark.slow

ONE_STEP_BATCH = ("train.per_device_train_batch_size=1", "fsdp.activation_checkpointing=true")


def _weights(folder) -> dict:
    """An export's weights as the model names them (transformers saves Qwen2-VL under its
    original checkpoint names, `model.layers.*` and `visual.*`, and maps them back on load)."""
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _check_against(out, ref, name: str) -> None:
    ref_losses, ref_norms, ref_eval, ref_weights = ref
    train, evals = read_metrics(out)
    assert [r["loss"] for r in train] == pytest.approx(ref_losses, abs=1e-5), name
    assert [r["grad_norm"] for r in train] == pytest.approx(ref_norms, rel=1e-4), name
    assert evals[-1]["eval_loss"] == pytest.approx(ref_eval[0], abs=1e-5), name
    worst = _max_diff(_weights(out / "best"), ref_weights)
    loss_diff = max(abs(r["loss"] - want) for r, want in zip(train, ref_losses))
    print(f"{name}: losses within {loss_diff:.1e}, weights within {worst:.1e} of one process")  # -s shows it
    assert worst <= 1e-5, f"{name}: weights differ from the reference by {worst:.2e}"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_family_trains_sharded_as_one_process(family, tiny_family_dir, dataset, tmp_path):  # noqa: F811
    model_dir = tiny_family_dir(family)
    ref = reference(model_dir, dataset)
    initial = _weights(model_dir)
    assert _max_diff(initial, ref[3]) > 1e-3  # the weights moved: equality below means something

    fsdp1 = launch(tmp_path, model_dir, dataset, 2, *ONE_STEP_BATCH, "train.save_steps=2")
    _check_against(fsdp1, ref, f"{family} fsdp1")
    fsdp2 = launch(tmp_path, model_dir, dataset, 2, *ONE_STEP_BATCH, "fsdp.backend=fsdp2")
    _check_against(fsdp2, ref, f"{family} fsdp2")

    # Step 2's checkpoint of the 2-rank run, resumed on 1 rank (global batch 2 either way).
    resumed = launch(tmp_path, model_dir, dataset, 1, "train.per_device_train_batch_size=2",
                     f"train.resume={fsdp1 / 'checkpoints' / 'step-2'}")
    assert [r["step"] for r in read_metrics(resumed)[0]] == [STEPS]
    assert read_metrics(resumed)[0][0]["loss"] == pytest.approx(ref[0][-1], abs=1e-5)
    assert _max_diff(_weights(resumed / "best"), ref[3]) <= 1e-5

    # ft's Adafactor on 2 ranks against HF's in one process: the recipe's optimizer.
    hf = reference(model_dir, dataset, optim="adafactor")
    _check_against(launch(tmp_path, model_dir, dataset, 2, *ONE_STEP_BATCH, "train.optim=adafactor"),
                   hf, f"{family} adafactor")

    # bf16 master weights (stochastic rounding) train too: the losses of fp32 weights up to
    # the rounding of the loaded weights, and the weights move.
    bf16 = launch(tmp_path, model_dir, dataset, 2, *ONE_STEP_BATCH, "train.optim=adafactor",
                  "train.master_weights=bf16", "fsdp.backend=fsdp2")
    assert [r["loss"] for r in read_metrics(bf16)[0]] == pytest.approx(hf[0], abs=2e-2)
    assert _max_diff(_weights(bf16 / "best"), {k: v.bfloat16().float() for k, v in initial.items()}) > 1e-3

    # Only the language model trains: the vision tower and every merger stay bit-identical.
    frozen = launch(tmp_path, model_dir, dataset, 2, *ONE_STEP_BATCH, "model.freeze_vision_tower=true",
                    "model.freeze_merger=true")
    got = _weights(frozen / "best")
    vision = [k for k in got if k.startswith("model.visual.")]
    assert any("merger" in k for k in vision) and any("blocks" in k for k in vision)
    assert all(torch.equal(got[k], initial[k]) for k in vision)
    assert max((got[k] - initial[k]).abs().max().item() for k in got if k not in vision) > 1e-3

    _export_prepares_inputs_as_training_did(model_dir, fsdp1 / "best", tmp_path)
    _export_generates(fsdp1 / "best", dataset)


def _export_prepares_inputs_as_training_did(model_dir, best, tmp) -> None:
    """The export's processor files carry the run's pixel bounds: a large picture and a
    large clip (both beyond the default bounds, which the tiny model's saved ones are
    not) become the same tokens and pixels from the export as in training."""
    write_test_image(tmp / "big.png", size=(640, 480), seed=3)
    write_test_video(tmp / "big.mp4", frames=8, size=(320, 240), fps=4, seed=5)
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "big.png"},
                                                     {"type": "video", "video": "big.mp4"}]},
                        {"role": "assistant", "content": "Both."}]}
    (tmp / "big.jsonl").write_text(json.dumps(row) + "\n")
    defaults = DataConfig()
    training = load_processor(model_dir, defaults.min_pixels, defaults.max_pixels, defaults.video_min_pixels,
                              defaults.video_max_pixels)
    ours, theirs = (ConversationDataset(load_rows(tmp / "big.jsonl"), p, 4096)[0]
                    for p in (training, load_processor(best)))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(torch.as_tensor(ours[k]), torch.as_tensor(theirs[k])) for k in ours)


def _export_generates(best, data) -> None:
    """AutoProcessor and from_pretrained load the export; it generates from an image and
    from a video (frames with their rate and indices, as ft.chat passes them)."""
    processor = AutoProcessor.from_pretrained(best)
    model = AutoModelForImageTextToText.from_pretrained(best, dtype=torch.float32).eval()
    image = Image.open(data / "a.png").convert("RGB")
    frames = torch.stack([torch.from_numpy(numpy.array(image.resize((56, 56))))] * 4).permute(0, 3, 1, 2)
    for medium, kwargs in (("image", {"images": [image]}),
                           ("video", {"videos": [frames], "videos_kwargs": {
                               "do_sample_frames": False,
                               "video_metadata": [VideoMetadata(total_num_frames=4, fps=2.0,
                                                                frames_indices=[0, 1, 2, 3])]}})):
        messages = [{"role": "user", "content": [{"type": medium}, {"type": "text", "text": "What is it?"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=[text], return_tensors="pt", **kwargs)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3, medium
