"""Videos: which frames are taken, decoding, tokens and labels, M-RoPE's time axis, bad
files, the dummy video, and packed == padded with videos. (Sharded == unsharded with
videos on some ranks and not others is in test_train_e2e.py, whose data has them.)"""

import json
import sys

import pytest
import torch
import transformers
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

from conftest import write_test_image, write_test_video
from ft.config import DataConfig
from ft.collate import Collator
from ft.datacheck import check_data
from ft.dataset import ConversationDataset
from ft.messages import IGNORE_INDEX, IMAGE, VIDEO
from ft.rows import DataError, load_rows
from ft.metrics import forward_flops
from ft.model import loss_sum
from ft.packing import RopeIndex, truncates_video_seconds
from ft.deps import MissingDependency
from ft.processor import load_processor
from ft.video import VideoError, VideoSampling, probe, read
from transformers.video_utils import VideoMetadata

DEFAULTS = DataConfig()


# -------------------------------------------------------------------------------------
# Which frames: a pure function of the frame count and rate
# -------------------------------------------------------------------------------------
def test_sampling_follows_seconds_caps_and_rounds_to_temporal_patches():
    s = VideoSampling(fps=2.0, max_frames=32)
    assert s.count(40, 8.0) == 10  # 5 s at 2 fps
    assert s.count(44, 8.0) == 10  # 5.5 s: 11 frames, rounded down to whole temporal patches
    assert s.count(1800, 30.0) == 32  # one minute: capped at max_frames
    assert s.count(1, 30.0) == 2  # a single frame fills one temporal patch (repeated)
    assert s.count(7, None) == 6  # a list of frames is at `fps` already
    taken = s.indices(1800, 30.0)
    assert len(taken) == 32 and taken[0] == 0 and taken[-1] == 1799 and taken == sorted(set(taken))
    assert s.indices(1, 30.0) == [0, 0]
    assert s.sampled_fps(40, 8.0) == 2.0
    assert s.sampled_fps(1800, 30.0) == pytest.approx(32 / 60)  # 32 frames over a minute


def test_defaults_keep_a_one_minute_clip_within_max_length(tiny_model_dir):
    """A one-minute clip at the defaults, in any common shape, leaves room for text."""
    processor = load_processor(tiny_model_dir, video_min_pixels=DEFAULTS.video_min_pixels,
                               video_max_pixels=DEFAULTS.video_max_pixels)
    frames = VideoSampling(DEFAULTS.video_fps, DEFAULTS.video_max_frames).count(60 * 30, 30.0)
    for width, height in ((1920, 1080), (1280, 720), (640, 480), (720, 1280), (224, 224)):
        tokens = processor.video_processor.get_num_of_video_patches(frames, height, width, {}) // 4
        assert 0 < tokens <= DEFAULTS.max_length // 2, (width, height, tokens)


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_probe_and_read_take_the_counted_frames(tmp_path, codec):
    path = str(write_test_video(tmp_path / "c.mp4", frames=10, size=(64, 48), fps=4, codec=codec))
    info = probe(path)
    assert (info.frames, info.rate, info.width, info.height) == (10, 4.0, 64, 48)
    frames, fps, indices, rate = read(path, VideoSampling(fps=2.0, max_frames=32))
    # 2.5 s at 2 fps: 5 frames, rounded down to 4, spread over the clip: 0, 3, 6 and 9.
    assert frames.shape == (4, 3, 48, 64) and frames.dtype == torch.uint8
    assert fps == pytest.approx(4 / 2.5)
    assert indices == [0, 3, 6, 9] and rate == 4.0  # what Qwen3-VL's timestamps are made of
    red = frames[:, 0].float().mean((1, 2))
    assert red.tolist() == pytest.approx([40, 100, 160, 220], abs=12)  # frame k's red is 40 + 20k


def test_bad_files_are_video_errors(tmp_path):
    (tmp_path / "text.mp4").write_text("not a video")
    with pytest.raises(VideoError, match="cannot read video .*text.mp4"):
        probe(str(tmp_path / "text.mp4"))
    write_test_image(tmp_path / "still.png")
    # An image is a one-frame "video" to FFmpeg: it decodes, it is not refused here.
    assert probe(str(tmp_path / "still.png")).frames == 1
    with pytest.raises(VideoError, match="before its first frame"):
        probe(str(_empty_video(tmp_path / "empty.mkv")))


