"""The dry run's activation estimate (ft.dryrun.estimate_activations) against a measured
peak, on the CPU, at small shapes.

    python benchmarks/fit_check.py [--tokens 512 1024 2048] [--patches-per-token 1.0]

The model has the 7B model's proportions at reduced sizes (head dim 128, MLP 5.25x
hidden, GQA, vision head dim 80), 2 decoder layers, 2 vision blocks (one windowed, one
full-attention), untied lm_head, in bf16 as FSDP's mixed precision computes. One
micro-batch (text, then one image, then text; every position labelled) runs forward +
backward through ft.model.loss_sum (the chunked loss), with the plan's modules
checkpointed as ft.fsdp1.wrap does (non-reentrant checkpoint_wrapper). No FSDP, so every
parameter's gradient is dropped as soon as it is accumulated (FSDP1 frees a unit's
unsharded gradient once reduce-scattered), and the estimate's `grad_buffers` term (the
unsharded gradients FSDP1 holds: the root's flat gradient through the whole backward,
plus one unit's; unit sizes times the compute dtype's bytes, no shape model) is left
out of the comparison: measured is compared with `total - grad_buffers`.

What is measured: the peak of live tensor storage bytes created during forward +
backward (a TorchDispatchMode, as benchmarks/loss_memory.py counts them: torch's CPU
allocator has no peak counter); the parameters, created before, are not counted, as
they are not in the activation row either. The estimate is the activation row of the
dry run for the same shapes, with the vision patches given exactly.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from functools import partial
from pathlib import Path

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from ft.dryrun import estimate_activations
from ft.fsdp_wrap import plan_units
from ft.model import loss_sum

_spec = importlib.util.spec_from_file_location("benchmarks_loss_memory", Path(__file__).with_name("loss_memory.py"))
_loss_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_loss_memory)
LiveStorageBytes = _loss_memory.LiveStorageBytes

MiB = 2**20
# Stated error bound of the activation estimate at these shapes (see RESULTS.md).
TOLERANCE = 0.25


def small_config(vocab: int = 16384, hidden: int = 512, layers: int = 2, vision_depth: int = 2):
    """A Qwen2_5_VLConfig with the 7B model's proportions at reduced sizes."""
    from transformers import Qwen2_5_VLConfig

    ids = {"image_token_id": vocab - 1, "video_token_id": vocab - 2, "vision_start_token_id": vocab - 3,
           "vision_end_token_id": vocab - 4}
    text = {
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": hidden * 21 // 4,
        "num_hidden_layers": layers, "num_attention_heads": hidden // 128, "num_key_value_heads": 1,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": False, "bos_token_id": vocab - 5, "eos_token_id": vocab - 6,
        "pad_token_id": vocab - 5,
    }
    vision = {
        "depth": vision_depth, "hidden_size": 320, "intermediate_size": 864, "num_heads": 4,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
        "fullatt_block_indexes": [vision_depth - 1], "out_hidden_size": hidden,
    }
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                              bos_token_id=vocab - 5, eos_token_id=vocab - 6, pad_token_id=vocab - 5, **ids)
    config._attn_implementation = "sdpa"
    return config


def build(config, seed: int = 0):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                             dtype=torch.bfloat16)
    model.train()
    units = plan_units(model)
    keep = {id(m) for u in units for m in u.recompute.values()}
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: id(m) in keep)

    def drop(p):
        p.grad = None

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(drop)
    return model, units


def batch(config, tokens: int, side: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One sample of `tokens` tokens holding one image of side x side patches."""
    g = torch.Generator().manual_seed(seed)
    merge = config.vision_config.spatial_merge_size
    image_tokens = (side // merge) ** 2
    text = config.text_config.vocab_size - 10
    before = (tokens - image_tokens - 2) // 2
    after = tokens - image_tokens - 2 - before
    ids = torch.cat([torch.randint(0, text, (before,), generator=g), torch.tensor([config.vision_start_token_id]),
                     torch.full((image_tokens,), config.image_token_id), torch.tensor([config.vision_end_token_id]),
                     torch.randint(0, text, (after,), generator=g)])[None]
    v = config.vision_config
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
        "pixel_values": torch.randn(side * side, patch_dim, generator=g).to(torch.bfloat16),
        "image_grid_thw": torch.tensor([[1, side, side]]),
    }


def measure(model, config, tokens: int, side: int, chunk_size: int) -> int:
    """Peak live storage bytes of one forward + backward."""
    b = batch(config, tokens, side)
    with LiveStorageBytes() as tracker:
        loss, _ = loss_sum(model, b, chunk_size)
        loss.backward()
    return tracker.peak


def compare(tokens: int, side: int, chunk_size: int = 256, model_and_units=None, config=None):
    """(measured, estimated) activation bytes for one micro-batch."""
    config = config or small_config()
    model, units = model_and_units or build(config)
    measured = measure(model, config, tokens, side, chunk_size)
    est = estimate_activations(config, units, tokens, "bf16", True, chunk_size, vision_patches=side * side)
    return measured, est


def compared(est) -> int:
    """The part of the activation estimate the measurement can check (no FSDP here)."""
    return est.total - est.grad_buffers


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--side", type=int, nargs="+", default=[16, 32],
                        help="image side in patches (side^2 patches, side^2/4 image tokens)")
    parser.add_argument("--chunk-size", type=int, default=256)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = small_config()
    built = build(config)
    print(f"activation estimate vs measured peak of live storage bytes (CPU, bf16, checkpointed; "
          f"hidden {config.text_config.hidden_size}, vocab {config.text_config.vocab_size}, "
          f"loss chunk {args.chunk_size})")
    print(f"  {'tokens':>6} {'patches':>7} {'measured':>10} {'estimate':>10} {'error':>7}   estimate's parts (MiB)")
    worst = 0.0
    for side in args.side:
        for tokens in args.tokens:
            if (side // 2) ** 2 + 2 > tokens:
                continue
            measured, est = compare(tokens, side, args.chunk_size, built, config)
            err = compared(est) / measured - 1
            worst = max(worst, abs(err))
            parts = (f"layer inputs {est.decoder_inputs / MiB:.1f} + block inputs {est.vision_inputs / MiB:.1f} "
                     f"+ recompute ({est.recompute_of}) {est.recompute / MiB:.1f} + loss {est.loss / MiB:.1f} "
                     f"+ other {est.other / MiB:.1f}")
            print(f"  {tokens:>6} {side * side:>7} {measured / MiB:>7.1f} MiB {compared(est) / MiB:>7.1f} MiB "
                  f"{err:>+7.1%}   {parts}")
    print(f"worst error {worst:.1%} (stated bound {TOLERANCE:.0%})")
    sys.exit(0 if worst <= TOLERANCE else 1)


if __name__ == "__main__":
    main()
