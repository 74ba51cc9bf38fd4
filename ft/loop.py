"""ft's training loop. Run it with torchrun (see launch.sh):

    torchrun --nproc-per-node 2 -m ft.loop configs/demo.yaml train.max_steps=10

`train()` is the table of contents: setup, data, model, optimizer, resume, then the loop,
whose step is `train_step`. Every rank runs this same file. Lines marked SYNC run a
collective, directly or inside the call: every rank must reach them in the same order,
or the job hangs (NCCL; gloo too, when the mismatched collectives happen to fit) or
aborts (gloo). A SYNC comment names the label the call runs under (`SYNC step/agree`):
`ft.watchdog` records it per rank, and a hang report names the ranks and labels out of
step, so that a reader goes from the report to the line. Nothing between two SYNC lines
may depend on data that differs between ranks in a way that changes which collectives
run: that is why eval pads ranks to the same number of batches, why the collator gives
an image-less batch a dummy image, and why every decision to skip or stop a step is
taken from the step's one all-reduce (`agree`), which all ranks see alike.

The file is longer than ft's other modules on purpose: a reader follows a whole step, its
skips, logs, eval and save here, without jumping through modules.
"""

from __future__ import annotations

import functools
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader
from tqdm import tqdm
import transformers
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from ft import ckpt, dist, faults, watchdog
from ft.backends import BACKENDS
from ft.ckpt import CheckpointMismatch, ResumeError
from ft.config import ConfigError
from ft.config_load import builds_tiny_model, config_to_dict, load_config, model_path_refusal, save_config
from ft.data import IMAGE, MEDIA, VIDEO, Batch, Collator, DataError, build_datasets, validate
from ft.fsdp_wrap import checkpoint_summary, format_plan, plan_units, root_members, wrap_model
from ft.metrics import memory_stats, mfu, peak_flops, train_flops
from ft.model import load_model, loss_sum, loss_sum_and_correct
from ft.optim import build_optimizer, clip_grad_norm, lr_scale, set_lr
from ft.parts import PARTS, WrapPlanError, apply_freezing, param_groups
from ft.packing import PackedBatchSampler, PackedRows, RopeIndex, eval_batches, truncates_video_seconds, varlen_refusal
from ft.processor import MissingDependency, load_processor_for, training_settings
from ft.rounding import MASTER_DTYPES
from ft.sampler import ShardedBatchSampler
from ft.track import Tracker

USAGE = "usage: python -m ft.loop [CONFIG.yaml] [section.key=value ...]"

# FSDP1's state-dict code warns on every save about its own internals (ShardedTensor,
# _get_pg_default_device); users can do nothing about them and they bury the log.
for _pattern in (".*ShardedTensor.*", ".*_get_pg_default_device.*", ".*Multiple backends are registered.*"):
    warnings.filterwarnings("ignore", message=_pattern)
# FSDP2 warns that a unit returned a view that an in-place op could detach from its
# pre-backward hook: the patch embedding's `.view` output and the root's empty logits
# slice, neither of which is modified in place (the equivalence tests would see it).
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \((FSDPQwen2_5_VisionPatchEmbed|"
                                          r"FSDPQwen2_5_VLForConditionalGeneration)\) returned a view tensor")


# =====================================================================================
# Loop state
# =====================================================================================
@dataclass
class TrainState:
    """Everything that changes as training advances and is not a tensor; checkpointed."""

    step: int = 0  # optimizer steps taken (skipped steps not counted)
    epoch: int = 0  # current pass over the training set
    epoch_steps: int = 0  # steps (global batches) of this epoch consumed, skipped ones included
    samples_seen: int = 0  # all ranks, skipped ones included
    tokens_seen: int = 0  # real (non-pad) tokens trained on, all ranks
    best_metric: float | None = None  # train.metric_for_best's value at best_step
    best_metric_name: str = "eval_loss"
    best_step: int | None = None
    last_eval_step: int | None = None
    skipped_steps: int = 0  # non-finite loss/gradient, or a bad sample under on_bad_sample=skip
    skipped_samples: int = 0  # samples dropped in those steps
    skips_in_a_row: int = 0  # stops the job at train.max_skipped_steps

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        d = dict(d)
        if "best_eval_loss" in d:  # checkpoints from before train.metric_for_best
            d["best_metric"] = d.pop("best_eval_loss")
        d.pop("epoch_batches", None)  # ft before the world-size-independent order: see `resume`
        for k, v in d.items():
            setattr(self, k, v)


class Meter:
    """Sums over optimizer steps: the current logging window, and the whole run after
    the first `warmup_steps` steps of this process (allocator warm-up, first-touch page
    faults, lazy initialisation), for the end-of-run summary."""

    KEYS = ("steps", "loss_sum", "labels", "tokens", "samples", "rows", "slots", "flops",
            "data_s", "fwd_bwd_s", "optim_s", "step_s")

    def __init__(self, warmup_steps: int):
        self.warmup_steps, self.steps_here = warmup_steps, 0
        self.window, self.totals = dict.fromkeys(self.KEYS, 0.0), dict.fromkeys(self.KEYS, 0.0)

    def add(self, **values: float) -> None:
        self.steps_here += 1
        for w in (self.window, self.totals) if self.steps_here > self.warmup_steps else (self.window,):
            w["steps"] += 1
            for k, v in values.items():
                w[k] += v

    def take_window(self) -> dict:
        window, self.window = self.window, dict.fromkeys(self.KEYS, 0.0)
        return window

    @staticmethod
    def rates(w: dict, world: int, peak: float | None, pack_length: int = 0) -> dict:
        """Per-step means and rates of a window: tokens are real (non-pad) text and image
        tokens of all ranks; MFU is model FLOPs (ft.metrics conventions) per device over
        the device's bf16 peak, only where that peak is known (never on CPU); the model
        FLOP/s are reported everywhere (a CPU's own peak: benchmarks/cpu_peak.py). The
        padding share is of the token positions computed on; with packing
        (`pack_length`), the pack efficiency is real tokens / (rows x pack_length)."""
        n, dt = max(w["steps"], 1.0), max(w["step_s"], 1e-9)
        out = {
            "padding_share": 1.0 - w["tokens"] / max(w["slots"], 1.0),
            "tokens_per_s": w["tokens"] / dt,
            "tokens_per_s_per_device": w["tokens"] / dt / world,
            "flops_per_s_per_device": w["flops"] / dt / world,
            "step_time_s": w["step_s"] / n,
            "data_s": w["data_s"] / n,
            "fwd_bwd_s": w["fwd_bwd_s"] / n,
            "optim_s": w["optim_s"] / n,
        }
        if pack_length:
            out["pack_efficiency"] = w["tokens"] / max(w["rows"] * pack_length, 1.0)
        if peak:
            out["mfu"] = mfu(w["flops"] / world, dt, peak)
        return out


class StopRequest:
    """The SIGTERM (cluster preemption; launch.sh forwards it) and SIGUSR1 (SLURM's
    warning signal) handler: finish the current step, checkpoint, exit 0. It only sets
    a flag; the ranks agree on it in the step's all-reduce, so they all stop at the same
    step. A small object of its own, not a closure over the `Run`: the interpreter keeps
    signal handlers until its very end, and a handler holding the model would keep the
    process group alive into interpreter shutdown (see `dist.cleanup`)."""

    signum: int = 0

    def __call__(self, signum, _frame) -> None:
        self.signum = signum


@dataclass
class Run:
    """What one training run holds while it goes: built once by `train()`, read by the
    helpers below (module functions, not closures, so each can be read on its own)."""

    cfg: object
    info: dist.DistInfo
    precision: str
    resume_path: str | None
    state: TrainState = field(default_factory=TrainState)
    stop: StopRequest = field(default_factory=StopRequest)  # agreed on in `agree`
    # data
    train_ds: object = None
    eval_ds: object = None
    eval_lengths: list | None = None  # tokens per eval row (for packing its batches)
    collator: Collator | None = None
    sampler: ShardedBatchSampler | PackedBatchSampler | None = None
    loader: DataLoader | None = None
    batches: object = None  # the iterator over `loader` for the current epoch
    run_shape: dict = field(default_factory=dict)
    # model, optimizer, metrics
    model: torch.nn.Module | None = None
    flops_of: object = None  # BatchStats -> training FLOPs of this model (frozen parts known)
    optimizer: torch.optim.Optimizer | None = None
    tracker: Tracker | None = None
    meter: Meter | None = None
    peak: float | None = None
    bar: tqdm | None = None
    last_line: float = 0.0  # when the last progress line was printed (no terminal)

    @property
    def out(self) -> str:
        return self.cfg.train.output_dir

    @property
    def best_dir(self) -> str:
        return os.path.join(self.cfg.train.output_dir, "best")

    @property
    def global_batch(self) -> int:
        """Rows per optimizer step over all ranks: samples, or packs when packing."""
        t = self.cfg.train
        return t.per_device_train_batch_size * t.gradient_accumulation_steps * self.info.world_size

    @property
    def pack_length(self) -> int:
        """Tokens per packed row; 0 when not packing."""
        d = self.cfg.data
        return (d.pack_length or d.max_length) if d.packing else 0


# =====================================================================================
# The table of contents
# =====================================================================================
def train(cfg) -> None:
    run = setup(cfg)  # SYNC: process group, signals, run folder, seeds
    # ---- data, checked row by row before any weight is read (it needs the processor only)
    processor = prepare_processor(run)  # SYNC (the tiny demo model is built once per node)
    build_data(run, processor)  # SYNC setup/data (the ranks share the row check)
    # ---- model: rank 0 reads the weights; freeze, plan, wrap (root last), checkpointing
    run.model = build_model(run)  # SYNC setup/model (rank 0's weights broadcast)
    # ---- optimizer: FSDP's flat shards, one group per trainable part and its own lr
    run.optimizer = build_optimizer(param_groups(run.model, cfg.train), cfg.train, model=run.model)
    # ---- resume: weights, optimizer state, train state, data position, RNG
    resume(run)  # SYNC setup/resume
    if run.info.is_main:
        run.tracker = Tracker(run.out, cfg.wandb, config_to_dict(cfg),
                              cfg.wandb.run_name or os.path.basename(os.path.abspath(run.out)),
                              resume_step=run.state.step if run.resume_path else None)
    run.meter, run.peak = Meter(cfg.train.metrics_warmup_steps), peak_flops(run.info.device)
    run.bar = progress_bar(run)
    state, stopped = run.state, False
    run.sampler.set_position(state.epoch, state.epoch_steps)
    run.batches = iter(run.loader)
    run.model.train()

    # ---- the loop: one optimizer step per pass
    while state.step < cfg.train.max_steps:
        watchdog.set_step(state.step + 1)
        t_start = clock(run.info)
        micro, bad, unloaded = fetch_step(run)
        counts = agree(run, micro, bad, unloaded)  # SYNC step/agree: the step's all-reduce
        state.samples_seen += int(counts.samples)
        saved = False
        if counts.bad:
            skip_bad_data(run, bad, counts)
        else:
            result = train_step(run, micro, counts.labels, t_start)  # SYNC step/... (FSDP, clip, loss, optimizer)
            if isinstance(result, str):
                skip(run, result, counts)
            else:
                state.step += 1
                state.skips_in_a_row = 0
                state.tokens_seen += int(counts.tokens)
                if run.bar is not None:
                    run.bar.update(1)
                run.meter.add(loss_sum=result["loss_sum"], **counts.summable(), **result["timings"])
                faults.hook("crash", state.step, run.info.rank)
                if state.step % cfg.train.logging_steps == 0 or state.step == cfg.train.max_steps:
                    log_window(run, result)  # SYNC (peak memory over ranks)
                if run.eval_ds is not None and cfg.train.eval_steps and state.step % cfg.train.eval_steps == 0:
                    eval_and_export(run)  # SYNC
                if cfg.train.save_steps and state.step % cfg.train.save_steps == 0:
                    save(run)  # SYNC
                    saved = True
        # ---- a stop signal reached some rank before this step: all ranks stop here
        if counts.stop:
            if not saved:
                save(run, " (stop signal; relaunch to continue)")  # SYNC
            stopped = True
            break
    finish(run, stopped)  # SYNC (last eval and export, summary)


# =====================================================================================
# Setup, data, model, resume
# =====================================================================================
def setup(cfg) -> Run:
    info = dist.init_distributed(timeout_s=watchdog.process_group_timeout(cfg.train.hang_timeout_s))
    earlier = dist.earlier_refusal()
    if earlier:  # torchrun restarted the group after a refusal: a restart cannot fix it
        raise Refused(earlier)
    refusals = BACKENDS[cfg.fsdp.backend].config_refusals(cfg)  # before anything is read or written
    if refusals:
        raise ConfigError("; ".join(refusals))
    hf_logging.disable_progress_bar()  # per-rank "Loading weights" bars: noise under torchrun
    run = Run(cfg, info, resolve_precision(cfg.train.precision, info), None)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, run.stop)
    watchdog.start(info.rank, info.world_size, cfg.train.hang_timeout_s)

    run.resume_path = ckpt.find_resume_checkpoint(cfg.train, run.out, info, lambda m: log(info, m))  # SYNC
    if info.is_main:
        os.makedirs(run.out, exist_ok=True)
        save_config(cfg, os.path.join(run.out, "config.yaml"))
        ckpt.recover_export(run.best_dir)
    dist.barrier()  # SYNC: the output folder is ready (and cleared, if asked)
    log(info, f"world size {info.world_size} on {info.device.type}, precision {run.precision}, "
              f"output {os.path.abspath(run.out)}")
    # Same seed everywhere: the sampler and any dropout draw the same numbers on every
    # rank; the weights do not depend on it (rank 0's are broadcast). A resumed run
    # restores each rank's RNG state from the checkpoint instead.
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    return run


