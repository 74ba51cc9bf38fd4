"""Loading Qwen2.5-VL for sharded training, and the loss ft optimises."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

from ft.data import IGNORE_INDEX
from ft.dist import DistInfo


def load_model(path: str, info: DistInfo, attn_implementation: str = "sdpa") -> Qwen2_5_VLForConditionalGeneration:
    """Rank 0 reads the weights from disk (fp32 master copy, on CPU); every other rank
    builds the same architecture without reading anything.

    Other ranks build on the meta device, then `to_empty` gives them uninitialised
    storage: on the GPU when there is one (so the node's CPU RAM holds one copy of the
    model, not one per rank), else on the CPU. `wrap_model` then makes every rank's
    weights equal to rank 0's (FSDP's sync_module_states on GPU, an explicit broadcast
    on CPU), so nothing on those ranks is ever read before it is overwritten.
    """
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"model.path={path!r} has no config.json: point it at a local Hugging Face "
            "folder of a Qwen2.5-VL checkpoint (or set model.build_tiny_if_missing=true "
            "for the tiny demo model)"
        )
    config = AutoConfig.from_pretrained(path)
    if config.model_type != "qwen2_5_vl":
        raise ValueError(f"{path}/config.json: model_type is {config.model_type!r}, expected 'qwen2_5_vl'")
    config.use_cache = False  # no KV cache in training: it only costs memory

    common = dict(dtype=torch.float32, attn_implementation=attn_implementation)
    if info.rank == 0:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, config=config, **common)
    else:
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, **common)
        model.to_empty(device=info.device)
        # to_empty gives lm_head and embed_tokens separate storage even when the config
        # ties them; re-tie, or rank 0 and this rank disagree on the parameter list and
        # the broadcast aborts with "collective mismatch" (FACTS.md).
        model.tie_weights()
    model.train()
    return model


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Forward one micro-batch; return the *sum* of next-token cross-entropies over its
    label tokens (fp32) and how many label tokens there were.

    A sum, not a mean: the loop divides by the label-token count of the whole optimizer
    step (all micro-batches, all ranks), which makes the update independent of how the
    global batch is split across ranks and accumulation steps.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    logits = model(**inputs, use_cache=False).logits
    # Position t predicts token t+1. Select the label positions before the fp32 upcast
    # so the [tokens x vocab] fp32 copy only exists for tokens that are learned.
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    picked = logits[:, :-1][keep].float()
    loss = F.cross_entropy(picked, targets[keep], reduction="sum")
    return loss, int(keep.sum())