def _empty_video(path):
    """A Matroska file with a video stream and no frame."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    return path


# -------------------------------------------------------------------------------------
# Rows with videos: tokens, labels and inputs as at inference
# -------------------------------------------------------------------------------------
ANSWERS = ["It gets brighter.", "No, the picture is not in the clip.", "The noise moves."]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    write_test_video(d / "clip.mp4", frames=10, size=(64, 48), fps=4, seed=1)
    write_test_video(d / "short.mp4", frames=6, size=(56, 56), fps=2, seed=2)
    write_test_image(d / "a.png", size=(84, 56), seed=3)
    (d / "frames").mkdir()
    for k in range(4):
        write_test_image(d / "frames" / f"{k}.png", size=(56, 42), seed=10 + k)
    user = lambda *parts: {"role": "user", "content": list(parts)}  # noqa: E731
    video = lambda v: {"type": "video", "video": v}  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    rows = [
        {"messages": [user(video("clip.mp4"), text("What happens?")), {"role": "assistant", "content": ANSWERS[0]}]},
        {"image": "a.png", "video": "short.mp4",
         "conversations": [{"from": "human", "value": "<image>\n<video>\nIs the picture in the clip?"},
                           {"from": "gpt", "value": ANSWERS[1]}]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      user(video([f"frames/{k}.png" for k in range(4)]), text("And here?")),
                      {"role": "assistant", "content": ANSWERS[2]}]},
        {"messages": [user(text("Say hi.")), {"role": "assistant", "content": "Hi."}]},
    ]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir, video_min_pixels=DEFAULTS.video_min_pixels,
                          video_max_pixels=DEFAULTS.video_max_pixels)


def test_tokens_labels_and_the_data_check_with_the_real_vocabulary(tiny_model_dir_real, clips):
    processor = load_processor(tiny_model_dir_real)
    ds = ConversationDataset(load_rows(clips / "rows.jsonl"), processor, 4096)
    tok = processor.tokenizer
    pad = tok.convert_tokens_to_ids("<|video_pad|>")
    for i, answer in enumerate(ANSWERS):
        s = ds[i]
        grid = s["video_grid_thw"]
        assert int((s["input_ids"] == pad).sum()) == int(grid.prod(-1).sum()) // 4
        assert torch.equal(s["mm_token_type_ids"] == VIDEO, s["input_ids"] == pad)
        assert s["pixel_values_videos"].shape[0] == int(grid.prod(-1).sum())
        assert len(s["second_per_grid_ts"]) == len(grid)
        # Only the answer and its <|im_end|> are learned: no video token, no question.
        assert tok.decode(s["labels"][s["labels"] != IGNORE_INDEX]) == answer + "<|im_end|>"
        # The data check counts exactly these tokens without decoding every frame.
        layout = ds.layout(i)
        for key in ("input_ids", "labels", "mm_token_type_ids"):
            assert torch.equal(layout[key], s[key]), (i, key)
    # Row 1 holds an image and a video: both kinds, in their places.
    assert (ds[1]["mm_token_type_ids"] == IMAGE).any() and "image_grid_thw" in ds[1]
    # The file: 10 frames at 4 fps sampled at 2 fps -> 4 frames, 2 temporal patches of
    # 1.25 s (4 frames over 2.5 s). The frame list: 4 frames at data.video_fps 2 -> 1 s.
    assert ds[0]["video_grid_thw"][0, 0] == 2 and ds[0]["second_per_grid_ts"].tolist() == pytest.approx([1.25])
    assert ds[2]["video_grid_thw"][0, 0] == 2 and ds[2]["second_per_grid_ts"].tolist() == pytest.approx([1.0])


def test_a_sample_is_what_the_official_processor_makes_at_inference(processor, clips):
    """The chat template plus the processor on the same frames give the same ids and
    pixels (the prompt part: up to the assistant's answer)."""
    ds = ConversationDataset(load_rows(clips / "rows.jsonl"), processor, 4096)
    sample = ds[0]
    frames, fps, _, _ = read(str(clips / "clip.mp4"), ds.video)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    out = processor(text=[text], videos=[frames], return_tensors="pt",
                    videos_kwargs={"video_metadata": [VideoMetadata(total_num_frames=len(frames), fps=fps)],
                                   "do_sample_frames": False, "cap_pixels_per_frame": False})
    n = out["input_ids"].shape[1]
    assert torch.equal(sample["input_ids"][:n], out["input_ids"][0])
    # Then the answer, learned, and the newline after <|im_end|>, not learned.
    assert (sample["labels"][:n] == IGNORE_INDEX).all() and (sample["labels"][n:-1] != IGNORE_INDEX).all()
    for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        assert torch.equal(torch.as_tensor(sample[key]), torch.as_tensor(out[key])), key


def test_time_positions_follow_seconds_and_match_the_models_own(processor, clips, tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    model = Qwen2_5_VLForConditionalGeneration(config)
    collate = Collator(processor, RopeIndex(config), media={IMAGE, VIDEO})
    step = config.vision_config.tokens_per_second
    gaps = {}
    for fps in (2.0, 4.0):
        ds = ConversationDataset(load_rows(clips / "rows.jsonl"), processor, 4096, VideoSampling(fps, 32))
        for i in (0, 1, 2):
            s = ds[i]
            n = len(s["input_ids"])
            positions = collate([[s]]).inputs["position_ids"][:, 0, :n]
            own, _ = model.model.get_rope_index(
                s["input_ids"][None], mm_token_type_ids=s["mm_token_type_ids"][None],
                image_grid_thw=s.get("image_grid_thw"), video_grid_thw=s["video_grid_thw"],
                second_per_grid_ts=s["second_per_grid_ts"])
            assert torch.equal(positions[1:], own[:, 0]), (fps, i)
        s = ds[0]
        times = positions_of_video(collate, s)
        gaps[fps] = (times.diff(), float(s["second_per_grid_ts"][0]))
    # Consecutive temporal patches sit tokens_per_second x (seconds per patch) apart:
    # the clip sampled at 4 fps (0.5 s per patch) advances slower than at 2 fps (1.25 s).
    # (transformers 5.17 rounds the seconds down first; truncates_video_seconds says so.)
    whole = truncates_video_seconds(config)
    assert whole == (transformers.__version__.startswith("5.17"))
    for diffs, seconds in gaps.values():
        expected = step * int(seconds) if whole else int(step * seconds)
        assert (diffs == expected).all(), (diffs, seconds)
    # 10 frames at 4 fps: 5 temporal patches; at 2 fps: 2. On 5.17 the five share one
    # time position (0.5 s rounds to 0).
    assert gaps[2.0][0].numel() == 1 and gaps[4.0][0].numel() == (0 if whole else 4)


def positions_of_video(collate, sample):
    """The distinct time positions of a sample's first video, in order."""
    n = len(sample["input_ids"])
    positions = collate([[sample]]).inputs["position_ids"][1, 0, :n]
    return positions[sample["mm_token_type_ids"] == VIDEO].unique()


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(model, batches):
    model.zero_grad(set_to_none=True)
    total = 0.0
    for b in batches:
        s, _ = loss_sum(model, b, 0)
        s.backward()
        total += s.item()
    return total, _grads(model)


def test_packed_equals_padded_with_videos(processor, clips, tiny_model_dir):
    """Loss and gradients of 4 samples (an image with a video, two videos, text only):
    padded 2 per row, against packed in 2 rows, one of them text only with dummies."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    ds = ConversationDataset(load_rows(clips / "rows.jsonl"), processor, 4096)
    s = [ds[i] for i in range(4)]
    media = {IMAGE, VIDEO}
    padded = [Collator(processor, media=media)(pair).inputs for pair in (s[:2], s[2:])]
    collate = Collator(processor, RopeIndex(model.config), media=media)
    packed = [collate([[s[0], s[1], s[2]]]).inputs, collate([[s[3]]]).inputs]
    loss_a, grads_a = _loss_and_grads(model, padded)
    loss_b, grads_b = _loss_and_grads(model, packed)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        scale = max(grads_a[k].abs().max().item(), 1.0)
        assert (grads_a[k] - grads_b[k]).abs().max().item() <= 1e-5 * scale, k


def test_dummy_video_changes_no_loss_and_no_gradient(processor, clips, tiny_model_dir):
    """An image-only batch of a dataset that has videos carries a dummy video (so every
    rank runs the vision tower for videos too): the loss and every gradient are those of
    the batch without it, and the batch's statistics leave it out."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    write_test_image(clips / "b.png", size=(56, 84), seed=5)
    rows = clips / "images.jsonl"
    rows.write_text(json.dumps({"image": "b.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."}]}) + "\n")
    sample = ConversationDataset(load_rows(rows), processor, 4096)[0]
    plain = Collator(processor, media={IMAGE})([sample])
    both = Collator(processor, media={IMAGE, VIDEO})([sample])
    assert "pixel_values_videos" not in plain.inputs and "pixel_values_videos" in both.inputs
    assert both.stats.dummy_video and not both.stats.dummy_image and both.stats.video_grids == ()
    assert both.stats.tokens == plain.stats.tokens == len(sample["input_ids"])
    loss_a, grads_a = _loss_and_grads(model, [plain.inputs])
    loss_b, grads_b = _loss_and_grads(model, [both.inputs])
    assert loss_b == loss_a
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:  # up to float rounding: the rows are longer by the dummy's tokens
        scale = max(grads_a[k].abs().max().item(), 1.0)
        assert (grads_a[k] - grads_b[k]).abs().max().item() <= 1e-6 * scale, k
    # A text-only batch gets both dummies.
    text_only = Collator(processor, media={IMAGE, VIDEO})([ConversationDataset(
        load_rows(clips / "rows.jsonl"), processor, 4096)[3]])
    assert text_only.stats.dummy_image and text_only.stats.dummy_video


