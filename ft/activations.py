"""The activation part of the fit check (`python -m ft.dryrun`): the bytes one rank holds
at the peak of a micro-batch's forward and backward, besides the parameter, gradient and
optimizer shards that `ft.dryrun.estimate_memory` counts. Computed from the model's
config and the wrap plan, on no device.

With sequence parallelism (`parallel.sequence_parallel_size` N, `ft.sequence`) the
figures are one rank's of a group of N: the language model's per-token tensors on 1/N of
the micro-batch's tokens, attention's on all of them with 1/N of the heads, and the
all-to-alls' buffers; the vision tower on 1/N of the micro-batch's patches (ft deals
each video's temporal patches to the group's ranks: `vision_split`).

Not counted: the pixel values (the processor's fp32 rows, one per patch: 4,704 B a
patch for Qwen2.5-VL's 3 x 2 x 14 x 14 values, on every rank of a group); the
[rows, 1, L, L] boolean mask sdpa gets for packed or padded rows of L tokens (L x L
bytes a row; none for one unpadded sample a row, or under flash_attention_2); the CUDA
context, NCCL buffers and allocator fragmentation.
"""

from __future__ import annotations

from typing import NamedTuple

from ft.families import MoeShape, family_of, head_dim
from ft.fsdp_wrap import Unit, fmt_bytes
from ft.sequence import head_split


