"""The job config's schema: typed sections whose fields carry their own documentation.

A :class:`Config` is made of sections (:data:`SECTIONS`). Each field is documented by
the string literal that follows it (torchtitan's convention); :func:`field_docs` reads
them back, so that the Markdown reference (``ft.config_load``) and the code cannot drift
apart. A field typed ``Literal[...]`` selects between alternatives (:data:`CHOICES`); a
numeric field annotated ``Annotated[int, Range(...)]`` has a range (:func:`ranges`).
Loading YAML plus ``section.key=value`` overrides is ``ft.config_load``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal

__all__ = [
    "CHOICES", "SECTIONS", "Config", "ConfigError", "DataConfig", "FSDPConfig",
    "ModelConfig", "ParallelConfig", "Range", "TrainConfig", "WandbConfig", "choices", "field_choices", "field_docs",
    "field_types", "literal_choices", "ranges",
]


class ConfigError(ValueError):
    """A config file or override that names an unknown key or holds an invalid value."""


@dataclass(frozen=True)
class Range:
    """The values a numeric field allows, written in its annotation:
    ``max_steps: Annotated[int, AT_LEAST_1] = 60``. `text` completes "VALUE must be ..."."""

    ok: Callable[[Any], bool]
    text: str


def at_least(low: int, note: str = "") -> Range:
    return Range(lambda v: v >= low, f">= {low}{note}")


AT_LEAST_0 = at_least(0)
AT_LEAST_1 = at_least(1)
POSITIVE = Range(lambda v: v > 0, "> 0")
FRACTION = Range(lambda v: 0 <= v < 1, "in [0, 1)")
PART_LR = Range(lambda v: v >= 0 or v == -1, ">= 0, or -1 for train.learning_rate")


@dataclass
class ModelConfig:
    """The checkpoint to fine-tune and how its attention is computed."""

    path: str = "runs/tiny-qwen2.5-vl"
    """Local directory holding a Hugging Face-format checkpoint of Qwen2-VL, Qwen2.5-VL,
    Qwen3-VL or Qwen3-VL-MoE (config.json, whose `model_type` says which; safetensors
    weights, tokenizer and processor files), e.g. a downloaded Qwen2.5-VL-7B-Instruct.
    Nothing is fetched from the Hub. A relative path resolves against the working
    directory. Left unset, the tiny model of `tiny_family` (`runs/tiny-qwen3-vl-moe`)."""

    build_tiny_if_missing: bool = False
    """Build a tiny randomly initialised model of `tiny_family` (for the demo) when
    `path` is the tiny model's place (see `path`) and holds no model yet. Only there: any
    other `path` must be a folder with config.json and weights, even when this is true,
    and one that does not exist or lacks config.json is refused before anything is
    written, so that a typo in `path` is an error rather than a silent fine-tune of a
    random model. Leave false for real checkpoints."""

    tiny_family: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"] = "qwen2_5_vl"
    """Family of the tiny model `build_tiny_if_missing` makes: `qwen2_vl`, `qwen2_5_vl`,
    `qwen3_vl` or `qwen3_vl_moe` (docs/families.md)."""

    tiny_vocab: Literal["real", "small"] = "real"
    """Vocabulary of the tiny model made by `build_tiny_if_missing`: `real` uses the full
    Qwen2.5-VL tokenizer (~151k tokens, so the embedding dominates the tiny model's size);
    `small` uses a reduced vocabulary, making the model much smaller and faster. Ignored
    when `path` already exists."""

    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers: `sdpa` (PyTorch scaled-dot-product
    attention, works everywhere), `eager` (plain matmuls, slowest, for debugging), or
    `flash_attention_2` (needs the flash-attn package and a CUDA GPU)."""

    freeze_vision_tower: bool = False
    """Keep the vision encoder (patch embedding and ViT blocks; not the merger) at its
    loaded weights: it gets no gradients and no optimizer state, and is saved unchanged
    in checkpoints and exports. It still runs on every batch to encode the images."""

    freeze_merger: bool = False
    """Keep the merger (the projector from vision features into the language model's
    embeddings) at its loaded weights."""

    freeze_router: bool = False
    """Keep the MoE routers (each decoder layer's `gate`) at their loaded weights while
    the experts train (Qwen3-VL-MoE only)."""

    freeze_llm: bool = False
    """Keep the language model (token embeddings, decoder layers but their MoE routers,
    final norm, lm_head) at its loaded weights. Gradients still flow back through it to
    the merger, so it keeps activation checkpointing. Not every part may be frozen."""


@dataclass
class DataConfig:
    """Training and evaluation data, and how samples are sized."""

    train_file: str = "data/demo/train.jsonl"
    """Training conversations (formats: docs/data.md): a JSONL file, one sample per
    line; a folder written by `datasets.Dataset.save_to_disk`; or local Parquet or Arrow
    files, one path or a glob (`data/train-*.parquet`). Datasets are read lazily from
    memory-mapped Arrow. A relative path resolves against the working directory."""

    eval_file: str = "data/demo/eval.jsonl"
    """Evaluation conversations, in any form `train_file` takes. The empty string
    disables evaluation, unless `eval_fraction` carves an eval set out of `train_file`."""

    eval_fraction: Annotated[float, FRACTION] = 0.0
    """Fraction of `train_file`'s rows held out for evaluation (at least one row), when
    there is no `eval_file`: which rows is decided by `train.seed` alone, the same on
    every rank and on every launch, and they never train. 0 holds out none. Setting it
    together with `eval_file` is refused."""

    max_length: Annotated[int, at_least(16)] = 2048
    """Maximum tokens per sample, image and video tokens included. A longer sample is
    truncated after its last image or video. A sample whose images and videos alone do
    not fit gets smaller video frames (down to `video_min_pixels`), and is refused if
    that is not enough. Lower `max_pixels` (images) or `video_max_frames` (videos) to
    make them take fewer tokens."""

    min_pixels: Annotated[int, POSITIVE] = 3136
    """Lower bound on each image's pixel count (height × width) after the image
    processor's resizing; smaller images are upscaled. Qwen2.5-VL turns every 28×28 pixel
    area into one token, so 3136 = 4 × 28 × 28 means at least 4 tokens per image."""

    max_pixels: Annotated[int, POSITIVE] = 200704
    """Upper bound on each image's pixel count after resizing; larger images are
    downscaled, keeping their aspect ratio. The default 200704 = 256 × 28 × 28 caps an
    image at about 256 tokens. Must be at least `min_pixels`."""

    video_fps: Annotated[float, POSITIVE] = 2.0
    """Frames sampled per second of a video file, spread evenly over the clip (Qwen's
    reference rate). The frame count is rounded down to a multiple of the temporal patch
    size (2: each video token covers two frames) and is at least 2. A video given as a
    list of frames is taken to be sampled at this rate already. The sampled rate also
    sets the time axis of M-RoPE, so positions follow real seconds."""

    video_max_frames: Annotated[int, Range(lambda v: v >= 2 and v % 2 == 0,
                                           "an even number >= 2 (two frames per video token)")] = 32
    """At most this many frames per video, spread evenly over the clip when `video_fps`
    would give more (a one-minute clip at 2 fps would be 120). Must be even. With
    `video_max_pixels` it bounds a video's tokens: 32 frames x 64 tokens per two-frame
    patch / 2 = 1,024 tokens at the defaults, within `max_length` 2048."""

    video_min_pixels: Annotated[int, POSITIVE] = 12544
    """Lower bound on each video frame's pixel count after resizing (12544 = 16 x 28 x 28:
    at least 16 tokens per two frames); smaller frames are upscaled. Qwen3-VL's processor
    bounds the whole clip (frames x height x width) instead: docs/families.md."""

    video_max_pixels: Annotated[int, POSITIVE] = 50176
    """Upper bound on each video frame's pixel count after resizing (50176 = 64 x 28 x 28,
    e.g. 224 x 224: at most 64 tokens per two frames; Qwen3-VL: of the whole clip);
    larger frames are downscaled, keeping their aspect ratio. A sample that would not fit
    `max_length` gets the largest smaller bound that fits. transformers' whole-video
    pixel budget (`cap_pixels_per_frame`) is off, so a video's token count depends on
    its frames, these bounds and `max_length` alone, as the data check computes it. Must
    be at least `video_min_pixels`."""

    on_bad_sample: Literal["error", "skip"] = "error"
    """What to do with rows that cannot be trained on. Before training, every row of
    `train_file` and `eval_file` is checked (malformed JSON, unknown keys or roles, no
    assistant turn, missing, unreadable or truncated image, a video that cannot be
    decoded or has no frame, a count of `<image>` or `<video>` placeholders that does
    not match the images or videos, images and videos that do not fit in
    `max_length`): `error` stops with a list of `file:line: reason`; `skip` leaves those
    rows out and logs how many there were and why."""

    group_by_length: bool = False
    """Put training rows of similar length (text, image and video tokens) in the same batch,
    which cuts padding when `per_device_train_batch_size` > 1. Each epoch is still
    shuffled: its rows are cut into chunks of 50 global batches (all ranks' micro-batches
    of one step), each chunk is sorted by length and split into global batches, and the
    order of the batches is shuffled; the batch holding the epoch's longest row goes
    first, so an out-of-memory error shows at the first step. A global batch is cut
    into micro-batches of consecutive lengths, so ranks and accumulation steps get
    similar lengths; like the plain order, it depends on the global batch's size only,
    not on the world size. Off by default, which
    keeps the plain shuffled order of the HF Trainer reference: grouped steps see all
    short or all long samples, so the per-step loss swings with length."""

    packing: bool = False
    """Pack several whole samples into each row instead of padding one sample per row:
    no compute is spent on padding. A micro-batch is then `per_device_train_batch_size`
    packed rows of up to `pack_length` tokens each (eval batches likewise, with
    `per_device_eval_batch_size`). Every sample keeps its own positions and attends only
    to itself, so the loss and gradients are those of the same samples padded. Works
    with `sdpa` and `eager` (which build a block-diagonal mask, memory rows x
    pack_length² per layer call) and `flash_attention_2` (variable-length kernels, no
    mask: the fast choice for long packs). Excludes `group_by_length`."""

    pack_length: Annotated[int, at_least(0, " (0 means data.max_length)")] = 0
    """Tokens per packed row when `packing` is on; 0 means `max_length`, and any other
    value must be at least `max_length` (a sample is never split across rows)."""


@dataclass
class TrainConfig:
    """The optimisation loop: steps, batch sizes, optimizer, schedule, logging, saving."""

    output_dir: str = "runs/demo"
    """Directory for checkpoints, the final model, logs and the resolved config. A
    relative path resolves against the working directory."""

    max_steps: Annotated[int, AT_LEAST_1] = 60
    """Number of optimizer steps to train for. Each step consumes
    `per_device_train_batch_size` × `gradient_accumulation_steps` × world size samples
    (the global batch); the training data is reshuffled and repeated as often as needed.
    An epoch is a whole number of steps: the rows of its shuffle that do not fill a last
    global batch (fewer than one global batch) are left out of it, different ones each
    epoch."""

    per_device_train_batch_size: Annotated[int, AT_LEAST_1] = 1
    """Training samples per micro-batch on each process (GPU, or CPU rank). The global
    batch per optimizer step is `per_device_train_batch_size` ×
    `gradient_accumulation_steps` × world size."""

    per_device_eval_batch_size: Annotated[int, AT_LEAST_1] = 1
    """Evaluation samples per batch on each process."""

    gradient_accumulation_steps: Annotated[int, AT_LEAST_1] = 1
    """Micro-batches whose gradients are summed before each optimizer step. The loss is
    token-weighted over the whole optimizer step: every target token across all
    micro-batches and ranks counts equally, so accumulating gives the same gradient as
    one larger batch."""

    learning_rate: Annotated[float, AT_LEAST_0] = 1e-4
    """Peak learning rate, reached after warmup and then held constant. It applies to
    the language model, and to the vision tower and merger unless `vision_lr` or
    `merger_lr` is set."""

    vision_lr: Annotated[float, PART_LR] = -1.0
    """Peak learning rate of the vision tower (patch embedding and ViT blocks), on the
    same warmup schedule. -1 means `learning_rate`; 0 leaves the tower unchanged although
    it is not frozen (it still gets gradients and optimizer state: prefer
    `model.freeze_vision_tower`)."""

    merger_lr: Annotated[float, PART_LR] = -1.0
    """Peak learning rate of the merger (vision-to-language projector), on the same
    warmup schedule. -1 means `learning_rate`."""

    router_lr: Annotated[float, PART_LR] = -1.0
    """Peak learning rate of the MoE routers (Qwen3-VL-MoE), as `merger_lr`."""

    router_aux_loss_coef: Annotated[float, PART_LR] = -1.0
    """Weight of the MoE load-balancing loss, computed over the whole global batch
    without pads (docs/families.md); -1 takes the checkpoint's `router_aux_loss_coef`
    (0.001 in Qwen3-VL-MoE's), 0 turns it off. Dense families ignore it."""

    warmup_ratio: Annotated[float, FRACTION] = 0.0
    """Fraction of `max_steps` over which the learning rate rises linearly from 0 to
    `learning_rate` (ceil(warmup_ratio × max_steps) steps). This is Hugging Face's
    `constant_with_warmup` schedule; note that Hugging Face's plain `constant` schedule
    ignores warmup_ratio, while ft always honours it."""

    max_grad_norm: Annotated[float, AT_LEAST_0] = 1.0
    """Clip the global gradient L2 norm (over all parameters and ranks) to this value
    before each optimizer step. 0 disables clipping; the norm is logged either way."""

    weight_decay: Annotated[float, AT_LEAST_0] = 0.0
    """Weight decay coefficient passed to the optimizer. Applied to every parameter,
    norms and biases included: with FSDP1 flat parameters (`use_orig_params=false`)
    one flat shard mixes them, so HF's no-decay group for norms and biases cannot be
    formed."""

    logging_steps: Annotated[int, AT_LEAST_1] = 1
    """Log training metrics every this many optimizer steps: loss, lr, grad norm,
    tokens/s (all ranks and per device; real text, image and video tokens, no padding), the
    step split into data wait / forward+backward / optimizer, MFU (GPU only) and the
    highest peak memory over the ranks."""

    metrics_warmup_steps: Annotated[int, AT_LEAST_0] = 2
    """Steps left out of the end-of-run throughput averages (the `summary` record of
    metrics.jsonl): the first steps of a process pay for allocator warm-up and lazy
    initialisation. Counted from the start of each launch, resumed or not."""

    eval_steps: Annotated[int, AT_LEAST_0] = 20
    """Evaluate on `eval_file` every this many optimizer steps, and at the end of
    training. 0 evaluates only at the end. Ignored when `eval_file` is empty."""

    metric_for_best: Literal["eval_loss", "eval_token_accuracy"] = "eval_loss"
    """Which eval metric picks the model exported to `output_dir/best/`: `eval_loss`
    (token-weighted cross-entropy, lower is better; the recipe's) or
    `eval_token_accuracy` (share of label tokens whose most likely prediction is the
    label, token-weighted over the whole eval set; higher is better). Both are logged
    at every eval either way."""

    export_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Dtype of the floating-point weights written to `output_dir/best/` (the HF
    export; its config.json records it, so `from_pretrained` loads it in that dtype by
    default). `auto`: the dtype of the checkpoint the run started from, as its
    config.json says (`dtype`, or `torch_dtype` before transformers 5): bfloat16 for the
    released Qwen2.5-VL models, float16 if the source says float16, fp32 when it says
    float32, something else or nothing. `bf16` or `fp32` override it. The cast is made
    on the gathered master weights when exporting; training and the resumable
    checkpoints keep the master weights' dtype (`master_weights`). A bf16 export is half
    the size of an fp32 one."""

    save_steps: Annotated[int, AT_LEAST_0] = 20
    """Write a resumable checkpoint to `output_dir/checkpoints/step-N/` every this many
    optimizer steps (0: none, except on SIGTERM/SIGUSR1). Sharded with
    torch.distributed.checkpoint: every rank writes its own model and optimizer shards
    and RNG state; the folder counts as complete only once `train_state.json` is written
    after all ranks finished."""

    keep_last_n: Annotated[int, Range(lambda v: v == 0 or v >= 2, "0 (keep all) or >= 2")] = 3
    """Keep this many newest complete checkpoints; older ones are deleted only after a
    newer one is complete. 0 keeps all; otherwise at least 2, so a crash during a save
    never leaves you without one. The best export (`best/`) is never deleted."""

    resume: str = "auto"
    """`auto`: continue from the newest complete checkpoint in `output_dir`, or start
    fresh when there is none. A path: continue from that checkpoint folder. `none`:
    start over, refused if `output_dir` already holds a run unless
    `overwrite_output_dir` is true. Resuming needs the same global batch
    (`per_device_train_batch_size` × `gradient_accumulation_steps` × world size), seed
    and data as the run that wrote the checkpoint, and ft checks and refuses otherwise;
    how the global batch is split may change (e.g. 2 ranks × accumulation 3 continuing
    on 3 ranks × accumulation 2), and every step then trains on the same samples."""

    overwrite_output_dir: bool = False
    """With `resume=none`: delete the previous run's checkpoints, export and logs in
    `output_dir` and start over."""

    max_skipped_steps: Annotated[int, AT_LEAST_1] = 5
    """A step whose loss or gradient norm is NaN or infinite on any rank is skipped on
    all ranks (no update; weights, optimizer state and checkpoints stay finite). After
    this many skipped steps in a row the job stops with an error; its last checkpoint is
    intact."""

    seed: int = 42
    """Seed for data shuffling and the random number generators."""

    optim: Literal["adafactor", "hf_adafactor", "adamw"] = "adafactor"
    """Optimizer. `adafactor`: ft's Adafactor, which applies to every original parameter
    exactly the update of the recipe's HF `Adafactor(lr, scale_parameter=False,
    relative_step=False)` on one process, whatever the world size and FSDP sharding:
    factored second moment (a row and a column vector per matrix), update clipping over
    the whole parameter; two small all-reduces per step. `hf_adafactor`: HF's Adafactor
    itself, as the HF Trainer recipe runs it: under FSDP1 it sees each rank's 1-D flat
    shard, so it keeps a full-size fp32 second moment and clips per shard, and training
    then depends on the world size; for comparison with the recipe. `adamw`: torch's
    AdamW with HF's defaults (betas 0.9/0.999, eps 1e-8; two full-size fp32 moments)."""

    precision: Literal["bf16", "fp32", "auto"] = "auto"
    """Compute precision: `bf16` (parameters and activations in bf16; the sharded master
    weights are `master_weights`, the optimizer state fp32), `fp32`, or `auto` (bf16 on
    GPU, fp32 on CPU, where bf16 matmuls are about 6× slower)."""

    master_weights: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the sharded weights the optimizer updates, and of their gradients.
    `fp32` (the recipe's: the HF Trainer's accelerate upcasts FSDP's flat parameters to
    fp32): 4 + 4 bytes per parameter per rank's shard, bf16 copies made for compute.
    `bf16`: weights and gradients stay bf16, 2 + 2 bytes: half the memory of the model
    state, which is what lets a 72B full fine-tune fit one 8x80 GB node. The model is
    loaded in bf16 (buffers such as the rotary `inv_freq` stay fp32), compute is in
    `precision` (bf16 needs no cast; fp32 upcasts each gathered unit), gradients are
    reduced in `fsdp.reduce_dtype` and stored in bf16. The optimizer does its math in
    fp32 (its state stays fp32) and writes each result back to bf16 as
    `stochastic_rounding` says. Checkpoints hold the bf16 weights (`export_dtype` still
    sets the export's). `train.optim=hf_adafactor` is refused with bf16 (it writes back
    with round-to-nearest)."""

    stochastic_rounding: bool = True
    """With `master_weights=bf16`: write the optimizer's fp32 result back to bf16 with
    stochastic rounding (up with probability equal to the fractional distance to the
    next bf16 value), so updates smaller than bf16's spacing still move weights on
    average; round-to-nearest drops every update below half the spacing (near 0.02 the
    spacing is 1.2e-4; Adafactor at lr 1e-5 moves a weight ~1e-5). The random bits of
    element i of parameter P at step t hash (seed, t, P's name, i): the result does not
    depend on the world size or sharding, and a resumed run continues bit for bit.
    `false` rounds to nearest, kept for comparison. Ignored with fp32 master weights."""

    loss_chunk_size: Annotated[int, AT_LEAST_0] = 1024
    """Compute the cross-entropy from the final hidden states of the label tokens only,
    this many tokens at a time, recomputing each chunk's logits in the backward pass:
    the vocabulary-sized logits (151,936 columns on Qwen2.5-VL) then exist for one chunk
    at a time instead of for every position of the batch, in bf16 and again in fp32.
    Same loss and gradients as the plain path, for one extra vocabulary projection of
    the label tokens in the backward pass. At 4,096 labelled tokens on the 3B model the
    loss's peak memory falls from 7.0 GiB to 1.5 GiB (1.0 GiB with 512;
    `benchmarks/loss_memory.py`). 0 uses the plain path (the model's full logits), e.g.
    to compare."""

    dataloader_num_workers: Annotated[int, AT_LEAST_0] = 0
    """Worker processes per rank for loading and preprocessing samples (image decoding
    and resizing). 0 loads in the training process."""

    hang_timeout_s: Annotated[float, at_least(0, " (0 turns the watchdog off)")] = 900.0
    """Seconds a rank may wait in one collective of the training loop (a step's
    all-reduce, a forward's all-gathers, eval, a checkpoint) before ft calls it a hang:
    every rank that can still run then prints where each rank is (step and the label of
    its last collective, from torchrun's store), names the ranks that are behind or
    elsewhere, dumps its Python stack and exits with status 3, so that torchrun's
    restarts resume from the last checkpoint. Start-up (weights loading, data check) is
    not watched. The process group's own timeout is set above it (this + 120 s, at
    least 30 min) so that ft's report comes first. Raise it if one checkpoint save or
    export legitimately takes longer (a very large model on a slow file system). 0
    turns the watchdog off."""


@dataclass
class FSDPConfig:
    """How the model is sharded across processes with PyTorch FSDP."""

    backend: Literal["fsdp1", "fsdp2"] = "fsdp1"
    """Which FSDP runs it: `fsdp1` (torch's FSDP wrapper with one flat parameter per unit:
    the HF Trainer recipe's) or `fsdp2` (torch's per-parameter FSDP: each parameter a
    DTensor sharded on dim 0, so a unit may mix frozen and trainable weights). Both use the same wrap
    plan and give the same training; the FSDP1 knobs below are mapped onto fsdp2 or
    refused with the reason (docs/sharding.md), and `train.optim=hf_adafactor` is
    refused on fsdp2."""

    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD"
    """What FSDP shards across ranks: `FULL_SHARD` (parameters, gradients and optimizer
    state; least memory), `SHARD_GRAD_OP` (gradients and optimizer state; parameters
    stay gathered between forward and backward, trading memory for less communication),
    `NO_SHARD` (plain data parallelism), `HYBRID_SHARD` (full sharding within a node,
    replication across nodes)."""

    backward_prefetch: Literal["BACKWARD_PRE", "BACKWARD_POST", "NONE"] = "BACKWARD_PRE"
    """When FSDP gathers the next layer's parameters during backward: `BACKWARD_PRE`
    (before the current layer's gradient computation; fastest, most memory),
    `BACKWARD_POST` (after it), or `NONE` (no prefetch)."""

    forward_prefetch: bool = False
    """All-gather the next unit before the current unit's forward (more overlap, more memory)."""

    limit_all_gathers: bool = True
    """Allow at most two all-gathers in flight, bounding peak GPU memory when the CPU
    runs ahead of the GPU."""

    sync_module_states: bool = True
    """Make every rank start from rank 0's weights. On GPU FSDP broadcasts them at
    wrapping time; on CPU, where FSDP refuses this flag, ft broadcasts them explicitly
    just before wrapping."""

    use_orig_params: bool = False
    """Expose the original parameters instead of FSDP's flattened ones (for parameters
    of one unit treated differently, e.g. some frozen); costs some memory and speed."""

    cpu_offload: bool = False
    """Keep sharded parameters and gradients in CPU memory (the optimizer step runs
    there): saves GPU memory at a large cost in speed."""

    activation_checkpointing: bool = True
    """Recompute activations during backward instead of storing them: the wrap plan's
    modules (decoder layers, vision blocks) in a non-reentrant checkpoint wrapper. Saves
    a lot of memory for roughly a third more compute."""

    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the gradient reduce-scatter/all-reduce under `bf16` precision: `fp32`
    (exact sums, twice the traffic) or `bf16` (half the traffic, rounding error grows
    with world size). Under `fp32` precision gradients are always reduced in fp32."""


@dataclass
class ParallelConfig:
    """Parallelism besides FSDP's sharding."""

    sequence_parallel_size: Annotated[int, AT_LEAST_1] = 1
    """N ranks share one micro-batch, each running the language model on 1/N of every
    row's tokens (Ulysses: two all-to-alls around attention; docs/sharding.md). Groups are
    N consecutive ranks; N must divide the world size and the query heads; data
    parallelism runs over world size / N groups. 1: off."""


@dataclass
class WandbConfig:
    """Weights & Biases experiment tracking."""

    project: str = "ft"
    """W&B project that runs are logged to."""

    run_name: str = ""
    """W&B run name. The empty string uses the last path component of
    `train.output_dir`."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """`online` logs to the W&B server; `offline` writes runs locally (to upload later
    with `wandb sync`); `disabled` turns W&B off; `auto` is online when an
    API key is configured (the WANDB_API_KEY environment variable or an api.wandb.ai
    entry in ~/.netrc) and offline otherwise. A WANDB_MODE environment variable takes
    precedence over this setting."""


@dataclass
class Config:
    """A complete ft job configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The checkpoint to fine-tune."""

    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation loop."""

    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    """FSDP sharding and memory-saving options."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Sequence parallelism."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging."""


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Each field's type, its `Annotated` range left out (see :func:`ranges`)."""
    # `from __future__ import annotations` leaves field.type as a string; resolve it.
    return typing.get_type_hints(cls)


@functools.cache
def ranges(cls: type) -> dict[str, Range]:
    """The :class:`Range` of each field of `cls` that has one, from its annotation."""
    out = {}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        if typing.get_origin(hint) is Annotated:
            out.update({name: extra for extra in hint.__metadata__ if isinstance(extra, Range)})
    return out


def literal_choices(typ: Any) -> tuple[str, ...] | None:
    """The allowed values of a ``Literal[...]`` field type, or None for any other type."""
    if typing.get_origin(typ) is not Literal:
        return None
    args = typing.get_args(typ)
    if not args or not all(isinstance(arg, str) for arg in args):
        raise TypeError(f"config fields support Literal types of strings only, got {typ}")
    return args


def choices(cls_or_section: type | str, name: str) -> tuple[str, ...] | None:
    """The allowed values of field `name` of a section (a dataclass or its name), from
    its ``Literal[...]`` type; None for other types, KeyError for an unknown field."""
    cls = SECTIONS[cls_or_section] if isinstance(cls_or_section, str) else cls_or_section
    types = field_types(cls)
    if name not in types:
        raise KeyError(f"{cls.__name__} has no field {name!r}")
    return literal_choices(types[name])


CHOICES: dict[str, tuple[str, ...]] = {
    f"{section}.{name}": allowed
    for section, cls in SECTIONS.items()
    for name in field_types(cls)
    if (allowed := choices(cls, name)) is not None
}
"""Allowed values of the string fields that select between alternatives, keyed by
``section.key``, in declaration order. Derived from the fields' ``Literal[...]`` types."""


def field_choices(key: str) -> tuple[str, ...]:
    """The allowed values of the field ``section.key`` (argparse's ``choices=``);
    KeyError for an unknown key or a field not typed with a Literal."""
    section, dot, name = key.partition(".")
    if not dot or section not in SECTIONS:
        raise KeyError(f"unknown config key {key!r}")
    allowed = choices(section, name)
    if allowed is None:
        raise KeyError(f"config key {key!r} has no fixed choices")
    return allowed


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field of the dataclass `cls` to its docstring ("" if none), parsed from the
    source: Python discards a string literal that follows an annotated assignment."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {f.name: "" for f in dataclasses.fields(cls)}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs

