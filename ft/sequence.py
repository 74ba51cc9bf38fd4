"""Sequence parallelism, Ulysses style: the N ranks of a group share one micro-batch, and
each runs the language model on 1/N of every row's tokens.

Everything outside attention (norms, MLPs, the rotary embedding, the loss) works token by
token, so a rank computes it on its own slice. Attention needs the whole sequence: around
it, one all-to-all turns "my slice of the tokens, all heads" into "all the tokens, my
1/N of the heads", the kernel (sdpa or flash-attention) runs on that, and a second
all-to-all turns the result back. The per-sample boundaries of a packed row stay global,
because after the first all-to-all each rank sees the whole row for its heads.

How it hooks in, without touching transformers' model code:

* the attention function is registered with transformers' `AttentionInterface` under
  :data:`ATTENTION` and chosen for the language model only (the vision tower keeps its
  kernel); transformers builds no mask for a name it has no mask function for, and the
  function builds its own from the row's global positions;
* a forward pre-hook on the language model cuts its inputs (the merged text and vision
  embeddings, the M-RoPE positions, Qwen3-VL's DeepStack features) to this rank's
  slice, after the vision tower and the position index ran on the whole row;
* `ft.model` cuts the targets (labels shifted by one, before the cut) the same way,
  so each rank's loss sum covers its own tokens and the sum over the group is the
  whole row's.

The model stays sharded by FSDP over all ranks; data parallelism runs over the world
size / N groups (`ft.dist.DistInfo.data_rank`). Groups are N consecutive ranks, so they
stay within a node where the node has N GPUs.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from transformers import AttentionInterface
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ft.config import ConfigError
from ft.dist import DistInfo
from ft.families import family_of

ATTENTION = "ft_sequence_parallel"
"""The name ft's attention function is registered under in transformers."""

KERNELS = {"sdpa": sdpa_attention_forward, "flash_attention_2": flash_attention_forward}
"""The kernels the all-to-alls wrap, by `model.attn_implementation`."""

SHARD_ATTRIBUTE = "ft_sequence_shard"
"""The attribute of the Hugging Face model that holds its :class:`SequenceShard`."""


def head_split(text_config, size: int, what: str = "the model") -> int:
    """How many times each key/value head is repeated so that N ranks split the heads
    evenly (1: they split as they are). Raises ConfigError, with the numbers, when N
    does not divide the query heads."""
    q_heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    if q_heads % size:
        fits = [n for n in range(1, q_heads + 1) if q_heads % n == 0]
        raise ConfigError(
            f"parallel.sequence_parallel_size={size} does not divide the {q_heads} query heads of {what}: "
            f"each rank of a group attends with 1/{size} of them. Choose one of {fits} that divides the world size")
    # The smallest repeat that makes the key/value heads a multiple of N: lcm(kv, N) / kv.
    # It divides the query heads too (they are a multiple of both), so each query head
    # still meets its own key/value head after the split.
    return math.lcm(kv_heads, size) // kv_heads


