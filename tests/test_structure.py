"""The seams the rest of ft builds on: one module per FSDP backend reads its internals, optimizers are
registered once, unit and checkpointing are separate decisions of the wrap plan, test
faults stay out of the way unless asked for."""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLDecoderLayer,
    Qwen2_5_VLPatchMerger,
    Qwen2_5_VLVisionBlock,
)

from conftest import free_port
from ft import faults
from ft.config import TrainConfig, field_choices
from ft.dryrun import build_on_meta, estimate_memory, format_plan
from ft.fsdp_wrap import WrapRule, checkpoint_summary, plan_units
from ft.optim import OPTIMIZERS, build_optimizer, spec_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One unit for the whole vision tower (its merger apart: another part), checkpointing
# per vision block and per decoder layer.
TOWER_PLAN = [
    WrapRule(Qwen2_5_VisionTransformerPretrainedModel, "the whole vision tower"),
    WrapRule(Qwen2_5_VLVisionBlock, "recomputed, not a unit", unit=False, checkpoint=True),
    WrapRule(Qwen2_5_VLPatchMerger, "merger"),
    WrapRule(Qwen2_5_VLDecoderLayer, "layer", checkpoint=True),
]


def _tracked_files() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()


def _readers(pattern: str) -> list[str]:
    regex = re.compile(pattern)
    return sorted(f for f in _tracked_files() if f.startswith("ft/") and f.endswith(".py")
                  and regex.search(open(os.path.join(REPO, f)).read()))


def test_fsdp_internals_are_read_in_the_backend_modules():
    assert _readers(r"_shard_param_infos|\._fqns|_param_infos|_flat_param|FlatParameter|FullyShardedDataParallel"
                    r"|_fsdp_wrapped_module|state_dict_type") == ["ft/fsdp1.py"]
    assert _readers(r"fully_shard|FSDPModule|MixedPrecisionPolicy|set_modules_to_") == ["ft/fsdp2.py"]
    # State dicts go through the backend (and ft's Adafactor's own fqn_state_dict).
    assert _readers(r"get_optimizer_state_dict|get_model_state_dict") == ["ft/fsdp1.py", "ft/fsdp2.py"]


def test_no_file_cites_a_document_the_repository_lacks():
    name = "FACTS" + ".md"  # split, or this file would cite it
    citing = [f for f in _tracked_files() if not f.endswith((".png", ".jpg", ".jpeg"))
              and name in open(os.path.join(REPO, f), errors="replace").read()]
    assert citing == []


def test_optimizers_are_registered_once(tiny_model_dir):
    assert tuple(OPTIMIZERS) == field_choices("train.optim")
    model = torch.nn.Linear(4, 3)
    for name, spec in OPTIMIZERS.items():
        opt = build_optimizer(model.parameters(), TrainConfig(optim=name), model=model)
        assert type(opt) is spec.cls and spec_of(opt) is spec
    # The dry run's optimizer figure is the registry's, and they differ by optimizer.
    units = plan_units(build_on_meta(tiny_model_dir))
    figures = {name: estimate_memory(units, 4, name, "bf16").optimizer for name in OPTIMIZERS}
    assert figures == {name: spec.state_bytes(units, 4, "fsdp1") for name, spec in OPTIMIZERS.items()}
    assert len(set(figures.values())) == len(figures)


def test_backends_are_registered_once_and_fsdp2_maps_or_refuses_each_knob():
    from ft import fsdp2
    from ft.backends import BACKENDS
    from ft.config import FSDPConfig, load_config

    assert tuple(BACKENDS) == field_choices("fsdp.backend") and FSDPConfig().backend == "fsdp1"
    assert BACKENDS["fsdp2"].config_refusals(load_config(None, ["fsdp.backend=fsdp2"])) == []
    # Every FSDP1 knob, every value: mapped (and logged) or refused, naming the key.
    for key, values in fsdp2.KNOBS.items():
        for value, what in values.items():
            cfg = load_config(None, ["fsdp.backend=fsdp2", f"fsdp.{key}={str(value).lower()}"
                                     if isinstance(value, bool) else f"fsdp.{key}={value}"])
            refusals = fsdp2.config_refusals(cfg)
            if isinstance(what, fsdp2.Refused):
                assert refusals == [f"fsdp.{key}={value} with fsdp.backend=fsdp2: {what.why}"]
            else:
                assert refusals == [] and f"{key}={value} -> {what.to}" in fsdp2.describe(cfg.fsdp, "bf16")
    (refusal,) = fsdp2.config_refusals(load_config(None, ["fsdp.backend=fsdp2", "train.optim=hf_adafactor"]))
    assert "train.optim=hf_adafactor" in refusal and "got mixed torch.Tensor and DTensor" in refusal


