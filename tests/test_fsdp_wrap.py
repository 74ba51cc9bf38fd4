"""The wrap plan, and what FSDP builds from it on 2 gloo ranks: units, shard sizes,
exports that round-trip through from_pretrained, resumable checkpoints that reload."""

import dataclasses
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration

from conftest import free_port
from ft.config import ModelConfig
from ft.families import FAMILIES
from ft.dryrun import build_on_meta, estimate_memory, main as dry_run
from ft.fsdp_wrap import WRAP_PLAN, WrapPlanError, WrapRule, format_plan, per_rank_numel, plan_units, root_members
from ft.parts import apply_freezing

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


def test_rule_matching_nothing_is_refused(tiny_model_dir, monkeypatch):
    model = build_on_meta(tiny_model_dir)

    with pytest.raises(KeyError, match="Qwen2.5-VL has no role 'decoder_layers'.*decoder_layer"):
        plan_units(model, WRAP_PLAN + [WrapRule("decoder_layers", "typo")])

    # A role whose class the model does not hold (transformers renamed it, say).
    renamed = dataclasses.replace(FAMILIES["qwen2_5_vl"], roles={**FAMILIES["qwen2_5_vl"].roles,
                                                                "merger": "Qwen2_5_VLPreTrainedModel"})
    with monkeypatch.context() as m:
        m.setitem(FAMILIES, "qwen2_5_vl", renamed)
        with pytest.raises(WrapPlanError, match="wrap rule merger.*matched no module.*Qwen2_5_VLDecoderLayer"):
            plan_units(model, WRAP_PLAN)


def test_shard_numel_pads_to_world_size():
    assert per_rank_numel(10, 4) == 3
    assert per_rank_numel(12, 4) == 3
    assert per_rank_numel(1, 8) == 1


def test_dry_run_prints_plan(tiny_model_dir, capsys):
    dry_run([tiny_model_dir, "--world-size", "4"])
    out = capsys.readouterr().out
    assert "world size 4" in out and "Qwen2_5_VLDecoderLayer" in out and "<root>" in out
    assert "Per-rank memory estimate" in out


# -------------------------------------------------------------------------------------
# Dry run on the real model shapes (configs/, meta device: no weights)
# -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def meta_7b():
    return build_on_meta(os.path.join(REPO, "configs/qwen2_5_vl_7b/config.json"))


def _estimate(model, world, optim, freeze_vision=False):
    apply_freezing(model, ModelConfig(freeze_vision_tower=freeze_vision))
    units = plan_units(model)
    return units, estimate_memory(units, world, optim, "bf16")


def test_real_configs_build_on_meta_with_published_sizes(meta_7b):
    assert abs(sum(p.numel() for p in meta_7b.parameters()) - 8.29e9) < 0.01 * 8.29e9
    assert meta_7b.lm_head.weight is not meta_7b.model.language_model.embed_tokens.weight
    model_3b = build_on_meta(os.path.join(REPO, "configs/qwen2_5_vl_3b"))
    assert abs(sum(p.numel() for p in model_3b.parameters()) - 3.75e9) < 0.01 * 3.75e9
    assert model_3b.lm_head.weight is model_3b.model.language_model.embed_tokens.weight
    for model in (meta_7b, model_3b):
        assert model.config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
        assert len(plan_units(model)) == 1 + 32 + 1 + model.config.text_config.num_hidden_layers + 1


def test_memory_estimate_7b(meta_7b):
    total = sum(p.numel() for p in meta_7b.parameters())
    for world in (2, 8):
        units, adamw = _estimate(meta_7b, world, "adamw")
        # Master shards: total x 4 B / world, up to FSDP's padding (< world elements a unit).
        assert 0 <= adamw.master - total * 4 / world < len(units) * world * 4
        assert adamw.gradients == adamw.master and adamw.optimizer == 2 * adamw.master
        root, layer = units[-1], units[-2]
        assert adamw.gathered == (root.numel + 2 * layer.numel) * 2  # bf16 root + 2 layers

        # Freezing the vision tower removes exactly its shards from gradients and state.
        vision_shards = sum(per_rank_numel(u.numel, world) for u in units if u.parts == ("vision_tower",))
        assert 600e6 / world < vision_shards < 650e6 / world
        _, frozen = _estimate(meta_7b, world, "adamw", freeze_vision=True)
        assert frozen.master == adamw.master
        assert adamw.gradients - frozen.gradients == 4 * vision_shards
        assert adamw.optimizer - frozen.optimizer == 8 * vision_shards
        _, hf = _estimate(meta_7b, world, "hf_adafactor")
        _, hf_frozen = _estimate(meta_7b, world, "hf_adafactor", freeze_vision=True)
        assert hf.optimizer - hf_frozen.optimizer == 4 * vision_shards
        # ft's Adafactor keeps factors: a tiny fraction of HF's unfactored moment.
        _, ada = _estimate(meta_7b, world, "adafactor")
        _, ada_frozen = _estimate(meta_7b, world, "adafactor", freeze_vision=True)
        assert ada_frozen.optimizer < ada.optimizer < hf.optimizer / 50


