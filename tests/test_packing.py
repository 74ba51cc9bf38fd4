"""Packing (ft.packing, the packed Collator): the plan, the positions, and packed rows
computing what the same samples compute padded, one per row (bare model, and FSDP1 on
2 gloo ranks: training gradients and the eval loss)."""

import os
from collections import Counter

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

from conftest import assert_same_loss_and_grads, chat_row, free_port, loss_and_grads, write_jsonl, write_test_image
from ft.collate import Collator
from ft.dataset import ConversationDataset
from ft.messages import IGNORE_INDEX, IMAGE
from ft.rows import load_rows
from ft.model import loss_sum
from ft.packing import PackedBatchSampler, RopeIndex, eval_batches, pack, varlen_kwargs, varlen_refusal
from ft.processor import load_processor


# -------------------------------------------------------------------------------------
# The plan
# -------------------------------------------------------------------------------------
def _lengths(n, seed=0, lo=20, hi=500):
    g = torch.Generator().manual_seed(seed)
    # long-tailed: many short rows, a few long ones
    return (lo + (torch.rand(n, generator=g) ** 3) * (hi - lo)).long().tolist()


def test_pack_places_every_row_once_within_capacity():
    lengths = _lengths(300)
    packs = pack(range(300), lengths, 512)
    assert sorted(r for p in packs for r in p) == list(range(300))
    assert all(sum(lengths[r] for r in p) <= 512 for p in packs)
    # Best fit decreasing is within 11/9 OPT + 1 packs; the volume bound is a floor of OPT.
    assert len(packs) <= 11 / 9 * -(-sum(lengths) // 512) + 1
    assert packs == pack(range(300), lengths, 512)  # deterministic
    assert pack([0, 1, 2, 3], [6, 4, 4, 6], 10) == [[0, 1], [3, 2]]  # two full packs


def test_packed_sampler_epochs_are_equal_on_ranks_disjoint_balanced_and_resumable():
    lengths, world, bs, cap = _lengths(400, seed=1), 2, 2, 600
    ranks = [PackedBatchSampler(lengths, cap, bs, world, r, seed=5) for r in range(world)]
    for epoch in range(3):
        mine = [s.batches(epoch) for s in ranks]
        assert len({len(m) for m in mine}) == 1 and ranks[0].steps_in(epoch) == len(mine[0]) > 0
        rows = [r for m in mine for batch in m for p in batch for r in p]
        assert len(rows) == len(set(rows))  # no row twice in an epoch
        assert all(len(batch) == bs for m in mine for batch in m)
        packs = [p for m in mine for batch in m for p in batch]
        assert all(sum(lengths[r] for r in p) <= cap for p in packs)
        # The fullest pack of the epoch is in the first micro-batch.
        fullest = max(sum(lengths[r] for r in p) for p in packs)
        assert fullest in [sum(lengths[r] for r in p) for m in mine for p in m[0]]
        # Ranks of one micro-batch carry similar tokens: within the largest pack.
        for step in zip(*mine):
            per_rank = [sum(lengths[r] for p in batch for r in p) for batch in step]
            assert max(per_rank) - min(per_rank) <= max(lengths)
        assert ranks[1].samples_in(epoch, 0) == sum(len(p) for p in mine[1][0])
        _, used, left = ranks[0].efficiency(epoch)
        assert used == len(rows) and used + left == len(lengths)
    assert ranks[0].batches(0) != ranks[0].batches(1)  # reshuffled every epoch
    again = PackedBatchSampler(lengths, cap, bs, world, 0, seed=5)
    assert again.batches(2) == ranks[0].batches(2)  # a pure function of (seed, epoch)
    again.set_position(2, 3)
    assert list(again) == ranks[0].batches(2)[3:]


def test_packed_steps_are_the_same_packs_at_any_world_size():
    """12 packs a step, split as (per-device packs, accumulation, world size) in several
    ways: each step holds the same packs (the same rows together), dealt to disjoint
    ranks in equal numbers, and a position in steps means the same for every split."""
    lengths, cap = _lengths(500, seed=3), 700
    splits = [(12, 1, 1), (3, 2, 2), (2, 3, 2), (1, 6, 2), (4, 1, 3), (2, 2, 3), (1, 4, 3)]

    def steps_of(split, epoch):
        bs, accum, world = split
        ranks = [PackedBatchSampler(lengths, cap, bs, world, r, seed=9, accumulation=accum) for r in range(world)]
        mine = [s.batches(epoch) for s in ranks]
        n = ranks[0].steps_in(epoch)
        assert n > 3 and {len(m) for m in mine} == {n * accum}
        assert all(len(batch) == bs for m in mine for batch in m)
        out = []
        for t in range(n):
            packs = [tuple(sorted(p)) for m in mine for batch in m[t * accum:(t + 1) * accum] for p in batch]
            assert len(packs) == 12
            out.append(sorted(packs))
        rows = [r for step in out for p in step for r in p]
        assert len(rows) == len(set(rows))  # no row twice in an epoch
        ranks[-1].set_position(epoch, 2)
        assert list(ranks[-1]) == mine[-1][2 * accum:]
        return out

    for epoch in (0, 1):
        reference = steps_of(splits[0], epoch)
        for split in splits[1:]:
            assert steps_of(split, epoch) == reference, split


def test_eval_batches_cover_every_row_once():
    lengths, world = _lengths(37, seed=2), 3
    plans = [eval_batches(lengths, 512, 2, world, r) for r in range(world)]
    rows = Counter(r for batches, _ in plans for batch in batches for p in batch for r in p)
    assert sorted(rows) == list(range(37)) and set(rows.values()) == {1}
    assert {n for _, n in plans} == {max(len(b) for b, _ in plans)}


def test_flash_packing_refused_where_transformers_passes_varlen_kwargs_to_the_vision_tower(monkeypatch):
    from transformers.utils import generic

    monkeypatch.setattr(generic, "_FLASH_VARLEN_KWARGS", ("cu_seq_lens_q",), raising=False)
    assert varlen_refusal("flash_attention_2") is None
    monkeypatch.delattr(generic, "_FLASH_VARLEN_KWARGS")
    assert "attn_implementation=sdpa" in varlen_refusal("flash_attention_2")
    assert varlen_refusal("sdpa") is None and varlen_refusal("eager") is None


def test_varlen_kwargs():
    kw = varlen_kwargs([3, 5, 2])
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 8, 10] and kw["cu_seq_lens_q"].dtype == torch.int32
    assert torch.equal(kw["cu_seq_lens_k"], kw["cu_seq_lens_q"])
    assert kw["max_length_q"] == kw["max_length_k"] == 5