def resolve_precision(precision: str, info: dist.DistInfo) -> str:
    # bf16 matmuls are about 6x slower than fp32 on a CPU: "auto" only uses them on GPU.
    if precision == "auto":
        return "bf16" if info.on_gpu else "fp32"
    return precision


def prepare_processor(run: Run):
    cfg, info = run.cfg, run.info
    refusal = model_path_refusal(cfg.model)  # `main` refused it already; `train(cfg)` from code
    if refusal:
        raise ConfigError(refusal)
    # Only at the demo model's default place: a typo in model.path is refused above.
    if builds_tiny_model(cfg.model) and not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        if info.local_rank == 0:  # one builder per node: the folder may not be shared
            from ft.tiny import save_tiny

            log(info, f"building the tiny demo model at {cfg.model.path} ({cfg.model.tiny_vocab} vocab)")
            save_tiny(cfg.model.path, vocab=cfg.model.tiny_vocab, if_missing=True)
        dist.barrier()  # SYNC: the model folder exists for everyone
    return load_processor_for(cfg.model.path, cfg.data)


@watchdog.at("setup/data", watch=False)  # start-up is slow, not stuck: recorded, not watched
def build_data(run: Run, processor) -> None:
    """Check every row once (no model, no pixel processing; the ranks split the rows and
    share what they found), so that a broken row stops the job now with its file and
    line, or is dropped (data.on_bad_sample), instead of killing one rank hours in. The
    check also measures each row's length, for length grouping. Then the loader: each
    rank reads its slice of every step's global batch."""
    cfg, info = run.cfg, run.info
    bs, world, accum = cfg.train.per_device_train_batch_size, info.world_size, cfg.train.gradient_accumulation_steps
    refusal = run.pack_length and varlen_refusal(cfg.model.attn_implementation)
    if refusal:
        raise ConfigError(refusal)
    train_ds, eval_ds = build_datasets(cfg.data, processor, cfg.train.seed)
    t0 = time.perf_counter()
    train_ds, train_lengths, note = validate(  # SYNC (all-gather)
        train_ds, cfg.data.on_bad_sample, info.rank, world, dist.all_gather_object,
        num_workers=cfg.train.dataloader_num_workers)
    if note:
        log(info, note)
    eval_lengths = None
    if eval_ds is not None:
        eval_ds, eval_lengths, note = validate(  # SYNC (all-gather)
            eval_ds, cfg.data.on_bad_sample, info.rank, world, dist.all_gather_object,
            num_workers=cfg.train.dataloader_num_workers)
        if note:
            log(info, note)
    # What every batch carries one of, real or dummy, so that each rank runs the vision
    # tower as often as the others: the data's kinds, which every rank knows alike.
    media = train_ds.media | (eval_ds.media if eval_ds is not None else frozenset())
    model_config = AutoConfig.from_pretrained(cfg.model.path)
    rope_index = RopeIndex(model_config) if run.pack_length else None  # packed rows: positions per sample
    run.collator = Collator(processor, rope_index, varlen=cfg.model.attn_implementation == "flash_attention_2",
                            media=media)
    kinds = " and ".join(MEDIA[kind].name + "s" for kind in sorted(media)) or "no images or videos"
    carried = " and ".join(("an " if kind == IMAGE else "a ") + MEDIA[kind].name for kind in run.collator.required)
    log(info, f"data checked in {time.perf_counter() - t0:.1f} s; it holds {kinds}: every batch carries "
              f"{carried} (a dummy where it has none)")
    if VIDEO in media and truncates_video_seconds(model_config):
        log(info, f"note: transformers {transformers.__version__} rounds a video's seconds per two frames "
                  "down to whole seconds in M-RoPE (0.5 s becomes 0: frames share a time position); "
                  "training and inference on this version agree, but transformers >= 5.24 keeps the fraction")
    if len(train_ds) < run.global_batch:
        raise DataError(
            f"{cfg.data.train_file}: {len(train_ds)} usable rows, but one optimizer step needs "
            f"{run.global_batch} (per_device_train_batch_size {bs} x gradient_accumulation_steps {accum} "
            f"x world size {world})"
        )
    # Every rank gets the same number of batches per epoch, hence runs the same number
    # of forwards (a rank with one more would wait forever in an all-gather). The order
    # is a pure function of (seed, epoch) over global batches, whatever the world size:
    # resuming sets the position (in steps), nothing else.
    if run.pack_length:
        run.sampler = PackedBatchSampler(train_lengths, run.pack_length, batch_size=bs, num_replicas=world,
                                         rank=info.rank, seed=cfg.train.seed, accumulation=accum)
        check_packs(run, train_lengths)
        train_ds, eval_ds = PackedRows(train_ds), eval_ds and PackedRows(eval_ds)
    else:
        run.sampler = ShardedBatchSampler(train_lengths, batch_size=bs, num_replicas=world, rank=info.rank,
                                          seed=cfg.train.seed, group_by_length=cfg.data.group_by_length,
                                          accumulation=accum)
    run.loader = DataLoader(train_ds, batch_sampler=run.sampler, collate_fn=run.collator,
                            num_workers=cfg.train.dataloader_num_workers, pin_memory=info.on_gpu)
    run.train_ds, run.eval_ds, run.eval_lengths = train_ds, eval_ds, eval_lengths
    log(info, f"train rows {len(train_ds)}, eval rows {len(eval_ds) if eval_ds else 0}; global batch "
              f"{run.global_batch} {'packs' if run.pack_length else 'rows'} = {bs} per device x "
              f"{accum} accumulation x {world} ranks")
    # What a checkpoint's data position means depends on these; resume refuses a change,
    # except of how the global batch is split (ckpt.check_run_shape).
    run.run_shape = {
        "world_size": world, "per_device_train_batch_size": bs,
        "gradient_accumulation_steps": accum, "seed": cfg.train.seed,
        "train_file": os.path.abspath(cfg.data.train_file), "train_rows": len(train_ds),
        "eval_fraction": cfg.data.eval_fraction, "group_by_length": cfg.data.group_by_length,
        "pack_length": run.pack_length,
    }


