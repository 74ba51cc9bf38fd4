"""What a training run says as it goes: rank 0's messages, the step clock, peak memory
over ranks, the sums of a logging window and of the whole run (`Meter`), and the progress
bar or line with the metrics record of each window (`Progress`). Used by `ft.loop`."""

from __future__ import annotations

import sys
import time

import torch
from tqdm import tqdm

from ft import dist, watchdog
from ft.metrics import memory_stats, mfu, peak_flops
from ft.moe import load_metrics


def log(info: dist.DistInfo, msg: str) -> None:
    """`msg` on rank 0 (nothing for an empty one)."""
    if info.is_main and msg:
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


PROGRESS_LINE_S = 30.0
"""Without a terminal (a batch job's log file) a progress line at most this often."""


class Progress:
    """A run's metrics as it goes: the `Meter`, rank 0's `ft.track.Tracker` (None on the
    other ranks), and the display: a tqdm bar on rank 0 when stderr is a terminal; in a
    log file, where bar frames would be noise, a plain line at most every
    `PROGRESS_LINE_S` seconds."""

    def __init__(self, info: dist.DistInfo, train_cfg, pack_length: int, step: int, tracker=None):
        self.info, self.max_steps, self.pack_length, self.tracker = info, train_cfg.max_steps, pack_length, tracker
        self.warmup_steps = train_cfg.metrics_warmup_steps
        self.meter, self.peak = Meter(self.warmup_steps), peak_flops(info.device)
        self.bar = (tqdm(total=self.max_steps, initial=step, desc="train", dynamic_ncols=True)
                    if info.is_main and sys.stderr.isatty() else None)
        self.last_line = 0.0  # when the last progress line was printed (no terminal)
        self.moe: list = []  # the window's (load-balancing loss, routing counts) per step (MoE)

    def record(self, rec: dict) -> None:
        """One record to metrics.jsonl and wandb (rank 0's tracker)."""
        if self.tracker:
            self.tracker.log(rec)

    def step_done(self, loss_sum: float, counts: dict, timings: dict, moe: tuple | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
        self.meter.add(loss_sum=loss_sum, **counts, **timings)
        if moe is not None:
            self.moe.append((moe[0], moe[1].cpu()))

    def log_window(self, step: int, skipped_steps: int, lr: float, grad_norm: float) -> None:
        """One metrics record per logging window (the same steps on every rank: peak memory
        is a collective); on a terminal the progress bar shows it, in a log file one line."""
        window = self.meter.take_window()
        rec = {
            "step": step,
            "loss": window["loss_sum"] / max(window["labels"], 1.0),
            "lr": lr,
            "grad_norm": grad_norm,
            **Meter.rates(window, self.info.world_size, self.peak, self.pack_length),
            **peak_memory(self.info),  # SYNC
            "skipped_steps": skipped_steps,
        }
        if self.moe:  # the MoE load-balancing loss (mean over the window's steps) and the experts' load
            rec["aux_loss"] = sum(aux for aux, _ in self.moe) / len(self.moe)
            rec.update(load_metrics(sum(counts for _, counts in self.moe)))
            self.moe = []
        self.record(rec)
        if not self.info.is_main:
            return
        shown = {"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}", "grad_norm": f"{rec['grad_norm']:.3g}",
                 "tok_s_dev": f"{rec['tokens_per_s_per_device']:.0f}"}
        if "mfu" in rec:
            shown["mfu"] = f"{rec['mfu']:.1%}"
        if "aux_loss" in rec:
            shown.update(aux_loss=f"{rec['aux_loss']:.4f}", load_max_mean=f"{rec['expert_load_max_over_mean']:.2f}")
        if self.bar is not None:
            self.bar.set_postfix(shown)
        elif time.monotonic() - self.last_line >= PROGRESS_LINE_S or step == self.max_steps:
            self.last_line = time.monotonic()
            log(self.info, f"step {step}/{self.max_steps}: " + ", ".join(f"{k} {v}" for k, v in shown.items())
                           + f", step_time_s {rec['step_time_s']:.3g}")

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def summary(self, step: int) -> None:
        """The throughput after warm-up over the whole run, logged and recorded. A
        collective (peak memory) when any step was measured."""
        totals = self.meter.totals
        if totals["steps"]:
            rates = Meter.rates(totals, self.info.world_size, self.peak, self.pack_length)
            summary = {f"avg_{k}": v for k, v in rates.items()}
            summary.update(peak_memory(self.info))  # SYNC
            self.record({"step": step, "summary": True, "warmup_steps": self.warmup_steps, **summary})
            log(self.info, "throughput after warm-up: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))

    def close(self) -> None:
        if self.tracker:
            self.tracker.close()