@dataclass
class SequenceShard:
    """This rank's place in its sequence-parallel group, and what the current forward
    needs to know about the whole row."""

    size: int  # N: ranks per group
    index: int  # this rank's place in its group: it holds tokens [index * L/N, (index+1) * L/N)
    group: object  # the group's process group
    kernel: str  # "sdpa" or "flash_attention_2"
    kv_repeat: int = 1  # key/value heads repeated to split evenly (`head_split`)
    mask: torch.Tensor | None = field(default=None, repr=False)  # [B, 1, L, L] packed rows; None: causal
    frames: list[int] | None = None  # the vision tower's merged tokens per rank this call; None: not split

    def local(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """This rank's slice of `t` along its sequence dimension `dim`."""
        length = t.shape[dim]
        if length % self.size:
            raise RuntimeError(f"a row of {length} tokens does not split over {self.size} ranks: the collator "
                               "pads rows to a multiple of parallel.sequence_parallel_size")
        part = length // self.size
        return t.narrow(dim, self.index * part, part)


def grouped(info: DistInfo, size: int) -> DistInfo:
    """`info` with its sequence-parallel group size (`parallel.sequence_parallel_size`),
    which must divide the world size."""
    if info.world_size % size:
        raise ConfigError(f"parallel.sequence_parallel_size={size} does not divide the world size "
                          f"{info.world_size}: a group is {size} consecutive ranks")
    return dataclasses.replace(info, sequence_parallel=size)


def new_group(info: DistInfo):
    """This rank's group of `info.sequence_parallel` consecutive ranks, as a process
    group. A collective: every rank creates every group, in the same order."""
    size, mine = info.sequence_parallel, None
    for start in range(0, info.world_size, size):
        ranks = list(range(start, start + size))
        group = dist.new_group(ranks)  # SYNC setup/model (every rank, every group)
        if info.rank in ranks:
            mine = group
    return mine


def check(config, size: int, kernel: str) -> int:
    """Refuse (ConfigError) a group of `size` > 1 ranks that cannot split the model of
    `config` (a ...Config) under attention `kernel`; else return `head_split`'s repeat."""
    if kernel not in KERNELS:
        raise ConfigError(f"parallel.sequence_parallel_size={size} wraps an attention kernel that takes "
                          f"the whole sequence: model.attn_implementation={kernel!r} is not one of "
                          f"{sorted(KERNELS)}")
    family = family_of(config)
    if family.is_moe:
        raise ConfigError(f"parallel.sequence_parallel_size={size} is not wired for {family.name}: the "
                          "load-balancing loss would count each rank's slice of the routing; use 1")
    return head_split(config.get_text_config(), size, family.name)


def apply(hf_model, info: DistInfo, kernel: str) -> str:
    """Make `hf_model` (bare, before FSDP) run its language model sequence-parallel over
    groups of `info.sequence_parallel` ranks; say so in a line to log. Nothing changes,
    and "" is returned, when the size is 1. A collective then (`new_group`)."""
    size = info.sequence_parallel
    if size == 1:
        return ""
    repeat = check(hf_model.config, size, kernel)
    text_config = hf_model.config.get_text_config()
    shard = SequenceShard(size, info.sequence_index, new_group(info), kernel, repeat)  # SYNC setup/model
    AttentionInterface.register(ATTENTION, lambda *a, **k: attention(shard, *a, **k))
    text_config._attn_implementation = ATTENTION
    hf_model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: split_inputs(shard, args, kwargs), with_kwargs=True)
    visual = hf_model.model.visual
    visual.register_forward_pre_hook(
        lambda module, args, kwargs: split_frames(shard, visual.spatial_merge_size, args, kwargs), with_kwargs=True)
    visual.register_forward_hook(lambda module, args, output: gather_frames(shard, output))
    setattr(hf_model, SHARD_ATTRIBUTE, shard)
    heads = (f"{text_config.num_attention_heads // size} query and "
             f"{text_config.num_key_value_heads * repeat // size} key/value heads per rank"
             + (f" (key/value heads repeated {repeat}x to split evenly)" if repeat > 1 else ""))
    return (f"sequence parallelism: groups of {size} consecutive ranks share each micro-batch, each with 1/{size} "
            f"of every row's tokens in the language model and of its images' and videos' frames in the vision "
            f"tower; attention ({kernel}) on all tokens with {heads}")


def shard_of(hf_model) -> SequenceShard | None:
    """The model's :class:`SequenceShard`; None without sequence parallelism."""
    return getattr(hf_model, SHARD_ATTRIBUTE, None)


