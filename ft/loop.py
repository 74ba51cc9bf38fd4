"""ft's training loop, top to bottom: config, model, data, sharding, optimizer, the
step, eval, saves. Run it with torchrun (see launch.sh):

    torchrun --nproc-per-node 2 -m ft.loop configs/demo.yaml train.max_steps=10

Every rank runs this same file. Lines marked SYNC are collectives: every rank must reach
them in the same order, or the job hangs (NCCL) or aborts (gloo). Nothing between two
SYNC lines may depend on data that differs between ranks in a way that changes which
collectives run — that is why eval pads ranks to the same number of batches and why the
collator gives an image-less batch a dummy image.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from ft import ckpt, dist
from ft.config import ConfigError, config_to_dict, load_config, save_config
from ft.data import build_datasets, Collator, DataError, validate
from ft.fsdp_wrap import (
    PARTS,
    apply_checkpointing,
    apply_freezing,
    format_plan,
    param_groups,
    plan_units,
    root_members,
    wrap_model,
)
from ft.metrics import batch_stats, memory_stats, mfu, peak_flops, train_flops
from ft.model import load_model, loss_sum
from ft.optim import build_optimizer, clip_grad_norm, lr_scale, set_lr
from ft.processor import load_processor
from ft.sampler import ShardedBatchSampler
from ft.track import Tracker

USAGE = "usage: python -m ft.loop [CONFIG.yaml] [section.key=value ...]"

# FSDP1's state-dict code warns on every save about its own internals (ShardedTensor,
# _get_pg_default_device); users can do nothing about them and they bury the log.
for _pattern in (".*ShardedTensor.*", ".*_get_pg_default_device.*", ".*Multiple backends are registered.*"):
    warnings.filterwarnings("ignore", message=_pattern)


# -------------------------------------------------------------------------------------
# Loop state: everything that changes as training advances and is not a tensor.
# -------------------------------------------------------------------------------------
@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped steps not counted)
    epoch: int = 0  # current pass over the training set
    epoch_batches: int = 0  # micro-batches each rank has consumed in this epoch
    samples_seen: int = 0  # all ranks, skipped ones included
    tokens_seen: int = 0  # real (non-pad) tokens trained on, all ranks
    best_eval_loss: float | None = None
    best_step: int | None = None
    last_eval_step: int | None = None
    skipped_steps: int = 0  # non-finite loss/gradient, or a bad sample under on_bad_sample=skip
    skipped_samples: int = 0  # samples dropped in those steps
    skips_in_a_row: int = 0  # stops the job at train.max_skipped_steps

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


def log(info: dist.DistInfo, msg: str) -> None:
    if info.is_main:
        tqdm.write(f"[ft] {msg}", file=sys.stdout)


def resolve_precision(precision: str, info: dist.DistInfo) -> str:
    # bf16 matmuls are ~6x slower than fp32 on CPU (FACTS.md): "auto" only uses them on GPU.
    if precision == "auto":
        return "bf16" if info.on_gpu else "fp32"
    return precision


def clock(info: dist.DistInfo) -> float:
    """Wall time for the step split. On GPU, wait for queued kernels first (a sync
    point, three per step), or the time of one phase would be billed to the next."""
    if info.on_gpu:
        torch.cuda.synchronize(info.device)
    return time.perf_counter()


def new_window() -> dict:
    """Sums over optimizer steps, for a logging window or the end-of-run averages."""
    return dict.fromkeys(("steps", "loss_sum", "labels", "tokens", "flops",
                          "data_s", "fwd_bwd_s", "optim_s", "step_s"), 0.0)


def throughput(w: dict, world: int, peak: float | None) -> dict:
    """Per-step means and rates of a window: tokens are real (non-pad) text and image
    tokens of all ranks; MFU is model FLOPs (ft.metrics conventions) per device over
    the device's bf16 peak, only where that peak is known (never on CPU)."""
    n, dt = max(w["steps"], 1.0), max(w["step_s"], 1e-9)
    out = {
        "tokens_per_s": w["tokens"] / dt,
        "tokens_per_s_per_device": w["tokens"] / dt / world,
        "step_time_s": w["step_s"] / n,
        "data_s": w["data_s"] / n,
        "fwd_bwd_s": w["fwd_bwd_s"] / n,
        "optim_s": w["optim_s"] / n,
    }
    if peak:
        out["mfu"] = mfu(w["flops"] / world, dt, peak)
    return out


