"""Evaluation over the whole eval set, the same on every rank, which eval result is the
best, and the Hugging Face export of a model (`best/`). Used by `ft.loop`."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader

from ft import ckpt, dist, faults, watchdog
from ft.model import loss_sum_and_correct, to_device
from ft.packing import eval_batches
from ft.processor import training_settings
from ft.progress import warn_all
from ft.rows import DataError

BEST = {"eval_loss": min, "eval_token_accuracy": max}
"""Each `train.metric_for_best` choice, and which of two values is the better."""


def improves(name: str, value: float, best: float | None) -> bool:
    """Whether `value` of metric `name` beats the best so far (None: nothing yet)."""
    return best is None or BEST[name](value, best) != best


def export_model(model, path: str, cfg, info: dist.DistInfo, export_info: dict, label: str) -> None:
    """`ckpt.export_hf` of the run's model with the run's processor settings and export
    dtype, under the watchdog label `label`. A collective."""
    with watchdog.at(label):
        ckpt.export_hf(model, path, cfg.model.path, info,  # SYNC (the label)
                       export_info, training_settings(cfg.data), cfg.train.export_dtype)


def eval_plan(n_rows: int, lengths: list | None, pack_length: int, batch_size: int,
              info: dist.DistInfo) -> tuple[list, int, int]:
    """This rank's eval batches (row indices, or packs of them), how many of them are
    real, and how many forwards every rank runs: the most any rank has. Padded, each
    rank takes every world_size-th row; packed (`pack_length`), all rows (of `lengths`
    tokens) are packed and the packs dealt to the ranks evening out tokens. A rank with
    no rows gets row 0 to run, uncounted. With sequence parallelism, read "group" for
    "rank" (`DistInfo.data_rank`): a group's ranks share its rows, each its tokens."""
    bs = batch_size
    if pack_length:
        batches, n_batches = eval_batches(lengths, pack_length, bs, info.data_world, info.data_rank)
        return batches or [[[0]]], len(batches), n_batches
    local = list(range(info.data_rank, n_rows, info.data_world))
    n_batches = math.ceil(math.ceil(n_rows / info.data_world) / bs)  # rank 0's count
    batches = [local[i:i + bs] for i in range(0, len(local), bs)]
    return batches or [[0]], len(batches), n_batches


def _next_inputs(it, i: int, info: dist.DistInfo, fallback: bool) -> tuple[dict | None, int]:
    """The next batch of this rank's eval loader on the device, or None, and how many
    batches failed to load on the way. None at the end of the loader (a bad batch
    earlier left this rank one short) and, when there is a batch to fall back on
    (`fallback`), after a batch that fails to load; without one, the next is tried."""
    n_bad = 0
    while True:
        try:
            batch = next(it)
            faults.hook("bad_eval", i, info.rank)
            return to_device(batch.inputs, info.device), n_bad
        except StopIteration:
            return None, n_bad
        except DataError as e:
            warn_all(info, f"eval: {e}")
            n_bad += 1
            if fallback:  # the caller repeats its last good batch, uncounted
                return None, n_bad


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
            new, bad = _next_inputs(it, i, info, fallback=inputs is not None)
            n_bad += bad
            if new is None:
                real = False
            else:
                inputs = new
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
