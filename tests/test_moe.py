"""The MoE load-balancing loss over the global batch (`ft.moe`), on the tiny
Qwen3-VL-MoE in one process:

- the shares of the micro-batches add up to transformers' own `load_balancing_loss_func`
  on the router logits of the whole batch, with its attention mask: in value and in the
  gradient they leave on every weight;
- how the samples are batched changes nothing: one a row, two a row with more padding,
  packed (pad segments and the collator's dummy image included): the same routing
  counts and the same loss;
- the per-expert load figures;
- the routers are a part and a unit of their own; a dense family has no router to
  freeze.

The same over ranks (2 ranks x 1 micro-batch against 1 rank x 2) is tests/test_moe_e2e.py.
"""

import json

import pytest
import torch
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import load_balancing_loss_func

from ft.collate import Collator
from ft.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from ft.dataset import ConversationDataset
from ft.families import read_family
from ft.fsdp_wrap import check_uniform_requires_grad, plan_units
from ft.moe import Balancer, load_metrics, tap_routers
from ft.packing import RopeIndex
from ft.parts import apply_freezing, param_groups
from ft.processor import load_processor
from ft.rows import load_rows
from conftest import write_test_image, write_test_video

FAMILY = "qwen3_vl_moe"


@pytest.fixture(scope="module")
def setup(tiny_family_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("moe-data")
    write_test_image(d / "a.png", size=(84, 56), seed=1)
    write_test_video(d / "clip.mp4", frames=8, size=(64, 48), fps=4, seed=4)

    def row(content, answer):
        return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}

    lines = [row([{"type": "image", "image": "a.png"}, {"type": "text", "text": "What is it?"}], "Noise."),
             row("Say hi.", "Hi there, how are you today?"),
             row([{"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "What happens?"}], "It moves."),
             row("Count to three.", "One, two, three.")]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    model_dir = tiny_family_dir(FAMILY)
    defaults = DataConfig()
    processor = load_processor(model_dir, video_min_pixels=defaults.video_min_pixels,
                               video_max_pixels=defaults.video_max_pixels)
    ds = ConversationDataset(load_rows(d / "rows.jsonl"), processor, 1024)
    model = read_family(model_dir).model_class().from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    return model, processor, [ds[i] for i in range(len(ds))]


def _shape(model):
    return read_family(model.config._name_or_path).moe_shape(model.config.text_config)


def _balance(model, batches) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """ft's loss over `batches` (one step's micro-batches): the summed shares, the
    step's routing counts, and the router weights' gradients the shares leave."""
    model.zero_grad()
    routings = []
    for batch in batches:
        with tap_routers(model, batch.real) as routed:
            model(**{k: v for k, v in batch.inputs.items() if k != "labels"}, use_cache=False)
        routings.append(routed[0])
    balancer = Balancer(_shape(model), 1.0, torch.device("cpu"))
    balancer.agree([r.counts for r in routings])
    total = sum(balancer.loss(r) for r in routings)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total.detach(), balancer.counts, grads


def test_shares_add_up_to_transformers_loss_on_the_whole_batch(setup):
    model, processor, samples = setup
    whole = Collator(processor)(samples)
    assert torch.equal(whole.real, whole.inputs["attention_mask"].bool())  # no dummy: every kind is there
    model.zero_grad()
    out = model(**{k: v for k, v in whole.inputs.items() if k != "labels"}, output_router_logits=True,
                use_cache=False)
    shape = _shape(model)
    want = load_balancing_loss_func(out.router_logits, shape.experts, shape.top_k, whole.inputs["attention_mask"])
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    got, counts, grads = _balance(model, [Collator(processor)(samples[:2]), Collator(processor)(samples[2:])])
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert counts.sum().item() == whole.real.sum().item() * len(shape.layers) * shape.top_k
    # The gradient reaches the routers and, through their inputs, the layers below.
    assert any(".mlp.gate." in n for n in grads) and any("self_attn" in n for n in grads)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        assert torch.allclose(g, want_grads[name], rtol=1e-5, atol=1e-7), name


def test_batching_pads_and_packs_change_no_count(setup):
    """The same four samples one a row (each batch but the image's gets the collator's
    dummy image), two a row, and packed into rows with pad segments."""
    model, processor, samples = setup
    alone = [Collator(processor)([s]) for s in samples]
    assert sum(b.stats.dummy_image for b in alone) == 3
    padded = [Collator(processor)([samples[1], samples[0]]), Collator(processor)(samples[2:])]
    packed = [Collator(processor, RopeIndex(model.config))([samples[:3], samples[3:]])]
    assert packed[0].real.sum() < packed[0].real.numel()  # the second row ends in a pad segment
    ref_loss, ref_counts, ref_grads = _balance(model, alone)
    for name, batches in (("padded", padded), ("packed", packed)):
        loss, counts, grads = _balance(model, batches)
        assert torch.equal(counts, ref_counts), name
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6), name
        for key, g in grads.items():
            assert torch.allclose(g, ref_grads[key], rtol=1e-5, atol=1e-7), (name, key)


def test_counting_every_position_would_differ(setup):
    """The check above can fail: counted with pads, as transformers does without an
    attention mask (packing), the loss moves."""
    model, processor, samples = setup
    batch = Collator(processor)(samples)
    _, counts, _ = _balance(model, [batch])
    everything = batch._replace(real=torch.ones_like(batch.real))
    _, with_pads, _ = _balance(model, [everything])
    assert with_pads.sum() > counts.sum()


def test_load_metrics():
    balanced = torch.full((2, 4), 5.0)
    assert load_metrics(balanced)["expert_load_max_over_mean"] == 1.0
    skewed = torch.tensor([[10.0, 10.0, 10.0, 10.0], [40.0, 0.0, 0.0, 0.0]])
    figures = load_metrics(skewed)
    assert figures["expert_load_max_over_mean"] == 4.0  # the worst layer: everything on one expert
    assert [figures[f"expert_share/{e}"] for e in range(4)] == [50 / 80, 10 / 80, 10 / 80, 10 / 80]
    assert load_metrics(torch.zeros(2, 4)) == {}


def test_routers_are_a_part_and_a_unit_of_their_own(setup, tiny_family_dir):
    model, _, _ = setup
    apply_freezing(model, ModelConfig(freeze_router=True))
    units = plan_units(model)
    check_uniform_requires_grad(units)
    routers = [u for u in units if u.parts == ("router",)]
    assert len(routers) == model.config.text_config.num_hidden_layers
    assert all(not p.requires_grad for u in routers for p in u.params.values())
    experts = [n for n, p in model.named_parameters() if ".experts." in n]
    assert experts and all(p.requires_grad for n, p in model.named_parameters() if n in experts)
    apply_freezing(model, ModelConfig())
    groups = {g["name"]: g for g in param_groups(model, TrainConfig(learning_rate=1e-4, router_lr=1e-5))}
    assert groups["router"]["lr"] == 1e-5 and groups["llm"]["lr"] == 1e-4
    assert {id(p) for p in groups["router"]["params"]} == {id(m.mlp.gate.weight)
                                                          for m in model.model.language_model.layers}

    dense = read_family(tiny_family_dir("qwen3_vl")).model_class().from_pretrained(tiny_family_dir("qwen3_vl"))
    with pytest.raises(ConfigError, match="model.freeze_router=true, but Qwen3-VL has no router"):
        apply_freezing(dense, ModelConfig(freeze_router=True))
    assert not [u for u in plan_units(dense) if "router" in u.parts]
