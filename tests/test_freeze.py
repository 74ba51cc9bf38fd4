"""Freezing the vision tower, the merger or the language model, and per-part learning
rates: the config switches, the wrap plan's guarantees, and training on 2 gloo ranks."""

import itertools
import json
import os
import re

import pytest
import torch
import torch.multiprocessing as mp
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionPatchEmbed,
    Qwen2_5_VLPatchMerger,
)

from conftest import free_port, write_test_image
from ft.config import ConfigError, FSDPConfig, ModelConfig, TrainConfig
from ft.config_load import load_config
from ft.dist import DistInfo
from ft.dryrun import build_on_meta
from ft.fsdp_wrap import WRAP_PLAN, WrapPlanError, check_uniform_requires_grad, checkpoint_summary, format_plan, plan_units, wrap_model
from ft.parts import PART_NAMES, apply_freezing, part_learning_rates

SWITCHES = ("freeze_vision_tower", "freeze_merger", "freeze_llm")
DENSE_PARTS = [p for p in PART_NAMES if p != "router"]  # the parts of the dense model these tests train


def part_of(name: str) -> str:
    """A parameter's part from its transformers 5.x path: an independent check of
    ft's class-based classification."""
    if name.startswith("model.visual.merger."):
        return "merger"
    return "vision_tower" if name.startswith("model.visual.") else "llm"


# -------------------------------------------------------------------------------------
# Config
# -------------------------------------------------------------------------------------
def test_config_freeze_switches_and_part_learning_rates():
    cfg = load_config(None, ["model.freeze_vision_tower=true", "train.merger_lr=3e-5"])
    assert cfg.model.freeze_vision_tower and not cfg.model.freeze_merger and not cfg.model.freeze_llm
    assert part_learning_rates(cfg.train) == {"vision_tower": 1e-4, "merger": 3e-5, "router": 1e-4, "llm": 1e-4}
    assert part_learning_rates(load_config(None, ["train.vision_lr=0"]).train)["vision_tower"] == 0.0

    with pytest.raises(ConfigError, match="all true.*nothing would be trained"):
        load_config(None, [f"model.{s}=true" for s in SWITCHES])
    with pytest.raises(ConfigError, match=r"train.vision_lr: -0.5 must be >= 0, or -1"):
        load_config(None, ["train.vision_lr=-0.5"])


# -------------------------------------------------------------------------------------
# The plan, on the meta device
# -------------------------------------------------------------------------------------
def test_every_switch_combination_gives_uniform_units(tiny_model_dir):
    model = build_on_meta(tiny_model_dir)
    total = sum(p.numel() for p in model.parameters())
    for flags in itertools.product([False, True], repeat=3):
        if all(flags):
            continue  # refused by the config
        frozen = {part for part, flag in zip(DENSE_PARTS, flags) if flag}
        summary = apply_freezing(model, ModelConfig(**dict(zip(SWITCHES, flags))))
        assert {p for p, s in summary.items() if s["frozen"]} == frozen
        assert sum(s["params"] for s in summary.values()) == total

        units = plan_units(model)
        check_uniform_requires_grad(units)  # no unit mixes frozen and trainable
        for u in units:
            assert len(u.parts) == 1, (u.fqn, u.parts)
            assert {part_of(n) for n in u.params} == set(u.parts), u.fqn
            assert all(p.requires_grad == (u.parts[0] not in frozen) for p in u.params.values())
        # The root holds language-model weights only: the vision tower left none behind.
        assert units[-1].parts == ("llm",)
        last = format_plan(units, 2).splitlines()[-1]
        for part in DENSE_PARTS:
            state = "frozen" if part in frozen else "trainable"
            assert re.search(rf"\b{part} \S+ {state}\b", last), (flags, last)


def test_plan_printout_marks_frozen_units(tiny_model_dir):
    model = build_on_meta(tiny_model_dir)
    apply_freezing(model, ModelConfig(freeze_vision_tower=True))
    text = format_plan(plan_units(model), 2)
    lines = {line.split()[0]: line for line in text.splitlines()[2:]}
    assert lines["model.visual.patch_embed"].endswith("frozen")
    # A frozen vision block is not checkpointed: backward never reaches it.
    assert lines["model.visual.blocks.{0..1}"].split()[-2:] == ["skip", "frozen"]
    assert lines["model.language_model.layers.{0..1}"].split()[-2:] == ["yes", "train"]
    assert "vision_tower 58.82K frozen, merger 24.80K trainable" in text