# -------------------------------------------------------------------------------------
# The packed collator on real samples
# -------------------------------------------------------------------------------------
def _rows(d):
    write_test_image(d / "a.png", size=(84, 56), seed=1)
    write_test_image(d / "b.png", size=(56, 112), seed=2)
    write_test_image(d / "c.png", size=(56, 56), seed=3)
    img = lambda name: {"type": "image", "image": name}  # noqa: E731
    rows = [
        chat_row([img("a.png"), img("b.png"), {"type": "text", "text": "Compare the two."}],
            "The first is wider; the second is taller and a little darker."),  # two images
        chat_row("Count to five.", "One, two, three, four, five."),  # text only
        chat_row([img("c.png"), {"type": "text", "text": "What is it?"}], "Noise over a gradient."),
        chat_row("Say hi.", "Hi."),
        chat_row("Name three colours.", "Red, green and a deep, dark blue."),
        chat_row("Spell cat.", "C, A, T."),
    ]
    return write_jsonl(d / "rows.jsonl", rows)


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    return _rows(tmp_path_factory.mktemp("packing-data"))


@pytest.fixture(scope="module")
def setup(tiny_model_dir, rows_file):
    processor = load_processor(tiny_model_dir)
    ds = ConversationDataset(load_rows(rows_file), processor, 512)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    return processor, ds, model


