"""The fit check of a mixture-of-experts model (Qwen3-VL-MoE): its weights, gradients and
optimizer state count every expert; its activations count the MLPs of the top_k experts
a token is routed to, plus the routing, and never intermediate_size (the width of the
dense MLP that only the layers in mlp_only_layers have). Tiny configs on the meta
device, no processes."""

import pytest
import torch

from ft.dryrun import estimate_activations, estimate_memory, format_activations
from ft.families import family_named
from ft.fsdp_wrap import plan_units

FAMILY = family_named("qwen3_vl_moe")
TOKENS, HIDDEN, MOE_INTERMEDIATE, LAYERS = 256, 64, 48, 2
BF16 = 2


def _model(**text):
    """A tiny Qwen3-VL-MoE on the meta device: 2 layers of 8 experts, top-2, unless `text`
    says otherwise. intermediate_size (1000) is far from top_k x moe_intermediate_size."""
    text = {"vocab_size": 512, "hidden_size": HIDDEN, "intermediate_size": 1000, "num_hidden_layers": LAYERS,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
            "moe_intermediate_size": MOE_INTERMEDIATE, "num_experts": 8, "num_experts_per_tok": 2,
            "decoder_sparse_step": 1, "mlp_only_layers": [],
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 4, 4],
                                "mrope_interleaved": True}, **text}
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": HIDDEN,
              "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 16,
              "deepstack_visual_indexes": [0]}
    config = FAMILY.config_class()(text_config=text, vision_config=vision, tie_word_embeddings=False)
    with torch.device("meta"):
        return FAMILY.model_class()._from_config(config)


def _activations(model):
    """No vision patches: the recomputed layer is the decoder layer."""
    return estimate_activations(model.config, plan_units(model), TOKENS, "bf16", vision_patches=0)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_activations_do_not_grow_with_the_number_of_experts_but_the_router_term():
    few, many = _model(num_experts=8), _model(num_experts=32)
    a, b = _activations(few), _activations(many)
    assert a.recompute_of == b.recompute_of == "decoder layer"
    # The router's logits (compute dtype) and probabilities (fp32) are [tokens, experts]:
    # the only term that grows with the number of experts, in the layer and in what the
    # load-balancing loss keeps of every layer.
    router = TOKENS * (32 - 8) * (BF16 + 4)
    assert b.recompute - a.recompute == router
    assert b.routing - a.routing == LAYERS * router
    assert (a.decoder_inputs, a.other, a.loss) == (b.decoder_inputs, b.other, b.loss)
    assert "MoE router" in format_activations(a)


def test_weights_gradients_and_optimizer_state_count_every_expert():
    few, many = _model(num_experts=8), _model(num_experts=32)
    # Every expert's gate, up and down rows, and the router's row for it, per layer.
    grown = LAYERS * (32 - 8) * (3 * HIDDEN * MOE_INTERMEDIATE + HIDDEN)
    assert _params(many) - _params(few) == grown
    units_few, units_many = plan_units(few), plan_units(many)
    assert sum(u.numel for u in units_few) == _params(few)
    assert sum(u.numel for u in units_many) == _params(many)
    a, b = estimate_memory(units_few, 1, "adamw", "bf16"), estimate_memory(units_many, 1, "adamw", "bf16")
    assert b.master - a.master == 4 * grown  # fp32 master shards, one rank
    assert b.gradients - a.gradients == 4 * grown
    assert b.optimizer - a.optimizer == 8 * grown  # adamw: two fp32 moments


def test_the_mlp_term_grows_with_top_k():
    top2, top4 = _activations(_model(num_experts_per_tok=2)), _activations(_model(num_experts_per_tok=4))
    # Two more routes per token, each at least the expert MLP's gate, up, act, product
    # and the gradients of gate and up.
    assert top4.recompute - top2.recompute >= TOKENS * 2 * 6 * MOE_INTERMEDIATE * BF16
    # ... and the 2 x 48 wide active MLP stays far below a dense 1000-wide MLP's
    # intermediates (6 x 1000 per token).
    assert top2.recompute < TOKENS * 6 * 1000 * BF16


@pytest.mark.parametrize("intermediate", [1000, 4000])
def test_intermediate_size_counts_only_in_dense_layers(intermediate):
    base = _activations(_model(intermediate_size=64))
    sparse = _activations(_model(intermediate_size=intermediate))
    assert sparse.recompute == base.recompute and sparse.without_checkpointing == base.without_checkpointing
    # Layer 1 dense (mlp_only_layers): its MLP is intermediate_size wide, the larger layer.
    mixed_model = _model(intermediate_size=intermediate, mlp_only_layers=[1])
    assert FAMILY.moe_shape(mixed_model.config.text_config).layers == (0,)
    mixed = _activations(mixed_model)
    assert mixed.recompute >= TOKENS * 6 * intermediate * BF16 > sparse.recompute
    assert mixed.routing == sparse.routing // LAYERS  # one MoE layer left