# torchrun's @record on the entry point cannot enable its fault handler under capsys.
@pytest.mark.filterwarnings("ignore:Unable to enable fault handler:UserWarning")
def test_fsdp2_refusal_stops_the_loop_before_it_starts(tmp_path, monkeypatch, capsys):
    """The training entry point (what `python -m ft.loop` runs), in this process: the
    refusal comes before any process group or output exists, so no fresh process is
    needed (launch.sh's refusals in a real job: tests/test_resume.py)."""
    from ft.loop import main as train_main

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit:
        train_main([os.path.join(REPO, "configs/demo.yaml"), "fsdp.backend=fsdp2",
                    "fsdp.cpu_offload=true", f"train.output_dir={tmp_path / 'out'}"])
    stderr = capsys.readouterr().err
    assert exit.value.code == 2, stderr[-3000:]
    assert "ft: config error: fsdp.cpu_offload=True with fsdp.backend=fsdp2: FSDP2's CPUOffloadPolicy" in stderr
    assert not (tmp_path / "out").exists()


def test_unit_and_checkpointing_are_separate_decisions(tiny_model_dir):
    model = build_on_meta(tiny_model_dir)
    units = plan_units(model, TOWER_PLAN)
    assert [u.fqn for u in units] == ["model.visual", "model.visual.merger", "model.language_model.layers.0",
                                      "model.language_model.layers.1", ""]
    tower = units[0]
    assert list(tower.recompute) == ["model.visual.blocks.0", "model.visual.blocks.1"] and not tower.checkpoint
    assert units[2].checkpoint and list(units[2].recompute) == ["model.language_model.layers.0"]
    assert checkpoint_summary(units) == (4, 0)
    line = next(line for line in format_plan(units, 2).splitlines() if line.strip().startswith("model.visual "))
    assert re.search(r"\s2\s+train$", line), line  # two modules recomputed inside the unit


def _wrap_worker(rank, world, port, model_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from ft import dist
    from ft.config import FSDPConfig
    from ft.data import Collator, ConversationDataset, load_rows
    from ft.fsdp_wrap import WRAP_PLAN, wrap_model
    from ft.model import load_model, loss_sum
    from ft.processor import load_processor

    info = dist.init_distributed()
    processor = load_processor(model_dir)
    ds = ConversationDataset(load_rows(os.path.join(REPO, "data/demo/train.jsonl")), processor, 1024)
    batch = Collator(processor)([ds[rank], ds[rank + 2]]).inputs
    results = {}
    for name, rules in (("default", WRAP_PLAN), ("tower", TOWER_PLAN)):
        model = load_model(model_dir, info)
        wrapped = wrap_model(model, plan_units(model, rules), FSDPConfig(), "fp32", info)
        s, n = loss_sum(wrapped, batch)
        (s / n).backward()
        norm = wrapped.clip_grad_norm_(float("inf"))
        ckpt_names = sorted(n for n, m in wrapped.named_modules() if isinstance(m, CheckpointWrapper))
        results[name] = (s.item(), norm.item(), len(ckpt_names))
    if rank == 0:
        torch.save(results, out)
    dist.cleanup()


# slow: 2 gloo ranks are processes of their own (mp.spawn)
@pytest.mark.slow
def test_whole_tower_unit_with_block_checkpointing_trains_the_same(tiny_model_dir, tmp_path):
    out = str(tmp_path / "r.pt")
    mp.spawn(_wrap_worker, args=(2, free_port(), tiny_model_dir, out), nprocs=2, join=True)
    r = torch.load(out)
    assert r["default"][2] == r["tower"][2] == 4  # 2 blocks + 2 layers recomputed either way
    assert r["tower"][0] == pytest.approx(r["default"][0], abs=1e-5)
    assert r["tower"][1] == pytest.approx(r["default"][1], rel=1e-5)


def test_faults_fire_once_and_only_when_asked(monkeypatch):
    monkeypatch.delenv("FT_TEST_FAULT", raising=False)
    assert not faults.fires("crash", 3, 0)
    monkeypatch.setenv("FT_TEST_FAULT", "nan:3:1")
    monkeypatch.setattr(faults, "_fired", set())
    assert not faults.fires("nan", 3, 0) and not faults.fires("nan", 2, 1) and not faults.fires("crash", 3, 1)
    loss = torch.tensor(2.0)
    assert torch.isnan(faults.poison_loss(loss, 3, 1))
    assert faults.poison_loss(loss, 3, 1) is loss  # once
    monkeypatch.setattr(faults, "_fired", set())
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert not faults.fires("nan", 3, 1)  # never after a restart
    monkeypatch.setenv("FT_TEST_FAULT", "typo:1:0")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(ValueError, match="unknown kind 'typo'"):
        faults.fires("nan", 1, 0)