def test_dry_run_cli_on_7b(capsys):
    config = os.path.join(REPO, "configs/qwen2_5_vl_7b/config.json")
    dry_run([config, "--world-size", "8", "--freeze-vision-tower", "--optim", "adamw"])
    out = capsys.readouterr().out
    assert "total 8.29B params in 63 units" in out
    assert "trainable 7.66B of 8.29B params: vision_tower 631.98M frozen" in out
    assert "largest all-gather: <root>, 1.09B params = 2.03 GiB in bf16" in out
    assert "adamw: 2 fp32 moments" in out
    with pytest.raises(SystemExit) as e:
        dry_run([config, "--freeze-vision-tower", "--freeze-merger", "--freeze-llm"])
    assert e.value.code == 2


# -------------------------------------------------------------------------------------
# On 2 gloo ranks
# -------------------------------------------------------------------------------------
def _batch(model_dir):
    from ft.collate import Collator
    from ft.dataset import ConversationDataset
    from ft.rows import load_rows
    from ft.processor import load_processor

    processor = load_processor(model_dir)
    ds = ConversationDataset(load_rows(os.path.join(REPO, "data/demo/train.jsonl")), processor, 1024)
    return Collator(processor)([ds[0], ds[1]]).inputs


def _worker(rank, world, port, model_dir, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from ft import ckpt, dist
    from ft.config import FSDPConfig, TrainConfig
    from ft.fsdp_wrap import wrap_model
    from ft.model import load_model, loss_sum
    from ft.optim import build_optimizer
    from ft.shards import local

    info = dist.init_distributed()
    batch = _batch(model_dir)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    results = {}
    # FSDP1 with torch's AdamW as built here; FSDP2 with ft's optimizers (the tied model:
    # ft's Adafactor, whose state DCP saves by name; the untied one: AdamW's DTensor state).
    fsdp2_optim = "adafactor" if "untied" not in model_dir else "adamw"
    for backend in ("fsdp1", "fsdp2"):
        out = os.path.join(out_dir, backend)

        def build():
            model = load_model(model_dir, info)
            units = plan_units(model)
            wrapped = wrap_model(model, units, FSDPConfig(backend=backend), "fp32", info)
            if backend == "fsdp1":
                opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
            else:
                opt = build_optimizer(wrapped.parameters(), TrainConfig(optim=fsdp2_optim, learning_rate=1e-2),
                                      model=wrapped)
            return wrapped, units, opt

        def step(model, opt):
            s, n = loss_sum(model, batch)
            (s / n).backward()
            opt.step()
            opt.zero_grad()
            return (s / n).item()

        model, units, opt = build()
        # Each rank holds what the plan says: FSDP1 ceil(numel / world) of each unit's
        # flat parameter; FSDP2 each parameter's dim-0 chunk (planned_slices).
        by_module = {id(u.module): u for u in units}
        sizes = {}
        if backend == "fsdp1":
            for fsdp_module in FSDP.fsdp_modules(model):
                unit = by_module[id(fsdp_module.module)]
                flat = fsdp_module._flat_param  # FSDP1 private, stable since torch 2.0
                sizes[unit.fqn] = [flat.numel(), per_rank_numel(unit.numel, world)]
        else:
            from ft.fsdp2 import clean_name, planned_slices

            held = {clean_name(n): local(p).numel() for n, p in model.named_parameters()}
            for unit in units:
                sizes[unit.fqn] = [sum(held[n] for n in unit.params),
                                   sum(sl.numel for sl in planned_slices(unit.params, world, rank))]

        for _ in range(2):
            step(model, opt)
        model.eval()
        with torch.no_grad():
            logits = model(**inputs).logits
        ckpt.export_hf(model, os.path.join(out, "best"), model_dir, info, {"step": 2})
        path = ckpt.save_checkpoint(model, opt, {"train_state": {"step": 2}}, out, info)

        # A fresh model and optimizer, reloaded from the checkpoint, compute the same
        # logits, and the next training step is the uninterrupted run's, bit for bit.
        fresh, _, fresh_opt = build()
        state = ckpt.load_checkpoint(fresh, fresh_opt, path, info)["train_state"]
        fresh.eval()
        with torch.no_grad():
            reloaded = fresh(**inputs).logits
        opt_steps = ([s["step"].item() for s in fresh_opt.state.values()] if backend == "fsdp1" or
                     fsdp2_optim == "adamw" else [v.item() for k, v in fresh_opt.fqn_state_dict().items()
                                                 if k.endswith(".step")])
        model.train()
        fresh.train()
        continued = [step(model, opt), step(fresh, fresh_opt)]
        same_weights = all(torch.equal(local(a), local(b)) for a, b in zip(model.parameters(), fresh.parameters()))
        results[backend] = {"logits": logits, "reloaded": reloaded, "sizes": sizes, "state": state,
                            "opt_steps": opt_steps, "continued": continued, "same_weights": same_weights}
        del model, fresh, opt, fresh_opt
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "result.pt"))
    dist.cleanup()


