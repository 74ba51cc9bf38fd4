"""Padding with and without length-grouped batching, on the demo data.

    python benchmarks/padding.py [--config configs/demo.yaml] [--epochs 20]

Row lengths (text plus image tokens, as the collator sees them) come from the
data check (``ft.datacheck.check_data``) with the demo processor, whose pixel bounds
and max_length are the config's; batches come from ``ft.sampler.ShardedBatchSampler`` as
the training loop draws them, averaged over several epochs. Two figures per setting:

* padding: pad tokens / all tokens of every rank's padded micro-batches (each padded to
  its own longest row: the compute and memory spent on nothing);
* lockstep: the same, but each step's micro-batches all padded to the step's longest
  row. Under FSDP the ranks wait for each other at every step, so a rank with short
  rows idles while the longest finishes; this counts that idle time as padding.

The collator's dummy image (added to batches without an image) is left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from ft.config_load import load_config
from ft.datacheck import check_data
from ft.dataset import build_datasets
from ft.processor import load_processor_for
from ft.sampler import ShardedBatchSampler
from ft.tinymodel import save_tiny


def fractions(lengths: list[int], batch_size: int, world: int, group: bool, seed: int, epochs: int):
    """(padding, lockstep) fractions over `epochs` epochs of all ranks' batches."""
    ranks = [ShardedBatchSampler(lengths, batch_size, world, rank, seed, group_by_length=group)
             for rank in range(world)]
    real = padded = lockstep = 0
    for epoch in range(epochs):
        for step in zip(*[sampler.batches(epoch) for sampler in ranks]):
            longest = [max(lengths[i] for i in batch) for batch in step]
            real += sum(lengths[i] for batch in step for i in batch)
            padded += batch_size * sum(longest)
            lockstep += batch_size * world * max(longest)
    return 1 - real / padded, 1 - real / lockstep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    cfg = load_config(args.config)
    save_tiny(cfg.model.path, vocab=cfg.model.tiny_vocab, if_missing=True)
    processor = load_processor_for(cfg.model.path, cfg.data)
    dataset, _ = build_datasets(dataclasses.replace(cfg.data, eval_file=""), processor)
    start = time.perf_counter()
    _, lengths, _ = check_data(dataset, "error")
    seconds = time.perf_counter() - start
    print(f"{cfg.data.train_file}: {len(lengths)} rows, {len(lengths) / seconds:.0f} rows/s validated; "
          f"tokens per row min {min(lengths)}, mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)} "
          f"(min_pixels {cfg.data.min_pixels}, max_pixels {cfg.data.max_pixels}, "
          f"max_length {cfg.data.max_length}); {args.epochs} epochs, seed {cfg.train.seed}")
    print()
    print("world  batch  steps/epoch   padding: plain -> grouped   lockstep: plain -> grouped")
    for world in (1, 2):
        for batch_size in (2, 4, 8):
            plain = fractions(lengths, batch_size, world, False, cfg.train.seed, args.epochs)
            grouped = fractions(lengths, batch_size, world, True, cfg.train.seed, args.epochs)
            steps = len(lengths) // (world * batch_size)
            print(f"{world:>5}  {batch_size:>5}  {steps:>11}   {plain[0]:>14.1%} -> {grouped[0]:>6.1%}"
                  f"   {plain[1]:>15.1%} -> {grouped[1]:>6.1%}")


if __name__ == "__main__":
    main()