def test_plan_mixing_frozen_and_trainable_is_refused(tiny_model_dir):
    model = build_on_meta(tiny_model_dir)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    # Without its own rule the merger falls into the root, next to embed_tokens.
    apply_freezing(model, ModelConfig(freeze_merger=True))
    no_merger_rule = [r for r in WRAP_PLAN if r.role != "merger"]
    units = plan_units(model, no_merger_rule)
    with pytest.raises(WrapPlanError, match=r"unit <root> \(Qwen2_5_VLForConditionalGeneration\) "
                       r"mixes.*frozen model\.visual\.merger\.ln_q\.weight.*"
                       r"trainable model\.language_model\.embed_tokens\.weight"):
        wrap_model(model, units, FSDPConfig(), "fp32", info)  # raises before any collective

    # Same for the patch embedding with the vision tower frozen.
    apply_freezing(model, ModelConfig(freeze_vision_tower=True))
    units = plan_units(model, [r for r in WRAP_PLAN if r.role != "vision_own"])
    with pytest.raises(WrapPlanError, match=r"<root>.*frozen model\.visual\.patch_embed\.proj\.weight"):
        check_uniform_requires_grad(units)

    # A hand-frozen sub-module of a unit names that unit.
    apply_freezing(model, ModelConfig())
    model.model.language_model.layers[1].mlp.requires_grad_(False)
    with pytest.raises(WrapPlanError, match=r"unit model\.language_model\.layers\.1 .*frozen "
                       r"model\.language_model\.layers\.1\.mlp\.gate_proj\.weight, .*down_proj\.weight; "
                       r"trainable model\.language_model\.layers\.1\.self_attn\.q_proj\.weight, .* and 6 more"):
        check_uniform_requires_grad(plan_units(model))


# -------------------------------------------------------------------------------------
# Training on 2 gloo ranks
# -------------------------------------------------------------------------------------
LR = 1e-2
STEPS = 3
# (name, model.freeze_* switches, per-part learning rates, parts expected unchanged)
CASES = [
    ("vision", {"freeze_vision_tower": True}, {"merger_lr": 2e-2}, {"vision_tower"}),
    # The tower trains (gradients, optimizer state) at lr 0: it must not move.
    ("merger", {"freeze_merger": True}, {"vision_lr": 0.0}, {"merger", "vision_tower"}),
    ("llm", {"freeze_llm": True}, {"vision_lr": 5e-3}, {"llm"}),
    ("vision+merger", {"freeze_vision_tower": True, "freeze_merger": True}, {}, {"vision_tower", "merger"}),
]
# FSDP2 only (FSDP1 refuses them): units that mix frozen and trainable weights, with
# (modules frozen by hand, plan). A decoder layer whose mlp is frozen, and the frozen
# merger left in the root next to the trained embeddings (WRAP_PLAN without its rule).
FSDP2_CASES = [
    ("mlp of layer 1", {}, {}, set(), (["model.language_model.layers.1.mlp"], WRAP_PLAN)),
    ("merger in the root", {"freeze_merger": True}, {}, {"merger"},
     ([], [r for r in WRAP_PLAN if r.role != "merger"])),
]