def _both_models(rank, world, ports, model_dirs, out_dirs):
    """Both tiny models in one spawn (process start-up is most of the cost), each in a
    process group of its own."""
    for port, model_dir, out_dir in zip(ports, model_dirs, out_dirs):
        _worker(rank, world, port, model_dir, out_dir)


@pytest.fixture(scope="module")
def two_rank_runs(tiny_model_dir, tiny_model_dir_untied, tmp_path_factory):
    """{fixture name: the folder its 2-rank run wrote}, from one 2-process run."""
    names = ("tiny_model_dir", "tiny_model_dir_untied")
    out_dirs = [tmp_path_factory.mktemp(name) for name in names]
    mp.spawn(_both_models, args=(2, [free_port() for _ in names], [tiny_model_dir, tiny_model_dir_untied],
                                 [str(d) for d in out_dirs]), nprocs=2, join=True)
    return dict(zip(names, out_dirs))


# slow: 2 gloo ranks are processes of their own (one mp.spawn for both models)
@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_model_dir_untied"])
def test_two_ranks_units_export_and_checkpoint(fixture, request, two_rank_runs):
    """On each backend: the units hold the planned shards; the export round-trips through
    from_pretrained; a checkpoint reloads into a fresh model and optimizer and resumes
    exactly (FSDP1: torch's AdamW; FSDP2: ft's Adafactor tied, AdamW untied)."""
    model_dir = request.getfixturevalue(fixture)
    tmp_path = two_rank_runs[fixture]
    results = torch.load(tmp_path / "result.pt")
    batch = _batch(model_dir)
    untrained = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        before = untrained(**{k: v for k, v in batch.items() if k != "labels"}).logits

    for backend, result in results.items():
        for fqn, (held, expected) in result["sizes"].items():
            assert held == expected, f"{backend} unit {fqn or '<root>'}: rank holds {held} elements, plan says {expected}"
        assert len(result["sizes"]) == 7

        # The export loads with from_pretrained and gives the trained model's logits.
        best = tmp_path / backend / "best"
        assert json.loads((best / "ft_export.json").read_text()) == {"step": 2}
        umask = os.umask(0)
        os.umask(umask)
        assert (best / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(best, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        assert (logits - result["logits"]).abs().max().item() <= 1e-5, backend
        # ... and they are not the untrained model's logits.
        assert (before - result["logits"]).abs().max().item() > 1e-3, backend
        tied = json.loads((best / "config.json").read_text()).get("tie_word_embeddings", True)
        assert tied == (fixture == "tiny_model_dir")
        assert (model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()) == tied

        # The sharded checkpoint reloads model and optimizer state exactly.
        assert torch.equal(result["reloaded"], result["logits"]), backend
        assert result["state"] == {"step": 2}
        assert result["opt_steps"] and all(s == 2 for s in result["opt_steps"]), backend
        assert result["continued"][0] == result["continued"][1] and result["same_weights"], backend