def peak_memory(info: dist.DistInfo) -> dict:
    """The highest peak over all ranks of each memory figure of ft.metrics.memory_stats."""
    stats = memory_stats(info.device)
    return dict(zip(stats, dist.all_reduce_max(list(stats.values()), info.device)))  # SYNC


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, eval_ds, collator, batch_size: int, num_workers: int, chunk_size: int,
             on_bad_sample: str, info: dist.DistInfo) -> float:
    """Token-weighted loss over the whole eval set, identical on every rank.

    Each rank takes every world_size-th row. Ranks may end up with one batch fewer than
    rank 0, yet every rank must run as many forwards (each is a series of FSDP
    all-gathers): the short ranks repeat a batch they have and leave it out of the sum.
    A batch that fails to load (a file gone since the data check) is replaced the same
    way, and all ranks then stop together (on_bad_sample=error) or go on without it.
    """
    model.eval()
    local = list(range(info.rank, len(eval_ds), info.world_size))
    n_batches = math.ceil(math.ceil(len(eval_ds) / info.world_size) / batch_size)  # rank 0's count
    loader = DataLoader(
        torch.utils.data.Subset(eval_ds, local or [0]),
        batch_size=batch_size, collate_fn=collator, num_workers=num_workers,
    )
    total, count, n_bad, inputs = 0.0, 0, 0, None
    it = iter(loader)
    for i in range(n_batches):
        real = i * batch_size < len(local)
        if real or inputs is None:  # a rank with no eval rows at all still needs a batch
            while True:
                try:
                    batch = next(it)
                    if test_fault("bad_eval", i, info):
                        raise DataError("test fault: stands for an eval sample deleted after the data check")
                    inputs = to_device({k: v for k, v in batch.items() if k != "num_real_tokens"}, info.device)
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
        s, n = loss_sum(model, inputs, chunk_size)  # SYNC (FSDP all-gathers inside)
        if real:
            total += s.item()
            count += n
    total, count, n_bad = dist.all_reduce_sum([total, count, n_bad], info.device)  # SYNC
    if n_bad and on_bad_sample == "error":
        raise DataError(f"eval: {int(n_bad)} batch(es) could not be loaded (the reasons are printed above; "
                        "data.on_bad_sample=skip would leave them out)")
    model.train()
    return total / max(count, 1)


# -------------------------------------------------------------------------------------
# Resume decisions, skipped steps, test-only faults
# -------------------------------------------------------------------------------------
# What a previous run leaves in output_dir; `resume=none` refuses to mix with it.
RUN_OUTPUTS = ("checkpoints", "best", "metrics.jsonl", "wandb", "wandb_run_id")


