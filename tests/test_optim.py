"""The schedule and optimizer match what the HF Trainer recipe builds."""

import pytest
import torch
from transformers import get_constant_schedule_with_warmup
from transformers.optimization import Adafactor

from ft.config import TrainConfig
from ft.optim import build_optimizer, clip_grad_norm, lr_at, warmup_steps


@pytest.mark.parametrize("max_steps,ratio", [(60, 0.05), (10, 0.0), (7, 0.3), (100, 0.1)])
def test_lr_matches_hf_constant_with_warmup(max_steps, ratio):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2e-4)
    sched = get_constant_schedule_with_warmup(opt, warmup_steps(max_steps, ratio))
    for step in range(max_steps):
        assert lr_at(step, max_steps, 2e-4, ratio) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-15)
        opt.step()
        sched.step()


def test_warmup_is_honoured():
    # HF's "constant" ignores warmup_ratio; ft does not.
    assert lr_at(0, 100, 1.0, 0.1) == 0.0
    assert lr_at(5, 100, 1.0, 0.1) == pytest.approx(0.5)
    assert lr_at(10, 100, 1.0, 0.1) == 1.0
    assert lr_at(99, 100, 1.0, 0.1) == 1.0


def test_adafactor_is_the_recipes():
    model = torch.nn.Linear(4, 3)
    opt = build_optimizer(model.parameters(), TrainConfig(optim="adafactor", learning_rate=3e-5))
    assert isinstance(opt, Adafactor)
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
