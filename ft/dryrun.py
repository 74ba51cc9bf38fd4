"""The dry run: print the wrap plan and a per-rank memory estimate for any Qwen VL
config.json, without loading weights (the model is built on the meta device) and
without a GPU. The plan's table is `ft.fsdp_wrap.format_plan`, which the loop prints at
start-up too.

    python -m ft.dryrun /models/Qwen2.5-VL-7B-Instruct --world-size 16 [--freeze-vision-tower] [--optim adamw]

It is also the fit check of a run config: given the YAML file a run would use (plus
`section.key=value` overrides, as `./launch.sh` and `python -m ft.loop` take them), it
reads model.path, the freeze_* switches, train.optim, train.precision,
fsdp.activation_checkpointing, train.loss_chunk_size and the micro-batch's tokens from
it, adds an activation estimate (`estimate_activations`) to the memory table and says
whether a rank fits in `--gpu-memory-gib` (80 by default):

    python -m ft.dryrun configs/example_qwen2_5_vl_7b.yaml --world-size 8 train.optim=adamw

The Config is built by `ft.config_load.load_config` either way (a model folder becomes
`model.path`, the flags that set a field become overrides), so its validation is the
only gate.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ft.backends import BACKENDS, DEFAULT
from ft.config import Config, ConfigError, TrainConfig, field_choices
from ft.config_load import load_config
from ft.families import MoeShape, family_of, head_dim, read_family
from ft.fsdp_wrap import Unit, fmt_bytes, fmt_count, format_plan, per_rank_numel, plan_units, root_members
from ft.optim import OPTIMIZERS
from ft.parts import PARTS, apply_freezing
from ft.rounding import MASTER_DTYPES


# =====================================================================================
# Per-rank memory, computed from the plan
# =====================================================================================
class MemoryEstimate(NamedTuple):
    """Bytes per rank. Activations, buffers and the CUDA context are not included."""

    world_size: int
    precision: str
    optim: str
    master_weights: str  # train.master_weights: fp32 or bf16
    master: int  # parameter shards in the master dtype
    gathered: int  # compute-dtype unsharded copies alive at once (see estimate_memory)
    gathered_units: tuple[Unit, Unit | None]  # (root, largest other unit)
    gradients: int  # gradient shards (master dtype) of the trainable units
    optimizer: int  # optimizer state on the worst rank
    trainable: int  # trainable parameters (whole model)


def estimate_memory(units: list[Unit], world_size: int, optim: str, precision: str,
                    master_weights: str = "fp32", backend: str = DEFAULT) -> MemoryEstimate:
    """Per-rank memory of parameters, gradients and optimizer state under FULL_SHARD.

    Parameter and gradient shards are in the master dtype (`train.master_weights`: fp32
    4 B, bf16 2 B per element); the optimizer state is fp32 either way.

    Gathered copies: FSDP1 keeps the root unit gathered from forward to backward, and
    with limit_all_gathers and backward prefetch at most two other units are gathered
    at once (the one running and the next), so the peak is taken as the root plus twice
    the largest other unit, in the compute dtype (bf16: 2 B, fp32: 4 B).
    Optimizer state per trainable shard element: adamw 8 B (two fp32 moments);
    hf_adafactor 4 B (HF Adafactor cannot factor FSDP1's 1-D shards);
    adafactor (ft's, `ft.optim.Adafactor`): full fp32 row and column factors of every
    trainable matrix a rank holds any slice of, and its slice of the 1-D parameters'
    second moments; the worst rank is reported.
    """
    if optim not in OPTIMIZERS:
        raise ValueError(f"optim must be one of {', '.join(OPTIMIZERS)}, got {optim!r}")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    if master_weights not in MASTER_DTYPES:
        raise ValueError(f"master_weights must be one of {', '.join(MASTER_DTYPES)}, got {master_weights!r}")
    master_bytes = MASTER_DTYPES[master_weights].itemsize
    trainable_shard = sum(per_rank_numel(u.numel, world_size, backend) for u in units if u.trainable_numel)
    root, others = units[-1], units[:-1]
    largest = max(others, key=lambda u: u.numel, default=None)
    compute_bytes = 2 if precision == "bf16" else 4
    gathered = (root.numel + 2 * (largest.numel if largest else 0)) * compute_bytes
    optimizer = OPTIMIZERS[optim].state_bytes(units, world_size, backend)
    return MemoryEstimate(
        world_size=world_size,
        precision=precision,
        optim=optim,
        master_weights=master_weights,
        master=sum(per_rank_numel(u.numel, world_size, backend) for u in units) * master_bytes,
        gathered=gathered,
        gathered_units=(root, largest),
        gradients=trainable_shard * master_bytes,
        optimizer=optimizer,
        trainable=sum(u.trainable_numel for u in units),
    )


def format_memory(est: MemoryEstimate, act: "ActivationEstimate | None" = None) -> str:
    root, largest = est.gathered_units
    biggest = max((u for u in est.gathered_units if u), key=lambda u: u.numel)
    dtype = est.precision
    gathered_why = f"<root> {fmt_count(root.numel)}"
    if largest:
        gathered_why += f" + 2 x {largest.fqn} {fmt_count(largest.numel)} (running + prefetched)"
    optim_why = OPTIMIZERS[est.optim].memory_note
    total = est.master + est.gathered + est.gradients + est.optimizer
    rows = [
        ("parameters", est.master, f"{est.master_weights} master shards"),
        ("", est.gathered, f"{dtype} gathered during compute: {gathered_why}"),
        ("gradients", est.gradients, f"{est.master_weights} shards, trainable units only "
                                     f"({fmt_count(est.trainable)} params)"),
        ("optimizer", est.optimizer, f"{est.optim}: {optim_why}"),
    ]
    if act is None:
        rows.append(("total", total, "+ activations, buffers, allocator slack"))
    lines = [
        f"Per-rank memory estimate (world size {est.world_size}, {dtype} compute, {est.master_weights} "
        f"master weights, {est.optim}); "
        f"largest all-gather: {biggest.fqn or '<root>'}, {fmt_count(biggest.numel)} params = "
        f"{fmt_bytes(biggest.numel * (2 if dtype == 'bf16' else 4))} in {dtype}",
    ]
    lines += [f"  {name:<11} {fmt_bytes(n):>10}  {why}" for name, n, why in rows]
    if act is not None:
        lines.append(format_activations(act))
        lines.append(f"  {'total':<11} {fmt_bytes(total + act.total):>10}  "
                     "+ CUDA context, NCCL buffers, allocator fragmentation (a few GiB)")
    return "\n".join(lines)


# =====================================================================================
# Activations per micro-batch, and the fit check
# =====================================================================================
PATCHES_PER_TOKEN_ASSUMED = "every token an image token"


class ActivationEstimate(NamedTuple):
    """Bytes per rank alive at the peak of one micro-batch's forward + backward, besides
    the parameter, gradient and optimizer shards of MemoryEstimate."""

    tokens: int
    vision_patches: int
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

    @property
    def total(self) -> int:
        # The loss runs (forward and backward) before any layer is recomputed: the two
        # peaks are at different times, so the larger one counts.
        stored = self.decoder_inputs + self.vision_inputs + self.other + self.routing
        return stored + max(self.recompute, self.loss) + self.grad_buffers if self.checkpointing \
            else self.without_checkpointing


def _decoder_layer_bytes(text, tokens: int, cb: int, moe: MoeShape | None = None) -> int:
    """Intermediates one decoder layer keeps for its backward (sdpa): its normed input,
    q, k, v, the rotated q and k, the attention output; the MLP's normed input, gate,
    up, act(gate) and act(gate) * up, and the gradients of gate and up, alive together
    in the MLP's backward (its peak); in the compute dtype.

    A mixture-of-experts MLP (`moe`: the layer is one of `moe.layers`) runs that gated
    MLP, `moe.intermediate` wide, once per token and chosen expert: top_k times per
    token, not intermediate_size wide. Each of those runs also holds its own copy of the
    token (gathered by expert), the expert's output (kept for the product with the
    routing weight) and that product's gradient; the router adds `_router_bytes`."""
    q = text.num_attention_heads * head_dim(text)
    kv = text.num_key_value_heads * head_dim(text)
    attention = text.hidden_size + 2 * (q + kv) + kv + q
    if moe is None:
        return tokens * (attention + text.hidden_size + 6 * text.intermediate_size) * cb
    routes = moe.top_k * (3 * text.hidden_size + 6 * moe.intermediate)
    return tokens * (attention + text.hidden_size + routes) * cb + _router_bytes(moe, tokens, cb)


def _router_bytes(moe: MoeShape, tokens: int, cb: int) -> int:
    """One MoE layer's routing tensors: the router logits [tokens, experts] in the
    compute dtype and their softmax in fp32; per token and chosen expert, the top-k
    probability and its renormalised value (fp32), the routing weight in the compute
    dtype and its copy sorted by expert, and four int64 indices (the chosen expert, the
    sorted expert, the sort's permutation and its inverse: transformers' grouped_mm
    experts kernel, the default on a GPU)."""
    return tokens * (moe.experts * (cb + 4) + moe.top_k * (4 + 4 + 2 * cb + 4 * 8))


def _decoder_layers(config, tokens: int, cb: int) -> tuple[int, int, int]:
    """(one decoder layer's intermediates, the largest kind's; all layers' together;
    what the load-balancing loss (`ft.moe`) keeps of every MoE layer: the router logits
    in the compute dtype, held by `tap_routers` until the forward ends, and their fp32
    softmax, held until the backward; both counted, an upper bound, and counted even
    when train.router_aux_loss_coef is 0). The MoE layers are the family's
    (`ft.families.Family.moe_shape`); the others are dense."""
    text = getattr(config, "text_config", config)
    moe = family_of(config).moe_shape(text)
    sparse = len(moe.layers) if moe else 0
    dense = text.num_hidden_layers - sparse
    dense_layer = _decoder_layer_bytes(text, tokens, cb) if dense else 0
    sparse_layer = _decoder_layer_bytes(text, tokens, cb, moe) if sparse else 0
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


def _vision_trains(units: list[Unit]) -> bool:
    """Whether backward runs through the vision tower: it trains or recomputes blocks."""
    return any(u.recompute or u.trainable_numel for u in units if "vision_tower" in u.parts)


def _grad_buffers(units: list[Unit], cb: int) -> int:
    """The unsharded compute-dtype gradients FSDP1 holds until reduce-scatter: the
    root's (for the whole backward) and the largest other trainable unit's."""
    root, others = units[-1], units[:-1]
    largest = max((u.numel for u in others if u.trainable_numel), default=0)
    return ((root.numel if root.trainable_numel else 0) + largest) * cb


def estimate_activations(
    config,
    units: list[Unit],
    tokens: int,
    precision: str,
    checkpointing: bool = True,
    loss_chunk_size: int = 1024,
    vision_patches: int | None = None,
) -> ActivationEstimate:
    """Activation memory of one micro-batch of `tokens` tokens (all of them labelled,
    the worst case), for the model of `config` (a family's ...Config) planned as `units`.

    With activation checkpointing: the input of every decoder layer (tokens x hidden)
    and of every vision block (patches x vision hidden), kept from forward to backward;
    plus, at the peak, one layer's intermediates while it is recomputed and
    backpropagated (the larger of a decoder layer and a vision block) or, earlier in
    the step, the chunked loss's live chunk (its logits in the compute dtype, their fp32
    copy and one fp32 temporary: rows x vocab x (bytes + 8), the forward's peak; see
    ft.model._ChunkedCrossEntropySum), whichever is larger; the embeddings, final norm
    and label rows; and the unsharded gradient buffers (`_grad_buffers`). Vision
    patches: `vision_patches`, else assumed to be every token an image token, each
    merged from spatial_merge_size**2 (4) patches (an upper bound for an image-heavy
    batch). A frozen vision tower that backward never reaches keeps nothing. An MoE
    layer counts the MLPs of the top_k experts a token is routed to, not of all experts,
    and its routing (`_decoder_layers`); estimate_memory counts all experts' weights.
    """
    cb = 2 if precision == "bf16" else 4
    text = getattr(config, "text_config", config)
    vision = config.vision_config
    shape = family_of(config).vision_shape(vision)
    assumed = vision_patches is None
    if assumed:
        vision_patches = tokens * vision.spatial_merge_size**2
    vision_trains = _vision_trains(units)
    vision_depth = vision.depth if vision_trains else 0
    hidden, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    decoder_layer, decoder_layers, routing = _decoder_layers(config, tokens, cb)
    vision_block = _vision_block_bytes(shape, vision_patches, cb) if vision_trains else 0
    if decoder_layer >= vision_block:
        recompute, recompute_of = decoder_layer, "decoder layer"
    else:
        recompute, recompute_of = vision_block, "vision block"
    rows = min(loss_chunk_size or tokens, tokens)
    loss = rows * vocab * (cb + 8)
    # inputs_embeds and its image-filled copy; the final norm's fp32 upcast and output;
    # the label rows handed to the loss and their gradient; Qwen3-VL's DeepStack
    # features, one per extra merger, added to the first decoder layers' outputs.
    merged = vision_patches // vision.spatial_merge_size**2
    other = tokens * hidden * (4 * cb + 4) + (shape.mergers - 1) * merged * hidden * cb
    grad_buffers = _grad_buffers(units, cb)
    without = decoder_layers + routing + vision_depth * vision_block + loss + other + grad_buffers
    return ActivationEstimate(
        tokens=tokens, vision_patches=vision_patches, patches_assumed=assumed, precision=precision,
        checkpointing=checkpointing, decoder_inputs=layers * tokens * hidden * cb,
        vision_inputs=vision_depth * vision_patches * shape.width * cb, recompute=recompute,
        recompute_of=recompute_of, loss=loss, loss_rows=rows, other=other, grad_buffers=grad_buffers,
        without_checkpointing=without, routing=routing,
    )


def format_activations(act: ActivationEstimate) -> str:
    patches = f"{act.vision_patches} vision patches"
    if act.patches_assumed:
        patches += " (assumed: every token an image token x 4 patches; --vision-patches to set)"
    if not act.checkpointing:
        return (f"  {'activations':<11} {fmt_bytes(act.total):>10}  {act.tokens} tokens, {patches}; "
                "no activation checkpointing: every layer's intermediates kept")
    parts = [
        f"inputs of every decoder layer {fmt_bytes(act.decoder_inputs)}",
        f"of every vision block {fmt_bytes(act.vision_inputs)}" if act.vision_inputs
        else "vision tower frozen: none",
        f"the larger of one {act.recompute_of} recomputed {fmt_bytes(act.recompute)} "
        f"and the loss chunk ({act.loss_rows} rows) {fmt_bytes(act.loss)}",
        f"embeddings/norm/label rows {fmt_bytes(act.other)}",
        *([f"MoE router logits/probabilities of every MoE layer {fmt_bytes(act.routing)}"] if act.routing else []),
        f"unsharded grads {fmt_bytes(act.grad_buffers)}",
    ]
    return (f"  {'activations':<11} {fmt_bytes(act.total):>10}  {act.tokens} tokens, {patches}, "
            f"checkpointed: " + "; ".join(parts)
            + f" (without checkpointing: {fmt_bytes(act.without_checkpointing)})")


def fit_verdict(total: int, gpu_bytes: int, suggestions: list[str]) -> str:
    spare = gpu_bytes - total
    if spare >= 0:
        return f"fits: {fmt_bytes(total)} of {fmt_bytes(gpu_bytes)} per rank, {fmt_bytes(spare)} to spare"
    line = f"does NOT fit: {fmt_bytes(total)} per rank is {fmt_bytes(-spare)} over {fmt_bytes(gpu_bytes)}"
    return line + (". To fit: " + "; ".join(suggestions) if suggestions else "")


def plan_total(est: MemoryEstimate, act: ActivationEstimate | None) -> int:
    return est.master + est.gathered + est.gradients + est.optimizer + (act.total if act else 0)


# =====================================================================================
# Dry run: print the plan for a config, no weights, no GPU.
# =====================================================================================
def build_on_meta(config_path: str) -> nn.Module:
    """The model of a config.json (or of the folder holding one), on the meta device."""
    from transformers import AutoConfig

    folder = config_path if os.path.isdir(config_path) else os.path.dirname(config_path) or "."
    model_class = read_family(folder).model_class()
    config = AutoConfig.from_pretrained(config_path)
    with torch.device("meta"):
        return model_class._from_config(config)


class _Plan(NamedTuple):
    """What the fit check needs, from a run config or from the flags."""

    model_path: str
    freeze: dict[str, bool]
    optim: str
    precision: str
    master_weights: str
    checkpointing: bool
    tokens: int
    tokens_why: str
    loss_chunk_size: int
    backend: str = DEFAULT


def _is_run_config(path: str) -> bool:
    return Path(path).suffix.lower() in (".yaml", ".yml")


def micro_batch_tokens(cfg: Config) -> tuple[int, str]:
    """Tokens of one micro-batch of a run config, and where the number comes from."""
    if cfg.data.packing and cfg.data.pack_length:
        return cfg.data.pack_length, f"data.pack_length {cfg.data.pack_length}"
    batch = cfg.train.per_device_train_batch_size
    return (cfg.data.max_length * batch,
            f"data.max_length {cfg.data.max_length} x train.per_device_train_batch_size {batch}")


def _flag_overrides(args) -> list[str]:
    """The flags that set a config field, as the `section.key=value` overrides they are."""
    out = [f"model.{p.freeze_field}=true" for p in PARTS if getattr(args, p.freeze_field)]
    out += [f"train.{key}={getattr(args, key)}" for key in ("optim", "precision", "master_weights")
            if getattr(args, key)]
    if args.no_activation_checkpointing:
        out.append("fsdp.activation_checkpointing=false")
    return out


def _load(args, parser) -> Config:
    """The Config the plan is for, built by `load_config`, whose validation is the one
    gate: a run config (YAML) with its overrides, or a model folder (a config.json: its
    folder) as `model.path`; the flags given come last, so they win. The model must be
    there: the dry run builds no demo model (`model.build_tiny_if_missing=false`)."""
    flags = ["model.build_tiny_if_missing=false", *_flag_overrides(args)]
    if _is_run_config(args.config):
        return load_config(args.config, [*args.overrides, *flags], check_model=True)
    if args.overrides:
        parser.error(f"section.key=value overrides need a run config (YAML), got {args.overrides}")
    path = Path(args.config)
    folder = path.parent if path.name == "config.json" and path.is_file() else path
    return load_config(None, [f"model.path={folder}", *flags], check_model=True)


def _resolve(args, parser) -> _Plan:
    """The plan from a run config or a model folder, and the flags. Raises ConfigError
    for bad input."""
    cfg = _load(args, parser)
    refusals = BACKENDS[cfg.fsdp.backend].config_refusals(cfg)
    if refusals:
        raise ConfigError("; ".join(refusals))
    tokens, why = micro_batch_tokens(cfg)
    if args.tokens:
        tokens, why = args.tokens, "--tokens"
    elif not _is_run_config(args.config):
        why = f"data.max_length's default {cfg.data.max_length}"
    precision = cfg.train.precision
    return _Plan(cfg.model.path, {p.freeze_field: getattr(cfg.model, p.freeze_field) for p in PARTS},
                 cfg.train.optim, "bf16" if precision == "auto" else precision, cfg.train.master_weights,
                 cfg.fsdp.activation_checkpointing, tokens, why, cfg.train.loss_chunk_size, cfg.fsdp.backend)


def _suggestions(model, units, plan: _Plan, world: int, gpu_bytes: int, vision_patches) -> list[str]:
    """What would make a plan that does not fit, fit: more ranks, freezing, fewer tokens."""
    def total(world_size: int, units_=units, tokens=plan.tokens, patches=vision_patches) -> int:
        est = estimate_memory(units_, world_size, plan.optim, plan.precision, plan.master_weights, plan.backend)
        act = estimate_activations(model.config, units_, tokens, plan.precision, plan.checkpointing,
                                   plan.loss_chunk_size, patches)
        return plan_total(est, act)

    out = []
    more = next((w for w in (world * 2**k for k in range(1, 8)) if total(w) <= gpu_bytes), None)
    if more:
        out.append(f"--world-size {more}")
    elif total(world * 2**7) > gpu_bytes:
        out.append("more ranks alone do not help (activations and gathered units do not shrink)")
    if plan.optim != "adafactor":
        est = estimate_memory(units, world, "adafactor", plan.precision, plan.master_weights, plan.backend)
        act = estimate_activations(model.config, units, plan.tokens, plan.precision, plan.checkpointing,
                                   plan.loss_chunk_size, vision_patches)
        if plan_total(est, act) <= gpu_bytes:
            out.append("train.optim=adafactor")
    if plan.master_weights == "fp32":
        optim = "adafactor" if plan.optim == "hf_adafactor" else plan.optim
        est = estimate_memory(units, world, optim, plan.precision, "bf16", plan.backend)
        act = estimate_activations(model.config, units, plan.tokens, plan.precision, plan.checkpointing,
                                   plan.loss_chunk_size, vision_patches)
        if plan_total(est, act) <= gpu_bytes:
            out.append("train.master_weights=bf16" + (" train.optim=adafactor" if optim != plan.optim else ""))
    if not plan.freeze["freeze_vision_tower"]:
        frozen = dict(plan.freeze, freeze_vision_tower=True)
        if not all(frozen.values()):
            apply_freezing(model, argparse.Namespace(**frozen))
            if total(world, plan_units(model)) <= gpu_bytes:
                out.append("model.freeze_vision_tower=true")
            apply_freezing(model, argparse.Namespace(**plan.freeze))
    if not plan.checkpointing:
        est = estimate_memory(units, world, plan.optim, plan.precision, plan.master_weights, plan.backend)
        act = estimate_activations(model.config, units, plan.tokens, plan.precision, True,
                                   plan.loss_chunk_size, vision_patches)
        if plan_total(est, act) <= gpu_bytes:
            out.append("fsdp.activation_checkpointing=true")
    low, high = 0, plan.tokens  # the most tokens per micro-batch that fit, by bisection
    while high - low > 64:
        mid = (low + high) // 2
        patches = None if vision_patches is None else vision_patches * mid // plan.tokens
        if total(world, tokens=mid, patches=patches) <= gpu_bytes:
            low = mid
        else:
            high = mid
    if low >= 64:
        out.append(f"at most ~{low // 64 * 64} tokens per micro-batch (--tokens; data.max_length/pack_length)")
    return out


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ft.dryrun",
        description="Print the FSDP wrap plan of a Qwen VL model and an estimate of "
        "each rank's memory for parameters, gradients, optimizer state and activations, "
        "without loading weights (the model is built on the meta device), and whether it "
        "fits in --gpu-memory-gib.",
    )
    parser.add_argument("config", metavar="CONFIG",
                        help="a run config (.yaml, as ./launch.sh and python -m ft.loop take it), a model "
                        "folder holding config.json, or a config.json file")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides of the run config, as ./launch.sh and python -m ft.loop take them")
    parser.add_argument("--world-size", type=int, default=8, help="ranks sharing the model (default 8)")
    for part in PARTS:
        flag = "--" + part.freeze_field.replace("_", "-")
        parser.add_argument(flag, action="store_true", help=f"freeze the {part.name}: {part.what}")
    parser.add_argument("--optim", choices=field_choices("train.optim"), default=None,
                        help="optimizer state counted (default: the run config's train.optim, else "
                        f"{TrainConfig.optim}): " + "; ".join(
                            f"{name}: {spec.memory_note}" for name, spec in OPTIMIZERS.items()))
    parser.add_argument("--precision", choices=[c for c in field_choices("train.precision") if c != "auto"],
                        default=None,
                        help="compute dtype of the gathered parameters and activations (default: the "
                        "run config's train.precision, auto meaning bf16; else bf16)")
    parser.add_argument("--master-weights", choices=field_choices("train.master_weights"), default=None,
                        help="dtype of the parameter and gradient shards (default: the run config's "
                        f"train.master_weights, else {TrainConfig.master_weights})")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per micro-batch (default: the run config's data.pack_length if "
                        "packing, else data.max_length x train.per_device_train_batch_size)")
    parser.add_argument("--vision-patches", type=int, default=None,
                        help="vision patches per micro-batch (default: every token an image token, "
                        "4 patches each: an upper bound)")
    parser.add_argument("--no-activation-checkpointing", action="store_true",
                        help="estimate without activation checkpointing")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0,
                        help="memory of one GPU for the verdict (default 80)")
    return parser