def check_packs(run: Run, lengths: list[int]) -> None:
    """Refuse data too small for one packed micro-batch on every rank; log what packing
    saves: the packs' fill against the padding of the same rows unpacked."""
    cfg, sampler = run.cfg, run.sampler
    if not sampler.steps_in(0):
        raise DataError(
            f"{cfg.data.train_file}: {len(lengths)} usable rows fill fewer than the {sampler.step_packs} packs of "
            f"{run.pack_length} tokens that one optimizer step needs (per_device_train_batch_size "
            f"{sampler.batch_size} x gradient_accumulation_steps {sampler.accumulation} x world size "
            f"{sampler.num_replicas}): lower data.pack_length or the batch size"
        )
    efficiency, used, left = sampler.efficiency(0)
    unpacked = [b for r in range(sampler.num_replicas)
                for b in ShardedBatchSampler(lengths, sampler.batch_size, sampler.num_replicas, r,
                                             cfg.train.seed).batches(0)]
    real = sum(lengths[i] for b in unpacked for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in unpacked)
    log(run.info, f"packing: epoch 0 packs {used} rows into {sampler.steps_in(0) * sampler.step_packs} rows of "
                  f"{run.pack_length} tokens, {efficiency:.1%} filled ({left} rows wait for the next epoch); "
                  f"unpacked, {1 - real / padded:.1%} of the batch would be padding")


@watchdog.at("setup/model", watch=False)
def build_model(run: Run) -> torch.nn.Module:
    """Freezing first: the plan keeps frozen and trainable weights in separate units
    (FSDP1 flattens a unit into one tensor, which has one requires_grad), and
    wrap_model refuses a plan that mixes them, naming the unit."""
    cfg, info = run.cfg, run.info
    model = load_model(cfg.model.path, info, cfg.model.attn_implementation, cfg.train.master_weights)
    log(info, f"best/ exports in {ckpt.export_dtype_name(cfg.train.export_dtype, cfg.model.path)} "
              f"(train.export_dtype={cfg.train.export_dtype})")
    apply_freezing(model, cfg.model)
    units = plan_units(model)
    log(info, format_plan(units, info.world_size, root_names=root_members(model, units),
                          param_bytes=MASTER_DTYPES[cfg.train.master_weights].itemsize))
    if cfg.train.master_weights == "bf16":
        log(info, "master weights and gradients in bf16; the optimizer writes its fp32 result back with "
                  + (f"stochastic rounding (keyed by seed {cfg.train.seed}, step, parameter, element)"
                     if cfg.train.stochastic_rounding else "round-to-nearest (updates below half the bf16 "
                                                           "spacing are lost)"))
    frozen = [p.name for p in PARTS if getattr(cfg.model, p.freeze_field)]
    run.flops_of = functools.partial(train_flops, model.config, frozen=frozen)
    model = wrap_model(model, units, cfg.fsdp, run.precision, info,
                       master=cfg.train.master_weights)  # SYNC (weights broadcast)
    log(info, BACKENDS[cfg.fsdp.backend].describe(cfg.fsdp, run.precision, cfg.train.master_weights))
    if cfg.fsdp.activation_checkpointing:
        ck = checkpoint_summary(units)
        log(info, f"activation checkpointing (non-reentrant) on {ck.wrapped} modules"
                  + (f"; {ck.skipped} skipped (frozen, no gradient flows through them)" if ck.skipped else ""))
    return model