class ActivationEstimate(NamedTuple):
    """Bytes per rank alive at the peak of one micro-batch's forward + backward, besides
    the parameter, gradient and optimizer shards of MemoryEstimate."""

    tokens: int  # the micro-batch's tokens (a sequence-parallel group's, all of them)
    vision_patches: int  # the micro-batch's vision patches, all of them
    patches_assumed: bool  # True: vision_patches is this module's assumption, not given
    precision: str
    checkpointing: bool
    decoder_inputs: int  # the checkpointed input of every decoder layer
    vision_inputs: int  # the checkpointed input of every vision block (0: tower frozen)
    recompute: int  # one layer's intermediates while it is recomputed and backpropagated
    recompute_of: str  # "decoder layer" or "vision block", the larger
    loss: int  # one chunk of the chunked loss, forward or backward
    loss_rows: int
    other: int  # embeddings, final norm, the label rows fed to the loss and their gradient
    grad_buffers: int  # unsharded compute-dtype gradients: the root's, and one unit's
    without_checkpointing: int  # the same total with every layer's intermediates kept
    routing: int = 0  # MoE: every MoE layer's router logits and probabilities, for the balancing loss
    sequence_parallel: int = 1  # N: ranks sharing the micro-batch (`parallel.sequence_parallel_size`)
    exchange: int = 0  # the all-to-alls' buffers of the decoder layer being run (0 when N is 1)
    vision_split: int = 1  # ranks the vision patches are split over (1: each rank runs them all)
    vision_forward: int = 0  # a frozen tower's forward peak (`_vision_forward_bytes`); 0 when it trains

    @property
    def rank_tokens(self) -> int:
        """Tokens this rank runs the language model on: 1/N of the micro-batch's, rounded
        up (the collator pads rows to a multiple of N)."""
        return -(-self.tokens // self.sequence_parallel)

    @property
    def rank_patches(self) -> int:
        """Vision patches this rank runs the vision tower on."""
        return -(-self.vision_patches // self.vision_split)

    @property
    def total(self) -> int:
        # The loss runs (forward and backward) before any layer is recomputed: the two
        # peaks are at different times, so the larger one counts.
        # A frozen tower's forward peak comes before the language model stores anything.
        stored = self.decoder_inputs + self.vision_inputs + self.other + self.routing
        step = stored + max(self.recompute, self.loss) + self.grad_buffers if self.checkpointing \
            else self.without_checkpointing
        return max(step, self.vision_forward)


def _decoder_layer_bytes(text, tokens: int, cb: int, moe: MoeShape | None = None, size: int = 1,
                         repeat: int = 1) -> int:
    """Intermediates one decoder layer keeps for its backward (sdpa), on this rank's
    `tokens` (1/`size` of the row's): its normed input and the q and k projections; what
    the attention kernel holds: rotated q, rotated k, v and its output, on the whole row
    (tokens x size) with 1/size of the heads, key/value heads counted `repeat` times
    (`ft.sequence.head_split`): at `repeat` 1 the same bytes as this rank's tokens with
    every head; the MLP's normed input, gate, up, act(gate) and act(gate) * up, and
    the gradients of gate and up, alive together in the MLP's backward (its peak); in
    the compute dtype. At size 1 the kernel's q, k and v are the rotated projections.

    A mixture-of-experts MLP (`moe`: the layer is one of `moe.layers`) runs that gated
    MLP, `moe.intermediate` wide, once per token and chosen expert: top_k times per
    token, not intermediate_size wide. Each of those runs also holds its own copy of the
    token (gathered by expert), the expert's output (kept for the product with the
    routing weight) and that product's gradient; the router adds `_router_bytes`."""
    q = text.num_attention_heads * head_dim(text)
    kv = text.num_key_value_heads * head_dim(text)
    row = tokens * size
    kernel = row * (2 * q + 2 * kv * repeat) // size  # whole row, 1/size of the heads
    attention = tokens * (text.hidden_size + q + kv) * cb + kernel * cb
    if moe is None:
        return attention + tokens * (text.hidden_size + 6 * text.intermediate_size) * cb
    routes = moe.top_k * (3 * text.hidden_size + 6 * moe.intermediate)
    return attention + tokens * (text.hidden_size + routes) * cb + _router_bytes(moe, tokens, cb)


def _router_bytes(moe: MoeShape, tokens: int, cb: int) -> int:
    """One MoE layer's routing tensors: the router logits [tokens, experts] in the
    compute dtype and their softmax in fp32; per token and chosen expert, the top-k
    probability and its renormalised value (fp32), the routing weight in the compute
    dtype and its copy sorted by expert, and four int64 indices (the chosen expert, the
    sorted expert, the sort's permutation and its inverse: transformers' grouped_mm
    experts kernel, the default on a GPU)."""
    return tokens * (moe.experts * (cb + 4) + moe.top_k * (4 + 4 + 2 * cb + 4 * 8))


def _exchange_bytes(text, tokens: int, cb: int, size: int) -> int:
    """The all-to-alls' buffers of the decoder layer that is running (sequence
    parallelism, `ft.sequence`): the send and receive copies of q, k, v and of the
    attention output, taken as 4 tensors of this rank's `tokens` x hidden in the compute
    dtype (q and the output are that wide in Qwen VL models, k and v narrower unless
    repeated), for one layer at a time: the copies live while its attention runs
    forward or backward. 0 without sequence parallelism (`size` 1)."""
    return 0 if size == 1 else 4 * tokens * text.hidden_size * cb


def _decoder_layers(config, tokens: int, cb: int, size: int = 1) -> tuple[int, int, int]:
    """(one decoder layer's intermediates, the largest kind's; all layers' together;
    what the load-balancing loss (`ft.moe`) keeps of every MoE layer: the router logits
    in the compute dtype, held by `tap_routers` until the forward ends, and their fp32
    softmax, held until the backward; both counted, an upper bound, and counted even
    when train.router_aux_loss_coef is 0), on this rank's `tokens` of a sequence-parallel
    group of `size`. The MoE layers are the family's (`ft.families.Family.moe_shape`);
    the others are dense."""
    text = getattr(config, "text_config", config)
    repeat = head_split(text, size) if size > 1 else 1
    moe = family_of(config).moe_shape(text)
    sparse = len(moe.layers) if moe else 0
    dense = text.num_hidden_layers - sparse
    dense_layer = _decoder_layer_bytes(text, tokens, cb, None, size, repeat) if dense else 0
    sparse_layer = _decoder_layer_bytes(text, tokens, cb, moe, size, repeat) if sparse else 0
    routing = sparse * tokens * moe.experts * (cb + 4) if sparse else 0
    return max(dense_layer, sparse_layer), dense * dense_layer + sparse * sparse_layer, routing


def _vision_block_bytes(shape, patches: int, cb: int) -> int:
    """The same for one vision block (`shape`: `ft.families.VisionShape`): normed input,
    qkv, rotated q and k (rotated in fp32, then cast back), attention output; normed
    input, then a gated MLP's gate, up, act, product and the gradients of gate and up
    (Qwen2.5-VL), or a plain MLP's fc1 output, its activation and fc1's gradient."""
    h, i = shape.width, shape.intermediate
    mlp = h + (6 if shape.mlp_matrices == 3 else 3) * i
    return patches * ((h + 3 * h + 2 * h + h) * cb + 2 * h * 4 + mlp * cb)


def _vision_forward_bytes(shape, patches: int, cb: int) -> int:
    """The peak of one vision block's forward when backward never reaches the tower (it
    is frozen: nothing is kept, but each block's temporaries live while it runs): the
    larger of the attention's (block input, normed input, qkv, q and k upcast to fp32
    and rotated in fp32) and the MLP's (block input, normed input, then gate, up, act
    and product for a gated MLP, or fc1's output and its activation), in the compute
    dtype but for the fp32 rotation."""
    h, i = shape.width, shape.intermediate
    attention = 5 * h * cb + 4 * h * 4
    mlp = (2 * h + (4 if shape.mlp_matrices == 3 else 2) * i) * cb
    return patches * max(attention, mlp)


def _vision_trains(units: list[Unit]) -> bool:
    """Whether backward runs through the vision tower: it trains or recomputes blocks."""
    return any(u.recompute or u.trainable_numel for u in units if "vision_tower" in u.parts)


def _grad_buffers(units: list[Unit], cb: int) -> int:
    """The unsharded compute-dtype gradients FSDP1 holds until reduce-scatter: the
    root's (for the whole backward) and the largest other trainable unit's."""
    root, others = units[-1], units[:-1]
    largest = max((u.numel for u in others if u.trainable_numel), default=0)
    return ((root.numel if root.trainable_numel else 0) + largest) * cb


def _other_bytes(config, tokens: int, rank_tokens: int, merged: int, cb: int) -> int:
    """inputs_embeds and its vision-filled copy, on the whole row (`tokens`: they are
    built before the sequence-parallel cut); the final norm's fp32 upcast and output,
    the label rows handed to the loss and their gradient, on this rank's `rank_tokens`;
    Qwen3-VL's DeepStack features, one per extra merger, counted for all `merged`
    vision tokens (the tower makes them all before the cut)."""
    hidden = getattr(config, "text_config", config).hidden_size
    shape = family_of(config).vision_shape(config.vision_config)
    return (tokens * hidden * 2 * cb + rank_tokens * hidden * (2 * cb + 4)
            + (shape.mergers - 1) * merged * hidden * cb)


def _vision(config, units: list[Unit], patches: int, cb: int) -> tuple[int, int, int, int]:
    """The vision tower's terms on the `patches` a rank runs it on: (the checkpointed
    inputs of every vision block; one block's intermediates while it is recomputed and
    backpropagated; every block's, without checkpointing; all three 0 when backward
    never reaches the tower) and a frozen tower's forward peak (`_vision_forward_bytes`;
    0 when it trains)."""
    shape, depth = family_of(config).vision_shape(config.vision_config), config.vision_config.depth
    if _vision_trains(units):
        block = _vision_block_bytes(shape, patches, cb)
        return depth * patches * shape.width * cb, block, depth * block, 0
    return 0, 0, 0, _vision_forward_bytes(shape, patches, cb)


def estimate_activations(
    config,
    units: list[Unit],
    tokens: int,
    precision: str,
    checkpointing: bool = True,
    loss_chunk_size: int = 1024,
    vision_patches: int | None = None,
    sequence_parallel: int = 1,
    vision_split: int | None = None,
) -> ActivationEstimate:
    """Activation memory on one rank of one micro-batch of `tokens` tokens (all of them
    labelled, the worst case), for the model of `config` (a family's ...Config) planned
    as `units`, the micro-batch shared by a sequence-parallel group of
    `sequence_parallel` ranks (N; 1: off).

    With activation checkpointing: the input of every decoder layer (tokens/N x hidden)
    and of every vision block (patches/`vision_split` x vision hidden), kept from
    forward to backward; plus, at the peak, one layer's intermediates while it is
    recomputed and backpropagated (the larger of a decoder layer, with its all-to-all
    buffers (`_exchange_bytes`), and a vision block) or, earlier in the step, the
    chunked loss's live chunk (its logits in the compute dtype, their fp32 copy and one
    fp32 temporary: rows x vocab x (bytes + 8), rows at most tokens/N; the forward's
    peak; see ft.model._ChunkedCrossEntropySum), whichever is larger; the embeddings,
    final norm and label rows (`_other_bytes`); and the unsharded gradient buffers
    (`_grad_buffers`). Vision patches: `vision_patches`, else assumed to be every token
    an image token, each merged from spatial_merge_size**2 (4) patches (an upper bound
    for an image-heavy batch). A frozen tower that backward never reaches keeps nothing
    but peaks in its forward, before the language model runs (`_vision`, plus the row's
    input embeddings): the total is the larger of that and the rest. `vision_split`: the
    ranks the patches are dealt to (None: N, as ft deals the temporal patches). An MoE layer counts
    the MLPs of the top_k experts a token is routed to and its routing
    (`_decoder_layers`). Not counted: see the module's docstring. Raises ConfigError
    when N does not split the heads.
    """
    cb, vision_split = 2 if precision == "bf16" else 4, vision_split or sequence_parallel
    text = getattr(config, "text_config", config)
    merge = config.vision_config.spatial_merge_size**2
    assumed = vision_patches is None
    if assumed:
        vision_patches = tokens * merge
    rank_tokens, rank_patches = -(-tokens // sequence_parallel), -(-vision_patches // vision_split)
    vision_inputs, vision_block, vision_blocks, vision_forward = _vision(config, units, rank_patches, cb)
    decoder_layer, decoder_layers, routing = _decoder_layers(config, rank_tokens, cb, sequence_parallel)
    exchange = _exchange_bytes(text, rank_tokens, cb, sequence_parallel)
    recompute, recompute_of = max((decoder_layer + exchange, "decoder layer"), (vision_block, "vision block"),
                                  key=lambda term: term[0])
    rows = min(loss_chunk_size or rank_tokens, rank_tokens)
    loss = rows * text.vocab_size * (cb + 8)
    other = _other_bytes(config, tokens, rank_tokens, vision_patches // merge, cb)
    grad_buffers = _grad_buffers(units, cb)
    without = decoder_layers + exchange + routing + vision_blocks + loss + other + grad_buffers
    return ActivationEstimate(
        tokens=tokens, vision_patches=vision_patches, patches_assumed=assumed, precision=precision,
        checkpointing=checkpointing, decoder_inputs=text.num_hidden_layers * rank_tokens * text.hidden_size * cb,
        vision_inputs=vision_inputs, recompute=recompute, recompute_of=recompute_of, loss=loss, loss_rows=rows,
        other=other, grad_buffers=grad_buffers, without_checkpointing=without, routing=routing,
        sequence_parallel=sequence_parallel, exchange=exchange, vision_split=vision_split,
        vision_forward=vision_forward + tokens * text.hidden_size * cb if vision_forward else 0,
    )


def format_activations(act: ActivationEstimate) -> str:
    """The activations row of the dry run's memory table."""
    tokens, patches = f"{act.tokens} tokens", f"{act.vision_patches} vision patches"
    if act.sequence_parallel > 1:
        tokens += f" ({act.rank_tokens} per rank in the language model, sequence parallel {act.sequence_parallel})"
        patches += " on every rank" if act.vision_split == 1 else f" ({act.rank_patches} per rank)"
    if act.patches_assumed:
        patches += " (assumed: every token an image token x 4 patches; --vision-patches to set)"
    if not act.checkpointing:
        return (f"  {'activations':<11} {fmt_bytes(act.total):>10}  {tokens}, {patches}; "
                "no activation checkpointing: every layer's intermediates kept")
    exchange = f", all-to-all buffers {fmt_bytes(act.exchange)} included" \
        if act.exchange and act.recompute_of == "decoder layer" else ""
    parts = [
        f"inputs of every decoder layer {fmt_bytes(act.decoder_inputs)}",
        f"of every vision block {fmt_bytes(act.vision_inputs)}" if act.vision_inputs
        else f"vision tower frozen: none kept, its forward's peak {fmt_bytes(act.vision_forward)} "
             "counted where larger than all the rest" if act.vision_forward else "vision tower frozen: none",
        f"the larger of one {act.recompute_of} recomputed {fmt_bytes(act.recompute)}{exchange} "
        f"and the loss chunk ({act.loss_rows} rows) {fmt_bytes(act.loss)}",
        f"embeddings/norm/label rows {fmt_bytes(act.other)}",
        *([f"MoE router logits/probabilities of every MoE layer {fmt_bytes(act.routing)}"] if act.routing else []),
        f"unsharded grads {fmt_bytes(act.grad_buffers)}",
    ]
    return (f"  {'activations':<11} {fmt_bytes(act.total):>10}  {tokens}, {patches}, "
            f"checkpointed: " + "; ".join(parts)
            + f" (without checkpointing: {fmt_bytes(act.without_checkpointing)})")