def split_inputs(shard: SequenceShard, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The language model's inputs cut to this rank's slice of the tokens (a forward
    pre-hook). The packed rows' attention mask is built here, from the whole row."""
    embeds, positions = kwargs["inputs_embeds"], kwargs.get("position_ids")
    if positions is None:  # no vision input: the positions the language model would take, 0 to L-1
        positions = torch.arange(embeds.shape[1], device=embeds.device).expand(3, embeds.shape[0], -1)
    shard.mask = segment_mask(positions[0]) if positions.dim() == 3 and positions.shape[0] == 4 else None
    kwargs = dict(kwargs, inputs_embeds=shard.local(embeds, 1), position_ids=shard.local(positions, -1),
                  attention_mask=None)
    visual = kwargs.get("visual_pos_masks")
    if visual is not None:  # Qwen3-VL's DeepStack: features added at the vision tokens of each layer
        cut = torch.zeros_like(visual)
        shard.local(cut, -1).fill_(True)
        keep = cut[visual]  # which of the row's vision tokens are in this rank's slice
        kwargs["visual_pos_masks"] = shard.local(visual, -1)
        kwargs["deepstack_visual_embeds"] = [e[keep] for e in kwargs["deepstack_visual_embeds"]]
    return args, kwargs


def frame_split(grid_thw: torch.Tensor, size: int, merge: int) -> list[tuple[int, int, torch.Tensor, int]] | None:
    """How the vision tower's input is dealt to `size` ranks: each image or video is cut
    into its temporal patches (grid (t, h, w) -> t pieces (1, h, w)), and each rank takes
    a run of consecutive pieces, about the same number of patches each. Per rank: its
    patch rows [start, end), its pieces' grids and the merged tokens they give; None when
    there are fewer pieces than ranks.

    Exact because the tower attends within a temporal patch only (Qwen2-VL, Qwen2.5-VL
    and Qwen3-VL cut their attention at every h x w frame patch, and their windows, rotary
    and learned positions are per frame): a piece computes what it would inside its
    video, and the merged tokens come out in the order of the pieces."""
    t, hw = grid_thw[:, 0].tolist(), (grid_thw[:, 1] * grid_thw[:, 2]).tolist()
    rows = [n for ti, n in zip(t, hw) for _ in range(ti)]  # patches per piece
    if len(rows) < size:
        return None
    ends = torch.tensor(rows).cumsum(0)
    starts = [0, *ends.tolist()]
    cut = [0]
    for r in range(1, size):  # the piece boundary nearest the share r/size of the patches, 1 piece a rank at least
        target = starts[-1] * r / size
        i = int(torch.searchsorted(ends, target))  # the first piece that reaches it
        at = i if target - starts[i] <= starts[i + 1] - target else i + 1
        cut.append(min(max(at, cut[-1] + 1), len(rows) - (size - r)))
    cut.append(len(rows))
    pieces = torch.repeat_interleave(grid_thw, torch.tensor(t, device=grid_thw.device), dim=0)
    pieces[:, 0] = 1
    return [(starts[a], starts[b], pieces[a:b], (starts[b] - starts[a]) // merge ** 2)
            for a, b in zip(cut, cut[1:])]


def split_frames(shard: SequenceShard, merge: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The vision tower's input cut to this rank's pieces (`frame_split`; a forward
    pre-hook). Unsplit, each rank would run the whole tower on the whole micro-batch."""
    plan = frame_split(kwargs["grid_thw"], shard.size, merge)
    shard.frames = None if plan is None else [merged for *_, merged in plan]
    if plan is None:  # fewer frames than ranks: every rank runs them all
        return args, kwargs
    start, end, grids, _ = plan[shard.index]
    return (args[0][start:end], *args[1:]), dict(kwargs, grid_thw=grids)


def gather_frames(shard: SequenceShard, output):
    """The tower's merged tokens (and Qwen3-VL's DeepStack features) of all ranks'
    pieces, in order, on every rank (a forward hook)."""
    if shard.frames is None:
        return output
    output.pooler_output = _GatherRows.apply(output.pooler_output, shard.frames, shard.index, shard.group)
    if getattr(output, "deepstack_features", None):
        output.deepstack_features = [_GatherRows.apply(f, shard.frames, shard.index, shard.group)
                                     for f in output.deepstack_features]
    return output


class _GatherRows(torch.autograd.Function):
    """Every rank's rows (`sizes[r]` of them on rank r) concatenated in rank order. The
    gradient of a rank's rows is the sum over the group of the gradients of its part:
    each rank's loss reads all of them."""

    @staticmethod
    def forward(ctx, x, sizes, index, group):
        ctx.sizes, ctx.index, ctx.group = sizes, index, group
        padded = x.new_zeros(max(sizes), *x.shape[1:])
        padded[:len(x)] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)  # SYNC step/forward-backward
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # SYNC step/forward-backward
        start = sum(ctx.sizes[:ctx.index])
        return grad[start:start + ctx.sizes[ctx.index]], None, None, None


def segment_mask(text_positions: torch.Tensor) -> torch.Tensor | None:
    """[B, 1, L, L] bool, True where a token may attend: earlier or itself, in the same
    sample of a packed row. A sample starts wherever the text position does not step by
    one (positions restart at 0 for every packed sample); None when each row is one
    sample, for which plain causal attention is the same."""
    steps = text_positions[:, 1:] != text_positions[:, :-1] + 1
    if not bool(steps.any()):
        return None
    segment = torch.cat([torch.zeros_like(steps[:, :1]), steps], dim=1).cumsum(1)
    length = text_positions.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment.device).tril()
    return ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]


