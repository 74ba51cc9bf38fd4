"""Tests of ft.messages, ft.dataset, ft.datacheck and ft.collate: row formats, chat
rendering, labels, truncation, errors, collation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from ft.config import DataConfig
from ft.collate import Collator
from ft.datacheck import RowCheck, check_data, check_rows
from ft.dataset import ConversationDataset, build_datasets
from ft.messages import IGNORE_INDEX, IMAGE, VIDEO, parse_row
from ft.rows import DataError, load_rows
from ft.processor import load_processor

REPO = Path(__file__).resolve().parents[1]
BATCH_KEYS = {"input_ids", "attention_mask", "labels", "mm_token_type_ids", "pixel_values", "image_grid_thw"}


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def processor_real(tiny_model_dir_real):
    return load_processor(tiny_model_dir_real)


@pytest.fixture
def data_dir(tmp_path, make_image):
    """A data folder with images of distinct sizes (so a swapped order shows)."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    make_image(images / "red.png", size=(64, 48), seed=1)
    make_image(images / "blue.png", size=(120, 90), seed=2)
    (images / "broken.png").write_bytes(b"not an image")
    return tmp_path / "data"


def write_jsonl(path, rows):
    """Write rows (dicts, or strings written verbatim) one per line; return the path."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def dataset(path, processor, max_length=4096):
    return ConversationDataset(load_rows(path), processor, max_length)


def learned_spans(sample):
    """(start, end) of each maximal run of positions whose label is not IGNORE_INDEX."""
    learned = (sample["labels"] != IGNORE_INDEX).tolist() + [False]
    spans, start = [], None
    for i, flag in enumerate(learned):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_labels_are_exactly_the_assistant_replies_real_vocab(data_dir, processor_real):
    row = {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image", "image": "images/red.png"},
                                     {"type": "text", "text": "What colour is this square?"}]},
        {"role": "assistant", "content": "It is red."},
        {"role": "user", "content": "Are you sure?"},
        {"role": "assistant", "content": "Yes, quite sure."},
    ]}
    path = write_jsonl(data_dir / "train.jsonl", [row])
    sample = dataset(path, processor_real)[0]
    tokenizer = processor_real.tokenizer
    ids, labels = sample["input_ids"], sample["labels"]

    spans = learned_spans(sample)
    assert [tokenizer.decode(ids[a:b]) for a, b in spans] == ["It is red.<|im_end|>", "Yes, quite sure.<|im_end|>"]
    for a, b in spans:
        assert torch.equal(labels[a:b], ids[a:b])
        assert tokenizer.decode(ids[a - 3:a]) == "<|im_start|>assistant\n"  # header not learned
        assert tokenizer.decode(ids[b:b + 1]) == "\n"  # the newline after <|im_end|> not learned
    assert int((labels != IGNORE_INDEX).sum()) == sum(b - a for a, b in spans)

    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert image_id == 151655
    assert int((ids == image_id).sum()) == int(sample["image_grid_thw"].prod()) // 4
    assert torch.equal(sample["mm_token_type_ids"], (ids == image_id).long())

    # The ids are those of the chat template's rendering, tokenised in one piece.
    messages = parse_row(json.dumps(row), str(path), 1)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    reference = processor_real(text=[text], images=[Image.open(data_dir / "images/red.png").convert("RGB")],
                               return_tensors="pt")
    assert torch.equal(ids, reference["input_ids"][0])
    assert torch.equal(sample["pixel_values"], reference["pixel_values"])


def test_reply_starting_with_newline_tokenises_as_at_inference_real_vocab(data_dir, processor_real):
    # Tokenised together, "assistant\n" + "\nDone." would merge the newlines into one
    # token the model never sees at inference, where the prompt ends with "\n".
    path = write_jsonl(data_dir / "train.jsonl", [
        {"messages": [{"role": "user", "content": "List it."}, {"role": "assistant", "content": "\nDone."}]},
    ])
    sample = dataset(path, processor_real)[0]
    tokenizer = processor_real.tokenizer
    (a, b), = learned_spans(sample)
    assert tokenizer.decode(sample["input_ids"][a:b]) == "\nDone.<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "List it."}], tokenize=False,
                                           add_generation_prompt=True)
    assert sample["input_ids"][:a].tolist() == tokenizer.encode(prompt, add_special_tokens=False)


def test_formats_and_paths_normalise_to_the_same_sample(data_dir, processor, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # image paths must resolve against the JSONL's folder, not here
    red = str(data_dir / "images" / "red.png")
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "images/red.png"},
                                                   {"type": "text", "text": "What is this?"}]},
                      {"role": "assistant", "content": "A red square."}]},
        "",  # blank lines are skipped but still counted for line numbers
        {"image": "images/red.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                           {"from": "gpt", "value": "A red square."}]},
        {"image": [red], "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                           {"from": "gpt", "value": "A red square."}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": red},
                                                   {"type": "text", "text": "What is this?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A red "},
                                                        {"type": "text", "text": "square."}]}]},
    ]
    path = write_jsonl(data_dir / "mixed.jsonl", rows)
    rows_ds = load_rows(path)
    assert rows_ds.lines == [1, 3, 4, 5]
    ds = ConversationDataset(rows_ds, processor, 4096)
    assert ds.messages(1)[0]["content"] == [{"type": "image", "image": red}, {"type": "text", "text": "What is this?"}]
    first = ds[0]
    for i in range(1, len(ds)):
        sample = ds[i]
        assert sample.keys() == first.keys()
        for key in first:
            assert torch.equal(sample[key], first[key]), (i, key)


def test_two_images_in_one_turn_keep_their_order(data_dir, processor):
    path = write_jsonl(data_dir / "train.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "images/red.png"},
                                                   {"type": "text", "text": "and"},
                                                   {"type": "image", "image": "images/blue.png"}]},
                      {"role": "assistant", "content": "Two squares."}]},
        {"image": ["images/red.png", "images/blue.png"],
         "conversations": [{"from": "human", "value": "<image>and<image>"}, {"from": "gpt", "value": "Two squares."}]},
    ])
    ds = dataset(path, processor)
    sample = ds[0]
    red = processor.image_processor([Image.open(data_dir / "images/red.png").convert("RGB")], return_tensors="pt")
    blue = processor.image_processor([Image.open(data_dir / "images/blue.png").convert("RGB")], return_tensors="pt")
    assert torch.equal(sample["image_grid_thw"], torch.cat([red["image_grid_thw"], blue["image_grid_thw"]]))
    assert torch.equal(sample["pixel_values"], torch.cat([red["pixel_values"], blue["pixel_values"]]))
    runs = [len(m) for m in re.findall(r"1+", "".join(map(str, sample["mm_token_type_ids"].tolist())))]
    assert runs == [int(red["image_grid_thw"].prod()) // 4, int(blue["image_grid_thw"].prod()) // 4]
    assert torch.equal(ds[1]["input_ids"], sample["input_ids"])


def test_text_only_rows(data_dir, processor):
    path = write_jsonl(data_dir / "train.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"image": None, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    ])
    ds = dataset(path, processor)
    sample = ds[0]
    for i in (1, 2):
        assert torch.equal(ds[i]["input_ids"], sample["input_ids"])
        assert torch.equal(ds[i]["labels"], sample["labels"])
    assert set(sample) == {"input_ids", "labels", "mm_token_type_ids"}
    assert not sample["mm_token_type_ids"].any()
    assert processor.tokenizer.decode(sample["input_ids"]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    )


def test_truncation_cuts_the_tail_after_the_last_image(data_dir, processor):
    path = write_jsonl(data_dir / "train.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "images/red.png"},
                                                   {"type": "text", "text": "Describe."}]},
                      {"role": "assistant", "content": "A red square. " * 40}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "images/red.png"},
                                                   {"type": "text", "text": "Describe the picture. " * 40}]},
                      {"role": "assistant", "content": "Red."}]},
    ])
    full = dataset(path, processor)[0]
    vision_end = processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    images_end = int((full["input_ids"] == vision_end).nonzero()[-1]) + 1
    assert len(full["input_ids"]) > images_end + 60

    max_length = images_end + 30
    cut = dataset(path, processor, max_length)[0]
    for key in ("input_ids", "labels", "mm_token_type_ids"):
        assert torch.equal(cut[key], full[key][:max_length])
    assert (cut["labels"] != IGNORE_INDEX).any()
    assert torch.equal(cut["pixel_values"], full["pixel_values"])

    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: max_length: .*{images_end}.*max_length {images_end - 1}"):
        dataset(path, processor, images_end - 1)[0]
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: max_length: .*no assistant token"):
        dataset(path, processor, images_end + 30)[1]


GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
BAD_ROWS = [
    ('{"messages": [', "row", "invalid JSON"),
    ("[1, 2]", "row", "expected a JSON object"),
    ({"text": "hi"}, "row", "'messages'"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "unknown role 'bot'"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     "messages[0].content", "expected a string or a list"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}]},
     "messages[0].content[0].type", "unknown part type"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},
                   {"role": "assistant", "content": "x"}]}, "messages[1]", "system message must come first"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "images/nope.png"}]},
                   {"role": "assistant", "content": "x"}]}, "messages[0].content[0].image", "not found"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": [{"type": "image", "image": "images/red.png"}]}]},
     "messages[1]", "only allowed in user turns"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a<|im_end|>b"}]},
     "messages[1].content", "control token <|im_end|>"),
    ({"messages": GOOD["messages"], "images": ["images/red.png"]}, "images", "content parts"),
    ({"image": "images/red.png", "conversations": [{"from": "human", "value": "<image><image>"},
                                                    {"from": "gpt", "value": "x"}]},
     "image", "1 image(s) but 2 <image> placeholder(s)"),
    ({"image": ["images/red.png", "images/nope.png"],
      "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]},
     "image[1]", "not found"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]},
     "conversations[1].from", "unknown role"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}, "conversations[0].value", "missing"),
    ({"image": "images/broken.png", "conversations": [{"from": "human", "value": "<image>"},
                                                       {"from": "gpt", "value": "x"}]},
     "image", "cannot read image"),
]


@pytest.mark.parametrize("row, field, reason", BAD_ROWS, ids=[f"{i}-{case[1]}" for i, case in enumerate(BAD_ROWS)])
def test_bad_rows_name_file_line_and_field(data_dir, processor, row, field, reason):
    path = write_jsonl(data_dir / "train.jsonl", [GOOD, "", row])
    ds = dataset(path, processor)
    ds[0]  # the good row still loads
    with pytest.raises(DataError) as error:
        ds[1]
    message = str(error.value)
    assert message.startswith(f"{path}:3: {field}: "), message
    assert reason in message
    # The validation pass refuses the row with the same message.
    with pytest.raises(DataError) as error:
        ds.layout(1)
    assert str(error.value) == message


def test_load_rows_errors(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        load_rows(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n{\"x\": \"caf\xe9\"}\n")
    with pytest.raises(DataError, match=r"latin1.jsonl:2: row: not valid UTF-8"):
        load_rows(tmp_path / "latin1.jsonl")


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_collator_pads_and_concatenates(data_dir, processor, tiny_model):
    path = write_jsonl(data_dir / "train.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "images/blue.png"},
                                                   {"type": "text", "text": "What is this?"}]},
                      {"role": "assistant", "content": "A blue square."}]},
        {"image": "images/red.png", "conversations": [{"from": "human", "value": "<image>\nAnd this?"},
                                                      {"from": "gpt", "value": "A red one."}]},
    ])
    ds = dataset(path, processor)
    samples = [ds[0], ds[1], ds[2]]
    collator = Collator(processor)
    batch, stats, _ = collator(samples)
    assert set(batch) == BATCH_KEYS
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert stats.seq_lens == tuple(lengths) and stats.samples == 3 and not stats.dummy_image
    assert stats.image_grids == tuple(tuple(g) for s in samples[1:] for g in s["image_grid_thw"].tolist())
    pad_id = processor.tokenizer.pad_token_id
    for i, (sample, n) in enumerate(zip(samples, lengths)):
        for key, fill in (("input_ids", pad_id), ("labels", IGNORE_INDEX), ("mm_token_type_ids", 0)):
            assert torch.equal(batch[key][i, :n], sample[key])
            assert (batch[key][i, n:] == fill).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
    assert torch.equal(batch["pixel_values"], torch.cat([samples[1]["pixel_values"], samples[2]["pixel_values"]]))
    assert torch.equal(batch["image_grid_thw"], torch.cat([samples[1]["image_grid_thw"], samples[2]["image_grid_thw"]]))

    with torch.no_grad():
        loss = tiny_model(**batch).loss
    assert torch.isfinite(loss)


def test_dummy_image_changes_no_output_and_no_gradient(data_dir, processor, tiny_model):
    path = write_jsonl(data_dir / "train.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
        {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a colour."},
                      {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
                      {"role": "assistant", "content": "Red."}]},
    ])
    ds = dataset(path, processor)
    samples = [ds[0], ds[1]]
    lengths = [len(s["input_ids"]) for s in samples]
    collator = Collator(processor)
    batch, stats, _ = collator(samples)

    # The dummy image follows the first sample's last token, unlearned but attended to.
    dummy = collator.dummies[IMAGE]["input_ids"]
    n = len(dummy)
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert dummy[0] == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert dummy[-1] == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert torch.equal(batch["image_grid_thw"], collator.dummies[IMAGE]["image_grid_thw"])
    assert int((dummy == image_id).sum()) == int(collator.dummies[IMAGE]["image_grid_thw"].prod()) // 4
    first = slice(lengths[0], lengths[0] + n)
    assert torch.equal(batch["input_ids"][0, first], dummy)
    assert (batch["labels"][0, first] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][0, first] == 1).all()
    assert torch.equal(batch["mm_token_type_ids"][0, first], (dummy == image_id).long())
    assert stats.tokens == sum(lengths) and stats.dummy_image and stats.image_grids == ()
    assert int(batch["attention_mask"].sum()) == sum(lengths) + n

    # The same samples padded without a dummy: no image, so the vision tower would not run.
    length = max(lengths)
    plain = {
        "input_ids": torch.stack([torch.nn.functional.pad(s["input_ids"], (0, length - len(s["input_ids"])),
                                                          value=tokenizer.pad_token_id) for s in samples]),
        "attention_mask": torch.stack([(torch.arange(length) < k).long() for k in lengths]),
        "labels": torch.stack([torch.nn.functional.pad(s["labels"], (0, length - len(s["labels"])),
                                                       value=IGNORE_INDEX) for s in samples]),
        "mm_token_type_ids": torch.stack([torch.nn.functional.pad(s["mm_token_type_ids"],
                                                                  (0, length - len(s["input_ids"]))) for s in samples]),
    }
    tiny_model.zero_grad(set_to_none=True)
    with_dummy = tiny_model(**batch)
    with_dummy.loss.backward()
    with torch.no_grad():
        without = tiny_model(**plain)
    for i, k in enumerate(lengths):
        assert torch.allclose(with_dummy.logits[i, :k], without.logits[i, :k], rtol=0, atol=1e-6)
    assert abs(with_dummy.loss.item() - without.loss.item()) <= 1e-6

    visual = tiny_model.model.visual
    grads = [p.grad for p in visual.parameters()]
    assert all(g is not None for g in grads), "the vision tower did not run"
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    assert tiny_model.model.language_model.embed_tokens.weight.grad.abs().sum() > 0
    tiny_model.zero_grad(set_to_none=True)


def test_build_datasets_accepts_every_demo_row(tiny_model_dir):
    cfg = DataConfig(train_file=str(REPO / "data/demo/train.jsonl"), eval_file="", max_length=4096)
    processor = load_processor(tiny_model_dir, cfg.min_pixels, cfg.max_pixels, cfg.video_min_pixels,
                               cfg.video_max_pixels)
    train, evaluation = build_datasets(cfg, processor)
    assert evaluation is None
    cfg.eval_file = str(REPO / "data/demo/eval.jsonl")
    train, evaluation = build_datasets(cfg, processor)
    assert len(train) == 74 and len(evaluation) == 18
    for ds in (train, evaluation):
        checked, lengths, note = check_data(ds, "error")
        assert checked.rows is ds.rows and note is None
        assert checked.media == {IMAGE, VIDEO}  # the demo trains and evaluates on both
        for i in range(len(ds)):
            sample = ds[i]
            assert (sample["labels"] != IGNORE_INDEX).any()
            # The validation pass's tokens are exactly the sample's, found without pixels.
            assert lengths[i] == len(sample["input_ids"])
            layout = ds.layout(i)
            assert layout.keys() == {"input_ids", "labels", "mm_token_type_ids"}
            for key in layout:
                assert torch.equal(layout[key], sample[key]), (i, key)


def test_layout_matches_samples_real_vocab(data_dir, processor_real):
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "images/blue.png"},
                                                   {"type": "text", "text": "What is this?"},
                                                   {"type": "image", "image": "images/red.png"}]},
                      {"role": "assistant", "content": "\nTwo squares, one blue and one red."},
                      {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]},
        {"conversations": [{"from": "human", "value": "Say something long."},
                           {"from": "gpt", "value": "Something long. " * 40}]},
    ]
    path = write_jsonl(data_dir / "train.jsonl", rows)
    ds = dataset(path, processor_real, max_length=100)  # the text row is truncated
    _, lengths, _ = check_data(ds, "error")
    assert lengths[1] == 100
    for i in range(len(ds)):
        sample, layout = ds[i], ds.layout(i)
        assert lengths[i] == len(sample["input_ids"])
        for key in layout:
            assert torch.equal(layout[key], sample[key]), (i, key)


@pytest.fixture
def bad_data(data_dir, make_image):
    """A JSONL file with one row of each kind validation must refuse, between good ones.

    Returns (path, good line numbers, {bad line number: (field, reason)}, max_length).
    """
    images = data_dir / "images"
    make_image(images / "big.png", size=(448, 448), seed=3)  # 256 image tokens
    make_image(images / "photo.jpg", size=(200, 150), seed=4)
    jpeg = (images / "photo.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    make_image(images / "thin.png", size=(402, 2), seed=5)  # aspect ratio 201 > 200

    def image_row(image, question="What is this?", answer="A square."):
        return {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                          {"type": "text", "text": question}]},
                             {"role": "assistant", "content": answer}]}

    rows = [
        (image_row("images/red.png"), None),
        ("", None),  # blank lines are not rows but count for line numbers
        ('{"messages": [{"role": "user"', ("row", "invalid JSON")),
        ({"text": "hi"}, ("row", "expected a 'messages'")),
        ({"messages": [{"role": "bot", "content": "x"}]}, ("messages[0].role", "unknown role 'bot'")),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, ("messages[0].content", "missing")),
        ({"messages": [{"role": "user", "content": "hi"}]}, ("messages", "no assistant turn")),
        (image_row("images/nope.png"), ("messages[0].content[0].image", "image file not found")),
        (image_row("images/broken.png"), ("image", "cannot read image")),
        (image_row("images/truncated.jpg"), ("image", "truncated")),
        ({"image": "images/red.png", "conversations": [{"from": "human", "value": "<image> and <image>"},
                                                        {"from": "gpt", "value": "x"}]},
         ("image", "1 image(s) but 2 <image> placeholder(s)")),
        (image_row("images/big.png"), ("max_length", "beyond max_length 120")),
        ({"image": "images/blue.png", "conversations": [{"from": "human", "value": "<image>\nAnd this?"},
                                                         {"from": "gpt", "value": "Blue."}]}, None),
        (GOOD, None),
        (image_row("images/thin.png"), ("image", "aspect ratio")),
        (image_row("images/red.png", question="Describe it. " * 60), ("max_length", "no assistant token")),
        (image_row("images/photo.jpg", answer="A long answer. " * 60), None),  # truncated, still fine
    ]
    path = write_jsonl(data_dir / "train.jsonl", [row for row, _ in rows])
    good = [line for line, (row, bad) in enumerate(rows, start=1) if row != "" and bad is None]
    bad = {line: bad for line, (_, bad) in enumerate(rows, start=1) if bad is not None}
    return path, good, bad, 120


def test_check_data_error_lists_every_bad_row(bad_data, processor):
    path, good, bad, max_length = bad_data
    ds = dataset(path, processor, max_length)
    with pytest.raises(DataError) as error:
        check_data(ds, "error", listed=100)
    lines = str(error.value).splitlines()
    assert lines[0] == (f"{path}: {len(bad)} of {len(good) + len(bad)} rows cannot be used "
                        f"(data.on_bad_sample=skip leaves them out):")
    assert len(lines) == 1 + len(bad)
    for text, (line, (field, reason)) in zip(lines[1:], sorted(bad.items())):
        assert text.startswith(f"  {path}:{line}: {field}: "), text
        assert reason in text, text

    with pytest.raises(DataError) as error:
        check_data(ds, "error", listed=3)
    lines = str(error.value).splitlines()
    assert len(lines) == 1 + 3 + 1 and lines[-1] == f"  and {len(bad) - 3} more"


def test_check_data_skip_keeps_exactly_the_good_rows(bad_data, processor):
    path, good, bad, max_length = bad_data
    ds = dataset(path, processor, max_length)
    kept, lengths, note = check_data(ds, "skip", listed=2)
    assert kept.rows.lines == good
    assert lengths == [len(kept[i]["input_ids"]) for i in range(len(kept))]
    assert lengths[-1] == max_length  # the long answer is cut, not dropped
    lines = note.splitlines()
    assert lines[0] == f"{path}: {len(bad)} of {len(ds)} rows cannot be used, skipped (data.on_bad_sample=skip):"
    assert lines[1].startswith(f"  {path}:3: row: invalid JSON")
    assert lines[2].startswith(f"  {path}:4: row: expected a 'messages'")
    assert lines[3:] == [f"  and {len(bad) - 2} more"]

    # A file with no usable row is an error even when skipping.
    only_bad = dataset(write_jsonl(path.parent / "bad.jsonl", ["{", {"text": "x"}]), processor)
    with pytest.raises(DataError, match="2 of 2 rows cannot be used \\(no row is usable\\)"):
        check_data(only_bad, "skip")


def test_the_data_check_shards_over_ranks_and_workers(bad_data, processor):
    path, good, bad, max_length = bad_data
    ds = dataset(path, processor, max_length)
    whole = check_rows(ds, range(len(ds)))
    assert len(whole.lengths) == len(good) and len(whole.errors) == len(bad)
    assert check_rows(ds, range(len(ds)), num_workers=2) == whole

    world = 3
    parts = [check_rows(ds, range(rank, len(ds), world)) for rank in range(world)]
    assert RowCheck.merge(parts) == whole
    single = check_data(ds, "skip")
    for rank in range(world):
        kept, lengths, note = check_data(ds, "skip", rank, world, gather=lambda mine, rank=rank: (
            parts[:rank] + [mine] + parts[rank + 1:]))
        assert (kept.rows.lines, lengths, note) == (single[0].rows.lines, single[1], single[2])


def test_rows_broken_after_validation_raise_data_error(data_dir, processor, make_image):
    make_image(data_dir / "images" / "photo.jpg", size=(200, 150), seed=4)
    path = write_jsonl(data_dir / "train.jsonl", [
        GOOD,
        {"image": "images/red.png", "conversations": [{"from": "human", "value": "<image>"},
                                                       {"from": "gpt", "value": "Red."}]},
        {"image": "images/photo.jpg", "conversations": [{"from": "human", "value": "<image>"},
                                                         {"from": "gpt", "value": "A photo."}]},
    ])
    ds, _, _ = check_data(dataset(path, processor), "error")
    (data_dir / "images" / "red.png").unlink()
    jpeg = data_dir / "images" / "photo.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:2000])
    ds[0]
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: image: image file not found"):
        ds[1]
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: image: cannot read image .*truncated"):
        ds[2]


# slow: whether torch gets imported can only be seen in a fresh interpreter
@pytest.mark.slow
def test_row_formats_parse_without_torch():
    """ft.messages (row formats to normalised messages) imports no torch, so a data tool
    can read and check rows without it."""
    import subprocess
    import sys

    code = "import sys, ft.messages; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