def test_flops_count_videos_like_images(processor, clips, tiny_model_dir):
    """A video's vision work is that of its grid, wherever it comes from; its tokens
    count in the language model like any other."""
    config = AutoConfig.from_pretrained(tiny_model_dir)
    ds = ConversationDataset(load_rows(clips / "rows.jsonl"), processor, 4096)
    stats = Collator(processor, media={IMAGE, VIDEO})([ds[0]]).stats
    assert stats.video_grids and stats.image_grids == () and stats.tokens == len(ds[0]["input_ids"])
    as_image = type(stats)(**{**stats.__dict__, "image_grids": stats.video_grids, "video_grids": ()})
    no_video = type(stats)(**{**stats.__dict__, "video_grids": ()})
    assert forward_flops(config, stats) == forward_flops(config, as_image)
    assert forward_flops(config, stats).total > forward_flops(config, no_video).total


# -------------------------------------------------------------------------------------
# Bad videos: named by file:line and field, refused or skipped
# -------------------------------------------------------------------------------------
def _video_row(value, question="What happens?"):
    return {"messages": [{"role": "user", "content": [{"type": "video", "video": value},
                                                      {"type": "text", "text": question}]},
                         {"role": "assistant", "content": "Something."}]}


GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
BAD_VIDEOS = [
    (_video_row("nope.mp4"), "messages[0].content[0].video", "video file not found"),
    (_video_row("text.mp4"), "video", "cannot read video"),
    (_video_row("empty.mkv"), "video", "before its first frame"),
    (_video_row([]), "messages[0].content[0].video", "an empty list of frames"),
    (_video_row(["frames/0.png", "frames/nope.png"]), "messages[0].content[0].video[1]", "not found"),
    (_video_row(["frames/0.png", "a.png"]), "video", "must have one size"),
    ({"video": "clip.mp4", "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "x"}]},
     "video", "1 video(s) but 0 <video> placeholder(s)"),
    ({"video": ["clip.mp4"], "conversations": [{"from": "human", "value": "<video>"},
                                               {"from": "gpt", "value": "x"}]},
     "video", "the path of one video file"),
    ({"messages": [{"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": [{"type": "video", "video": "clip.mp4"}]}]},
     "messages[1]", "only allowed in user turns"),
    ({**GOOD, "video": "clip.mp4"}, "video", "content parts"),
]


@pytest.fixture(scope="module")
def bad_dir(clips):
    (clips / "text.mp4").write_text("not a video")
    _empty_video(clips / "empty.mkv")
    return clips


@pytest.mark.parametrize("row, field, reason", BAD_VIDEOS, ids=[f"{i}-{c[1]}" for i, c in enumerate(BAD_VIDEOS)])
def test_bad_videos_name_file_line_and_field(bad_dir, processor, row, field, reason):
    path = bad_dir / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(row) + "\n")
    ds = ConversationDataset(load_rows(path), processor, 4096)
    ds[0]
    with pytest.raises(DataError) as error:
        ds[1]
    message = str(error.value)
    assert message.startswith(f"{path}:3: {field}: ") and reason in message, message
    with pytest.raises(DataError) as error:
        ds.layout(1)  # the data check refuses it with the same words
    assert str(error.value) == message


