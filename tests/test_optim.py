"""The schedule and optimizers match what the HF Trainer recipe builds."""

import pytest
import torch
from transformers import get_constant_schedule_with_warmup
from transformers.optimization import Adafactor as HFAdafactor

from ft.config import TrainConfig
from ft.optim import Adafactor, build_optimizer, clip_grad_norm, lr_scale, set_lr, warmup_steps


@pytest.mark.parametrize("max_steps,ratio", [(60, 0.05), (10, 0.0), (7, 0.3), (100, 0.1)])
def test_lr_matches_hf_constant_with_warmup(max_steps, ratio):
    model = torch.nn.Linear(2, 2)
    groups = [{"params": [model.weight], "lr": 2e-4, "name": "a"}, {"params": [model.bias], "lr": 5e-5, "name": "b"}]
    ours = build_optimizer(groups, TrainConfig(optim="adamw"))
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 2e-4}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 5e-5}])
    sched = get_constant_schedule_with_warmup(opt, warmup_steps(max_steps, ratio))
    for step in range(max_steps):
        set_lr(ours, lr_scale(step, max_steps, ratio))
        for mine, hf in zip(ours.param_groups, opt.param_groups, strict=True):
            assert mine["lr"] == pytest.approx(hf["lr"], abs=1e-15)
        opt.step()
        sched.step()


def test_warmup_is_honoured():
    # HF's "constant" ignores warmup_ratio; ft does not.
    assert lr_scale(0, 100, 0.1) == 0.0
    assert lr_scale(5, 100, 0.1) == pytest.approx(0.5)
    assert lr_scale(10, 100, 0.1) == 1.0
    assert lr_scale(99, 100, 0.1) == 1.0


def test_groups_keep_names_and_base_lr():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)
    groups = [{"params": list(model[0].parameters()), "lr": 1e-3, "name": "vision"},
              {"params": list(model[1].parameters()), "lr": 1e-4, "name": "llm"},
              {"params": [model[1].bias], "lr": 1e-2, "name": "frozen"}]
    opt = build_optimizer(groups, TrainConfig(optim="adafactor", learning_rate=3e-5), model=model)
    assert [(g["name"], g["lr"], g["base_lr"]) for g in opt.param_groups] == [
        ("vision", 1e-3, 1e-3), ("llm", 1e-4, 1e-4)]  # the all-frozen group is dropped
    assert opt.param_groups[1]["params"] == [model[1].weight]
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 5e-5]


def test_adafactor_is_fts_and_needs_the_model():
    model = torch.nn.Linear(4, 3)
    cfg = TrainConfig(optim="adafactor", learning_rate=3e-5, weight_decay=0.1)
    opt = build_optimizer(model.parameters(), cfg, model=model)
    assert isinstance(opt, Adafactor)
    d = opt.defaults
    assert (d["lr"], d["eps"], d["clip_threshold"], d["decay_rate"], d["weight_decay"]) == (3e-5, 1e-30, 1.0, -0.8, 0.1)
    assert opt.param_groups[0]["name"] == "all"
    with pytest.raises(ValueError, match="model=root"):
        build_optimizer(model.parameters(), cfg)


def test_hf_adafactor_is_the_recipes():
    model = torch.nn.Linear(4, 3)
    opt = build_optimizer(model.parameters(), TrainConfig(optim="hf_adafactor", learning_rate=3e-5))
    assert isinstance(opt, HFAdafactor)
    d = opt.defaults
    assert d["lr"] == 3e-5
    assert d["scale_parameter"] is False and d["relative_step"] is False and d["warmup_init"] is False
    assert d["eps"] == (1e-30, 1e-3) and d["clip_threshold"] == 1.0 and d["decay_rate"] == -0.8
    assert d["beta1"] is None and d["weight_decay"] == 0.0


def test_adamw_and_frozen_params_skipped():
    model = torch.nn.Linear(4, 3)
    model.bias.requires_grad_(False)
    opt = build_optimizer(model.parameters(), TrainConfig(optim="adamw", learning_rate=1e-3))
    assert isinstance(opt, torch.optim.AdamW)
    assert [p for g in opt.param_groups for p in g["params"]] == [model.weight]


def test_clip_returns_preclip_norm():
    model = torch.nn.Linear(4, 3, bias=False)
    model.weight.grad = torch.full((3, 4), 2.0)  # norm = sqrt(12 * 4) = 6.93
    norm = clip_grad_norm(model, 1.0)
    assert norm == pytest.approx(48 ** 0.5)
    assert model.weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    model.weight.grad = torch.full((3, 4), 2.0)
    assert clip_grad_norm(model, 0.0) == pytest.approx(48 ** 0.5)  # 0 = no clipping
    assert model.weight.grad.norm().item() == pytest.approx(48 ** 0.5, rel=1e-5)
