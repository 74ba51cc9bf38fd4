"""Loading a Qwen VL model (any family of `ft.families`) for sharded training, and the
loss ft optimises."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig

from ft.backends import backend_of
from ft.dist import DistInfo
from ft.families import read_family
from ft.messages import IGNORE_INDEX
from ft.rounding import MASTER_DTYPES
from ft.sequence import shard_of


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (flash-attention's max_length_q/k are ints)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def load_model(path: str, info: DistInfo, attn_implementation: str = "sdpa",
               master: str = "fp32") -> nn.Module:
    """Rank 0 reads the weights from disk (the master copy, on CPU, in `master`'s dtype:
    `MASTER_DTYPES`); every other rank builds the same architecture without reading
    anything. Floating-point buffers (the rotary `inv_freq`) are fp32 either way.

    Other ranks build on the meta device, then `to_empty` gives them uninitialised
    storage: on the GPU when there is one (so the node's CPU RAM holds one copy of the
    model, not one per rank), else on the CPU. `wrap_model` then makes every rank's
    weights equal to rank 0's (FSDP's sync_module_states on GPU, an explicit broadcast
    on CPU), so nothing on those ranks is ever read before it is overwritten.
    """
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"model.path={path!r} has no config.json: point it at a local Hugging Face "
            "folder of a Qwen VL checkpoint (or set model.build_tiny_if_missing=true "
            "for the tiny demo model)"
        )
    family = read_family(path)
    config = AutoConfig.from_pretrained(path)
    config.use_cache = False  # no KV cache in training: it only costs memory

    common = dict(dtype=MASTER_DTYPES[master], attn_implementation=attn_implementation)
    model_class = family.model_class()
    if info.rank == 0:
        model = model_class.from_pretrained(path, config=config, **common)
    else:
        with torch.device("meta"):
            model = model_class._from_config(config, **common)
        model.to_empty(device=info.device)
        # to_empty gives lm_head and embed_tokens separate storage even when the config
        # ties them; re-tie, or rank 0 and this rank disagree on the parameter list and
        # the broadcast aborts (gloo: "Received data size doesn't match expected size ...
        # collective mismatch"; NCCL hangs).
        model.tie_weights()
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point() and buf.dtype != torch.float32:
                setattr(module, name, buf.float())
    model.train()
    return model


DEFAULT_LOSS_CHUNK_SIZE = 1024
"""Label tokens per chunk of the chunked loss; `train.loss_chunk_size`'s default."""


def loss_sum(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE
) -> tuple[torch.Tensor, int]:
    """Forward one micro-batch; return the *sum* of next-token cross-entropies over its
    label tokens (fp32) and how many label tokens there were.
    (:func:`loss_sum_and_correct` also counts the label tokens predicted right.)

    A sum, not a mean: the loop divides by the label-token count of the whole optimizer
    step (all micro-batches, all ranks), which makes the update independent of how the
    global batch is split across ranks and accumulation steps.

    `model` is the Qwen VL model, bare or wrapped in FSDP. With `chunk_size` > 0 the
    vocabulary projection runs only on the label positions, `chunk_size` of them at a
    time, and never for the whole sequence (see `_chunked_loss_hooks`); 0 takes the
    plain path that materialises the logits of every position. Both give the same loss
    and gradients up to float rounding.
    """
    loss, count, _ = _forward(model, batch, chunk_size, count_correct=False)
    return loss, count


