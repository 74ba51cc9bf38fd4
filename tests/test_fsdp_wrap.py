"""The wrap plan, and what FSDP builds from it on 2 gloo ranks: units, shard sizes,
exports that round-trip through from_pretrained, resumable checkpoints that reload."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration

from conftest import free_port
from ft.fsdp_wrap import (
    WRAP_PLAN,
    WrapPlanError,
    WrapRule,
    build_on_meta,
    format_plan,
    main as dry_run,
    plan_units,
    root_members,
    shard_numel,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_matches_qwen_modules(tiny_model_dir):
    model = build_on_meta(tiny_model_dir)
    units = plan_units(model)
    names = [(u.fqn, u.cls_name, u.checkpoint) for u in units]
    assert names == [
        ("model.visual.patch_embed", "Qwen2_5_VisionPatchEmbed", False),
        ("model.visual.blocks.0", "Qwen2_5_VLVisionBlock", True),
        ("model.visual.blocks.1", "Qwen2_5_VLVisionBlock", True),
        ("model.visual.merger", "Qwen2_5_VLPatchMerger", False),
        ("model.language_model.layers.0", "Qwen2_5_VLDecoderLayer", True),
        ("model.language_model.layers.1", "Qwen2_5_VLDecoderLayer", True),
        ("", "Qwen2_5_VLForConditionalGeneration", False),
    ]
    # Every parameter in exactly one unit; tied lm_head/embed_tokens counted once.
    assert sum(u.numel for u in units) == sum(p.numel() for p in model.parameters())
    assert root_members(model, units) == [
        "model.language_model.embed_tokens", "model.language_model.norm", "lm_head"]
    text = format_plan(units, 2, root_names=root_members(model, units))
    assert "model.language_model.layers.{0..1} x2" in text and "root holds" in text


def test_untied_lm_head_stays_in_root(tiny_model_dir_untied):
    model = build_on_meta(tiny_model_dir_untied)
    units = plan_units(model)
    root = units[-1]
    lm = model.lm_head.weight.numel()
    emb = model.model.language_model.embed_tokens.weight.numel()
    norm = model.model.language_model.norm.weight.numel()
    assert root.numel == lm + emb + norm


def test_rule_matching_nothing_is_refused(tiny_model_dir):
    model = build_on_meta(tiny_model_dir)

    class NotInQwen(nn.Module):
        pass

    with pytest.raises(WrapPlanError, match="NotInQwen matched no module.*Qwen2_5_VLDecoderLayer"):
        plan_units(model, WRAP_PLAN + [WrapRule(NotInQwen, "typo")])


def test_shard_numel_pads_to_world_size():
    assert shard_numel(10, 4) == 3
    assert shard_numel(12, 4) == 3
    assert shard_numel(1, 8) == 1


def test_dry_run_prints_plan(tiny_model_dir, capsys):
    dry_run([tiny_model_dir, "--world-size", "4"])
    out = capsys.readouterr().out
    assert "world size 4" in out and "Qwen2_5_VLDecoderLayer" in out and "<root>" in out


# -------------------------------------------------------------------------------------
# On 2 gloo ranks
# -------------------------------------------------------------------------------------
def _batch(model_dir):
    from ft.data import Collator, ConversationDataset, load_rows
    from ft.processor import load_processor

    processor = load_processor(model_dir)
    ds = ConversationDataset(load_rows(os.path.join(REPO, "data/demo/train.jsonl")), processor, 1024)
    batch = Collator(processor)([ds[0], ds[1]])
    batch.pop("num_real_tokens")
    return batch


def _worker(rank, world, port, model_dir, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from ft import ckpt, dist
    from ft.config import FSDPConfig
    from ft.fsdp_wrap import apply_checkpointing, wrap_model
    from ft.model import load_model, loss_sum

    info = dist.init_distributed()

    def build():
        model = load_model(model_dir, info)
        units = plan_units(model)
        wrapped = wrap_model(model, units, FSDPConfig(), "fp32", info)
        apply_checkpointing(wrapped)
        return wrapped, units

    model, units = build()
    # FSDP built one unit per planned unit, each rank holding ceil(numel / world).
    by_module = {id(u.module): u for u in units}
    sizes = {}
    for fsdp_module in FSDP.fsdp_modules(model):
        unit = by_module[id(fsdp_module.module)]
        flat = fsdp_module._flat_param  # FSDP1 private, stable since torch 2.0
        sizes[unit.fqn] = [flat.numel(), shard_numel(unit.numel, world)]

    batch = _batch(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        s, n = loss_sum(model, batch)
        (s / n).backward()
        opt.step()
        opt.zero_grad()

    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    ckpt.export_hf(model, os.path.join(out_dir, "best"), model_dir, info, {"step": 2})
    path = ckpt.save_checkpoint(model, opt, {"step": 2}, out_dir, info)

    # A fresh model and optimizer, reloaded from the checkpoint, compute the same logits.
    fresh, _ = build()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    state = ckpt.load_checkpoint(fresh, fresh_opt, path)
    fresh.eval()
    with torch.no_grad():
        reloaded = fresh(**{k: v for k, v in batch.items() if k != "labels"}).logits
    if rank == 0:
        torch.save({"logits": logits, "reloaded": reloaded, "sizes": sizes, "state": state,
                    "opt_steps": [s["step"].item() for s in fresh_opt.state.values()]},
                   os.path.join(out_dir, "result.pt"))
    dist.cleanup()


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_model_dir_untied"])
def test_two_ranks_units_export_and_checkpoint(fixture, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    mp.spawn(_worker, args=(2, free_port(), model_dir, str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt")

    for fqn, (held, expected) in result["sizes"].items():
        assert held == expected, f"unit {fqn or '<root>'}: rank holds {held} elements, plan says {expected}"
    assert len(result["sizes"]) == 7

    # The export loads with from_pretrained and gives the trained model's logits.
    best = tmp_path / "best"
    assert json.loads((best / "ft_export.json").read_text()) == {"step": 2}
    umask = os.umask(0)
    os.umask(umask)
    assert (best / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(best, dtype=torch.float32).eval()
    batch = _batch(str(best))
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert (logits - result["logits"]).abs().max().item() <= 1e-5
    # ... and they are not the untrained model's logits.
    untrained = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        before = untrained(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert (before - result["logits"]).abs().max().item() > 1e-3
    tied = json.loads((best / "config.json").read_text()).get("tie_word_embeddings", True)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr() or not tied

    # The sharded checkpoint reloads model and optimizer state exactly.
    assert torch.equal(result["reloaded"], result["logits"])
    assert result["state"] == {"step": 2}
    assert result["opt_steps"] and all(s == 2 for s in result["opt_steps"])