def test_a_video_too_long_for_max_length_is_refused_with_the_numbers_or_skipped(bad_dir, processor):
    path = bad_dir / "long.jsonl"
    rows = [_video_row("clip.mp4"), _video_row("text.mp4"), _video_row("nope.mp4"), _video_row("empty.mkv"), GOOD]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ConversationDataset(load_rows(path), processor, 4096)
    tokens = int(ds[0]["video_grid_thw"].prod(-1).sum()) // 4
    # One token short of the video's end; the text-only row still fits.
    video_end = int((ds[0]["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")).nonzero()[-1])
    assert video_end > len(ds[4]["input_ids"])
    short = ConversationDataset(load_rows(path), processor, video_end)
    with pytest.raises(DataError) as error:
        check_data(short, "error")
    message = str(error.value)
    assert "4 of 5 rows cannot be used" in message
    assert f"{path}:1: max_length: " in message and f"video {bad_dir / 'clip.mp4'}: {tokens} tokens" in message
    assert "at video_min_pixels" in message and f"{path}:2: video: cannot read video" in message
    assert f"{path}:3: messages[0].content[0].video: video file not found" in message
    assert f"{path}:4: video: " in message and "before its first frame" in message
    kept, lengths, note = check_data(short, "skip")
    assert len(kept) == 1 and kept.media == frozenset() and "4 of 5 rows cannot be used" in note
    assert torch.equal(kept[0]["input_ids"], ds[4]["input_ids"])
    kept, lengths, note = check_data(ds.select([0, 4]), "error")
    assert kept.media == {VIDEO} and note is None


