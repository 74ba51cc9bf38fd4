"""ft.chat: one-shot and interactive chat with a model folder, checked against a plain
``model.generate`` on the official processor's inputs."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import write_test_image, write_test_video
from ft import chat as ftchat
from ft.chat import Chat, ChatInputError

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is in this picture?"
N = 8  # new tokens per answer: enough to compare, fast on the tiny model


def run_chat(*args, stdin=None):
    """``python -m ft.chat ARGS`` from the repository root; stdout and stderr decoded as
    UTF-8 without newline translation (a random model's answer may hold a carriage return)."""
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONIOENCODING="utf-8")
    result = subprocess.run([sys.executable, "-m", "ft.chat", *map(str, args)], cwd=ROOT, env=env,
                            input=stdin.encode() if stdin is not None else None, capture_output=True, timeout=120)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode("utf-8"),
                                       result.stderr.decode("utf-8", errors="replace"))


@pytest.fixture(scope="module")
def greedy_chat(tiny_model_dir):
    return Chat(tiny_model_dir, device="cpu", max_new_tokens=N)


# slow: the command line's answer must equal the in-process one: `python -m ft.chat` in a fresh process
@pytest.mark.slow
def test_one_shot_answer_is_model_generate_on_processor_inputs(tiny_model_dir, greedy_chat, tmp_path):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    image = write_test_image(tmp_path / "picture.png", size=(84, 56), seed=3)
    greedy_chat.reset()
    text, ids = greedy_chat.ask(PROMPT, images=[str(image)])

    # The reference: the official processor and a freshly loaded model, no ft code.
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[Image.open(image).convert("RGB")], return_tensors="pt")
    assert set(inputs) == set(greedy_chat.last_inputs)
    for key in inputs:
        assert torch.equal(inputs[key], greedy_chat.last_inputs[key]), key
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    out = model.generate(**inputs, do_sample=False, max_new_tokens=N)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert ids == expected and len(ids) == N
    assert text == processor.tokenizer.decode(expected, skip_special_tokens=True)
    assert greedy_chat.last_stats["new_tokens"] == N

    # The command line gives the same answer, streamed to stdout, and a summary on stderr.
    result = run_chat(tiny_model_dir, "--image", image, "--max-new-tokens", N, PROMPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout and result.stdout == text + "\n"
    summary = [line for line in result.stderr.splitlines() if line.startswith("[chat]")]
    assert len(summary) == 1 and f"{N} new tokens in" in summary[0] and "tokens/s" in summary[0], result.stderr


def test_second_turn_sees_the_first_and_its_image(tiny_model_dir, tmp_path):
    first_image = write_test_image(tmp_path / "a.png", size=(56, 56), seed=1)
    second_image = write_test_image(tmp_path / "b.png", size=(112, 56), seed=2)
    chat = Chat(tiny_model_dir, device="cpu", max_new_tokens=N, temperature=1.0, seed=0)  # sampled: real words
    answer, ids = chat.ask(PROMPT, images=[first_image])
    first = chat.last_inputs
    first_ids = first["input_ids"][0].tolist()
    assert answer.strip(), "a sampled answer of the tiny model should hold some text"

    chat.ask("And in this one?", images=[second_image])
    second = chat.last_inputs
    second_ids = second["input_ids"][0].tolist()
    assert len(second_ids) > len(first_ids) + len(ids)
    assert second_ids[:len(first_ids)] == first_ids  # the first turn, its image included, unchanged
    # Then the first answer, as the chat template renders its text: the sampled ids
    # need not be the tokenizer's own split of that text, so compare with the text's ids.
    tokenizer = chat.processor.tokenizer
    assert tokenizer.decode(ids, skip_special_tokens=True) == answer
    encoded = tokenizer.encode(answer, add_special_tokens=False)
    assert second_ids[len(first_ids):len(first_ids) + len(encoded)] == encoded
    assert second_ids[len(first_ids) + len(encoded)] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Both images reach the processor, in conversation order.
    assert second["image_grid_thw"].tolist() == [first["image_grid_thw"][0].tolist(), [1, 4, 8]]
    rows = first["pixel_values"].shape[0]
    assert torch.equal(second["pixel_values"][:rows], first["pixel_values"])
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2

    chat.reset()
    chat.ask(PROMPT, images=[first_image])
    assert chat.last_inputs["input_ids"][0].tolist() == first_ids


# slow: `python -m ft.chat` in a fresh process, against the in-process answer
@pytest.mark.slow
def test_video_one_shot(tiny_model_dir, tmp_path):
    clip = write_test_video(tmp_path / "clip.mp4", frames=8, fps=4)  # 2 s
    question = "What happens in this video?"
    chat = Chat(tiny_model_dir, device="cpu", max_new_tokens=N, temperature=1.0, seed=0)
    text, ids = chat.ask(question, video=str(clip))
    # 2 s at ft's default 2 frames/s: 4 frames, 2 temporal patches.
    assert chat.last_inputs["video_grid_thw"][0, 0].item() == 2
    assert "pixel_values" not in chat.last_inputs

    result = run_chat(tiny_model_dir, "--video", clip, "--max-new-tokens", N, "--temperature", 1.0, "--seed", 0,
                      question)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and result.stdout == text + "\n"
    assert f"{N} new tokens in" in result.stderr

    faster = Chat(tiny_model_dir, device="cpu", max_new_tokens=1, video_fps=4.0)
    faster.ask(question, video=str(clip))
    assert faster.last_inputs["video_grid_thw"][0, 0].item() == 4  # all 8 frames


def test_video_sampling_follows_the_export(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"temporal_patch_size": 2}}))
    assert ftchat.video_sampling(tmp_path) == ftchat.VideoSampling(fps=2.0, max_frames=32)  # no processor file
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"fps": 1.0, "max_frames": 8}))
    assert ftchat.video_sampling(tmp_path) == ftchat.VideoSampling(fps=1.0, max_frames=8)
    assert ftchat.video_sampling(tmp_path, fps=3.0, max_frames=4) == ftchat.VideoSampling(fps=3.0, max_frames=4)