def find_resume_checkpoint(train_cfg, out: str, info: dist.DistInfo) -> str | None:
    """The checkpoint this run continues from (None: start fresh), per `train.resume`.
    Every rank decides the same from the same files; rank 0 alone deletes anything."""
    mode = train_cfg.resume
    if mode == "none":
        leftovers = [n for n in RUN_OUTPUTS if os.path.exists(os.path.join(out, n))]
        if leftovers and not train_cfg.overwrite_output_dir:
            raise ResumeError(
                f"train.resume=none but {out} already holds a run ({', '.join(leftovers)}). "
                "Use train.resume=auto to continue it, train.overwrite_output_dir=true to "
                "delete it and start over, or another train.output_dir."
            )
        dist.barrier()  # SYNC: every rank has looked before rank 0 deletes
        if leftovers and info.is_main:
            for name in leftovers:
                path = os.path.join(out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            log(info, f"train.overwrite_output_dir: deleted {', '.join(leftovers)} in {out}")
        return None
    if mode != "auto":  # a given checkpoint folder
        if not os.path.isdir(mode):
            raise ResumeError(f"train.resume={mode}: no such checkpoint folder")
        why = ckpt.incomplete_reason(mode)
        if why:
            raise ResumeError(f"train.resume={mode} is not a complete checkpoint: {why}")
        return mode
    ckpts = ckpt.list_checkpoints(out)
    for c in ckpts:
        if not c.complete:
            log(info, f"ignoring incomplete checkpoint {c.path}: {c.why_incomplete}")
    complete = [c for c in ckpts if c.complete]
    return complete[-1].path if complete else None


def check_run_shape(path: str, saved: dict, now: dict) -> None:
    """A checkpoint's data position (epoch, batches into it) and per-rank RNG states
    mean the same thing only with the same world size, batch sizes, seed and data."""
    changed = [f"{k}: {saved.get(k)} -> {v}" for k, v in now.items() if saved.get(k) != v]
    if changed:
        raise ResumeError(
            f"cannot resume from {path}: the run changed ({'; '.join(changed)}). Resume with "
            "the original settings, or start over with train.resume=none."
        )


class ResumeError(RuntimeError):
    pass


def skip_step(state: TrainState, limit: int, why: str, info: dist.DistInfo) -> None:
    state.skipped_steps += 1
    state.skips_in_a_row += 1
    log(info, f"step {state.step + 1} skipped on all ranks: {why} "
              f"({state.skips_in_a_row} in a row, limit train.max_skipped_steps={limit})")
    if state.skips_in_a_row >= limit:
        raise RuntimeError(
            f"{state.skips_in_a_row} steps in a row were skipped (last: {why}); stopping. "
            "The last checkpoint is intact: lower the learning rate or fix the data, then relaunch."
        )


def warn_all(info: dist.DistInfo, msg: str) -> None:
    """A message from whichever rank has it (log() prints on rank 0 only)."""
    tqdm.write(f"[ft rank {info.rank}] {msg}", file=sys.stderr)


def test_fault(kind: str, step: int, info: dist.DistInfo) -> bool:
    """Fault injection for tests/test_resume.py only: FT_TEST_FAULT=kind:step:rank
    (kind: crash, kill_in_save, nan, bad_sample; bad_eval counts eval batches, not steps). Fires once, on torchrun's first attempt only, so a
    restart gets past it."""
    spec = os.environ.get("FT_TEST_FAULT")
    if not spec or spec in _FIRED or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    k, s, r = spec.split(":")
    if k == kind and int(s) == step and int(r) == info.rank:
        _FIRED.add(spec)  # once: a skipped step is retried with the same step number
        return True
    return False


_FIRED: set[str] = set()


@record  # torchrun then prints the failing rank's traceback in its summary
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    config_path = argv[0] if argv and "=" not in argv[0] else None
    try:
        cfg = load_config(config_path, argv[1:] if config_path else argv)
    except (ConfigError, FileNotFoundError) as e:
        # A typo in a key is not a crash: say what is wrong once (not once per rank).
        if os.environ.get("RANK", "0") == "0":
            print(f"ft: config error: {e}", file=sys.stderr)
        sys.exit(2)

    try:
        train(cfg)
    except (ResumeError, ckpt.CheckpointMismatch, DataError) as e:
        # The same refusal on every rank (bad data, a run that cannot be resumed): one
        # message, no traceback per rank.
        if os.environ.get("RANK", "0") == "0":
            kind = "data error" if isinstance(e, DataError) else "cannot resume"
            print(f"ft: {kind}: {e}", file=sys.stderr, flush=True)
        dist.barrier()  # rank 0 has printed before any rank exits (torchrun then kills the rest)
        dist.cleanup()
        sys.exit(2)


def train(cfg) -> None:
    # =================================================================================
    # Setup: process group, signals, run folder, seeds
    # =================================================================================
    info = dist.init_distributed()
    hf_logging.disable_progress_bar()  # per-rank "Loading weights" bars: noise under torchrun
    # SIGTERM (cluster preemption; launch.sh forwards it) or SIGUSR1 (SLURM's warning
    # signal): finish the current step, checkpoint, exit 0. The handler only sets a flag;
    # the ranks agree on it in the step's all-reduce, so they all stop at the same step.
    stop = {"signal": 0}

    def request_stop(signum, _frame):
        stop["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, request_stop)

    precision = resolve_precision(cfg.train.precision, info)
    out = cfg.train.output_dir
    best_dir = os.path.join(out, "best")
    resume_path = find_resume_checkpoint(cfg.train, out, info)  # before anything is written
    if info.is_main:
        os.makedirs(out, exist_ok=True)
        save_config(cfg, os.path.join(out, "config.yaml"))
        ckpt.recover_export(best_dir)
    dist.barrier()  # SYNC: the output folder is ready (and cleared, if asked)
    log(info, f"world size {info.world_size} on {info.device.type}, precision {precision}, "
              f"output {os.path.abspath(out)}")
    # Same seed everywhere: the sampler and any dropout draw the same numbers on every
    # rank; the weights do not depend on it (rank 0's are broadcast). A resumed run
    # restores each rank's RNG state from the checkpoint instead.
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)

    # =================================================================================
    # Model and processor
    # =================================================================================
    if cfg.model.build_tiny_if_missing and not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        if info.local_rank == 0:  # one builder per node: the folder may not be shared
            from ft.tiny import save_tiny

            log(info, f"building the tiny demo model at {cfg.model.path} ({cfg.model.tiny_vocab} vocab)")
            save_tiny(cfg.model.path, vocab=cfg.model.tiny_vocab, if_missing=True)
        dist.barrier()  # SYNC: the model folder exists for everyone
    model = load_model(cfg.model.path, info, cfg.model.attn_implementation)
    processor = load_processor(cfg.model.path, cfg.data.min_pixels, cfg.data.max_pixels)

    # =================================================================================
    # Data: each rank reads a disjoint 1/world_size of every epoch
    # =================================================================================
    bs, accum, world = cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps, info.world_size
    train_ds, eval_ds = build_datasets(cfg.data, processor)
    # Check every row once before training (no model, no pixel processing; the ranks
    # split the rows and share what they found), so that a broken row stops the job now
    # with its file and line, or is dropped (data.on_bad_sample), instead of killing one
    # rank hours in. It also measures each row's length in tokens, for length grouping.
    t0 = time.perf_counter()
    train_ds, train_lengths, note = validate(  # SYNC (all-gather)
        train_ds, cfg.data.on_bad_sample, info.rank, world, dist.all_gather_object,
        num_workers=cfg.train.dataloader_num_workers)
    if note:
        log(info, note)
    if eval_ds is not None:
        eval_ds, _, note = validate(  # SYNC (all-gather)
            eval_ds, cfg.data.on_bad_sample, info.rank, world, dist.all_gather_object,
            num_workers=cfg.train.dataloader_num_workers)
        if note:
            log(info, note)
    log(info, f"data checked in {time.perf_counter() - t0:.1f} s")
    collator = Collator(processor)
    if len(train_ds) < bs * world:
        raise DataError(
            f"{cfg.data.train_file}: {len(train_ds)} usable rows, but one micro-batch on every rank "
            f"needs {bs * world} (per_device_train_batch_size {bs} x world size {world})"
        )
    # Every rank gets the same number of batches per epoch, hence runs the same number
    # of forwards (a rank with one more would wait forever in an all-gather). The order
    # is a pure function of (seed, epoch): resuming sets the position, nothing else.
    batch_sampler = ShardedBatchSampler(
        train_lengths, batch_size=bs, num_replicas=world, rank=info.rank, seed=cfg.train.seed,
        group_by_length=cfg.data.group_by_length,
    )
    loader = DataLoader(
        train_ds, batch_sampler=batch_sampler, collate_fn=collator,
        num_workers=cfg.train.dataloader_num_workers, pin_memory=info.on_gpu,
    )
    log(info, f"train rows {len(train_ds)}, eval rows {len(eval_ds) if eval_ds else 0}; global batch "
              f"{bs * accum * world} = {bs} per device x {accum} accumulation x {world} ranks")
    # What a checkpoint's data position means depends on these; resume refuses a change.
    run_shape = {
        "world_size": world, "per_device_train_batch_size": bs, "gradient_accumulation_steps": accum,
        "seed": cfg.train.seed, "train_file": os.path.abspath(cfg.data.train_file), "train_rows": len(train_ds),
        "group_by_length": cfg.data.group_by_length,
    }

    # =================================================================================
    # FSDP: plan, wrap (root last), then activation checkpointing
    # =================================================================================
    # Freezing first: the plan keeps frozen and trainable weights in separate units
    # (FSDP1 flattens a unit into one tensor, which has one requires_grad), and
    # wrap_model refuses a plan that mixes them, naming the unit.
    apply_freezing(model, cfg.model)
    units = plan_units(model)
    log(info, format_plan(units, world, root_names=root_members(model, units)))
    model = wrap_model(model, units, cfg.fsdp, precision, info)  # SYNC (weights broadcast)
    if cfg.fsdp.activation_checkpointing:
        ck = apply_checkpointing(model)
        log(info, f"activation checkpointing (non-reentrant) on {ck.wrapped} modules"
                  + (f"; {ck.skipped} skipped (frozen, no gradient flows through them)" if ck.skipped else ""))

    # =================================================================================
    # Optimizer. It sees FSDP's flat shards, one per unit, not the original parameters;
    # one group per part (vision tower, merger, language model), each with its own
    # learning rate, trainable units only: frozen ones get no gradient and no state.
    # =================================================================================
    optimizer = build_optimizer(param_groups(model, cfg.train), cfg.train, model=model)

    # =================================================================================
    # Resume: weights, optimizer state, train state, data position, RNG
    # =================================================================================
    state = TrainState()
    if resume_path:
        meta = ckpt.read_meta(resume_path)
        check_run_shape(resume_path, meta.get("run", {}), run_shape)
        t0 = time.perf_counter()
        ckpt.load_checkpoint(model, optimizer, resume_path, info)  # SYNC
        state.load_state_dict(meta["train_state"])
        log(info, f"resumed from {resume_path} (step {state.step}, epoch {state.epoch}) "
                  f"in {time.perf_counter() - t0:.1f} s")
        if state.step >= cfg.train.max_steps:
            log(info, f"step {state.step} >= train.max_steps={cfg.train.max_steps}: nothing left to train")

    tracker = None
    if info.is_main:
        run_name = cfg.wandb.run_name or os.path.basename(os.path.abspath(out))
        tracker = Tracker(out, cfg.wandb, config_to_dict(cfg), run_name,
                          resume_step=state.step if resume_path else None)

    def save(reason: str = "") -> None:
        t0 = time.perf_counter()
        meta = {"train_state": state.state_dict(), "run": run_shape}
        path = ckpt.save_checkpoint(  # SYNC
            model, optimizer, meta, out, info, cfg.train.keep_last_n,
            _crash_before_marker=test_fault("kill_in_save", state.step, info),
        )
        log(info, f"step {state.step}: checkpoint saved to {path} in {time.perf_counter() - t0:.1f} s{reason}")

    # =================================================================================
    # Training
    # =================================================================================
    batch_sampler.set_position(state.epoch, state.epoch_batches)
    batches = iter(loader)

    def next_batch() -> dict:
        """The next micro-batch of this rank; moves the data position even when the
        sample is bad, so that every rank's position stays the same."""
        nonlocal batches
        if state.epoch_batches == len(batch_sampler):  # epoch boundary: reshuffle
            state.epoch += 1
            state.epoch_batches = 0
            batch_sampler.set_position(state.epoch, 0)
            batches = iter(loader)
        state.epoch_batches += 1
        return next(batches)

    def run_eval_and_maybe_export() -> None:
        eval_loss = evaluate(
            model, eval_ds, collator, cfg.train.per_device_eval_batch_size,
            cfg.train.dataloader_num_workers, cfg.train.loss_chunk_size, cfg.data.on_bad_sample, info,
        )
        state.last_eval_step = state.step
        improved = state.best_eval_loss is None or eval_loss < state.best_eval_loss
        if improved:
            state.best_eval_loss, state.best_step = eval_loss, state.step
            export_info = {"step": state.step, "eval_loss": eval_loss}
            ckpt.export_hf(model, best_dir, cfg.model.path, info, export_info)  # SYNC
        if tracker:
            tracker.log({"step": state.step, "eval_loss": eval_loss})
        log(info, f"step {state.step}: eval_loss {eval_loss:.4f}" + (" (best, exported)" if improved else ""))

    # In a batch job's log file (no terminal) a redraw every 30 s is plenty.
    bar = tqdm(total=cfg.train.max_steps, initial=state.step, disable=not info.is_main, desc="train",
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0)
    # Throughput: sums per logging window, and over the whole run for the end-of-run
    # summary, which leaves out the first train.metrics_warmup_steps steps of this
    # process (allocator warm-up, first-touch page faults, lazy initialisation).
    hf_config = model.module.config
    frozen_parts = [p.name for p in PARTS if getattr(cfg.model, p.freeze_field)]
    peak = peak_flops(info.device)
    window, totals, steps_here = new_window(), new_window(), 0
    stopped = False
    model.train()
    while state.step < cfg.train.max_steps:
        t_start = clock(info)
        # ---- fetch the whole optimizer step's micro-batches first: the loss is divided by
        # the label-token count of all of them on all ranks, known before any backward.
        # A sample that fails to load (file gone since validation) must not take down
        # this rank alone: note it, keep fetching so every rank's position moves alike,
        # and let all ranks decide together below.
        micro, bad = [], None
        for _ in range(accum):
            try:
                micro.append(next_batch())
                if test_fault("bad_sample", state.step + 1, info):
                    micro.pop()
                    raise DataError("test fault: stands for a sample whose image was deleted after the data check")
            except DataError as e:
                bad = e
        stats = [batch_stats(b) for b in micro]  # on CPU tensors: no device sync
        for b in micro:
            del b["num_real_tokens"]
        n_labels = sum(st.label_tokens for st in stats)
        n_tokens = sum(st.tokens for st in stats)
        n_flops = sum(train_flops(hf_config, st, frozen_parts) for st in stats)
        # One small all-reduce carries the step's token and FLOP counts and two flags
        # every rank must agree on: "a sample failed to load", "a stop signal arrived".
        global_labels, global_tokens, global_flops, n_bad, n_stop = dist.all_reduce_sum(  # SYNC
            [n_labels, n_tokens, n_flops, bad is not None, stop["signal"] != 0], info.device)
        state.samples_seen += bs * accum * world
        saved = False
        if n_bad:
            if cfg.data.on_bad_sample == "error":
                if bad is not None:
                    warn_all(info, f"step {state.step + 1}: {bad}")
                raise DataError(f"step {state.step + 1}: {int(n_bad)} rank(s) could not load a sample "
                                "(the reason is printed above; data.on_bad_sample=skip would skip the step)")
            if bad is not None:
                warn_all(info, f"step {state.step + 1} skipped (data.on_bad_sample=skip): {bad}")
            state.skipped_samples += bs * accum * world
            skip_step(state, cfg.train.max_skipped_steps, "a sample could not be loaded", info)
        else:
            micro = [to_device(b, info.device) for b in micro]
            t_data = clock(info)
            # FSDP averages gradients over ranks (divides by world size); multiplying back
            # by it makes the result the gradient of sum(token losses) / global_labels.
            scale = world / max(global_labels, 1.0)

            # ---- forward/backward. No `no_sync()` across micro-batches: FSDP
            # reduce-scatters after each backward and keeps only sharded gradients, which
            # is what lets large models accumulate at all (no_sync would hold a full
            # unsharded gradient copy).
            step_loss = torch.zeros((), dtype=torch.float64, device=info.device)
            for batch in micro:
                s, _ = loss_sum(model, batch, cfg.train.loss_chunk_size)  # SYNC (all-gathers)
                if test_fault("nan", state.step + 1, info):
                    s = s * float("nan")
                (s * scale).backward()  # SYNC (reduce-scatters)
                step_loss += s.detach()
            del micro, batch, s
            t_fwd_bwd = clock(info)

            # ---- update, unless the loss or the gradient is not finite on some rank: the
            # summed loss is NaN/inf if any rank's is and the norm is global, so every
            # rank decides alike, and nothing non-finite reaches weights or optimizer.
            grad_norm = clip_grad_norm(model, cfg.train.max_grad_norm)  # SYNC
            (loss_total,) = dist.all_reduce_sum([float(step_loss)], info.device)  # SYNC
            if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                state.skipped_samples += bs * accum * world
                skip_step(state, cfg.train.max_skipped_steps,
                          f"non-finite loss ({loss_total}) or gradient norm ({grad_norm})", info)
            else:
                lr_factor = lr_scale(state.step, cfg.train.max_steps, cfg.train.warmup_ratio)
                set_lr(optimizer, lr_factor)  # every group: its own base lr x the schedule
                lr = cfg.train.learning_rate * lr_factor
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                t_end = clock(info)
                state.step += 1
                state.skips_in_a_row = 0
                state.tokens_seen += int(global_tokens)
                steps_here += 1
                for w in (window, totals) if steps_here > cfg.train.metrics_warmup_steps else (window,):
                    w["steps"] += 1
                    w["loss_sum"] += loss_total
                    w["labels"] += global_labels
                    w["tokens"] += global_tokens
                    w["flops"] += global_flops
                    w["data_s"] += t_data - t_start
                    w["fwd_bwd_s"] += t_fwd_bwd - t_data
                    w["optim_s"] += t_end - t_fwd_bwd
                    w["step_s"] += t_end - t_start
                bar.update(1)
                if test_fault("crash", state.step, info):
                    os._exit(13)  # a rank dies without warning: torchrun restarts the group

                # ---- log (the same steps on every rank: peak_memory is a collective)
                if state.step % cfg.train.logging_steps == 0 or state.step == cfg.train.max_steps:
                    record = {
                        "step": state.step,
                        "loss": window["loss_sum"] / max(window["labels"], 1.0),
                        "lr": lr,
                        "grad_norm": grad_norm,
                        **throughput(window, world, peak),
                        **peak_memory(info),  # SYNC
                        "skipped_steps": state.skipped_steps,
                    }
                    if tracker:
                        tracker.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                    tok_s_dev=f"{record['tokens_per_s_per_device']:.0f}",
                                    **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}))
                    window = new_window()

                # ---- eval, best export, resumable checkpoint
                if eval_ds is not None and cfg.train.eval_steps and state.step % cfg.train.eval_steps == 0:
                    run_eval_and_maybe_export()
                if cfg.train.save_steps and state.step % cfg.train.save_steps == 0:
                    save()
                    saved = True

        # ---- a stop signal reached some rank before this step: all ranks stop here
        if n_stop:
            if not saved:
                save(" (stop signal; relaunch to continue)")
            stopped = True
            break
    bar.close()

    # =================================================================================
    # End: a last eval if the last step had none, then report the best model
    # =================================================================================
    if stopped:
        log(info, f"stopped at step {state.step} by a signal; the checkpoint above resumes it")
    elif eval_ds is not None:
        if state.last_eval_step != state.step:
            run_eval_and_maybe_export()
        log(info, f"best model: step {state.best_step}, eval_loss {state.best_eval_loss:.4f} -> "
                  f"{os.path.abspath(best_dir)}")
    else:
        ckpt.export_hf(model, best_dir, cfg.model.path, info, {"step": state.step, "eval_loss": None})
        log(info, f"no eval set: exported the final model (step {state.step}) -> {os.path.abspath(best_dir)}")
    if totals["steps"]:
        summary = {f"avg_{k}": v for k, v in throughput(totals, world, peak).items()}
        summary.update(peak_memory(info))  # SYNC
        if tracker:
            tracker.log({"step": state.step, "summary": True,
                         "warmup_steps": cfg.train.metrics_warmup_steps, **summary})
        log(info, "throughput after warm-up: " + ", ".join(
            f"{k} {v:.4g}" for k, v in summary.items()))
    if state.skipped_steps:
        log(info, f"skipped {state.skipped_steps} step(s) ({state.skipped_samples} samples) in all")
    if tracker:
        tracker.close()
    dist.cleanup()

if __name__ == "__main__":
    main()
