"""Sequence parallelism (`ft.sequence`): the head split and its refusals, the packed
rows' mask, the frame split (fast); and on 2 gloo ranks, the Ulysses attention against
one process's sdpa on the whole sequence, the vision tower split by frames against one
process's, and each family's loss and gradients with the model split over 2 ranks
against one process on the same rows: a long video row, a row with two images and a
text-only row, padded and packed."""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import AutoConfig

from conftest import chat_row, free_port, write_jsonl, write_test_image, write_test_video
from ft import sequence
from ft.collate import Collator
from ft.config import ConfigError
from ft.dataset import ConversationDataset
from ft.dist import DistInfo
from ft.families import read_family
from ft.messages import IMAGE, VIDEO
from ft.model import loss_sum
from ft.packing import RopeIndex
from ft.processor import load_processor
from ft.rows import load_rows

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def heads(q: int, kv: int) -> SimpleNamespace:
    return SimpleNamespace(num_attention_heads=q, num_key_value_heads=kv)


def test_head_split_of_qwen2_5_vl_7b_and_the_refusal_with_the_numbers():
    seven_b = heads(28, 4)  # Qwen2.5-VL-7B: 28 query heads, 4 key/value heads
    assert sequence.head_split(seven_b, 2) == 1 and sequence.head_split(seven_b, 4) == 1
    assert sequence.head_split(seven_b, 7) == 7  # 4 key/value heads repeated to 28: 4 per rank
    assert sequence.head_split(heads(32, 8), 16) == 2  # 8 -> 16 key/value heads
    with pytest.raises(ConfigError, match=r"sequence_parallel_size=8 does not divide the 28 query heads.*"
                                          r"\[1, 2, 4, 7, 14, 28\]"):
        sequence.head_split(seven_b, 8)


def test_groups_must_divide_the_world_size():
    info = DistInfo(rank=3, world_size=4, local_rank=3, device=torch.device("cpu"))
    two = sequence.grouped(info, 2)
    assert (two.data_rank, two.data_world) == (1, 2)
    assert (info.data_rank, info.data_world) == (3, 4)
    with pytest.raises(ConfigError, match="sequence_parallel_size=3 does not divide the world size 4"):
        sequence.grouped(info, 3)


def test_apply_refuses_eager_attention_and_moe_by_name(tiny_family_dir):
    info = sequence.grouped(DistInfo(0, 2, 0, torch.device("cpu")), 2)
    dense = read_family(tiny_family_dir("qwen2_5_vl")).model_class()._from_config(
        AutoConfig.from_pretrained(tiny_family_dir("qwen2_5_vl")))
    with pytest.raises(ConfigError, match="model.attn_implementation='eager' is not one of"):
        sequence.apply(dense, info, "eager")
    moe_dir = tiny_family_dir("qwen3_vl_moe")
    moe = read_family(moe_dir).model_class()._from_config(AutoConfig.from_pretrained(moe_dir))
    with pytest.raises(ConfigError, match="not wired for Qwen3-VL-MoE"):
        sequence.apply(moe, info, "sdpa")
    assert sequence.apply(dense, sequence.grouped(info, 1), "sdpa") == ""  # off: nothing changed
    assert sequence.shard_of(dense) is None


