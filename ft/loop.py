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

A reader follows a whole step, its skips, logs, eval and save here; what they call lives
in library modules (`ft.trainloader`, `ft.progress`, `ft.evaluation`, `ft.ckpt`, `ft.moe`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.errors import record
from transformers.utils import logging as hf_logging

from ft import ckpt, dist, faults, sequence, watchdog
from ft.backends import BACKENDS
from ft.ckpt import CheckpointMismatch, ResumeError, TrainState
from ft.config import ConfigError
from ft.config_load import config_to_dict, load_config, save_config
from ft.collate import Batch
from ft.evaluation import eval_plan, evaluate, export_model, improves
from ft.families import FamilyError
from ft.fsdp_wrap import checkpoint_summary, format_plan, plan_units, root_members, wrap_model
from ft.metrics import train_flops
from ft.model import load_model, loss_sum, to_device
from ft.moe import Balancer, balancer_for, tap_routers
from ft.optim import build_optimizer, clip_grad_norm, lr_scale, set_lr
from ft.parts import PARTS, WrapPlanError, apply_freezing, param_groups
from ft.deps import MissingDependency
from ft.progress import Progress, clock, log, warn_all
from ft.rounding import MASTER_DTYPES
from ft.rows import DataError
from ft.trainloader import TrainData, build_data, packed_length, prepare_processor
from ft.track import Tracker

USAGE = "usage: python -m ft.loop [CONFIG.yaml] [section.key=value ...]"

# FSDP1's state-dict code warns on every save about its own internals (ShardedTensor,
# _get_pg_default_device); users can do nothing about them and they bury the log.
for _pattern in (".*ShardedTensor.*", ".*_get_pg_default_device.*", ".*Multiple backends are registered.*"):
    warnings.filterwarnings("ignore", message=_pattern)
# FSDP2 warns that a unit returned a view an in-place op could detach from its hook: the
# patch embedding's `.view` (Qwen3-VL's tower unit) and the root's empty logits slice,
# neither modified in place (the equivalence tests would see it).
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w+(Patch\w+|VisionModel|ForConditional"
                                          r"Generation)\) returned a view tensor")


# =====================================================================================
# Loop state
# =====================================================================================
class StopRequest:
    """The SIGTERM (preemption; launch.sh forwards it) and SIGUSR1 (SLURM's warning)
    handler: finish the step, checkpoint, exit 0. It only sets a flag, agreed on in the
    step's all-reduce. Not a closure over the `Run`: the interpreter keeps signal
    handlers to its end, and one holding the model would keep the process group alive
    into shutdown (see `dist.cleanup`)."""

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
    data: TrainData | None = None  # datasets, collator, sampler, loader, run shape
    batches: object = None  # the iterator over `data.loader` for the current epoch
    # model, optimizer, metrics
    model: torch.nn.Module | None = None
    flops_of: object = None  # BatchStats -> training FLOPs of this model (frozen parts known)
    balancer: Balancer | None = None  # the MoE load-balancing loss; None: dense, or its weight is 0
    optimizer: torch.optim.Optimizer | None = None
    progress: Progress | None = None

    @property
    def out(self) -> str:
        return self.cfg.train.output_dir

    @property
    def best_dir(self) -> str:
        return os.path.join(self.cfg.train.output_dir, "best")

    @property
    def pack_length(self) -> int:
        """Tokens per packed row; 0 when not packing."""
        return packed_length(self.cfg.data)


# =====================================================================================
# The table of contents
# =====================================================================================
def train(cfg) -> None:
    run = setup(cfg)  # SYNC: process group, signals, run folder, seeds
    # ---- data, checked row by row before any weight is read (it needs the processor only)
    processor = prepare_processor(cfg, run.info)  # SYNC (the tiny demo model is built once per node)
    run.data = build_data(cfg, run.info, processor)  # SYNC setup/data (the ranks share the row check)
    # ---- model: rank 0 reads the weights; freeze, plan, wrap (root last), checkpointing
    run.model = build_model(run)  # SYNC setup/model (rank 0's weights broadcast)
    run.balancer = balancer_for(run.model, cfg.train, run.info, lambda m: log(run.info, m))  # MoE only
    # ---- optimizer: FSDP's flat shards, one group per trainable part and its own lr
    run.optimizer = build_optimizer(param_groups(run.model, cfg.train), cfg.train, model=run.model)
    # ---- resume: weights, optimizer state, train state, data position, RNG
    resume(run)  # SYNC setup/resume
    tracker = Tracker(run.out, cfg.wandb, config_to_dict(cfg),
                      cfg.wandb.run_name or os.path.basename(os.path.abspath(run.out)),
                      resume_step=run.state.step if run.resume_path else None) if run.info.is_main else None
    run.progress = Progress(run.info, cfg.train, run.pack_length, run.state.step, tracker)
    state, stopped = run.state, False
    run.data.sampler.set_position(state.epoch, state.epoch_steps)
    run.batches = iter(run.data.loader)
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
            if result.skipped:
                skip(run, result.skipped, counts)
            else:
                state.step += 1
                state.skips_in_a_row = 0
                state.tokens_seen += int(counts.tokens)
                run.progress.step_done(result.loss_sum, counts.summable(), result.timings, result.moe)
                faults.hook("crash", state.step, run.info.rank)
                if state.step % cfg.train.logging_steps == 0 or state.step == cfg.train.max_steps:
                    run.progress.log_window(state.step, state.skipped_steps,  # SYNC (peak memory over ranks)
                                            result.lr, result.grad_norm)
                if run.data.eval_ds is not None and cfg.train.eval_steps and state.step % cfg.train.eval_steps == 0:
                    eval_and_export(run)  # SYNC
                if cfg.train.save_steps and state.step % cfg.train.save_steps == 0:
                    write_checkpoint(run)  # SYNC
                    saved = True
        # ---- a stop signal reached some rank before this step: all ranks stop here
        if counts.stop:
            if not saved:
                write_checkpoint(run, " (stop signal; relaunch to continue)")  # SYNC
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
        raise RunRefused(earlier)
    refusals = BACKENDS[cfg.fsdp.backend].config_refusals(cfg)  # before anything is read or written
    if refusals:
        raise ConfigError("; ".join(refusals))
    hf_logging.disable_progress_bar()  # per-rank "Loading weights" bars: noise under torchrun
    info = sequence.grouped(info, cfg.parallel.sequence_parallel_size)
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
    log(info, sequence.apply(model, info, cfg.model.attn_implementation))  # SYNC (its groups); "" when off
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
    ckpt.check_run_shape(run.resume_path, saved_shape, run.data.run_shape)
    t0 = time.perf_counter()
    ckpt.load_checkpoint(run.model, run.optimizer, run.resume_path, run.info, run.cfg.train.seed)  # SYNC
    run.state.load_state_dict(meta["train_state"])
    log(run.info, f"resumed from {run.resume_path} (step {run.state.step}, epoch {run.state.epoch}) "
                  f"in {time.perf_counter() - t0:.1f} s")
    if meta["world_size"] != run.info.world_size:
        ranks = f"{run.info.world_size} rank{'s' if run.info.world_size != 1 else ''}"
        log(run.info, f"resumed on {ranks} a run of {meta['world_size']}: global batch "
                      f"{ckpt.global_batch(saved_shape)} -> {ckpt.global_batch(run.data.run_shape)}; the same samples "
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
    while state.epoch_steps == run.data.sampler.steps_in(state.epoch):
        state.epoch += 1
        state.epoch_steps = 0
        run.data.sampler.set_position(state.epoch, 0)
        run.batches = iter(run.data.loader)
    micro, bad, unloaded = [], None, 0
    for i in range(accum):
        try:
            batch = next(run.batches)
            faults.hook("bad_sample", state.step + 1, run.info.rank)
            micro.append(batch)
        except DataError as e:
            bad = e
            unloaded += run.data.sampler.samples_in(state.epoch, state.epoch_steps * accum + i)
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
    # A sequence-parallel group's ranks hold the same micro-batches: one of them counts.
    counted = run.info.sequence_index == 0
    stats = [b.stats for b in micro] if counted else []
    counts = [
        sum(s.label_tokens for s in stats),
        sum(s.tokens for s in stats),
        sum(run.flops_of(s) for s in stats),
        sum(s.samples for s in stats) + unloaded * counted,
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


@dataclass
class StepResult:
    """What `train_step` returns: the step's summed loss over all ranks, gradient norm,
    learning rate and timings; or, in `skipped`, why the step was skipped ("" when it
    ran)."""

    loss_sum: float = 0.0
    grad_norm: float = 0.0
    lr: float = 0.0
    timings: dict = field(default_factory=dict)
    skipped: str = ""
    moe: tuple | None = None  # (the step's load-balancing loss, its [layers, experts] routing counts)


def train_step(run: Run, micro: list[Batch], global_labels: float, t_start: float) -> StepResult:
    """Forward/backward over the micro-batches, clip, update; when the loss or the
    gradient is not finite on some rank, the step is skipped with its reason (nothing
    non-finite then reaches the weights or the optimizer). Collectives inside: FSDP's
    all-gathers and reduce-scatters, the MoE routing counts', the clip's norm, the loss
    sum, the optimizer's."""
    cfg, info = run.cfg, run.info
    inputs = [to_device(b.inputs, info.device) for b in micro]
    real = [b.real.to(info.device) for b in micro] if run.balancer else [None] * len(micro)
    t_data = clock(info)
    if run.balancer and len(inputs) > 1:
        # SYNC step/route-count (forwards), step/route (the counts' sum)
        run.balancer.counting_pass(run.model, inputs, real, cfg.train.loss_chunk_size)
    # FSDP averages gradients over ranks (divides by world size); multiplying back by it
    # makes the result the gradient of sum(token losses) / global_labels.
    scale = info.world_size / max(global_labels, 1.0)
    # No `no_sync()` across micro-batches: FSDP reduce-scatters after each backward and
    # keeps only sharded gradients, which is what lets large models accumulate at all
    # (no_sync would hold a full unsharded gradient copy).
    step_loss = torch.zeros((), dtype=torch.float64, device=info.device)
    step_aux = torch.zeros((), dtype=torch.float64, device=info.device)
    for i, batch in enumerate(inputs):
        s, aux = forward_backward(run, batch, real[i], scale, i, len(inputs))  # SYNC step/forward-backward
        step_loss += s
        step_aux += aux
    del inputs, batch, s
    t_fwd_bwd = clock(info)

    # The summed loss is NaN/inf if any rank's is, and the norm is global: every rank
    # decides alike.
    with watchdog.at("step/clip"):
        grad_norm = clip_grad_norm(run.model, cfg.train.max_grad_norm)  # SYNC step/clip
    with watchdog.at("step/loss_sum"):
        loss_total, aux_total = dist.all_reduce_sum([float(step_loss), float(step_aux)],  # SYNC step/loss_sum
                                                    info.device)
    if not (math.isfinite(loss_total) and math.isfinite(aux_total) and math.isfinite(grad_norm)):
        run.optimizer.zero_grad(set_to_none=True)
        return StepResult(skipped=f"non-finite loss ({loss_total}, MoE balance {aux_total}) or gradient norm "
                                  f"({grad_norm})")
    lr_factor = lr_scale(run.state.step, cfg.train.max_steps, cfg.train.warmup_ratio)
    set_lr(run.optimizer, lr_factor)  # every group: its own base lr x the schedule
    with watchdog.at("step/optimizer"):
        run.optimizer.step()  # SYNC step/optimizer (ft's Adafactor: two all-reduces)
    run.optimizer.zero_grad(set_to_none=True)
    t_end = clock(info)
    return StepResult(loss_total, grad_norm, cfg.train.learning_rate * lr_factor,
                      {"data_s": t_data - t_start, "fwd_bwd_s": t_fwd_bwd - t_data,
                       "optim_s": t_end - t_fwd_bwd, "step_s": t_end - t_start},
                      moe=(aux_total, run.balancer.counts) if run.balancer else None)


def forward_backward(run: Run, batch: dict, real, scale: float, i: int, micro_batches: int):
    """One micro-batch's forward and backward: returns its summed token loss and (MoE)
    its share of the step's load-balancing loss, detached (0 for a dense model). With
    one micro-batch per rank, the routing counts are summed over the ranks between its
    forward and its backward; with more, `Balancer.counting_pass` summed them before."""
    cfg, info, balancer = run.cfg, run.info, run.balancer
    aux = torch.zeros((), device=info.device)
    with watchdog.at(f"step/forward-backward {i}"):
        with tap_routers(run.model, real) if balancer else contextlib.nullcontext() as routed:
            s, _ = loss_sum(run.model, batch, cfg.train.loss_chunk_size)  # SYNC step/forward-backward (all-gathers)
        s = faults.poison_loss(s, run.state.step + 1, info.rank)
        total = s * scale
        if balancer:
            if micro_batches == 1:
                with watchdog.at("step/route"):
                    balancer.agree([routed[0].counts])  # SYNC step/route
            aux = balancer.loss(routed[0])
            # FSDP averages over ranks: x world size, as for the token loss.
            total = total + aux * (balancer.coef * info.world_size)
        total.backward()  # SYNC step/forward-backward (reduce-scatters)
    return s.detach(), aux.detach()


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
# Eval, saving, the end
# =====================================================================================
def eval_and_export(run: Run) -> None:
    state, cfg, data = run.state, run.cfg, run.data
    plan = eval_plan(len(data.eval_ds), data.eval_lengths, run.pack_length, cfg.train.per_device_eval_batch_size,
                     run.info)
    metrics = evaluate(run.model, data.eval_ds, data.collator, plan,  # SYNC eval/...
                       cfg.train.dataloader_num_workers, cfg.train.loss_chunk_size, cfg.data.on_bad_sample,
                       run.info)
    state.last_eval_step = state.step
    name = cfg.train.metric_for_best
    improved = improves(name, metrics[name], state.best_metric)
    if improved:
        state.best_metric, state.best_metric_name, state.best_step = metrics[name], name, state.step
        export_model(run.model, run.best_dir, cfg, run.info, {"step": state.step, **metrics},  # SYNC eval/export
                     "eval/export")
    run.progress.record({"step": state.step, **metrics})
    log(run.info, f"step {state.step}: eval_loss {metrics['eval_loss']:.4f}, eval_token_accuracy "
                  f"{metrics['eval_token_accuracy']:.4f}" + (f" (best {name}, exported)" if improved else ""))


def write_checkpoint(run: Run, reason: str = "") -> None:
    t0 = time.perf_counter()
    meta = {"train_state": run.state.state_dict(), "run": run.data.run_shape}
    with watchdog.at("save/checkpoint"):
        path = ckpt.save_checkpoint(run.model, run.optimizer, meta, run.out, run.info,  # SYNC save/checkpoint
                                    run.cfg.train.keep_last_n)
    log(run.info, f"step {run.state.step}: checkpoint saved to {path} in {time.perf_counter() - t0:.1f} s{reason}")


def finish(run: Run, stopped: bool) -> None:
    """A last eval if the last step had none (or the final export without an eval set),
    the best model, the throughput summary."""
    state, info = run.state, run.info
    run.progress.close_bar()
    if stopped:
        log(info, f"stopped at step {state.step} by a signal; the checkpoint above resumes it")
    elif run.data.eval_ds is not None:
        if state.last_eval_step != state.step:
            eval_and_export(run)  # SYNC
        log(info, f"best model: step {state.best_step}, {state.best_metric_name} {state.best_metric:.4f} -> "
                  f"{os.path.abspath(run.best_dir)}")
    else:
        export_model(run.model, run.best_dir, run.cfg, info,  # SYNC finish/export
                     {"step": state.step, "eval_loss": None, "eval_token_accuracy": None}, "finish/export")
        log(info, f"no eval set: exported the final model (step {state.step}) -> {os.path.abspath(run.best_dir)}")
    run.progress.summary(state.step)  # SYNC (peak memory over ranks)
    if state.skipped_steps:
        log(info, f"skipped {state.skipped_steps} step(s) ({state.skipped_samples} samples) in all")
    run.progress.close()


# =====================================================================================
# Entry point: refusals are printed once and not retried
# =====================================================================================
class RunRefused(RuntimeError):
    """An earlier attempt of this job refused it; this attempt stops with its message."""


# The same on every rank, and not fixed by a restart: bad config, data, plan or checkpoint.
REFUSALS = {ConfigError: "config error", DataError: "data error", MissingDependency: "missing dependency",
            ResumeError: "cannot resume", FamilyError: "model family",
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
    except RunRefused as e:
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
    try:
        main()
    finally:
        # The process ends here. Its teardown would otherwise walk every object that
        # importing torch and transformers made, in the interpreter's last garbage
        # collections: about 1 s per process (measured on CPU). Frozen objects are skipped;
        # atexit handlers and flushing still run.
        gc.freeze()