def _worker(rank, world, port, model_dir, data_file, out_dir, backend):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_state_dict,
    )
    from ft import dist
    from ft.backends import BACKENDS
    from ft.collate import Collator
    from ft.dataset import ConversationDataset
    from ft.rows import load_rows
    from ft.parts import param_groups
    from ft.model import load_model, loss_sum
    from ft.processor import load_processor

    info = dist.init_distributed()
    processor = load_processor(model_dir, 56 * 56, 112 * 112)
    ds = ConversationDataset(load_rows(data_file), processor, 512)
    # Rank 0 trains on two images, rank 1 on a text-only row (the collator adds a dummy
    # image, which every rank's frozen or trainable tower then runs on).
    batch = Collator(processor)([ds[0], ds[1]] if rank == 0 else [ds[2]]).inputs
    assert rank == 0 or batch["image_grid_thw"].shape[0] == 1

    def build(freeze, rules=WRAP_PLAN, hand_frozen=()):
        model = load_model(model_dir, info)
        apply_freezing(model, ModelConfig(**freeze))
        for name in hand_frozen:
            model.get_submodule(name).requires_grad_(False)
        units = plan_units(model, rules)
        wrapped = wrap_model(model, units, FSDPConfig(backend=backend), "fp32", info)
        return wrapped, format_plan(units, world), checkpoint_summary(units)

    def full_state(model):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))

    results = {}
    cases = CASES + (FSDP2_CASES if backend == "fsdp2" else [])
    for name, freeze, lrs, _, *mixed in cases:
        hand_frozen, rules = mixed[0] if mixed else ((), WRAP_PLAN)
        train_cfg = TrainConfig(learning_rate=LR, **lrs)
        model, plan_text, checkpointed = build(freeze, rules, hand_frozen)
        groups = param_groups(model, train_cfg)
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        # The tensors the optimizer may see, and the original weights each holds: FSDP1's
        # flat parameters (a unit each), FSDP2's DTensors (one weight each).
        tensors = {id(p): (p, [fqn for _, fqn in held])
                   for _, p, held in BACKENDS[backend].original_params(model)}
        grads_ok, losses = [], []
        for _ in range(STEPS):
            s, n = loss_sum(model, batch)
            (s / n).backward()
            # Frozen tensors get no gradient at all (not a zero one).
            grads_ok.append(all((p.grad is None) != p.requires_grad for p, _ in tensors.values()))
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(s.item() / n)
        trainable = {i for i, (p, _) in tensors.items() if p.requires_grad}
        result = {
            "plan": plan_text,
            "checkpointed": tuple(checkpointed),
            "groups": [(g["name"], g["lr"], sorted(fqn for p in g["params"] for fqn in tensors[id(p)][1]))
                       for g in opt.param_groups],
            "state_only_trainable": {id(p) for p in opt.state} == trainable
            and {id(p) for g in opt.param_groups for p in g["params"]} == trainable,
            "grads_ok": grads_ok,
            "losses": losses,
            "full": full_state(model),
        }

        if name == "vision":
            # A sharded DCP checkpoint holds the frozen weights too, and reloads into a
            # fresh model and optimizer exactly.
            model_sd, optim_sd = get_state_dict(model, opt)
            result["sharded_keys"] = sorted(model_sd)
            path = os.path.join(out_dir, "ckpt")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
            fresh, _, _ = build(freeze)
            fresh_opt = torch.optim.AdamW(param_groups(fresh, train_cfg), weight_decay=0.0)
            state = dict(zip(("model", "optim"), get_state_dict(fresh, fresh_opt)))
            dcp.load(state, checkpoint_id=path)
            set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            reloaded = full_state(fresh)
            result["reload_equal"] = all(torch.equal(reloaded[k], v) for k, v in result["full"].items())
            result["optim_reload_equal"] = all(
                torch.equal(opt.state[p][k], fresh_opt.state[q][k])
                for g, h in zip(opt.param_groups, fresh_opt.param_groups)
                for p, q in zip(g["params"], h["params"]) for k in ("exp_avg", "exp_avg_sq"))
        results[name] = result

    if backend == "fsdp1":
        # An edited plan that puts two parts in one unit cannot have per-part groups.
        model, _, _ = build({}, [r for r in WRAP_PLAN if r.role != "merger"])
        try:
            param_groups(model, TrainConfig())
            results["mixed_parts_error"] = None
        except WrapPlanError as e:
            results["mixed_parts_error"] = str(e)

    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    dist.cleanup()


def _both_backends(rank, world, ports, model_dir, data_file, out_dirs):
    """Both backends in one spawn (process start-up is most of the cost): fsdp1's cases,
    then fsdp2's, each in a process group of its own."""
    for backend, out_dir in out_dirs.items():
        _worker(rank, world, ports[backend], model_dir, data_file, out_dir, backend)


