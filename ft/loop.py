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
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from ft import ckpt, dist
from ft.config import ConfigError, config_to_dict, load_config, save_config
from ft.data import build_datasets, Collator
from ft.fsdp_wrap import apply_checkpointing, format_plan, plan_units, root_members, wrap_model
from ft.model import IGNORE_INDEX, load_model, loss_sum
from ft.optim import build_optimizer, clip_grad_norm, lr_at, set_lr
from ft.processor import load_processor
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
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # passes over the training set started
    samples_seen: int = 0  # all ranks
    tokens_seen: int = 0  # real (non-pad) tokens, all ranks
    best_eval_loss: float | None = None
    best_step: int | None = None


def log(info: dist.DistInfo, msg: str) -> None:
    if info.is_main:
        tqdm.write(f"[ft] {msg}", file=sys.stdout)


def resolve_precision(precision: str, info: dist.DistInfo) -> str:
    # bf16 matmuls are ~6x slower than fp32 on CPU (FACTS.md): "auto" only uses them on GPU.
    if precision == "auto":
        return "bf16" if info.on_gpu else "fp32"
    return precision


def peak_memory_gb(info: dist.DistInfo) -> float:
    if info.on_gpu:
        return torch.cuda.max_memory_allocated(info.device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def count_labels(batch: dict) -> int:
    # Same shift as ft.model.loss_sum: labels[t+1] is what position t predicts.
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(model, eval_ds, collator, batch_size: int, num_workers: int, info: dist.DistInfo) -> float:
    """Token-weighted loss over the whole eval set, identical on every rank.

    Each rank takes every world_size-th row. Ranks may end up with one batch fewer than
    rank 0, yet every rank must run as many forwards (each is a series of FSDP
    all-gathers): the short ranks repeat a batch they have and leave it out of the sum.
    """
    model.eval()
    local = list(range(info.rank, len(eval_ds), info.world_size))
    n_batches = math.ceil(math.ceil(len(eval_ds) / info.world_size) / batch_size)  # rank 0's count
    loader = DataLoader(
        torch.utils.data.Subset(eval_ds, local or [0]),
        batch_size=batch_size, collate_fn=collator, num_workers=num_workers,
    )
    total, count, batch = 0.0, 0, None
    it = iter(loader)
    for i in range(n_batches):
        real = i * batch_size < len(local)
        if real or batch is None:  # a rank with no eval rows at all still needs a batch
            batch = next(it)
            inputs = to_device({k: v for k, v in batch.items() if k != "num_real_tokens"}, info.device)
        s, n = loss_sum(model, inputs)  # SYNC (FSDP all-gathers inside)
        if real:
            total += s.item()
            count += n
    total, count = dist.all_reduce_sum([total, count], info.device)  # SYNC
    model.train()
    return total / max(count, 1)


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

    # =================================================================================
    # Setup: process group, run folder, seeds
    # =================================================================================
    info = dist.init_distributed()
    hf_logging.disable_progress_bar()  # per-rank "Loading weights" bars: noise under torchrun
    precision = resolve_precision(cfg.train.precision, info)
    out = cfg.train.output_dir
    best_dir = os.path.join(out, "best")
    if info.is_main:
        os.makedirs(out, exist_ok=True)
        save_config(cfg, os.path.join(out, "config.yaml"))
        ckpt.recover_export(best_dir)
    log(info, f"world size {info.world_size} on {info.device.type}, precision {precision}, "
              f"output {os.path.abspath(out)}")
    # Same seed everywhere: the sampler and any dropout draw the same numbers on every
    # rank; the weights do not depend on it (rank 0's are broadcast).
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
    train_ds, eval_ds = build_datasets(cfg.data, processor)
    collator = Collator(processor)
    bs, accum, world = cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps, info.world_size
    if len(train_ds) < bs * world:
        raise ValueError(
            f"{cfg.data.train_file}: {len(train_ds)} rows, but one micro-batch on every rank "
            f"needs {bs * world} (per_device_train_batch_size {bs} x world size {world})"
        )
    # drop_last: every rank gets the same number of samples, hence the same number of
    # forwards per epoch (a rank with one more would wait forever in an all-gather).
    sampler = DistributedSampler(
        train_ds, num_replicas=world, rank=info.rank, shuffle=True, seed=cfg.train.seed, drop_last=True
    )
    loader = DataLoader(
        train_ds, batch_size=bs, sampler=sampler, collate_fn=collator,
        num_workers=cfg.train.dataloader_num_workers, pin_memory=info.on_gpu,
    )
    log(info, f"train rows {len(train_ds)}, eval rows {len(eval_ds) if eval_ds else 0}; global batch "
              f"{bs * accum * world} = {bs} per device x {accum} accumulation x {world} ranks")

    # =================================================================================
    # FSDP: plan, wrap (root last), then activation checkpointing
    # =================================================================================
    units = plan_units(model)
    log(info, format_plan(units, world, root_names=root_members(model, units)))
    model = wrap_model(model, units, cfg.fsdp, precision, info)  # SYNC (weights broadcast)
    if cfg.fsdp.activation_checkpointing:
        n = apply_checkpointing(model)
        log(info, f"activation checkpointing (non-reentrant) on {n} modules")

    # =================================================================================
    # Optimizer. It sees FSDP's flat shards, one per unit, not the original parameters.
    # =================================================================================
    optimizer = build_optimizer(model.parameters(), cfg.train)

    tracker = None
    if info.is_main:
        run_name = cfg.wandb.run_name or os.path.basename(os.path.abspath(out))
        tracker = Tracker(out, cfg.wandb, config_to_dict(cfg), run_name)

    # =================================================================================
    # Training
    # =================================================================================
    state = TrainState()
    sampler.set_epoch(state.epoch)
    batches = iter(loader)

    def next_batch() -> dict:
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:  # epoch boundary: reshuffle, same order on every rank
            state.epoch += 1
            sampler.set_epoch(state.epoch)
            batches = iter(loader)
            return next(batches)

    def run_eval_and_maybe_export() -> None:
        eval_loss = evaluate(
            model, eval_ds, collator, cfg.train.per_device_eval_batch_size,
            cfg.train.dataloader_num_workers, info,
        )
        improved = state.best_eval_loss is None or eval_loss < state.best_eval_loss
        if improved:
            state.best_eval_loss, state.best_step = eval_loss, state.step
            export_info = {"step": state.step, "eval_loss": eval_loss}
            ckpt.export_hf(model, best_dir, cfg.model.path, info, export_info)  # SYNC
        if tracker:
            tracker.log({"step": state.step, "eval_loss": eval_loss})
        log(info, f"step {state.step}: eval_loss {eval_loss:.4f}" + (" (best, exported)" if improved else ""))

    # In a batch job's log file (no terminal) a redraw every 30 s is plenty.
    bar = tqdm(total=cfg.train.max_steps, disable=not info.is_main, desc="train", dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30.0)
    window = {"loss_sum": 0.0, "labels": 0.0, "tokens": 0.0, "t0": time.perf_counter()}
    model.train()
    while state.step < cfg.train.max_steps:
        # ---- fetch the whole optimizer step's micro-batches first: the loss is divided by
        # the label-token count of all of them on all ranks, known before any backward.
        micro = [next_batch() for _ in range(accum)]
        n_tokens = sum(int(b.pop("num_real_tokens")) for b in micro)
        n_labels = sum(count_labels(b) for b in micro)  # on CPU: no device sync
        micro = [to_device(b, info.device) for b in micro]
        global_labels, global_tokens = dist.all_reduce_sum([n_labels, n_tokens], info.device)  # SYNC
        # FSDP averages gradients over ranks (divides by world size); multiplying back
        # by it makes the result the gradient of sum(token losses) / global_labels.
        scale = world / max(global_labels, 1.0)

        # ---- forward/backward. No `no_sync()` across micro-batches: FSDP reduce-scatters
        # after each backward and keeps only sharded gradients, which is what lets large
        # models accumulate at all (no_sync would hold a full unsharded gradient copy).
        step_loss = torch.zeros((), dtype=torch.float64, device=info.device)
        for batch in micro:
            s, _ = loss_sum(model, batch)  # SYNC (all-gathers)
            (s * scale).backward()  # SYNC (reduce-scatters)
            step_loss += s.detach()
        del micro, batch, s

        # ---- update
        grad_norm = clip_grad_norm(model, cfg.train.max_grad_norm)  # SYNC
        lr = lr_at(state.step, cfg.train.max_steps, cfg.train.learning_rate, cfg.train.warmup_ratio)
        set_lr(optimizer, lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.samples_seen += bs * accum * world
        state.tokens_seen += int(global_tokens)
        window["loss_sum"] += float(step_loss)
        window["labels"] += global_labels
        window["tokens"] += global_tokens
        bar.update(1)

        # ---- log (the same steps on every rank: the loss sum is all-reduced)
        if state.step % cfg.train.logging_steps == 0 or state.step == cfg.train.max_steps:
            (loss_total,) = dist.all_reduce_sum([window["loss_sum"]], info.device)  # SYNC
            elapsed = time.perf_counter() - window["t0"]
            record = {
                "step": state.step,
                "loss": loss_total / max(window["labels"], 1.0),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": window["tokens"] / elapsed,
                "peak_mem_gb": peak_memory_gb(info),
            }
            if tracker:
                tracker.log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            window = {"loss_sum": 0.0, "labels": 0.0, "tokens": 0.0, "t0": time.perf_counter()}

        # ---- eval, best export, resumable checkpoint
        if eval_ds is not None and cfg.train.eval_steps and state.step % cfg.train.eval_steps == 0:
            run_eval_and_maybe_export()
        if cfg.train.save_steps and state.step % cfg.train.save_steps == 0:
            path = ckpt.save_checkpoint(model, optimizer, asdict(state), out, info)  # SYNC
            log(info, f"step {state.step}: checkpoint saved to {path}")
    bar.close()

    # =================================================================================
    # End: a last eval if the last step had none, then report the best model
    # =================================================================================
    if eval_ds is not None:
        if not (cfg.train.eval_steps and state.step % cfg.train.eval_steps == 0):
            run_eval_and_maybe_export()
        log(info, f"best model: step {state.best_step}, eval_loss {state.best_eval_loss:.4f} -> "
                  f"{os.path.abspath(best_dir)}")
    else:
        ckpt.export_hf(model, best_dir, cfg.model.path, info, {"step": state.step, "eval_loss": None})
        log(info, f"no eval set: exported the final model (step {state.step}) -> {os.path.abspath(best_dir)}")
    if tracker:
        tracker.close()
    dist.cleanup()


if __name__ == "__main__":
    main()
