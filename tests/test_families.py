"""Each family of ft.families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) through ft's seams, in
one process: the family read from config.json (and refused by name), the wrap plan and
the parts, positions and packing against the model's own computation, Qwen3-VL's video
timestamps from the real frame rate, and the data check's token counts."""

import dataclasses
import json

import pytest
import torch

from conftest import assert_same_loss_and_grads, loss_and_grads, write_test_image, write_test_video
from ft.collate import Collator
from ft.config import ModelConfig
from ft.dataset import ConversationDataset
from ft.families import FAMILIES, FamilyError, read_family
from ft.fsdp_wrap import check_uniform_requires_grad, plan_units
from ft.messages import IGNORE_INDEX
from ft.metrics import matmul_params
from ft.packing import RopeIndex
from ft.parts import PART_NAMES, apply_freezing, module_parts
from ft.processor import load_processor
from ft.rows import load_rows

FAMILY_NAMES = list(FAMILIES)


# ----------------------------------------------------------------------------- registry
def test_family_comes_from_config_json_and_others_are_refused_by_name(tiny_family_dir, tmp_path, monkeypatch):
    for family in FAMILY_NAMES:
        assert read_family(tiny_family_dir(family)).model_type == family
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(FamilyError, match=r"config.json: model_type is 'llava': ft trains qwen2_vl \(Qwen2-VL\), "
                                          r"qwen2_5_vl \(Qwen2.5-VL\), qwen3_vl \(Qwen3-VL\)"):
        read_family(tmp_path)
    # A family this transformers lacks (the GPU image's 5.17 against a newer one, say).
    missing = dataclasses.replace(FAMILIES["qwen3_vl"], package="qwen9_vl")
    monkeypatch.setitem(FAMILIES, "qwen3_vl", missing)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    with pytest.raises(FamilyError, match=r"Qwen3-VL \(model_type 'qwen3_vl'\) needs a transformers that has "
                                          r"qwen9_vl; transformers 5\.\d+"):
        read_family(tmp_path)


def _model(model_dir: str):
    return read_family(model_dir).model_class().from_pretrained(model_dir, dtype=torch.float32,
                                                                attn_implementation="sdpa")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_plan_and_parts_cover_each_family(tiny_family_dir, family):
    """Every weight in exactly one unit and one part; the parts are the vision tower's
    own modules, its mergers (Qwen3-VL: DeepStack's too) and the rest; every freezing
    combination keeps each unit uniform, so FSDP1 can flatten it."""
    model = _model(tiny_family_dir(family))
    units = plan_units(model)
    owned = [name for u in units for name in u.params]
    assert sorted(owned) == sorted(n for n, _ in model.named_parameters(remove_duplicate=True))
    parts = module_parts(model)
    by_part = {part: [n for n, m in model.named_modules() if parts[id(m)] == part and n] for part in PART_NAMES}
    assert "model.visual.merger" in by_part["merger"] and "model.visual" in by_part["vision_tower"]
    assert "model.visual.blocks.0" in by_part["vision_tower"] and "lm_head" in by_part["llm"]
    if family == "qwen3_vl":
        assert "model.visual.deepstack_merger_list.0" in by_part["merger"]
        assert "model.visual.pos_embed" in by_part["vision_tower"]
    for flags in range(1, 7):  # never all three frozen
        cfg = ModelConfig(freeze_vision_tower=bool(flags & 1), freeze_merger=bool(flags & 2),
                          freeze_llm=bool(flags & 4))
        apply_freezing(model, cfg)
        check_uniform_requires_grad(plan_units(model))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_flop_count_reads_each_familys_shapes(tiny_family_dir, family):
    """The weights the FLOP count multiplies by are the model's own linear weights."""
    model = _model(tiny_family_dir(family))
    params = matmul_params(model.config)
    visual = model.model.visual
    blocks = sum(m.weight.numel() for m in visual.blocks.modules() if isinstance(m, torch.nn.Linear))
    mergers = sum(m.weight.numel() for m in visual.modules() if isinstance(m, torch.nn.Linear)
                  and not any(m is b for b in visual.blocks.modules()))
    layers = sum(m.weight.numel() for m in model.model.language_model.layers.modules()
                 if isinstance(m, torch.nn.Linear))
    moe = read_family(tiny_family_dir(family)).moe_shape(model.config.text_config)
    routers = 0
    if moe:  # a token meets top_k of the experts' fused weights, and its layer's router
        experts = [m.mlp.experts for m in model.model.language_model.layers]
        layers += sum(e.gate_up_proj.numel() + e.down_proj.numel() for e in experts) * moe.top_k // moe.experts
        routers = sum(m.mlp.gate.weight.numel() for m in model.model.language_model.layers)
    assert params["router"] == routers
    assert params["vision_blocks"] == blocks
    assert params["vision_merger"] == mergers
    assert params["text_layers"] == layers
    assert params["vision_patch_embed"] == visual.patch_embed.proj.weight.numel()