def test_segment_mask_keeps_packed_samples_apart():
    # Two rows: samples of 3 and 2 tokens, then a pad segment restarting at 0; one sample.
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    mask = sequence.segment_mask(positions)
    segments = torch.tensor([0, 0, 0, 1, 1, 2])
    expected = (segments[:, None] == segments[None, :]) & torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(mask[0, 0], expected)
    assert torch.equal(mask[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())
    assert sequence.segment_mask(positions[1:]) is None  # one sample a row: plain causal attention


def test_shard_local_takes_the_rank_s_slice_and_refuses_an_uneven_row():
    t = torch.arange(12).view(2, 6)
    assert sequence.SequenceShard(3, 1, None, "sdpa").local(t).tolist() == [[2, 3], [8, 9]]
    with pytest.raises(RuntimeError, match="does not split over 4 ranks"):
        sequence.SequenceShard(4, 0, None, "sdpa").local(t)


def test_split_inputs_takes_the_rank_s_tokens_with_their_global_positions_and_deepstack_rows():
    shard = sequence.SequenceShard(2, 1, None, "sdpa")
    embeds = torch.arange(12.0).view(1, 6, 2)
    visual = torch.tensor([[False, True, True, False, True, True]])
    deepstack = [torch.arange(4.0)[:, None].expand(4, 2)]  # one row per vision token, in order
    _, kw = sequence.split_inputs(shard, (), {"inputs_embeds": embeds, "position_ids": None,
                                              "attention_mask": torch.ones(1, 6), "visual_pos_masks": visual,
                                              "deepstack_visual_embeds": deepstack})
    assert torch.equal(kw["inputs_embeds"], embeds[:, 3:]) and kw["attention_mask"] is None
    assert kw["position_ids"].tolist() == [[[3, 4, 5]]] * 3  # not 0, 1, 2: the row's positions
    assert kw["visual_pos_masks"].tolist() == [[False, True, True]]
    assert kw["deepstack_visual_embeds"][0][:, 0].tolist() == [2.0, 3.0]  # the row's 3rd and 4th vision tokens
    assert shard.mask is None


def test_frame_split_deals_temporal_patches_in_order_and_evenly():
    # A 6-temporal-patch video of 4 x 4 patches, then an image of 2 x 4: 8 pieces, 104 patch rows.
    grid = torch.tensor([[6, 4, 4], [1, 2, 4]])
    plan = sequence.frame_split(grid, 2, merge=2)
    assert [(start, end) for start, end, _, _ in plan] == [(0, 48), (48, 104)]
    assert plan[0][2].tolist() == [[1, 4, 4]] * 3
    assert plan[1][2].tolist() == [[1, 4, 4]] * 3 + [[1, 2, 4]]
    assert [merged for *_, merged in plan] == [12, 14]  # 2 x 2 patches merge into one token
    four = sequence.frame_split(grid, 4, merge=2)
    assert [end - start for start, end, _, _ in four] == [32, 16, 32, 24] and four[-1][1] == 104
    assert sequence.frame_split(torch.tensor([[1, 4, 4]]), 2, merge=2) is None  # one frame: not split


def _rows(data_dir):
    """A long video row (24 frames), a row with two images, a text-only row."""
    write_test_video(data_dir / "long.mp4", frames=24, size=(64, 48), fps=4, seed=5)
    write_test_image(data_dir / "a.png", size=(84, 56), seed=1)
    write_test_image(data_dir / "b.png", size=(56, 56), seed=2)
    rows = [
        chat_row([{"type": "video", "video": "long.mp4"}, {"type": "text", "text": "What happens?"}],
            "The noise drifts slowly while the clip gets brighter, frame after frame."),
        chat_row([{"type": "image", "image": "a.png"}, {"type": "image", "image": "b.png"},
             {"type": "text", "text": "Which is wider?"}], "The first one."),
        chat_row("Count to five.", "One, two, three, four, five."),
    ]
    return write_jsonl(data_dir / "rows.jsonl", rows)


def _batches(model_dir, rows_file, multiple):
    """The rows padded into one batch, and packed into one row."""
    processor = load_processor(model_dir, video_min_pixels=12544, video_max_pixels=50176)
    ds = ConversationDataset(load_rows(rows_file), processor, 4096)
    samples = [ds[i] for i in range(len(ds))]
    kinds = (IMAGE, VIDEO)
    padded = Collator(processor, media=kinds, multiple=multiple)(samples).inputs
    packed = Collator(processor, RopeIndex(AutoConfig.from_pretrained(model_dir)), media=kinds,
                      multiple=multiple)([samples]).inputs
    return {"padded": padded, "packed": packed}


def _attention(rank, world, out_dir):
    """Ulysses attention against sdpa on the whole sequence, with 1 key/value head (so
    it is repeated to split), with a packed row's mask, and through the flash path."""
    info = sequence.grouped(DistInfo(rank, world, rank, torch.device("cpu")), world)
    shard = sequence.SequenceShard(world, rank, sequence.new_group(info), "sdpa", kv_repeat=2)
    torch.manual_seed(0)
    b, hq, hkv, length, d = 2, 4, 1, 12, 8
    q, k, v = (torch.randn(b, h, length, d, dtype=torch.float64, requires_grad=True) for h in (hq, hkv, hkv))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2], list(range(12))])
    result = {}
    for name, mask in (("causal", None), ("packed", sequence.segment_mask(positions))):
        shard.mask = mask
        local = [shard.local(t, 2).detach().requires_grad_() for t in (q, k, v)]
        module = SimpleNamespace(training=True, num_key_value_groups=hq // hkv, is_causal=True)
        out, _ = sequence.attention(shard, module, *local, None, scaling=d ** -0.5)
        (out * shard.local(_weights(b, length, hq, d), 1)).sum().backward()
        result[name] = {"out": out.detach(), "grads": [t.grad for t in local]}
    # flash-attention's path on the packed row 0, its kernel stood in by per-sample sdpa
    # (no flash-attn on a CPU): the kernel gets the whole row and the collator's cu_seq_lens,
    # and not this rank's slice of the positions.
    shard.kernel, shard.mask = "flash_attention_2", None
    cu = torch.tensor([0, 5, 9, 12], dtype=torch.int32)

    def flash(module, q_, k_, v_, mask, scaling=None, cu_seq_lens_q=None, **kwargs):
        assert mask is None and "position_ids" not in kwargs and q_.shape[2] == length
        k_, v_ = (t.repeat_interleave(q_.shape[1] // t.shape[1], 1) for t in (k_, v_))
        bounds = cu_seq_lens_q.tolist()
        parts = [F.scaled_dot_product_attention(q_[:, :, a:e], k_[:, :, a:e], v_[:, :, a:e], is_causal=True,
                                                scale=scaling) for a, e in zip(bounds, bounds[1:])]
        return torch.cat(parts, 2).transpose(1, 2), None

    real, sequence.flash_attention_forward = sequence.flash_attention_forward, flash
    local = [shard.local(t[:1], 2).detach().requires_grad_() for t in (q, k, v)]
    out, _ = sequence.attention(shard, module, *local, None, scaling=d ** -0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                max_length_q=5, max_length_k=5, position_ids=shard.local(positions[:1], -1))
    (out * shard.local(_weights(1, length, hq, d), 1)).sum().backward()
    result["flash"] = {"out": out.detach(), "grads": [t.grad for t in local]}
    sequence.flash_attention_forward = real
    torch.save(result, os.path.join(out_dir, f"attention{rank}.pt"))


def _weights(*shape):
    """Fixed weights of a sum over the attention output: a loss whose gradient differs
    by position and head."""
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float64).view(shape).sin()


def _join(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")


def _worker(rank, world, port, rows_file, dirs, out_dir):
    """The one spawn both 2-rank tests read: the attention alone, then the models."""
    _join(rank, world, port)
    _attention(rank, world, out_dir)
    _models(rank, world, rows_file, dirs, out_dir)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    return _rows(tmp_path_factory.mktemp("sp-data"))


@pytest.fixture(scope="module")
def two_ranks(tiny_family_dir, rows_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sp-ranks")
    dirs = {family: tiny_family_dir(family) for family in FAMILIES}
    mp.spawn(_worker, args=(2, free_port(), rows_file, dirs, str(out)), nprocs=2, join=True)
    return out


# slow: 2 gloo ranks are processes of their own (mp.spawn)
@pytest.mark.slow
def test_ulysses_attention_equals_sdpa_on_the_whole_sequence(two_ranks):
    torch.manual_seed(0)
    b, hq, hkv, length, d = 2, 4, 1, 12, 8
    q, k, v = (torch.randn(b, h, length, d, dtype=torch.float64, requires_grad=True) for h in (hq, hkv, hkv))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2], list(range(12))])
    ranks = [torch.load(two_ranks / f"attention{r}.pt") for r in range(2)]
    packed = sequence.segment_mask(positions)
    for name, rows, mask in (("causal", b, None), ("packed", b, packed), ("flash", 1, packed[:1])):
        q, k, v = (t[:rows].detach().requires_grad_() for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(hq, 1), v.repeat_interleave(hq, 1),
                                             attn_mask=mask, is_causal=mask is None, scale=d ** -0.5)
        out = out.transpose(1, 2)  # transformers' output layout [B, L, H, D]
        (out * _weights(rows, length, hq, d)).sum().backward()
        # Each rank holds its half of the tokens and weighs it as the whole output's
        # half: the gradients of the halves are the whole one's halves.
        got = torch.cat([r[name]["out"] for r in ranks], dim=1)
        assert (got - out).abs().max().item() < 1e-12, name
        for i, t in enumerate((q, k, v)):
            grad = torch.cat([r[name]["grads"][i] for r in ranks], dim=2)
            assert (grad - t.grad).abs().max().item() < 1e-12, (name, i)
        assert name != "packed" or not torch.equal(out, F.scaled_dot_product_attention(
            q, k.repeat_interleave(hq, 1), v.repeat_interleave(hq, 1), is_causal=True,
            scale=d ** -0.5).transpose(1, 2))  # the mask matters: the test can tell


def _models(rank, world, rows_file, dirs, out_dir):
    """Per family: loss sum and gradients of each batch with the language model split
    over the 2 ranks (summed over them), and on one process without the split."""
    info = sequence.grouped(DistInfo(rank, world, rank, torch.device("cpu")), world)
    result = {}
    for family, model_dir in dirs.items():
        reference = read_family(model_dir).model_class().from_pretrained(model_dir, dtype=torch.float32)
        split = read_family(model_dir).model_class().from_pretrained(model_dir, dtype=torch.float32)
        sequence.apply(split, info, "sdpa")
        batches = _batches(model_dir, rows_file, world)
        with torch.no_grad():  # the tower alone: the video's 12 temporal patches, the row's 2 images
            worst = 0.0
            for pixels, grid in (("pixel_values_videos", "video_grid_thw"), ("pixel_values", "image_grid_thw")):
                want, got = (m.model.visual(batches["padded"][pixels], grid_thw=batches["padded"][grid],
                                            return_dict=True) for m in (reference, split))
                pairs = [(want.pooler_output, got.pooler_output)]
                pairs += list(zip(getattr(want, "deepstack_features", None) or [],
                                  getattr(got, "deepstack_features", None) or []))
                assert all(a.shape == b.shape for a, b in pairs), family
                worst = max([worst] + [((a - b).abs().max() / a.abs().max().clamp(min=1)).item() for a, b in pairs])
            result[family, "vision"] = (worst, split.ft_sequence_shard.frames)
        for kind, batch in batches.items():
            runs = {}
            for name, model in (("reference", reference), ("split", split)):
                model.zero_grad()
                s, n = loss_sum(model, batch, 5)
                s.backward()
                grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
                if name == "split":  # each rank's slice of the tokens: the sums over the group
                    s, n = s.detach().clone(), torch.tensor(float(n))
                    for t in [s, n, *grads.values()]:
                        torch.distributed.all_reduce(t)
                runs[name] = (s.item() if name == "split" else s.detach().item(), int(n), grads)
            result[family, kind] = runs
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "models.pt"))