@watchdog.at("setup/resume", watch=False)
def resume(run: Run) -> None:
    if not run.resume_path:
        return
    meta = ckpt.read_meta(run.resume_path)
    saved_shape = meta.get("run", {})
    ckpt.check_run_shape(run.resume_path, saved_shape, run.run_shape)
    t0 = time.perf_counter()
    ckpt.load_checkpoint(run.model, run.optimizer, run.resume_path, run.info, run.cfg.train.seed)  # SYNC
    run.state.load_state_dict(meta["train_state"])
    if "epoch_steps" not in meta["train_state"]:
        old_position(run, meta["train_state"], saved_shape)
    log(run.info, f"resumed from {run.resume_path} (step {run.state.step}, epoch {run.state.epoch}) "
                  f"in {time.perf_counter() - t0:.1f} s")
    if meta["world_size"] != run.info.world_size:
        ranks = f"{run.info.world_size} rank{'s' if run.info.world_size != 1 else ''}"
        log(run.info, f"resumed on {ranks} a run of {meta['world_size']}: global batch "
                      f"{ckpt.global_batch(saved_shape)} -> {ckpt.global_batch(run.run_shape)}; the same samples "
                      f"per step; each rank's RNG state derived from (seed {run.cfg.train.seed}, step "
                      f"{run.state.step}, rank), not restored")
        if run.cfg.train.optim == "hf_adafactor":
            log(run.info, "note: train.optim=hf_adafactor keeps and clips its state per flat shard, so its "
                          "updates depend on the world size: from here on they are those of this one")
    metric = run.cfg.train.metric_for_best
    if run.state.best_metric is not None and run.state.best_metric_name != metric:
        log(run.info, f"train.metric_for_best changed from {run.state.best_metric_name} to {metric}: the next "
                      f"eval's model replaces best/ (step {run.state.best_step}'s, best by the old metric)")
        run.state.best_metric = None
    run.state.best_metric_name = metric
    if run.state.step >= run.cfg.train.max_steps:
        log(run.info, f"step {run.state.step} >= train.max_steps={run.cfg.train.max_steps}: nothing left to train")