# slow: the command line's exit status and stderr: `python -m ft.chat` in a fresh process
@pytest.mark.slow
def test_missing_image_exits_2_naming_it(tiny_model_dir, tmp_path):
    missing = tmp_path / "no-such-picture.png"
    result = run_chat(tiny_model_dir, "--image", missing, PROMPT)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0], result.stderr


def test_bad_inputs_in_process(tiny_model_dir, tmp_path, capsys):
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    assert ftchat.main([str(not_a_model), PROMPT]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(not_a_model) in err[0]

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a picture")
    assert ftchat.main([str(tiny_model_dir), "--image", str(broken), PROMPT]) == 2
    assert str(broken) in capsys.readouterr().err

    bad_clip = tmp_path / "clip.mp4"
    bad_clip.write_bytes(b"not a video")
    assert ftchat.main([str(tiny_model_dir), "--video", str(bad_clip), PROMPT]) == 2
    assert str(bad_clip) in capsys.readouterr().err

    with pytest.raises(ChatInputError, match="no-such"):
        ftchat.load_image(tmp_path / "no-such.png")


def test_missing_torchvision_is_one_line(tiny_model_dir, monkeypatch, capsys):
    def missing(module, why):
        raise ftchat.MissingDependency(f"{why} needs `{module}`, which does not load: pip install torchvision")

    monkeypatch.setattr(ftchat, "require", missing)
    assert ftchat.main([str(tiny_model_dir), PROMPT]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install torchvision" in err[0]


def test_interactive_session(tiny_model_dir, tmp_path, monkeypatch, capsys):
    image = write_test_image(tmp_path / "picture.png")
    missing = tmp_path / "gone.png"
    lines = [f"/image {image}", PROMPT, f"/image {missing}", "/frobnicate", "And now?", "/reset",
             "Hello", "/exit", "never read"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    seen = []
    ask = Chat.ask

    def spy(self, text, images=(), video=None, stream=None, **kwargs):
        out = ask(self, text, images=images, video=video, stream=stream, **kwargs)
        seen.append((text, len(images), len(self.messages), self.last_inputs["input_ids"].shape[1]))
        return out

    monkeypatch.setattr(Chat, "ask", spy)
    assert ftchat.main([str(tiny_model_dir), "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert "/image PATH" in err and "/reset" in err  # the help line
    assert str(missing) in err and "unknown command /frobnicate" in err  # errors, and it went on
    assert err.count("[chat] ") == 3
    (q1, n1, m1, p1), (q2, n2, m2, p2), (q3, n3, m3, p3) = seen
    assert (q1, n1, m1) == (PROMPT, 1, 2)
    assert (q2, n2, m2) == ("And now?", 0, 4) and p2 > p1  # history kept; the missing image was not attached
    assert (q3, n3, m3) == ("Hello", 0, 2) and p3 < p1  # after /reset: no history, no image


def test_eof_ends_the_session(greedy_chat):
    assert ftchat.repl(greedy_chat, stdin=io.StringIO("")) == 0


def test_sampling_overrides_a_greedy_generation_config(tiny_model_dir, tmp_path):
    # Qwen's released generation_config.json samples with top_k 1 (greedy in effect):
    # --temperature must really sample, and temperature 0 stay plain greedy.
    import shutil

    folder = tmp_path / "qwen-like"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=0.1, top_p=0.001, top_k=1)
    (folder / "generation_config.json").write_text(json.dumps(config))
    greedy = Chat(tiny_model_dir, device="cpu", max_new_tokens=N).ask(PROMPT)[1]
    assert Chat(folder, device="cpu", max_new_tokens=N).ask(PROMPT)[1] == greedy
    sampled = Chat(folder, device="cpu", max_new_tokens=N, temperature=1.0, seed=0).ask(PROMPT)[1]
    assert sampled == Chat(tiny_model_dir, device="cpu", max_new_tokens=N, temperature=1.0, seed=0).ask(PROMPT)[1]
    assert sampled != greedy


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_chat_on_each_family(family, tiny_family_dir, tmp_path, monkeypatch):
    """ft.chat loads any family's folder; on Qwen3-VL (and its MoE) a video's frames reach the processor
    with their real times (a 10-frame clip at 4 fps: patches at 0.4 s and 1.9 s), never
    the processor's 24 fps fallback."""
    from transformers.models.qwen3_vl import processing_qwen3_vl

    warned = []
    monkeypatch.setattr(processing_qwen3_vl.logger, "warning_once", lambda msg, *a, **k: warned.append(msg))
    chat = Chat(tiny_family_dir(family), device="cpu", max_new_tokens=2)
    chat.ask(PROMPT, images=[str(write_test_image(tmp_path / "a.png", size=(64, 64)))])
    chat.ask("And this?", video=str(write_test_video(tmp_path / "clip.mp4", frames=10, fps=4)))
    text = chat.processor.tokenizer.decode(chat.last_inputs["input_ids"][0])
    if family.startswith("qwen3"):
        assert "<0.4 seconds>" in text and "<1.9 seconds>" in text, text
    assert not [w for w in warned if "fps=24" in w]
    assert len(chat.messages) == 4