@pytest.mark.slow
def test_two_ranks_split_the_language_model_like_one_process(two_ranks):
    result = torch.load(two_ranks / "models.pt")
    for family in FAMILIES:  # the vision tower split by frames: each rank ran its half, gathered in order
        worst, frames = result.pop((family, "vision"))
        assert frames is not None and len(frames) == 2 and min(frames) > 0, family  # the split happened
        assert worst <= 1e-6, f"{family}: the tower's gathered outputs differ from one process's by {worst:.2e} " \
                              "of their largest magnitude"
    for (family, kind), runs in result.items():
        (loss, n, grads), (sp_loss, sp_n, sp_grads) = runs["reference"], runs["split"]
        what = f"{family} {kind}"
        assert sp_n == n > 20, what  # every label token counted once
        assert sp_loss == pytest.approx(loss, rel=1e-6, abs=1e-5), what
        assert grads.keys() == sp_grads.keys(), what
        assert any(k.startswith("model.visual") for k in grads), what  # the vision tower learns through the split
        # Each gradient within 1e-5 of its largest entry (at least 1e-5), as conftest's
        # assert_same_loss_and_grads: the split sums the same terms in another order.
        worst = max(((grads[k] - sp_grads[k]).abs().max() / grads[k].abs().max().clamp(min=1)).item() for k in grads)
        assert worst <= 1e-5, f"{what}: gradients differ by {worst:.2e} of their largest entry"
