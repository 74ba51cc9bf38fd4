"""Throughput figures for the training loop: model FLOPs of a batch, peak FLOP/s of the
accelerator (hence MFU), and peak memory.

All of it is plain arithmetic on the model config and on a batch's CPU tensors, cheap
enough to run every micro-batch before the host-to-device copy:

    inputs, stats, real = collator(samples)           # ft.collate.Batch: stats counted there
    step_flops += train_flops(hf_config, stats, frozen)  # over the step's micro-batches
    ...
    mfu(step_flops, step_seconds, peak_flops(device))   # this device's; None on CPU

FLOP conventions (those of PaLM's MFU, Chowdhery et al. 2022, appendix B):

* A matmul of [m, k] by [k, n] is 2·m·k·n FLOPs. Norms, activations, softmax, rotary
  embeddings, biases and the embedding lookup are not counted (they are a fraction of
  a percent at the real shapes).
* Training = 3 × forward (the backward computes gradients with respect to both the
  inputs and the weights of every matmul) when every part trains; with frozen parts
  (`model.freeze_*`) only the backward work that is still needed counts (see
  :func:`train_flops`). The recomputation of activation checkpointing is *not* counted:
  it is work the hardware does, not work the model needs, so MFU does not move when
  checkpointing is switched on or off.
* Videos count like images: the vision tower's work on every patch of every two-frame
  temporal patch, attention within each temporal patch, and each video token in the
  language model.
* Only work on real data counts: padding tokens, and the dummy image or video the
  collator adds to a batch without one (`ft.collate.Collator._dummies`; it exists only to
  keep FSDP's collectives in step across ranks), are overhead, like padding: the
  collator's `ft.collate.BatchStats` leaves both out.
* Attention: QKᵀ and AV, 2 FLOPs per multiply-add each, over the (query, key) pairs
  the model needs: every pair within a sequence (vision windows, full-attention
  blocks), and for the causal language model only the pairs with key ≤ query, the
  half a causal kernel computes (`causal=False` counts all of them, the Megatron /
  torchtitan convention and what `torch.utils.flop_counter` reports for attention).
* The vocabulary projection (lm_head) counts at the label positions only: those are
  the logits the loss needs, and the ones ft's chunked loss computes
  (`train.loss_chunk_size` > 0). The plain loss path projects every position: on
  prompt-heavy batches it does more work than is counted here.
"""

from __future__ import annotations

import re
import resource
import sys
from dataclasses import dataclass
from typing import Any, Collection

import torch

from ft.collate import BatchStats
from ft.families import family_of, head_dim
from ft.parts import PART_NAMES, backward_reaches

__all__ = [
    "Flops",
    "forward_flops",
    "matmul_params",
    "memory_stats",
    "mfu",
    "peak_flops",
    "peak_flops_for_name",
    "train_flops",
]


# =====================================================================================
# FLOPs from the config
# =====================================================================================
def matmul_params(config: Any) -> dict[str, int]:
    """Weights each token or patch is multiplied by, from a model config of any family
    (`ft.families`; a transformers config, or any object with its `model_type`,
    `text_config` and `vision_config` fields), without building the model.

    Keys: `text_layers` (all decoder layers: q, k, v, o projections and the gated MLP,
    per token; in a mixture-of-experts layer, the MLPs of the `top_k` experts a token
    is routed to, not all experts), `router` (the MoE routers, per token; 0 for a dense
    model), `lm_head` (per label token), `vision_patch_embed` (the Conv3d, per
    patch), `vision_blocks` (all blocks: qkv, proj and the MLP, per patch),
    `vision_merger` (the two linear layers of every merger, per merged token of merge²
    patches: Qwen3-VL runs its DeepStack mergers on every merged token too).
    """
    text, vision = config.text_config, config.vision_config
    hidden, heads, kv_heads = text.hidden_size, text.num_attention_heads, text.num_key_value_heads
    size = head_dim(text)
    attention = (
        hidden * heads * size  # q_proj
        + 2 * hidden * kv_heads * size  # k_proj, v_proj (grouped-query attention)
        + heads * size * hidden  # o_proj
    )
    family = family_of(config)
    moe = family.moe_shape(text)
    sparse = len(moe.layers) if moe else 0
    mlps = 3 * hidden * text.intermediate_size * (text.num_hidden_layers - sparse)  # gate, up, down
    if moe:
        mlps += 3 * hidden * moe.intermediate * moe.top_k * sparse
    shape = family.vision_shape(vision)
    dim, merge = shape.width, vision.spatial_merge_size
    merged = dim * merge**2
    return {
        "text_layers": attention * text.num_hidden_layers + mlps,
        "router": hidden * moe.experts * sparse if moe else 0,
        "lm_head": hidden * text.vocab_size,
        "vision_patch_embed": vision.in_channels * vision.temporal_patch_size * vision.patch_size**2 * dim,
        "vision_blocks": (4 * dim * dim + shape.mlp_matrices * dim * shape.intermediate) * vision.depth,
        "vision_merger": (merged * merged + merged * shape.out) * shape.mergers,
    }


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs of one batch, by kind of work."""

    text_matmuls: float
    """Decoder layers' linear layers."""
    text_attention: float
    lm_head: float
    vision_matmuls: float
    """Patch embedding and the vision blocks' linear layers."""
    vision_attention: float
    merger: float
    router: float = 0.0
    """The MoE routers' linear layers (0 for a dense model)."""

    @property
    def total(self) -> float:
        return (self.text_matmuls + self.text_attention + self.lm_head
                + self.vision_matmuls + self.vision_attention + self.merger + self.router)


