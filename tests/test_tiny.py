"""The tiny checkpoints load like real Qwen2.5-VL ones and train one step."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration


from ft.config import DataConfig
from ft.processor import export_processor_files, load_processor, training_settings
from ft.tiny import main
from ft.tinymodel import ADDED_TOKENS, SPECIAL_TOKENS, save_tiny

# Qwen2.5-VL's published ids (tokenizer_config.json / config.json of the 3B and 7B models).
QWEN_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "<|file_sep|>": 151664,
}
CONFIG_TOKEN_KEYS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def _config(model_dir):
    return json.loads((Path(model_dir) / "config.json").read_text())


def _image_chat(processor, image_path, answer="The car is blue."):
    from PIL import Image

    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the car?"}]},
        {"role": "assistant", "content": answer},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    return processor(text=[text], images=[Image.open(image_path)], return_tensors="pt")


def test_real_vocab_matches_qwen(tiny_model_dir_real):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir_real)
    # Token ids published in transformers' Qwen2 tokenizer tests.
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert {t: tok.convert_tokens_to_ids(t) for t in QWEN_IDS} == QWEN_IDS
    assert len(tok) == 151665
    config = _config(tiny_model_dir_real)
    assert config["text_config"]["vocab_size"] == 151936
    for key, token in CONFIG_TOKEN_KEYS.items():
        assert config[key] == QWEN_IDS[token], key
    assert config["text_config"]["eos_token_id"] == QWEN_IDS["<|im_end|>"]
    # Special tokens in running text are single ids, never split by the BPE.
    assert tok.encode("a<|im_start|>b<|image_pad|>", add_special_tokens=False) == [
        64, QWEN_IDS["<|im_start|>"], 65, QWEN_IDS["<|image_pad|>"]]


def test_small_vocab_ids_match_config(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = _config(tiny_model_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + ADDED_TOKENS}
    # Specials follow the regular vocabulary contiguously, in Qwen's order.
    first = ids["<|endoftext|>"]
    assert list(ids.values()) == list(range(first, first + len(ids)))
    assert len(tok) == first + len(ids) <= config["text_config"]["vocab_size"]
    for key, token in CONFIG_TOKEN_KEYS.items():
        assert config[key] == ids[token], key
    assert config["text_config"]["bos_token_id"] == ids["<|endoftext|>"]
    assert config["text_config"]["eos_token_id"] == ids["<|im_end|>"]
    assert config["text_config"]["pad_token_id"] == ids["<|endoftext|>"]
    assert tok.encode("<|vision_start|><|image_pad|><|vision_end|>", add_special_tokens=False) == [
        ids["<|vision_start|>"], ids["<|image_pad|>"], ids["<|vision_end|>"]]


def test_chat_template_format(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": "A boat."},
    ]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>\n"
        "<|im_start|>assistant\nA boat.<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_saved_dir_loads_and_processor_counts_image_tokens(tiny_model_dir, make_image, tmp_path):
    files = {p.name for p in Path(tiny_model_dir).iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
            "processor_config.json"} <= files
    assert json.loads((Path(tiny_model_dir) / "processor_config.json").read_text())["processor_class"] == (
        "Qwen2_5_VLProcessor")
    image_processor = load_processor(tiny_model_dir).image_processor
    assert (image_processor.size["shortest_edge"], image_processor.size["longest_edge"]) == (56 * 56, 448 * 448)

    processor = load_processor(tiny_model_dir)
    config = _config(tiny_model_dir)
    image = make_image(tmp_path / "img.png", size=(112, 84))
    batch = _image_chat(processor, image)
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"} <= set(batch)
    merge = processor.image_processor.merge_size
    expected = int(batch["image_grid_thw"].prod()) // merge**2
    assert batch["image_grid_thw"].tolist() == [[1, 84 // 14, 112 // 14]]
    image_tokens = batch["input_ids"] == config["image_token_id"]
    assert int(image_tokens.sum()) == expected == 12
    assert torch.equal(batch["mm_token_type_ids"], image_tokens.long())

    # min/max_pixels override the saved bounds: a 4x larger minimum area means more tokens.
    bigger = _image_chat(load_processor(tiny_model_dir, min_pixels=224 * 224), image)
    assert int((bigger["input_ids"] == config["image_token_id"]).sum()) >= 4 * expected


def test_load_processor_rejects_mismatched_ids(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    config = _config(broken)
    config["image_token_id"] += 1
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"(?s)broken.*<\|image_pad\|>.*image_token_id"):
        load_processor(broken)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_model_dir_untied"])
def test_forward_backward_with_image(fixture, request, make_image, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    embed = model.model.language_model.embed_tokens.weight
    assert (model.lm_head.weight.data_ptr() == embed.data_ptr()) == (fixture == "tiny_model_dir")

    processor = load_processor(model_dir)
    batch = _image_chat(processor, make_image(tmp_path / "img.png", size=(84, 112), seed=1))
    labels = batch["input_ids"].clone()
    labels[batch["mm_token_type_ids"] != 0] = -100
    model.train()
    out = model(**batch, labels=labels, use_cache=False)
    # A random model predicts roughly uniformly over the vocabulary.
    assert math.isfinite(out.loss.item())
    assert abs(out.loss.item() - math.log(model.config.text_config.vocab_size)) < 1.0
    out.loss.backward()
    for name, param in [("patch_embed", model.model.visual.patch_embed.proj.weight),
                        ("merger", next(model.model.visual.merger.parameters())),
                        ("embed_tokens", embed), ("lm_head", model.lm_head.weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_export_processor_files(tiny_model_dir, tmp_path):
    # A processor saved from a subclass records the subclass name: the case to repair.
    saved = tmp_path / "saved"
    load_processor(tiny_model_dir).save_pretrained(saved)
    (saved / "model.safetensors").write_bytes(b"weights")  # must not be copied
    shutil.copy(Path(tiny_model_dir) / "config.json", saved / "config.json")
    config = json.loads((saved / "processor_config.json").read_text())
    (saved / "processor_config.json").write_text(json.dumps({**config, "processor_class": "MyProcessor"}))

    export = tmp_path / "export"
    copied = export_processor_files(saved, export)
    assert "config.json" not in copied and "model.safetensors" not in copied
    assert {"tokenizer.json", "tokenizer_config.json", "processor_config.json"} <= set(copied)
    for name in copied:
        if name.endswith(".json") and "processor_class" in (data := json.loads((export / name).read_text())):
            assert data["processor_class"] == "Qwen2_5_VLProcessor", name
    assert AutoTokenizer.from_pretrained(export)("Hello")["input_ids"] == (
        AutoTokenizer.from_pretrained(tiny_model_dir)("Hello")["input_ids"])
    assert AutoProcessor.from_pretrained(export).image_processor.merge_size == 2

    # Files that are already right (as in real checkpoints) are copied byte for byte.
    export2 = tmp_path / "export2"
    copied2 = export_processor_files(tiny_model_dir, export2)
    assert {"preprocessor_config.json", "video_preprocessor_config.json", "chat_template.jinja"} <= set(copied2)
    for name in copied2:
        assert (export2 / name).read_bytes() == (Path(tiny_model_dir) / name).read_bytes(), name
    shutil.copy(Path(tiny_model_dir) / "config.json", export2 / "config.json")
    assert load_processor(export2).tokenizer.chat_template

    # A run's data settings go into the export, so that AutoProcessor prepares inputs
    # as training did; the files they do not touch stay byte for byte.
    export3 = tmp_path / "export3"
    data = DataConfig(min_pixels=112 * 112, video_max_pixels=100352, video_fps=1.0, video_max_frames=16)
    export_processor_files(tiny_model_dir, export3, training_settings(data))
    auto = AutoProcessor.from_pretrained(export3)
    assert auto.image_processor.size["shortest_edge"] == 112 * 112
    assert auto.video_processor.size["longest_edge"] == 100352
    assert (auto.video_processor.fps, auto.video_processor.max_frames) == (1.0, 16)
    assert (export3 / "tokenizer.json").read_bytes() == (Path(tiny_model_dir) / "tokenizer.json").read_bytes()


def test_build_is_deterministic_and_cli_if_missing(tiny_model_dir, tmp_path, capsys):
    again = save_tiny(tmp_path / "again", vocab="small", seed=0)
    other = save_tiny(tmp_path / "other", vocab="small", seed=1)
    reference = load_file(Path(tiny_model_dir) / "model.safetensors")
    same = load_file(Path(again["path"]) / "model.safetensors")
    assert reference.keys() == same.keys()
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    different = load_file(Path(other["path"]) / "model.safetensors")
    # Key names follow the checkpoint layout of the installed transformers; match by part.
    for part in ("embed_tokens", "patch_embed"):
        (key,) = [k for k in reference if part in k]
        assert not torch.equal(reference[key], different[key]), key
    # The tokenizer is rebuilt identically too.
    assert (Path(again["path"]) / "tokenizer.json").read_bytes() == (
        Path(tiny_model_dir) / "tokenizer.json").read_bytes()

    before = (Path(again["path"]) / "model.safetensors").stat().st_mtime_ns
    assert main([again["path"], "--vocab", "small", "--seed", "5", "--if-missing"]) == 0
    assert "kept existing" in capsys.readouterr().out
    assert (Path(again["path"]) / "model.safetensors").stat().st_mtime_ns == before
    # Only the finished folders are left: no temp or swapped-out folders behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]