def test_positions_are_the_models_own_per_sample(setup):
    """Rows 1-3 equal what the model computes for the sample alone; row 0 and all rows
    restart at every sample and at the pad segment."""
    processor, ds, model = setup
    samples = [ds[0], ds[1], ds[2]]
    batch = Collator(processor, RopeIndex(model.config))([samples])
    pos = batch.inputs["position_ids"][:, 0]
    start = 0
    for s in samples:
        n = len(s["input_ids"])
        own, _ = model.model.get_rope_index(s["input_ids"][None], mm_token_type_ids=s["mm_token_type_ids"][None],
                                            image_grid_thw=s.get("image_grid_thw"))
        assert torch.equal(pos[1:, start:start + n], own[:, 0])
        assert torch.equal(pos[0, start:start + n], torch.arange(n))
        start += n
    pad = pos.shape[1] - start
    assert pos.shape[1] % 8 == 0 and torch.equal(pos[:, start:], torch.arange(pad).expand(4, pad))
    assert "attention_mask" not in batch.inputs
    assert batch.stats.seq_lens == tuple(len(s["input_ids"]) for s in samples)
    assert batch.stats.rows == 1 and batch.stats.row_length == pos.shape[1]


def test_text_only_pack_gets_the_dummy_image_as_its_own_segment(setup):
    processor, ds, model = setup
    collate = Collator(processor, RopeIndex(model.config), varlen=True)
    batch = collate([[ds[1], ds[3]], [ds[4]]])
    n = len(ds[1]["input_ids"]) + len(ds[3]["input_ids"])
    dummy = len(collate.dummies[IMAGE]["input_ids"])
    inputs = batch.inputs
    assert batch.stats.dummy_image and batch.stats.samples == 3
    assert torch.equal(inputs["position_ids"][0, 0, n:n + dummy], torch.arange(dummy))
    assert (inputs["labels"][0, n:n + dummy] == IGNORE_INDEX).all()
    assert torch.equal(inputs["image_grid_thw"], collate.dummies[IMAGE]["image_grid_thw"])
    # flash-attention's segments: every sample, the dummy image and each row's pad.
    rows, length = inputs["input_ids"].shape
    bounds = inputs["cu_seq_lens_q"].tolist()
    assert bounds[-1] == rows * length and n in bounds and n + dummy in bounds and length in bounds


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_padded_bare_model(setup, tiny_model_dir, attn):
    """Loss and gradients of 6 samples: padded in 3 rows of 2, packed in 2 rows of 3
    (one with two images, text-only ones, and a text-only pack with the dummy image)."""
    processor, ds, _ = setup
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                               attn_implementation=attn)
    samples = [ds[i] for i in range(6)]
    padded = [Collator(processor)(samples[i:i + 2]).inputs for i in (0, 2, 4)]
    collate = Collator(processor, RopeIndex(model.config))
    packed = [collate([[samples[0], samples[1], samples[2]]]).inputs,
              collate([[samples[3], samples[5]], [samples[4]]]).inputs]  # text only: dummy image
    assert_same_loss_and_grads(loss_and_grads(model, padded), loss_and_grads(model, packed))


def test_no_attention_across_samples(setup):
    """Changing the first sample's tokens leaves the next sample's logits bit-identical;
    with an attention mask (which turns off transformers' packed-sequence detection) they
    change, so the check can fail."""
    processor, ds, model = setup
    collate = Collator(processor, RopeIndex(model.config))
    a, b = ds[1], ds[2]
    changed = dict(a, input_ids=a["input_ids"].clone())
    text = (changed["labels"] != IGNORE_INDEX).nonzero()[:, 0]
    changed["input_ids"][text] = (changed["input_ids"][text] + 7) % model.config.text_config.vocab_size
    n = len(a["input_ids"])
    span = slice(n, n + len(b["input_ids"]))
    with torch.no_grad():
        # use_cache=False as in training: a cache also turns the detection off.
        logits = [model(**{k: v for k, v in collate([[x, b]]).inputs.items() if k != "labels"},
                        use_cache=False).logits[0, span] for x in (a, changed)]
        assert torch.equal(logits[0], logits[1])
        masked = []
        for x in (a, changed):
            inputs = {k: v for k, v in collate([[x, b]]).inputs.items() if k != "labels"}
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            masked.append(model(**inputs, use_cache=False).logits[0, span])
        assert not torch.equal(masked[0], masked[1])