# ----------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """An image row, a video file row (10 frames at 4 fps), a list-of-frames row and a
    text-only row."""
    d = tmp_path_factory.mktemp("family-data")
    write_test_image(d / "a.png", size=(84, 56), seed=1)
    write_test_video(d / "clip.mp4", frames=10, size=(64, 48), fps=4, seed=4)
    (d / "frames").mkdir()
    for k in range(4):
        write_test_image(d / "frames" / f"{k}.png", size=(56, 42), seed=10 + k)

    def row(content, answer):
        return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}

    lines = [
        row([{"type": "image", "image": "a.png"}, {"type": "text", "text": "What is it?"}], "Noise on a gradient."),
        row([{"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "What happens?"}],
            "It gets brighter."),
        row("Say hi.", "Hi."),
        row([{"type": "video", "video": [f"frames/{k}.png" for k in range(4)]},
             {"type": "text", "text": "What changes?"}], "The noise moves."),
    ]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return d / "rows.jsonl"


def _dataset(model_dir, rows):
    processor = load_processor(model_dir, video_min_pixels=56 * 56, video_max_pixels=112 * 112 * 4)
    return processor, ConversationDataset(load_rows(rows), processor, 1024)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_data_check_counts_the_tokens_a_sample_gets(tiny_family_dir, rows, family):
    """layout (no pixels) equals the processed sample, Qwen3-VL's per-frame timestamps and
    vision markers included."""
    _, ds = _dataset(tiny_family_dir(family), rows)
    for i in range(len(ds)):
        sample, counted = ds[i], ds.layout(i)
        assert torch.equal(counted["input_ids"], sample["input_ids"]), i
        assert torch.equal(counted["labels"], sample["labels"]), i
        assert torch.equal(counted["mm_token_type_ids"], sample["mm_token_type_ids"]), i


def test_qwen3_video_timestamps_are_the_frames_real_times(tiny_family_dir, rows, monkeypatch):
    """A 10-frame file at 4 fps gives 4 frames at data.video_fps 2, spread over the clip:
    0, 3, 6 and 9, so temporal patches at (0 + 3) / 2 / 4 = 0.375 s and 1.875 s, written
    as text; not the processor's 24 fps guess, nor the times of the frames taken at 2
    fps (0.25 s, 1.25 s)."""
    from transformers.models.qwen3_vl import processing_qwen3_vl

    guesses = []
    monkeypatch.setattr(processing_qwen3_vl.logger, "warning_once", lambda msg, *a, **k: guesses.append(msg))
    processor, ds = _dataset(tiny_family_dir("qwen3_vl"), rows)
    text = processor.tokenizer.decode(ds[1]["input_ids"])
    assert "<0.4 seconds>" in text and "<1.9 seconds>" in text and text.count("seconds>") == 2, text
    # A list of frames is taken to be at data.video_fps (2): patches at 0.25 s and 1.25 s.
    text = processor.tokenizer.decode(ds[3]["input_ids"])
    assert "<0.2 seconds>" in text and "<1.2 seconds>" in text, text
    assert not [g for g in guesses if "fps=24" in g], guesses


# ----------------------------------------------------------------------------- packing
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_positions_are_the_models_own_per_family(tiny_family_dir, rows, family):
    model_dir = tiny_family_dir(family)
    processor, ds = _dataset(model_dir, rows)
    model = _model(model_dir)
    index = RopeIndex(model.config)
    for i in range(len(ds)):
        s = ds[i]
        kwargs = {k: s[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in s}
        if not index.family.rope_takes("second_per_grid_ts"):
            kwargs.pop("second_per_grid_ts", None)
        own, _ = model.model.get_rope_index(s["input_ids"][None], mm_token_type_ids=s["mm_token_type_ids"][None],
                                            **kwargs)
        ours = index(s["input_ids"], s["mm_token_type_ids"], s.get("image_grid_thw"), s.get("video_grid_thw"),
                     s.get("second_per_grid_ts"))
        assert torch.equal(ours[1:], own[:, 0]), i


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_packed_equals_padded_per_family(tiny_family_dir, rows, family):
    """An image sample, a video sample and a text-only sample in one pack (and a list
    of frames in a second row), and the same samples padded two to a row, against each
    sample alone in its batch: the same loss and gradients. On Qwen3-VL this covers DeepStack (its features land on each
    sample's own vision tokens) and the timestamps."""
    model_dir = tiny_family_dir(family)
    processor, ds = _dataset(model_dir, rows)
    model = _model(model_dir)
    samples = [ds[i] for i in range(len(ds))]
    assert all(s["labels"][0] == IGNORE_INDEX for s in samples)
    alone = [Collator(processor)([s]).inputs for s in samples]
    padded = [Collator(processor)(samples[:2]).inputs, Collator(processor)(samples[2:]).inputs]
    packed = [Collator(processor, RopeIndex(model.config))([samples[:3], samples[3:]]).inputs]
    reference = loss_and_grads(model, alone)
    for name, batches in (("padded 2 a row", padded), ("packed", packed)):
        worst = assert_same_loss_and_grads(reference, loss_and_grads(model, batches))
        print(f"{family} {name}: gradients within {worst:.1e} of one sample a row")  # -s shows it


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_model_is_a_checkpoint_of_its_family(tiny_family_dir, family):
    """The tiny model's files name its family's classes, AutoProcessor loads its
    processor, its special tokens are the config's, and its chat template renders what
    training renders (Qwen3-VL: no default system message)."""
    from transformers import AutoConfig, AutoProcessor

    from ft.messages import render_segments

    model_dir = tiny_family_dir(family)
    fam = FAMILIES[family]
    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == family and type(config).__name__ == fam.config
    processor = AutoProcessor.from_pretrained(model_dir)
    assert type(processor).__name__ == fam.processor
    assert type(processor.video_processor).__name__ == fam.video_processor
    patch = 16 if family.startswith("qwen3") else 14
    assert processor.image_processor.patch_size == config.vision_config.patch_size == patch
    load_processor(model_dir)  # checks the token ids against the config
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A ball."}]}]
    rendered = processor.apply_chat_template(messages, tokenize=False)
    assert rendered == "".join(text for text, _, _ in render_segments(messages, fam.default_system))
    assert rendered.startswith("<|im_start|>system") == (fam.default_system is not None)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pixel_bounds_reach_every_familys_processors(tiny_family_dir, family):
    """data.min_pixels/max_pixels and video_min_pixels/video_max_pixels replace the saved
    bounds of each family's image and video processors (Qwen3-VL's video processor
    ignores the flat min_pixels/max_pixels arguments that Qwen2-VL's need)."""
    processor = load_processor(tiny_family_dir(family), min_pixels=5000, max_pixels=60000,
                               video_min_pixels=1000, video_max_pixels=100000)
    for part, want in ((processor.image_processor, (5000, 60000)), (processor.video_processor, (1000, 100000))):
        assert (part.size["shortest_edge"], part.size["longest_edge"]) == want, type(part).__name__