def _check_numbers(parser: argparse.ArgumentParser, args) -> None:
    if args.world_size < 1:
        parser.error("--world-size must be >= 1")
    if args.tokens is not None and args.tokens < 1:
        parser.error("--tokens must be >= 1")
    if args.vision_patches is not None and args.vision_patches < 0:
        parser.error("--vision-patches must be >= 0")


def _report(model: nn.Module, plan: _Plan, args) -> None:
    """Print the plan, the memory table and the fit verdict."""
    units = plan_units(model)
    est = estimate_memory(units, args.world_size, plan.optim, plan.precision, plan.master_weights, plan.backend)
    act = estimate_activations(model.config, units, plan.tokens, plan.precision, plan.checkpointing,
                               plan.loss_chunk_size, args.vision_patches)
    print(format_plan(units, args.world_size, root_names=root_members(model, units),
                      param_bytes=MASTER_DTYPES[plan.master_weights].itemsize))
    print(f"Sharding backend: {plan.backend} (fsdp.backend)")
    print(format_memory(est, act))
    gpu_bytes = int(args.gpu_memory_gib * 2**30)
    total = plan_total(est, act)
    suggestions = _suggestions(model, units, plan, args.world_size, gpu_bytes, args.vision_patches) \
        if total > gpu_bytes else []
    print(f"Tokens per micro-batch: {plan.tokens} ({plan.tokens_why}); activation checkpointing "
          f"{'on' if plan.checkpointing else 'off'}; loss chunk {plan.loss_chunk_size}")
    print(f"Fit check ({args.gpu_memory_gib:g} GiB per GPU): " + fit_verdict(total, gpu_bytes, suggestions))


def main(argv: list[str] | None = None) -> None:
    parser = _argument_parser()
    args = parser.parse_intermixed_args(argv)
    _check_numbers(parser, args)
    try:
        plan = _resolve(args, parser)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        model = build_on_meta(plan.model_path)
    except (OSError, ValueError) as e:
        print(f"error: {plan.model_path}: cannot read the model config: {e}".splitlines()[0], file=sys.stderr)
        sys.exit(2)
    apply_freezing(model, argparse.Namespace(**plan.freeze))  # the freeze_* attributes of a ModelConfig
    _report(model, plan, args)


if __name__ == "__main__":
    main()