# -------------------------------------------------------------------------------------
# FSDP1, 2 gloo ranks: training gradients and the eval loss
# -------------------------------------------------------------------------------------
def _worker(rank, world, port, model_dir, rows_file, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from ft import dist
    from ft.config import FSDPConfig
    from ft.fsdp_wrap import plan_units, wrap_model
    from ft.evaluation import evaluate
    from ft.model import load_model
    from ft.packing import PackedRows

    torch.set_num_threads(1)
    info = dist.init_distributed()
    processor = load_processor(model_dir)
    ds = ConversationDataset(load_rows(rows_file), processor, 512)
    model = load_model(model_dir, info)
    model = wrap_model(model, plan_units(model), FSDPConfig(), "fp32", info)
    collate = Collator(processor, RopeIndex(AutoConfig.from_pretrained(model_dir)))
    # The same three samples per rank: padded as 3 rows, packed as one row (rank 1's
    # rows are text only, so its packed batch carries the dummy image).
    mine = [ds[i] for i in ((0, 1, 2) if rank == 0 else (3, 4, 5))]
    result = {}
    for name, batch in (("padded", Collator(processor)(mine)), ("packed", collate([mine]))):
        s, n = loss_sum(model, batch.inputs, 7)
        total_n = torch.tensor(float(n))
        torch.distributed.all_reduce(total_n)
        (s / total_n).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        result[name] = {"loss": s.item(), "grads": grads}
    # Eval over all 6 rows: padded batches of 2 rows per rank vs packs of 512 tokens.
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    local = list(range(rank, len(ds), world))
    padded_plan = ([local[i:i + 2] for i in range(0, len(local), 2)], 2, 2)
    packs, n_batches = eval_batches(lengths, 512, 1, world, rank)
    packed_plan = (packs or [[[0]]], len(packs), n_batches)
    result["eval"] = {
        "padded": evaluate(model, ds, Collator(processor), padded_plan, 0, 7, "error", info),
        "packed": evaluate(model, PackedRows(ds), collate, packed_plan, 0, 7, "error", info),
    }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.cleanup()


# slow: 2 gloo ranks are processes of their own (mp.spawn)
@pytest.mark.slow
def test_fsdp_two_ranks_packed_equals_padded(tiny_model_dir, rows_file, tmp_path):
    mp.spawn(_worker, args=(2, free_port(), tiny_model_dir, rows_file, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        padded, packed = result["padded"], result["packed"]
        assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-5)
        for a, e in zip(packed["grads"], padded["grads"]):
            assert (a - e).abs().max().item() <= 1e-5 * max(e.abs().max().item(), 1.0)
        assert result["eval"]["packed"] == pytest.approx(result["eval"]["padded"], rel=1e-5)


def test_resume_refuses_a_change_of_packing():
    from ft.ckpt import ResumeError, check_run_shape

    unpacked = {"world_size": 2, "seed": 1, "pack_length": 0}
    check_run_shape("ck", unpacked, {"world_size": 2, "seed": 1, "pack_length": 0})
    with pytest.raises(ResumeError, match="pack_length: 0 -> 2048"):
        check_run_shape("ck", unpacked, {"world_size": 2, "seed": 1, "pack_length": 2048})
    with pytest.raises(ResumeError, match="pack_length: 2048 -> 4096"):
        check_run_shape("ck", {"pack_length": 2048}, {"pack_length": 4096})
