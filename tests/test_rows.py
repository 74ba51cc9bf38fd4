"""Hugging Face datasets as input: a save_to_disk folder, Parquet and Arrow files give the
samples JSONL gives; their bad rows are named by dataset and row; eval_fraction."""

import json

import datasets
import pytest
import torch

from conftest import as_dataset, write_test_image, write_test_video
from ft.config import ConfigError
from ft.config_load import load_config
from ft.datacheck import check_data
from ft.dataset import ConversationDataset, build_datasets, hold_out
from ft.messages import IGNORE_INDEX
from ft.rows import DataError, load_rows
from ft.config import DataConfig
from ft.processor import load_processor_for
from ft.rows import DatasetRows, JsonlRows


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor_for(tiny_model_dir, DataConfig())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same rows as JSONL (paths; messages and LLaVA forms, text only, two images,
    a video, an image with a video) and as a save_to_disk folder, a Parquet file and an
    Arrow file of TRL-format records with the images embedded."""
    d = tmp_path_factory.mktemp("rows")
    write_test_image(d / "a.png", size=(56, 84), seed=1)
    write_test_image(d / "b.jpg", size=(112, 56), seed=2)
    write_test_video(d / "clip.mp4", frames=6, size=(64, 48), fps=4, seed=3)
    user = lambda *parts: {"role": "user", "content": list(parts)}  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    rows = [
        {"messages": [user(text("Say hi.")), {"role": "assistant", "content": "Hi."}]},
        {"messages": [user({"type": "image", "image": "a.png"}, {"type": "image", "image": "b.jpg"},
                           text("Which is wider?")), {"role": "assistant", "content": "The second."}]},
        {"image": "b.jpg", "conversations": [{"from": "human", "value": "<image>\nDescribe it."},
                                             {"from": "gpt", "value": "Noise on a gradient."}]},
        {"messages": [{"role": "system", "content": "Be brief."}, user({"type": "video", "video": "clip.mp4"},
                                                                      text("What happens?")),
                      {"role": "assistant", "content": "It brightens."}]},
        {"image": "a.png", "video": "clip.mp4",
         "conversations": [{"from": "human", "value": "<image>\n<video>\nSame?"}, {"from": "gpt", "value": "No."}]},
    ]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = as_dataset(d / "rows.jsonl")
    dataset.save_to_disk(str(d / "saved"))
    dataset.to_parquet(str(d / "rows.parquet"))
    (d / "shards").mkdir()
    dataset.select(range(3)).to_parquet(str(d / "shards" / "part-0.parquet"))
    dataset.select(range(3, 5)).to_parquet(str(d / "shards" / "part-1.parquet"))
    return d


def _samples(path, processor):
    ds = ConversationDataset(load_rows(path), processor, 4096)
    return [ds[i] for i in range(len(ds))], check_data(ds, "error")[1]


@pytest.mark.parametrize("form", ["saved", "rows.parquet", "shards/part-*.parquet", "arrow"])
def test_datasets_give_the_samples_jsonl_gives(data, processor, form):
    if form == "arrow":  # the Arrow file a save_to_disk folder holds, read where it lies
        form = next((data / "saved").glob("*.arrow")).relative_to(data)
    rows = load_rows(data / form)
    assert isinstance(rows, DatasetRows) and len(rows) == 5
    expected, lengths = _samples(data / "rows.jsonl", processor)
    got, got_lengths = _samples(data / form, processor)
    assert got_lengths == lengths
    for i, (a, b) in enumerate(zip(expected, got)):
        assert a.keys() == b.keys(), i
        for key in a:
            assert torch.equal(a[key], b[key]), (i, key)
    assert (expected[1]["labels"] != IGNORE_INDEX).any() and "pixel_values_videos" in expected[4]


def test_nothing_is_decoded_or_loaded_before_access(data):
    rows = load_rows(data / "saved")
    # Backed by the folder's memory-mapped Arrow file, not a copy in memory.
    assert rows.dataset.cache_files and rows.dataset.cache_files[0]["filename"].startswith(str(data / "saved"))
    record = rows.raw(1)
    assert isinstance(record["images"][0]["bytes"], bytes)  # still encoded
    assert str(rows.where(1).error("f", "r")) == f"{data / 'saved'}:row 1: f: r"
    assert str(rows.select([4, 1]).where(1).error("f", "r")).startswith(f"{data / 'saved'}:row 1: ")


def test_bad_dataset_rows_are_named_by_dataset_and_row(data, processor, tmp_path):
    good = as_dataset(data / "rows.jsonl").select([0, 1])
    broken = good.to_list()
    broken[1]["images"][1] = {"bytes": b"not an image", "path": None}
    extra = dict(broken[1], images=broken[1]["images"] + [broken[1]["images"][0]])
    no_answer = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "video": None}]}],
                 "images": []}
    bad = datasets.Dataset.from_list([broken[0], broken[1], extra, no_answer], features=good.features)
    bad.save_to_disk(str(tmp_path / "bad"))
    name = str(tmp_path / "bad")
    ds = ConversationDataset(load_rows(name), processor, 4096)
    with pytest.raises(DataError) as error:
        check_data(ds, "error")
    message = str(error.value)
    assert f"{name}: 3 of 4 rows cannot be used" in message
    assert f"{name}:row 1: image: cannot read image <embedded image, 12 bytes>" in message
    assert f"{name}:row 2: images: 3 image(s) but 2 {{\"type\": \"image\"}} placeholder(s)" in message
    assert f"{name}:row 3: messages: no assistant turn" in message
    kept, lengths, note = check_data(ds, "skip")
    assert len(kept) == 1 and "3 of 4 rows" in note
    with pytest.raises(DataError, match=rf"^{name}:row 1: image: cannot read image"):
        ds[1]


def test_sources_that_are_not_datasets_are_refused_by_name(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: not a dataset folder"):
        load_rows(tmp_path / "empty")
    with pytest.raises(DataError, match="no file matches"):
        load_rows(tmp_path / "nothing-*.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"messages": [[]]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"a DatasetDict with splits train: point at one, e\.g\. .*dd/train"):
        load_rows(tmp_path / "dd")
    datasets.Dataset.from_dict({"text": ["hi"]}).save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(DataError, match="no 'messages' or 'conversations' column"):
        load_rows(tmp_path / "plain")
    assert isinstance(load_rows(_jsonl(tmp_path)), JsonlRows)


def _jsonl(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b"}]}) + "\n")
    return path


# -------------------------------------------------------------------------------------
# eval_fraction
# -------------------------------------------------------------------------------------
def test_hold_out_is_disjoint_deterministic_and_seeded():
    train, held = hold_out(100, 0.1, seed=7)
    assert len(held) == 10 and len(train) == 90 and not set(train) & set(held)
    assert sorted(train + held) == list(range(100)) and held == sorted(held)
    assert hold_out(100, 0.1, seed=7) == (train, held)  # every rank, every launch
    assert hold_out(100, 0.1, seed=8)[1] != held
    assert hold_out(5, 0.01, seed=0)[1].__len__() == 1  # at least one row
    assert len(hold_out(2, 0.9, seed=0)[0]) == 1  # never all


def test_eval_fraction_carves_the_eval_set_out_of_train_file(data, processor):
    cfg = DataConfig(train_file=str(data / "saved"), eval_file="", eval_fraction=0.4)
    train, evaluation = build_datasets(cfg, processor, seed=3)
    assert len(train) == 3 and len(evaluation) == 2
    _, held = hold_out(5, 0.4, 3)
    full = ConversationDataset(load_rows(data / "saved"), processor, cfg.max_length)
    for i, row in enumerate(held):
        assert torch.equal(evaluation[i]["input_ids"], full[row]["input_ids"])
    # An error in a held-out row names the row of the whole dataset.
    assert evaluation.rows.where(0).place == f"row {held[0]}"


def test_eval_fraction_with_an_eval_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="data.eval_fraction .* data.eval_file is set too"):
        load_config(None, ["data.eval_fraction=0.1"])
    with pytest.raises(ConfigError, match=r"data.eval_fraction: 1.0 must be in \[0, 1\)"):
        load_config(None, ["data.eval_fraction=1.0", "data.eval_file="])
    assert load_config(None, ["data.eval_fraction=0.1", "data.eval_file="]).data.eval_fraction == 0.1