def old_position(run: Run, saved_state: dict, saved_shape: dict) -> None:
    """A checkpoint of ft before the world-size-independent data order counted the
    micro-batches each rank had consumed of its epoch (`epoch_batches`). With one
    micro-batch per step that count is the step count of today's order, which is the
    same order; with accumulation, old steps could straddle epochs and the order of the
    epoch differs, so the rest of this epoch may repeat or leave out a few rows."""
    batches, accum = saved_state.get("epoch_batches", 0), saved_shape.get("gradient_accumulation_steps", 1)
    steps = min(-(-batches // accum), run.sampler.steps_in(run.state.epoch))
    run.state.epoch_steps = steps
    if accum != 1 and batches:
        log(run.info, f"the checkpoint counts {batches} micro-batches of epoch {run.state.epoch} per rank (an "
                      f"older ft); continuing at its step {steps}: with accumulation the order of this epoch "
                      "changed since, so the rest of it may repeat or leave out a few rows")


# =====================================================================================
# One step
# =====================================================================================
def fetch_step(run: Run) -> tuple[list[Batch], DataError | None, int]:
    """The whole optimizer step's micro-batches, fetched first: the loss is divided by
    the label-token count of all of them on all ranks, known before any backward. A
    sample that fails to load (file gone since the data check) must not take down this
    rank alone: note it, keep fetching so every rank's position moves alike, and let
    all ranks decide together. Also returns how many samples the failed micro-batches
    held. The data position moves by one step (a global batch), whatever happens."""
    state, accum = run.state, run.cfg.train.gradient_accumulation_steps
    # Epoch boundary: reshuffle. `while`, not `if`: a packed epoch can come out one step
    # short of what the last one had, which for a dataset of one step an epoch is none
    # (the packing check at start-up saw epoch 0 only).
    while state.epoch_steps == run.sampler.steps_in(state.epoch):
        state.epoch += 1
        state.epoch_steps = 0
        run.sampler.set_position(state.epoch, 0)
        run.batches = iter(run.loader)
    micro, bad, unloaded = [], None, 0
    for i in range(accum):
        try:
            batch = next(run.batches)
            faults.hook("bad_sample", state.step + 1, run.info.rank)
            micro.append(batch)
        except DataError as e:
            bad = e
            unloaded += run.sampler.samples_in(state.epoch, state.epoch_steps * accum + i)
    state.epoch_steps += 1
    return micro, bad, unloaded


class StepCounts(NamedTuple):
    """A step's counts summed over all ranks (`agree`): the same numbers on every rank."""

    labels: float  # label tokens: the loss divisor
    tokens: float  # real tokens (text and image), padding excluded
    flops: float  # model FLOPs (ft.metrics.train_flops)
    samples: float  # samples (several per row when packed)
    rows: float  # rows of the batch tensors (packs when packed)
    slots: float  # token positions computed on: rows x row length, padding included
    bad: float  # ranks on which a sample failed to load
    stop: float  # ranks that got a stop signal

    def summable(self) -> dict:
        """The counts a `Meter` adds up over steps."""
        return {k: getattr(self, k) for k in ("labels", "tokens", "flops", "samples", "rows", "slots")}


def agree(run: Run, micro: list[Batch], bad: DataError | None, unloaded: int = 0) -> StepCounts:
    """The step's one all-reduce: its label-token, token, FLOP, sample and row counts
    over all ranks (samples include the `unloaded` ones of micro-batches that failed),
    and two flags every rank must agree on: "a sample failed to load", "a stop signal
    arrived". A collective."""
    stats = [b.stats for b in micro]
    counts = [
        sum(s.label_tokens for s in stats),
        sum(s.tokens for s in stats),
        sum(run.flops_of(s) for s in stats),
        sum(s.samples for s in stats) + unloaded,
        sum(s.rows for s in stats),
        sum(s.slots for s in stats),
        bad is not None,
        run.stop.signum != 0,
    ]
    if faults.fires("skip_collective", run.state.step + 1, run.info.rank):
        return StepCounts(*counts)  # a test's broken rank: the others wait in the all-reduce
    faults.hook("stall", run.state.step + 1, run.info.rank)
    faults.hook("freeze", run.state.step + 1, run.info.rank)
    with watchdog.at("step/agree"):
        return StepCounts(*dist.all_reduce_sum(counts, run.info.device))  # SYNC step/agree


def train_step(run: Run, micro: list[Batch], global_labels: float, t_start: float) -> dict | str:
    """Forward/backward over the micro-batches, clip, update. Returns the step's summed
    loss over all ranks, gradient norm, learning rate and timings, or, when the loss or
    the gradient is not finite on some rank, the reason to skip the step (nothing
    non-finite then reaches the weights or the optimizer). Collectives inside: FSDP's
    all-gathers and reduce-scatters, the clip's norm, the loss sum, the optimizer's."""
    cfg, info = run.cfg, run.info
    inputs = [to_device(b.inputs, info.device) for b in micro]
    t_data = clock(info)
    # FSDP averages gradients over ranks (divides by world size); multiplying back by it
    # makes the result the gradient of sum(token losses) / global_labels.
    scale = info.world_size / max(global_labels, 1.0)
    # No `no_sync()` across micro-batches: FSDP reduce-scatters after each backward and
    # keeps only sharded gradients, which is what lets large models accumulate at all
    # (no_sync would hold a full unsharded gradient copy).
    step_loss = torch.zeros((), dtype=torch.float64, device=info.device)
    for i, batch in enumerate(inputs):
        with watchdog.at(f"step/forward-backward {i}"):
            s, _ = loss_sum(run.model, batch, cfg.train.loss_chunk_size)  # SYNC step/forward-backward (all-gathers)
            s = faults.poison_loss(s, run.state.step + 1, info.rank)
            (s * scale).backward()  # SYNC step/forward-backward (reduce-scatters)
        step_loss += s.detach()
    del inputs, batch, s
    t_fwd_bwd = clock(info)

    # The summed loss is NaN/inf if any rank's is, and the norm is global: every rank
    # decides alike.
    with watchdog.at("step/clip"):
        grad_norm = clip_grad_norm(run.model, cfg.train.max_grad_norm)  # SYNC step/clip
    with watchdog.at("step/loss_sum"):
        (loss_total,) = dist.all_reduce_sum([float(step_loss)], info.device)  # SYNC step/loss_sum
    if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
        run.optimizer.zero_grad(set_to_none=True)
        return f"non-finite loss ({loss_total}) or gradient norm ({grad_norm})"
    lr_factor = lr_scale(run.state.step, cfg.train.max_steps, cfg.train.warmup_ratio)
    set_lr(run.optimizer, lr_factor)  # every group: its own base lr x the schedule
    with watchdog.at("step/optimizer"):
        run.optimizer.step()  # SYNC step/optimizer (ft's Adafactor: two all-reduces)
    run.optimizer.zero_grad(set_to_none=True)
    t_end = clock(info)
    return {
        "loss_sum": loss_total, "grad_norm": grad_norm, "lr": cfg.train.learning_rate * lr_factor,
        "timings": {"data_s": t_data - t_start, "fwd_bwd_s": t_fwd_bwd - t_data,
                    "optim_s": t_end - t_fwd_bwd, "step_s": t_end - t_start},
    }


def skip_bad_data(run: Run, bad: DataError | None, counts: StepCounts) -> None:
    """Some rank could not load a sample of this step: stop (on_bad_sample=error) or
    skip the step, on every rank alike."""
    step = run.state.step + 1
    if run.cfg.data.on_bad_sample == "error":
        if bad is not None:
            warn_all(run.info, f"step {step}: {bad}")
        raise DataError(f"step {step}: {int(counts.bad)} rank(s) could not load a sample "
                        "(the reason is printed above; data.on_bad_sample=skip would skip the step)")
    if bad is not None:
        warn_all(run.info, f"step {step} skipped (data.on_bad_sample=skip): {bad}")
    skip(run, "a sample could not be loaded", counts)


def skip(run: Run, why: str, counts: StepCounts) -> None:
    state, limit = run.state, run.cfg.train.max_skipped_steps
    state.skipped_steps += 1
    state.skipped_samples += int(counts.samples)
    state.skips_in_a_row += 1
    log(run.info, f"step {state.step + 1} skipped on all ranks: {why} "
                  f"({state.skips_in_a_row} in a row, limit train.max_skipped_steps={limit})")
    if state.skips_in_a_row >= limit:
        raise RuntimeError(
            f"{state.skips_in_a_row} steps in a row were skipped (last: {why}); stopping. "
            "The last checkpoint is intact: lower the learning rate or fix the data, then relaunch."
        )


# =====================================================================================
# Logging, eval, saving, the end
# =====================================================================================
def log_window(run: Run, result: dict) -> None:
    """One metrics record per logging window (the same steps on every rank: peak memory
    is a collective); on a terminal the progress bar shows it, in a log file one line."""
    window = run.meter.take_window()
    rec = {
        "step": run.state.step,
        "loss": window["loss_sum"] / max(window["labels"], 1.0),
        "lr": result["lr"],
        "grad_norm": result["grad_norm"],
        **Meter.rates(window, run.info.world_size, run.peak, run.pack_length),
        **peak_memory(run.info),  # SYNC
        "skipped_steps": run.state.skipped_steps,
    }
    if run.tracker:
        run.tracker.log(rec)
    if not run.info.is_main:
        return
    shown = {"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}", "grad_norm": f"{rec['grad_norm']:.3g}",
             "tok_s_dev": f"{rec['tokens_per_s_per_device']:.0f}"}
    if "mfu" in rec:
        shown["mfu"] = f"{rec['mfu']:.1%}"
    if run.bar is not None:
        run.bar.set_postfix(shown)
    elif time.monotonic() - run.last_line >= PROGRESS_LINE_S or run.state.step == run.cfg.train.max_steps:
        run.last_line = time.monotonic()
        log(run.info, f"step {run.state.step}/{run.cfg.train.max_steps}: "
                      + ", ".join(f"{k} {v}" for k, v in shown.items())
                      + f", step_time_s {rec['step_time_s']:.3g}")


PROGRESS_LINE_S = 30.0
"""Without a terminal (a batch job's log file) a progress line at most this often."""


def progress_bar(run: Run) -> tqdm | None:
    """A tqdm bar on rank 0 when stderr is a terminal; None in a log file, where
    `log_window` prints plain lines instead of bar frames."""
    if not run.info.is_main or not sys.stderr.isatty():
        return None
    return tqdm(total=run.cfg.train.max_steps, initial=run.state.step, desc="train", dynamic_ncols=True)


BEST = {"eval_loss": min, "eval_token_accuracy": max}
"""Each `train.metric_for_best` choice, and which of two values is the better."""


def eval_and_export(run: Run) -> None:
    state, cfg = run.state, run.cfg
    metrics = evaluate(run.model, run.eval_ds, run.collator, eval_plan(run),  # SYNC eval/...
                       cfg.train.dataloader_num_workers, cfg.train.loss_chunk_size, cfg.data.on_bad_sample,
                       run.info)
    state.last_eval_step = state.step
    name = cfg.train.metric_for_best
    value = metrics[name]
    improved = state.best_metric is None or BEST[name](value, state.best_metric) != state.best_metric
    if improved:
        state.best_metric, state.best_metric_name, state.best_step = value, name, state.step
        with watchdog.at("eval/export"):
            ckpt.export_hf(run.model, run.best_dir, cfg.model.path, run.info,  # SYNC eval/export
                           {"step": state.step, **metrics}, training_settings(cfg.data), cfg.train.export_dtype)
    if run.tracker:
        run.tracker.log({"step": state.step, **metrics})
    log(run.info, f"step {state.step}: eval_loss {metrics['eval_loss']:.4f}, eval_token_accuracy "
                  f"{metrics['eval_token_accuracy']:.4f}" + (f" (best {name}, exported)" if improved else ""))


def save(run: Run, reason: str = "") -> None:
    t0 = time.perf_counter()
    meta = {"train_state": run.state.state_dict(), "run": run.run_shape}
    with watchdog.at("save/checkpoint"):
        path = ckpt.save_checkpoint(run.model, run.optimizer, meta, run.out, run.info,  # SYNC save/checkpoint
                                    run.cfg.train.keep_last_n)
    log(run.info, f"step {run.state.step}: checkpoint saved to {path} in {time.perf_counter() - t0:.1f} s{reason}")


def finish(run: Run, stopped: bool) -> None:
    """A last eval if the last step had none (or the final export without an eval set),
    the best model, the throughput summary."""
    state, info = run.state, run.info
    if run.bar is not None:
        run.bar.close()
    if stopped:
        log(info, f"stopped at step {state.step} by a signal; the checkpoint above resumes it")
    elif run.eval_ds is not None:
        if state.last_eval_step != state.step:
            eval_and_export(run)  # SYNC
        log(info, f"best model: step {state.best_step}, {state.best_metric_name} {state.best_metric:.4f} -> "
                  f"{os.path.abspath(run.best_dir)}")
    else:
        with watchdog.at("finish/export"):
            ckpt.export_hf(run.model, run.best_dir, run.cfg.model.path, info,  # SYNC finish/export
                           {"step": state.step, "eval_loss": None, "eval_token_accuracy": None},
                           training_settings(run.cfg.data), run.cfg.train.export_dtype)
        log(info, f"no eval set: exported the final model (step {state.step}) -> {os.path.abspath(run.best_dir)}")
    totals = run.meter.totals
    if totals["steps"]:
        rates = Meter.rates(totals, info.world_size, run.peak, run.pack_length)
        summary = {f"avg_{k}": v for k, v in rates.items()}
        summary.update(peak_memory(info))  # SYNC
        if run.tracker:
            run.tracker.log({"step": state.step, "summary": True,
                             "warmup_steps": run.cfg.train.metrics_warmup_steps, **summary})
        log(info, "throughput after warm-up: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
    if state.skipped_steps:
        log(info, f"skipped {state.skipped_steps} step(s) ({state.skipped_samples} samples) in all")
    if run.tracker:
        run.tracker.close()


def eval_plan(run: Run) -> tuple[list, int, int]:
    """This rank's eval batches (row indices, or packs of them), how many of them are
    real, and how many forwards every rank runs: the most any rank has. Padded, each
    rank takes every world_size-th row; packed, all rows are packed and the packs dealt
    to the ranks evening out tokens. A rank with no rows gets row 0 to run, uncounted."""
    bs, info = run.cfg.train.per_device_eval_batch_size, run.info
    if run.pack_length:
        batches, n_batches = eval_batches(run.eval_lengths, run.pack_length, bs, info.world_size, info.rank)
        return batches or [[[0]]], len(batches), n_batches
    local = list(range(info.rank, len(run.eval_ds), info.world_size))
    n_batches = math.ceil(math.ceil(len(run.eval_ds) / info.world_size) / bs)  # rank 0's count
    batches = [local[i:i + bs] for i in range(0, len(local), bs)]
    return batches or [[0]], len(batches), n_batches


@torch.no_grad()
def evaluate(model, eval_ds, collator, plan: tuple[list, int, int], num_workers: int, chunk_size: int,
             on_bad_sample: str, info: dist.DistInfo) -> dict[str, float]:
    """``eval_loss`` (token-weighted cross-entropy) and ``eval_token_accuracy`` (label
    tokens whose argmax prediction is the label, over all label tokens) over the whole
    eval set, identical on every rank, from one forward per batch. A collective.

    `plan` is `eval_plan`'s. Ranks may have fewer batches than others, yet every rank
    must run as many forwards (each is a series of FSDP all-gathers): the short ranks
    repeat a batch they have and leave it out of the sum. A batch that fails to load (a
    file gone since the data check) is replaced the same way, and all ranks then stop
    together (on_bad_sample=error) or go on without it.
    """
    model.eval()
    batches, n_real, n_batches = plan
    loader = DataLoader(eval_ds, batch_sampler=batches, collate_fn=collator, num_workers=num_workers)
    total, count, right, n_bad, inputs = 0.0, 0, 0, 0, None
    it = iter(loader)
    for i in range(n_batches):
        real = i < n_real
        if real or inputs is None:  # a rank with no eval rows at all still needs a batch
            while True:
                try:
                    batch = next(it)
                    faults.hook("bad_eval", i, info.rank)
                    inputs = to_device(batch.inputs, info.device)
                    break
                except StopIteration:  # a bad batch earlier left this rank one short
                    real = False
                    break
                except DataError as e:
                    warn_all(info, f"eval: {e}")
                    n_bad += 1
                    if inputs is not None:  # repeat the last good batch, uncounted
                        real = False
                        break
        with watchdog.at(f"eval/forward {i}"):
            s, n, c = loss_sum_and_correct(model, inputs, chunk_size)  # SYNC eval/forward (FSDP all-gathers inside)
        if real:
            total += s.item()
            count += n
            right += int(c)
    with watchdog.at("eval/sum"):
        total, count, right, n_bad = dist.all_reduce_sum([total, count, right, n_bad], info.device)  # SYNC eval/sum
    if n_bad and on_bad_sample == "error":
        raise DataError(f"eval: {int(n_bad)} batch(es) could not be loaded (the reasons are printed above; "
                        "data.on_bad_sample=skip would leave them out)")
    model.train()
    return {"eval_loss": total / max(count, 1), "eval_token_accuracy": right / max(count, 1)}


# =====================================================================================
# Small helpers
# =====================================================================================
def log(info: dist.DistInfo, msg: str) -> None:
    if info.is_main:
        tqdm.write(f"[ft] {msg}", file=sys.stdout)


def warn_all(info: dist.DistInfo, msg: str) -> None:
    """A message from whichever rank has it (log() prints on rank 0 only)."""
    tqdm.write(f"[ft rank {info.rank}] {msg}", file=sys.stderr)


def clock(info: dist.DistInfo) -> float:
    """Wall time for the step split. On GPU, wait for queued kernels first (a sync
    point, three per step), or the time of one phase would be billed to the next."""
    if info.on_gpu:
        torch.cuda.synchronize(info.device)
    return time.perf_counter()


def peak_memory(info: dist.DistInfo) -> dict:
    """The highest peak over all ranks of each memory figure of ft.metrics.memory_stats."""
    stats = memory_stats(info.device)
    with watchdog.at("peak_memory"):
        return dict(zip(stats, dist.all_reduce_max(list(stats.values()), info.device)))  # SYNC peak_memory


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (flash-attention's max_length_q/k are ints)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# =====================================================================================
# Entry point: refusals are printed once and not retried
# =====================================================================================
class Refused(RuntimeError):
    """An earlier attempt of this job refused it; this attempt stops with its message."""


# The same on every rank, and not fixed by a restart: bad config, data, plan or checkpoint.
REFUSALS = {ConfigError: "config error", DataError: "data error", MissingDependency: "missing dependency",
            ResumeError: "cannot resume",
            CheckpointMismatch: "cannot resume", WrapPlanError: "wrap plan error"}


def refuse(message: str) -> None:
    """Print a refusal once (rank 0) and end this process so that it is not retried:
    torchrun restarts a group whose worker exits non-zero, so under launch.sh (which
    sets FT_EXIT_FILE) the workers exit 0 and launch.sh exits 2 after reading the file;
    under a bare torchrun the message also goes to its store, and a restarted attempt
    stops at once with it (`setup`). Exits 2 otherwise."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
        exit_file = os.environ.get("FT_EXIT_FILE")
        if exit_file:
            with open(exit_file, "w") as f:
                f.write(message + "\n")
        dist.record_refusal(message)
    dist.barrier()  # SYNC: rank 0 has written before any rank exits (torchrun then kills the rest)
    dist.cleanup()
    sys.exit(0 if os.environ.get("FT_EXIT_FILE") else 2)


@record  # torchrun then prints the failing rank's traceback in its summary
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    config_path = argv[0] if argv and "=" not in argv[0] else None
    refusal = None
    try:
        # check_model: a missing model.path is refused before anything is created
        train(load_config(config_path, argv[1:] if config_path else argv, check_model=True))
    except Refused as e:
        refusal = str(e)
    except tuple(REFUSALS) as e:
        kind = next(v for k, v in REFUSALS.items() if isinstance(e, k))
        refusal = f"ft: {kind}: {e}"
    # Out here, not in the except blocks: the traceback (and the model its frames hold)
    # is gone, so `dist.cleanup` can take the process group down while Python runs.
    watchdog.stop()
    if refusal:
        refuse(refusal)
    dist.cleanup()


if __name__ == "__main__":
    main()
