"""ft.metrics: FLOPs from the config checked against torch's FLOP counter on the tiny
model and against the real 3B module shapes; batch stats; peak FLOP/s; memory."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.vision_utils import get_vision_window_index

from conftest import write_test_image
from ft.collate import BatchStats, Collator
from ft.dataset import ConversationDataset
from ft.rows import load_rows
from ft.metrics import (
    _vision_attention_pairs,
    forward_flops,
    matmul_params,
    memory_stats,
    mfu,
    peak_flops,
    peak_flops_for_name,
    train_flops,
)
from ft.model import loss_sum
from ft.processor import load_processor

# Qwen2.5-VL-3B's published config.json.
CONFIG_3B = dict(
    text_config=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                     num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                      "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                       patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                       window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                       out_hidden_size=2048),
    tie_word_embeddings=True,
)
CHUNK = 8


@pytest.fixture(scope="module")
def data(tiny_model_dir, tmp_path_factory):
    """One text sample and one sample with two images of different sizes, whose
    merged grids do not divide into the tiny model's 2 × 2 windows."""
    d = tmp_path_factory.mktemp("metrics-data")
    write_test_image(d / "a.png", size=(140, 84), seed=1)
    write_test_image(d / "b.png", size=(56, 112), seed=2)
    rows = [
        {"messages": [{"role": "user", "content": "Count to five."},
                      {"role": "assistant", "content": "One, two, three, four, five."}]},
        {"messages": [{"role": "user", "content": [
            {"type": "image", "image": "a.png"}, {"type": "image", "image": "b.png"},
            {"type": "text", "text": "Compare them."}]},
            {"role": "assistant", "content": "The first is wider; both are noisy gradients."}]},
    ]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    processor = load_processor(tiny_model_dir)
    ds = ConversationDataset(load_rows(d / "rows.jsonl"), processor, 1024)
    return ds, Collator(processor)


def _count(model, batch, backward=False):
    inputs = batch
    with FlopCounterMode(display=False) as counter:
        with torch.set_grad_enabled(backward):
            s, _ = loss_sum(model, inputs, CHUNK)
            if backward:
                s.backward()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def eager_model(tiny_model_dir):
    # Eager attention: its matmuls are what the FLOP counter sees (it has no formula
    # for the CPU SDPA kernel).
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="eager")


def test_text_batch_flops_equal_flop_counter(eager_model, data):
    ds, collate = data
    sample = ds[0]
    collated, stats, _ = collate([sample])  # a text-only batch: the collator adds its dummy image
    n = len(sample["input_ids"])
    assert stats == BatchStats((n,), int((sample["labels"][1:] != -100).sum()), (), dummy_image=True,
                               rows=1, row_length=collated["input_ids"].shape[1])
    assert collated["attention_mask"].sum() > n  # the dummy is there, and not counted

    # The model on the same sample without the dummy image does exactly the counted work.
    bare = {"input_ids": sample["input_ids"][None], "attention_mask": torch.ones(1, n, dtype=torch.long),
            "labels": sample["labels"][None], "mm_token_type_ids": sample["mm_token_type_ids"][None]}
    flops = forward_flops(eager_model.config, stats, causal=False)
    assert flops.vision_matmuls == flops.vision_attention == flops.merger == 0
    assert _count(eager_model, bare) == flops.total
    # Causal attention counts (n + 1) / 2n of the full square.
    causal = forward_flops(eager_model.config, stats)
    assert causal.text_attention == flops.text_attention * (n + 1) / (2 * n)


def test_image_batch_flops_equal_flop_counter(eager_model, data):
    ds, collate = data
    batch, stats, _ = collate([ds[1]])
    assert len(stats.image_grids) == 2 and stats.tokens == len(ds[1]["input_ids"])
    flops = forward_flops(eager_model.config, stats, causal=False)
    assert flops.vision_attention > 0 and flops.lm_head > 0
    # Exact: the counter sees the same matmuls (linear layers, the patch Conv3d, QKᵀ
    # and AV per vision window and per sequence, lm_head on the label rows only, as
    # the chunked loss computes it); what it does not count (norms, softmax, rotary,
    # biases) is not counted here either.
    assert _count(eager_model, batch) == flops.total

    # Forward + backward is 3 x forward, up to what the counter sees differently: the
    # patch embedding computes no gradient for its input (the pixels); the chunked
    # loss recomputes the label rows' logits in backward (+1 lm_head forward), and
    # accumulates lm_head's weight gradient with the in-place addmm_, for which the
    # counter has no formula (-1 lm_head forward, not seen).
    params = matmul_params(eager_model.config)
    conv_input_grad = 2 * params["vision_patch_embed"] * stats.patches
    recompute, addmm_unseen = flops.lm_head, flops.lm_head
    expected = 3 * flops.total - conv_input_grad + recompute - addmm_unseen
    assert _count(eager_model, batch, backward=True) == expected
    # train_flops is the causal convention of the same count.
    assert train_flops(eager_model.config, stats) == 3 * forward_flops(eager_model.config, stats).total


@pytest.mark.parametrize("frozen", [("vision_tower", "merger"), ("llm",), ("vision_tower",)])
def test_frozen_parts_flops_equal_flop_counter(tiny_model_dir, data, frozen):
    """With frozen parts, the backward work train_flops counts is what autograd does."""
    ds, collate = data
    batch, stats, _ = collate([ds[1]])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    visual = model.model.visual
    modules = {"vision_tower": [visual.patch_embed, visual.blocks], "merger": [visual.merger],
               "llm": [model.model.language_model, model.lm_head]}
    for part in frozen:
        for module in modules[part]:
            module.requires_grad_(False)
    forward = forward_flops(model.config, stats, causal=False)
    counted = _count(model, batch, backward=True) - forward.total
    # The counter's causal=False attention; otherwise the same rules as train_flops.
    full = train_flops(model.config, stats, frozen) - forward_flops(model.config, stats).total
    expected = full + 2 * (forward.text_attention - forward_flops(model.config, stats).text_attention)
    # What the counter sees differently (see the test above): the chunked loss
    # recomputes the logits, and its lm_head weight gradient (addmm_) goes unseen when
    # the language model trains; a trained patch embedding computes no pixel gradient.
    expected += forward.lm_head
    if "llm" not in frozen:
        expected -= forward.lm_head
    if "vision_tower" not in frozen:
        expected -= 2 * matmul_params(model.config)["vision_patch_embed"] * stats.patches
    assert counted == expected


def test_parts_are_the_freezable_parts():
    with pytest.raises(ValueError, match="unknown parts"):
        train_flops(Qwen2_5_VLConfig(**CONFIG_3B), BatchStats((4,), 3, ()), frozen=("vision",))


def test_padded_batch_counts_real_tokens_only(data):
    ds, collate = data
    batch, stats, _ = collate([ds[0], ds[1]])
    assert stats.seq_lens == (len(ds[0]["input_ids"]), len(ds[1]["input_ids"]))
    assert stats.tokens == int(batch["attention_mask"].sum()) < batch["input_ids"].numel()
    assert stats.label_tokens == int((batch["labels"][:, 1:] != -100).sum())
    assert stats.image_grids == tuple(tuple(g) for g in ds[1]["image_grid_thw"].tolist())
    assert stats.samples == 2 and not stats.dummy_image


def test_matmul_params_match_the_3b_modules():
    config = Qwen2_5_VLConfig(**CONFIG_3B)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config)

    def weights(module, kind=(torch.nn.Linear, torch.nn.Conv3d)):
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, kind))

    visual = model.model.visual
    assert matmul_params(config) == {
        "text_layers": weights(model.model.language_model.layers),
        "lm_head": model.lm_head.weight.numel(),
        "vision_patch_embed": weights(visual.patch_embed),
        "vision_blocks": weights(visual.blocks),
        "vision_merger": weights(visual.merger),
        "router": 0,  # dense
    }
    # Sanity at the real shapes: ~2.8B decoder weights, ~6 x that per trained token.
    assert 2.7e9 < matmul_params(config)["text_layers"] < 2.8e9


@pytest.mark.parametrize("grid", [(1, 34, 50), (1, 32, 32), (2, 18, 10), (1, 4, 4)])
def test_window_pairs_match_hf_window_index(grid):
    """The windows as HF cuts them (its cu_window_seqlens), at the 3B's 112-pixel
    windows: sizes that divide, do not divide, several frames, smaller than a window."""
    config = Qwen2_5_VLConfig(**CONFIG_3B)
    v = config.vision_config
    _, cu = get_vision_window_index(torch.tensor([grid]), spatial_merge_size=v.spatial_merge_size,
                                    window_size=v.window_size, patch_size=v.patch_size)
    window_lengths = cu.diff().tolist()
    full, windowed = _vision_attention_pairs(config, grid, config.vision_config.window_size)
    assert windowed == sum(s * s for s in window_lengths)
    assert full == grid[0] * (grid[1] * grid[2]) ** 2


def test_3b_flops_per_token_order_of_magnitude():
    """A 4k-token text sample, all labelled: ~6 x params per token for training plus
    attention, the usual rule of thumb."""
    config = Qwen2_5_VLConfig(**CONFIG_3B)
    n = 4096
    stats = BatchStats((n,), n - 1, ())
    per_token = train_flops(config, stats) / n
    params = matmul_params(config)
    dense = 6 * (params["text_layers"] + params["lm_head"] * (n - 1) / n)
    attention = 3 * 4 * 2048 * (n + 1) / 2 * 36
    assert per_token == pytest.approx(dense + attention)
    # By hand: 6 x (2.775e9 + 0.311e9) + 12 x 2048 x 2048.5 x 36 = 18.51e9 + 1.81e9.
    assert per_token == pytest.approx(20.33e9, rel=1e-3)


def test_peak_flops_lookup():
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_name("NVIDIA H100 NVL") == 835.5e12
    assert peak_flops_for_name("NVIDIA H200") == 989.4e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_name("NVIDIA A100 80GB PCIe") == 312e12
    assert peak_flops_for_name("NVIDIA L40S") == 362.05e12
    assert peak_flops_for_name("NVIDIA L4") == 121e12
    assert peak_flops_for_name("NVIDIA A10G") is None  # no published figure
    assert peak_flops_for_name("Tesla T4") is None
    assert peak_flops(torch.device("cpu")) is None
    assert mfu(1e12, 2.0, 1e12) == 0.5
    assert mfu(1e12, 2.0, None) is None


def test_memory_stats_cpu():
    before = memory_stats(torch.device("cpu"))
    assert set(before) == {"peak_rss_gib"}
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
    after = memory_stats(torch.device("cpu"))
    assert after["peak_rss_gib"] >= before["peak_rss_gib"]
    assert 0.05 < after["peak_rss_gib"] < 64
    del block


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_memory_stats_gpu():
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    block = torch.empty(2**28, dtype=torch.uint8, device=device)  # 256 MiB
    stats = memory_stats(device)
    assert set(stats) == {"peak_rss_gib", "max_allocated_gib", "max_reserved_gib"}
    assert stats["max_reserved_gib"] >= stats["max_allocated_gib"] >= 0.25
    assert peak_flops(device) == peak_flops_for_name(torch.cuda.get_device_name(device))
    del block