def test_videos_too_big_for_max_length_get_smaller_frames(tmp_path, processor):
    """A sample whose videos overflow max_length at video_max_pixels gets the largest
    frame size that fits, the same in the data check and in the sample."""
    write_test_video(tmp_path / "big.mp4", frames=8, size=(224, 224), fps=4)
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(_video_row("big.mp4")) + "\n")
    full = ConversationDataset(load_rows(path), processor, 4096)[0]
    tokens = int(full["video_grid_thw"].prod(-1).sum()) // 4
    assert full["video_grid_thw"].tolist() == [[2, 16, 16]] and tokens == 128  # 224x224 = video_max_pixels
    end = int((full["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")).nonzero()[-1]) + 1
    got = []
    for max_length in (end - 1, end - 60):
        ds = ConversationDataset(load_rows(path), processor, max_length)
        sample, layout = ds[0], ds.layout(0)
        for key in ("input_ids", "labels", "mm_token_type_ids"):
            assert torch.equal(sample[key], layout[key]), key
        assert len(sample["input_ids"]) <= max_length and (sample["labels"] != IGNORE_INDEX).any()
        shrunk = int(sample["video_grid_thw"].prod(-1).sum()) // 4
        assert sample["pixel_values_videos"].shape[0] == shrunk * 4
        got.append(shrunk)
    # The largest that fits: square frames shrink from 8 x 8 tokens (224 x 224) to the
    # next square size, 7 x 7 (196 x 196), when one token is missing; 60 short (68
    # tokens left) needs 2 x 5 x 5 = 50 (2 x 6 x 6 = 72 is one size too many).
    assert got == [2 * 7 * 7, 2 * 5 * 5]
    # Below what video_min_pixels gives, it is refused with the numbers.
    with pytest.raises(DataError, match=r"max_length: .*big.mp4: 128 tokens, 32 at video_min_pixels"):
        ConversationDataset(load_rows(path), processor, end - tokens + 31).layout(0)


def test_missing_torchvision_is_one_line_saying_what_to_install(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` now fails
    with pytest.raises(MissingDependency) as error:
        load_processor(tiny_model_dir)
    message = str(error.value)
    assert "\n" not in message and "pip install" in message and "torchvision" in message


# slow: torchvision is missing from the start of a fresh interpreter, through the whole start-up
@pytest.mark.slow
def test_training_without_torchvision_stops_at_start_up_with_one_line(tmp_path, tiny_model_dir):
    """Through the real entry point: no traceback, exit 2 (a refusal, not a crash)."""
    import subprocess

    code = ("import sys, runpy; sys.modules['torchvision'] = None; "
            f"sys.argv = ['ft.loop', 'configs/demo.yaml', 'model.path={tiny_model_dir}', "
            f"'model.build_tiny_if_missing=false', 'train.output_dir={tmp_path / 'out'}']; "
            "runpy.run_module('ft.loop', run_name='__main__')")
    repo = __import__("pathlib").Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [line for line in (proc.stdout + proc.stderr).splitlines() if "missing dependency" in line]
    assert "pip install" in line and "torchvision" in line