def _window_sizes(length: int, window: int) -> list[int]:
    """How HF's get_vision_window_index cuts `length` merged rows (or columns) into
    windows: full windows from the top-left, the remainder last."""
    return [window] * (length // window) + ([length % window] if length % window else [])


def _vision_attention_pairs(config: Any, grid: tuple[int, int, int], window_px: int) -> tuple[int, int]:
    """(query, key) pairs of one image in a full-attention block and in a window block.

    Attention never crosses a frame (t) boundary. A window (Qwen2.5-VL) is `window_px`
    pixels square (`ft.families.VisionShape.window`; 0: no block is windowed), cut on
    the grid of merged tokens (merge × merge patches each); windows at the right and
    bottom edges are smaller.
    """
    vision = config.vision_config
    t, h, w = grid
    merge = vision.spatial_merge_size
    if not window_px:
        return t * (h * w) ** 2, 0
    window = window_px // merge // vision.patch_size  # in merged tokens
    rows = sum(r * r for r in _window_sizes(h // merge, window))
    cols = sum(c * c for c in _window_sizes(w // merge, window))
    # A window of r × c merged tokens holds r·c·merge² patches: (r·c·merge²)² pairs.
    return t * (h * w) ** 2, t * rows * cols * merge**4


def forward_flops(config: Any, stats: BatchStats, *, causal: bool = True) -> Flops:
    """Forward FLOPs of the model on a batch (see the module doc for the conventions).

    Sliding-window attention in the language model (`use_sliding_window`, off in the
    released Qwen2.5-VL configs) is not modelled: all layers count as full causal
    attention.
    """
    params = matmul_params(config)
    text, vision = config.text_config, config.vision_config

    # One QKᵀ and one AV per (query, key) pair and head: 2·2·head_dim·heads FLOPs.
    text_width = text.num_attention_heads * head_dim(text)
    if causal:
        pairs = sum(n * (n + 1) // 2 for n in stats.seq_lens)
    else:
        pairs = sum(n * n for n in stats.seq_lens)
    text_attention = 4 * text_width * pairs * text.num_hidden_layers

    patches = stats.patches
    shape = family_of(config).vision_shape(vision)
    full_blocks, window_blocks = shape.full_blocks, shape.window_blocks
    full_pairs = window_pairs = 0
    for grid in stats.vision_grids:
        f, w = _vision_attention_pairs(config, grid, shape.window)
        full_pairs += f
        window_pairs += w
    vision_attention = 4 * shape.width * (full_pairs * full_blocks + window_pairs * window_blocks)

    return Flops(
        text_matmuls=float(2 * params["text_layers"] * stats.tokens),
        router=float(2 * params["router"] * stats.tokens),
        text_attention=float(text_attention),
        lm_head=float(2 * params["lm_head"] * stats.label_tokens),
        vision_matmuls=float(2 * (params["vision_patch_embed"] + params["vision_blocks"]) * patches),
        vision_attention=float(vision_attention),
        merger=float(2 * params["vision_merger"] * (patches // vision.spatial_merge_size**2)),
    )


def train_flops(config: Any, stats: BatchStats, frozen: Collection[str] = ()) -> float:
    """Model FLOPs of a training forward + backward on a batch (causal attention counted
    as its half, checkpoint recomputation not counted): 3 × forward when every part
    trains.

    With `frozen` parts (names from `ft.parts.PART_NAMES`), each part's backward counts
    what autograd still computes: the gradients with respect to its inputs (its matmuls
    once more, its attention twice) when backward reaches it
    (`ft.parts.backward_reaches`: it or a part before it trains); those with respect to
    its weights (its matmuls once more) when it trains. E.g. a frozen vision tower
    before a trained language model needs no backward at all.
    """
    unknown = set(frozen) - set(PART_NAMES)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; parts are {', '.join(PART_NAMES)}")
    f = forward_flops(config, stats)
    matmuls = {"vision_tower": f.vision_matmuls, "merger": f.merger, "router": f.router,
               "llm": f.text_matmuls + f.lm_head}
    attention = {"vision_tower": f.vision_attention, "merger": 0.0, "router": 0.0, "llm": f.text_attention}
    trainable = {part for part in PART_NAMES if part not in frozen}
    total = f.total
    for part in PART_NAMES:
        if backward_reaches(part, trainable):
            total += matmuls[part] + 2 * attention[part]
        if part in trainable:
            total += matmuls[part]
    return total


# =====================================================================================
# The accelerator
# =====================================================================================
# Dense (no 2:4 sparsity) bf16 tensor-core peaks from the vendors' datasheets, which
# quote the sparse figure: half of it. Patterns match torch.cuda.get_device_name();
# the first match wins, so variants come before their family.
_PEAK_BF16: list[tuple[str, float]] = [
    (r"\bGB200\b", 2.5e15),
    (r"\bB200\b", 2.25e15),
    (r"\bH200 NVL\b", 835.5e12),
    (r"\bH200\b", 989.4e12),  # SXM
    (r"\bGH200\b", 989.4e12),
    (r"\bH100 NVL\b", 835.5e12),
    (r"\bH100 PCIe\b", 756e12),
    (r"\bH100\b", 989.4e12),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"\bH800 PCIe\b", 756e12),
    (r"\bH800\b", 989.4e12),
    (r"\bA100\b", 312e12),
    (r"\bA800\b", 312e12),
    (r"\bL40S\b", 362.05e12),
    (r"\bL40\b", 181.05e12),
    (r"\bL4\b", 121e12),
    (r"\bA40\b", 149.7e12),
    (r"\bA30\b", 165e12),
    (r"\bA10\b", 125e12),  # not the A10G, whose figure NVIDIA does not publish
    (r"\bMI325X\b", 1307.4e12),
    (r"\bMI300X\b", 1307.4e12),
]


def peak_flops_for_name(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the accelerator called `name` (as
    torch.cuda.get_device_name reports it), or None when it is not in the table."""
    for pattern, flops in _PEAK_BF16:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return flops
    return None


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of `device`; None on CPU or an unknown GPU (then MFU is
    not reported rather than reported wrong)."""
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation of one device: the model FLOPs it did in `seconds`
    over what its peak allows. None when the peak is unknown."""
    if peak is None or seconds <= 0:
        return None
    return flops / (seconds * peak)


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory of this process, in GiB (2**30 bytes), since it started or since
    the last `torch.cuda.reset_peak_memory_stats(device)` for the GPU figures.

    `peak_rss_gib`: peak resident host memory (the kernel's high-water mark, which
    never resets). On a GPU also `max_allocated_gib` (memory held by tensors) and
    `max_reserved_gib` (held by PyTorch's caching allocator: what nvidia-smi sees,
    minus the CUDA context).
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
    stats = {"peak_rss_gib": rss_bytes / 2**30}
    if device.type == "cuda":
        stats["max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        stats["max_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return stats