def loss_sum_and_correct(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """:func:`loss_sum`, and how many label tokens the model predicts right (the argmax
    of the logits equals the label; a 0-d int64 tensor), from the same forward: the
    chunked loss takes the argmax of each chunk of logits it computes anyway."""
    return _forward(model, batch, chunk_size, count_correct=True)


def _forward(model, batch, chunk_size: int, count_correct: bool) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    # Position t predicts token t+1 (the last position nothing). Shifted before a
    # sequence-parallel rank takes its slice of the positions.
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    shard = shard_of(backend_of(model).unwrap(model))
    if shard is not None:
        targets = shard.local(targets)
    keep = targets != IGNORE_INDEX
    if chunk_size > 0:
        correct: dict[str, torch.Tensor] = {}
        with _chunked_loss_hooks(model, keep, targets[keep], chunk_size, correct if count_correct else None):
            out = model(
                **inputs,
                use_cache=False,
                # Slice the final hidden states to zero positions before lm_head: the
                # forward still runs lm_head, on an empty [batch, 0, hidden] input.
                logits_to_keep=torch.empty(0, dtype=torch.long, device=labels.device),
            )
        return out.loss, int(keep.sum()), correct.get("correct")
    logits = model(**inputs, use_cache=False).logits
    # Select the label positions before the fp32 upcast so the [tokens x vocab] fp32
    # copy only exists for tokens that are learned.
    picked = logits[keep].float()
    loss = F.cross_entropy(picked, targets[keep], reduction="sum")
    right = (picked.argmax(-1) == targets[keep]).sum() if count_correct else None
    return loss, int(keep.sum()), right


@contextlib.contextmanager
def _chunked_loss_hooks(model: torch.nn.Module, keep: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                        correct: dict | None = None):
    """Make `model`'s next forward return the chunked loss sum as `output.loss` (and,
    given a dict `correct`, put the count of right argmax predictions in it).

    Why hooks inside the forward: under FSDP1, lm_head.weight belongs to the root unit,
    whose flat parameter is all-gathered (and the original parameters' views point into
    it, as a bf16 copy under mixed precision) only while the root's forward runs. The
    root's forward *is* the HF model's `__call__`, so forward hooks on the HF model and
    its submodules run while the weight is valid, whatever the sharding strategy or
    `use_orig_params`. Returning the loss inside the root's output also lets FSDP hook
    its backward as for the logits (its pre-backward hook on the root's outputs is what
    schedules the final gradient reduction). Computing the loss after the forward
    returned would instead depend on FSDP1 leaving the root unsharded until backward, an
    implementation detail. Nothing is renamed or replaced: state-dict keys and weight
    tying stay as they are, and the hooks are removed when the forward returns.
    """
    hf_model = backend_of(model).unwrap(model)
    captured: dict[str, torch.Tensor] = {}

    def keep_hidden(module, args, output):
        # The inner model's output: the final-norm hidden states lm_head would project.
        captured["hidden"] = output.last_hidden_state

    def add_loss(module, args, kwargs, output):
        hidden = captured.pop("hidden")[keep]
        loss, right = _ChunkedCrossEntropySum.apply(hidden, hf_model.lm_head.weight, targets, chunk_size,
                                                    correct is not None)
        output["loss"] = loss
        if correct is not None:
            correct["correct"] = right
        return output

    handles = [
        hf_model.model.register_forward_hook(keep_hidden),
        hf_model.register_forward_hook(add_loss, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def chunked_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """`F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")`
    without holding more than `chunk_size` rows of logits at once, in forward or
    backward. Returns a 0-d fp32 tensor (fp64 for fp64 inputs).

    `hidden` is [n, hidden] (the label positions only), `weight` the [vocab, hidden]
    output projection. Logits are computed in the weight's dtype and upcast to fp32 per
    chunk, as the plain path does for all of them.
    """
    return _ChunkedCrossEntropySum.apply(hidden, weight, targets, chunk_size, False)[0]


class _ChunkedCrossEntropySum(torch.autograd.Function):
    """Autograd saves only the inputs and one fp32 log-sum-exp per row; the backward
    recomputes each chunk's logits. With torch.utils.checkpoint per chunk instead, each
    chunk's backward would return its own [vocab, hidden] weight gradient for autograd
    to add to the running sum (two such buffers alive at once, 1.2 GB in bf16 on the 3B
    model); here every chunk adds into one buffer in place."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, count_correct):
        # fp32, or fp64 when the inputs are (gradcheck).
        dtype = torch.promote_types(weight.dtype, torch.float32)
        lse = torch.empty(len(hidden), dtype=dtype, device=hidden.device)
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, len(hidden), chunk_size):
            rows = slice(start, start + chunk_size)
            logits = F.linear(hidden[rows], weight).to(dtype)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            total += (lse[rows] - logits.gather(1, targets[rows, None]).squeeze(1)).sum()
            if count_correct:
                correct += (logits.argmax(-1) == targets[rows]).sum()
            # Free this chunk's logits before the next chunk's exist: rebinding the
            # name would only drop them after the next matmul, doubling the peak.
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, grad_correct):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulated in the weight's dtype, as autograd would hold the plain path's
        # gradient: fp32 in fp32 training; under bf16 mixed precision FSDP's gathered
        # gradient is bf16 anyway, and an fp32 buffer would cost 1.2 GB on the 3B model.
        grad_weight = torch.zeros_like(weight) if need_weight else None
        for start in range(0, len(hidden), ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            # d(sum of CE)/d(logits) = softmax(logits) - onehot(target), in fp32, then
            # cast to the matmul dtype as the plain path's `.float()` backward does.
            probs = F.linear(hidden[rows], weight).to(lse.dtype).sub_(lse[rows, None]).exp_()
            probs[torch.arange(len(probs), device=probs.device), targets[rows]] -= 1
            grad_logits = probs.mul_(grad_total).to(weight.dtype)
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if need_weight:
                grad_weight.addmm_(grad_logits.T, hidden[rows])
            del probs, grad_logits  # as in forward
        return grad_hidden, grad_weight, None, None, None