@pytest.fixture(scope="module")
def two_rank_results(tiny_model_dir, tmp_path_factory):
    """Each backend's results of the one 2-process run: {backend: results}."""
    tmp_path = tmp_path_factory.mktemp("freeze")
    for image, size, seed in (("a.png", (56, 56), 1), ("b.png", (84, 56), 2)):
        write_test_image(tmp_path / image, size=size, seed=seed)
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                    {"type": "text", "text": "What is this?"}]},
                      {"role": "assistant", "content": answer}]}
        for image, answer in (("a.png", "A smooth gradient with some noise."), ("b.png", "Colours."))
    ] + [{"messages": [{"role": "user", "content": "Say hello."},
                       {"role": "assistant", "content": "Hello there, nice to meet you."}]}]
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_dirs = {backend: tmp_path / backend for backend in ("fsdp1", "fsdp2")}
    for out_dir in out_dirs.values():
        out_dir.mkdir()
    mp.spawn(_both_backends, args=(2, {b: free_port() for b in out_dirs}, tiny_model_dir, str(data_file),
                                   {b: str(d) for b, d in out_dirs.items()}), nprocs=2, join=True)
    return {b: torch.load(d / "results.pt", weights_only=False) for b, d in out_dirs.items()}


# slow: 2 gloo ranks are processes of their own (one mp.spawn for both backends)
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp1", "fsdp2"])
def test_freezing_on_two_ranks(backend, tiny_model_dir, two_rank_results):
    results = two_rank_results[backend]
    initial = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()

    expected_checkpointed = {"vision": (2, 2), "merger": (4, 0), "llm": (4, 0), "vision+merger": (2, 2),
                             "mlp of layer 1": (4, 0), "merger in the root": (4, 0)}
    for name, freeze, lrs, unchanged, *mixed in CASES + (FSDP2_CASES if backend == "fsdp2" else []):
        hand_frozen = mixed[0][0] if mixed else ()
        r = results[name]
        frozen = {part for part, switch in zip(DENSE_PARTS, SWITCHES) if freeze.get(switch)}
        # Frozen vision blocks are not checkpointed; frozen decoder layers are when the
        # vision side trains, since the gradient flows through them.
        assert r["checkpointed"] == expected_checkpointed[name], name
        assert all(r["grads_ok"]) and r["state_only_trainable"], name
        assert r["losses"][-1] < r["losses"][0], (name, r["losses"])

        # One optimizer group per trainable part, holding exactly that part's weights,
        # at that part's learning rate.
        lrs_by_part = part_learning_rates(TrainConfig(learning_rate=LR, **lrs))
        assert [g[0] for g in r["groups"]] == [p for p in DENSE_PARTS if p not in frozen], name
        for group, lr, fqns in r["groups"]:
            assert lr == lrs_by_part[group] and {part_of(f) for f in fqns} == {group}, (name, group)

        # Frozen weights are bit-identical after training (so is a trainable tower at
        # lr 0); every other tensor moved.
        full = r["full"]
        assert set(initial) <= set(full) | {"lm_head.weight"}, name
        for key, before in initial.items():
            after = full.get(key, full.get("model.language_model.embed_tokens.weight"))
            if part_of(key) in unchanged or any(key.startswith(m + ".") for m in hand_frozen):
                assert torch.equal(after, before), (name, key)
            else:
                assert not torch.equal(after, before), (name, key)

    vision = results["vision"]
    assert "model.visual.patch_embed.proj.weight" in vision["sharded_keys"]
    assert vision["reload_equal"] and vision["optim_reload_equal"]
    assert "model.visual.blocks.{0..1} x2" in vision["plan"] and "frozen" in vision["plan"]
    if backend == "fsdp1":
        assert results["mixed_parts_error"] and "2 parts" in results["mixed_parts_error"]
        assert "merger: model.visual.merger." in results["mixed_parts_error"]
    else:  # units mixing frozen and trainable weights train, and are planned as such
        assert "MIXED" in results["mlp of layer 1"]["plan"] and "MIXED" in results["merger in the root"]["plan"]