class _AllToAll(torch.autograd.Function):
    """`dist.all_to_all_single` of [N, ...] over `group`: part j goes to the group's rank
    j. Its gradient is the same exchange of the gradients, back."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)  # SYNC step/forward-backward
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()  # it may come with the strides of the permute that follows
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)  # SYNC step/forward-backward
        return out, None


def _heads_to_sequence(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """[B, H, L/N, D] (all heads, my tokens) -> [B, H/N, L, D] (my heads, all tokens)."""
    b, h, part, d = x.shape
    n = shard.size
    send = x.reshape(b, n, h // n, part, d).transpose(0, 1).contiguous()  # [N, B, H/N, L/N, D]: to rank j, heads j
    got = _AllToAll.apply(send, shard.group)
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * part, d)  # from rank i: its tokens, in order


def _sequence_to_heads(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """[B, L, H/N, D] (the kernel's output layout) -> [B, L/N, H, D]."""
    b, length, h, d = x.shape
    n = shard.size
    send = x.reshape(b, n, length // n, h, d).transpose(0, 1).contiguous()  # [N, B, L/N, H/N, D]: rank j's tokens
    got = _AllToAll.apply(send, shard.group)
    return got.permute(1, 2, 0, 3, 4).reshape(b, length // n, n * h, d)  # from rank i: its heads, in order


def attention(shard: SequenceShard, module, query, key, value, attention_mask, **kwargs):
    """transformers' attention signature: query [B, Hq, L/N, D], key and value
    [B, Hkv, L/N, D], this rank's tokens; returns ([B, L/N, Hq, D], None)."""
    if shard.kv_repeat > 1:
        key = key.repeat_interleave(shard.kv_repeat, dim=1)
        value = value.repeat_interleave(shard.kv_repeat, dim=1)
    query, key, value = (_heads_to_sequence(t, shard) for t in (query, key, value))
    kwargs.pop("position_ids", None)  # this rank's slice: flash-attention would read it as the row's
    if shard.kernel == "sdpa":
        # The kernel repeats key/value heads by the module's ratio; after a repeat here
        # the ratio is smaller, so it gets the one that holds now.
        groups = types.SimpleNamespace(num_key_value_groups=query.shape[1] // key.shape[1], is_causal=True,
                                       training=module.training)
        out, _ = sdpa_attention_forward(groups, query, key, value, shard.mask, **kwargs)
    else:  # packed rows: the collator's cu_seq_lens_q/k, global already
        out, _ = flash_attention_forward(module, query, key, value, None, **kwargs)
    return _sequence_to_heads(out, shard), None
