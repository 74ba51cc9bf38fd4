"""The training run's data, ready for the loop: every row checked once, the collator,
the sampler (padded or packed), the DataLoader, and the run shape a checkpoint's data
position depends on. Used by `ft.loop`."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import transformers
from torch.utils.data import DataLoader
from transformers import AutoConfig

from ft import dist, watchdog
from ft.config import ConfigError
from ft.config_load import builds_tiny_model, model_path_refusal
from ft.collate import Collator
from ft.datacheck import check_data
from ft.dataset import build_datasets
from ft.families import family_of
from ft.messages import IMAGE, MEDIA, VIDEO
from ft.rows import DataError
from ft.packing import PackedBatchSampler, PackedRows, RopeIndex, truncates_video_seconds, varlen_refusal
from ft.processor import load_processor_for
from ft.progress import log
from ft.sampler import ShardedBatchSampler
from ft.tinymodel import save_tiny


@dataclass
class TrainData:
    """What `build_data` makes: the datasets (eval_ds None without an eval set), the
    loader over the training set, and the run shape that `ft.ckpt.check_run_shape`
    compares on resume."""

    train_ds: object
    eval_ds: object
    eval_lengths: list | None  # tokens per eval row (for packing its batches)
    collator: Collator
    sampler: ShardedBatchSampler | PackedBatchSampler
    loader: DataLoader
    run_shape: dict = field(default_factory=dict)


def prepare_processor(cfg, info: dist.DistInfo):
    """The run's processor; first the tiny demo model, once per node, when the config
    asks for it and its folder is empty. A collective (a barrier) in that case."""
    refusal = model_path_refusal(cfg.model)  # `main` refused it already; `train(cfg)` from code
    if refusal:
        raise ConfigError(refusal)
    # Only at the demo model's default place: a typo in model.path is refused above.
    if builds_tiny_model(cfg.model) and not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        if info.local_rank == 0:  # one builder per node: the folder may not be shared
            log(info, f"building the tiny demo model at {cfg.model.path} "
                      f"({cfg.model.tiny_family}, {cfg.model.tiny_vocab} vocab)")
            save_tiny(cfg.model.path, vocab=cfg.model.tiny_vocab, if_missing=True, family=cfg.model.tiny_family)
        dist.barrier()  # SYNC: the model folder exists for everyone
    return load_processor_for(cfg.model.path, cfg.data)


def packed_length(data_cfg) -> int:
    """Tokens per packed row; 0 when not packing."""
    return (data_cfg.pack_length or data_cfg.max_length) if data_cfg.packing else 0


def global_batch_size(train_cfg, world_size: int) -> int:
    """Rows per optimizer step over all ranks: samples, or packs when packing."""
    return train_cfg.per_device_train_batch_size * train_cfg.gradient_accumulation_steps * world_size


def _checked_rows(ds, cfg, info: dist.DistInfo):
    """`check_data` of one dataset (a collective: the ranks share the row check)."""
    ds, lengths, note = check_data(  # SYNC (all-gather)
        ds, cfg.data.on_bad_sample, info.rank, info.world_size, dist.all_gather_object,
        num_workers=cfg.train.dataloader_num_workers)
    if note:
        log(info, note)
    return ds, lengths


def _collator(cfg, info: dist.DistInfo, processor, media: frozenset, model_config, t0: float) -> Collator:
    """The collator, and the log of what the data holds. `media`: what every batch carries
    one of, real or dummy, so that each rank runs the vision tower as often as the
    others: the data's kinds, which every rank knows alike."""
    rope_index = RopeIndex(model_config) if packed_length(cfg.data) else None  # packed rows: positions per sample
    collator = Collator(processor, rope_index, varlen=cfg.model.attn_implementation == "flash_attention_2",
                        media=media, multiple=info.sequence_parallel)
    kinds = " and ".join(MEDIA[kind].name + "s" for kind in sorted(media)) or "no images or videos"
    carried = " and ".join(("an " if kind == IMAGE else "a ") + MEDIA[kind].name for kind in collator.required)
    log(info, f"data checked in {time.perf_counter() - t0:.1f} s; it holds {kinds}: every batch carries "
              f"{carried} (a dummy where it has none)")
    family = family_of(model_config)
    if VIDEO in media and family.video_bounds == "clip":
        per_frame = cfg.data.video_max_pixels // cfg.data.video_max_frames
        log(info, f"note: {family.name} bounds a video's frames together: data.video_max_pixels="
                  f"{cfg.data.video_max_pixels} over up to {cfg.data.video_max_frames} frames is about {per_frame} "
                  f"pixels a frame, data.video_min_pixels={cfg.data.video_min_pixels} the least for a clip "
                  "(docs/families.md)")
    if VIDEO in media and truncates_video_seconds(model_config):
        log(info, f"note: transformers {transformers.__version__} rounds a video's seconds per two frames "
                  "down to whole seconds in M-RoPE (0.5 s becomes 0: frames share a time position); "
                  "training and inference on this version agree, but transformers >= 5.24 keeps the fraction")
    return collator


@watchdog.at("setup/data", watch=False)  # start-up is slow, not stuck: recorded, not watched
def build_data(cfg, info: dist.DistInfo, processor) -> TrainData:
    """Check every row once (no model, no pixel processing; the ranks split the rows and
    share what they found), so that a broken row stops the job now with its file and
    line, or is dropped (data.on_bad_sample), instead of killing one rank hours in. The
    check also measures each row's length, for length grouping. Then the loader: each
    rank reads its slice of every step's global batch."""
    # The ranks of a sequence-parallel group read the same rows: the batch is dealt to groups.
    bs, world, accum = cfg.train.per_device_train_batch_size, info.data_world, cfg.train.gradient_accumulation_steps
    pack_length, global_batch = packed_length(cfg.data), global_batch_size(cfg.train, world)
    refusal = pack_length and varlen_refusal(cfg.model.attn_implementation)
    if refusal:
        raise ConfigError(refusal)
    train_ds, eval_ds = build_datasets(cfg.data, processor, cfg.train.seed)
    t0 = time.perf_counter()
    train_ds, train_lengths = _checked_rows(train_ds, cfg, info)  # SYNC
    eval_ds, eval_lengths = _checked_rows(eval_ds, cfg, info) if eval_ds is not None else (None, None)  # SYNC
    media = train_ds.media | (eval_ds.media if eval_ds is not None else frozenset())
    collator = _collator(cfg, info, processor, media, AutoConfig.from_pretrained(cfg.model.path), t0)
    if len(train_ds) < global_batch:
        raise DataError(
            f"{cfg.data.train_file}: {len(train_ds)} usable rows, but one optimizer step needs "
            f"{global_batch} (per_device_train_batch_size {bs} x gradient_accumulation_steps {accum} "
            f"x world size {world})"
        )
    # Every rank gets the same number of batches per epoch, hence runs the same number
    # of forwards (a rank with one more would wait forever in an all-gather). The order
    # is a pure function of (seed, epoch) over global batches, whatever the world size:
    # resuming sets the position (in steps), nothing else.
    if pack_length:
        sampler = PackedBatchSampler(train_lengths, pack_length, batch_size=bs, num_replicas=world,
                                     rank=info.data_rank, seed=cfg.train.seed, accumulation=accum)
        check_packs(cfg, info, sampler, train_lengths, pack_length)
        train_ds, eval_ds = PackedRows(train_ds), eval_ds and PackedRows(eval_ds)
    else:
        sampler = ShardedBatchSampler(train_lengths, batch_size=bs, num_replicas=world, rank=info.data_rank,
                                      seed=cfg.train.seed, group_by_length=cfg.data.group_by_length,
                                      accumulation=accum)
    loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collator,
                        num_workers=cfg.train.dataloader_num_workers, pin_memory=info.on_gpu)
    log(info, f"train rows {len(train_ds)}, eval rows {len(eval_ds) if eval_ds else 0}; global batch "
              f"{global_batch} {'packs' if pack_length else 'rows'} = {bs} per device x "
              f"{accum} accumulation x {world} " + (f"groups of {info.sequence_parallel} sequence-parallel ranks"
                                                     if info.sequence_parallel > 1 else "ranks"))
    return TrainData(train_ds, eval_ds, eval_lengths, collator, sampler, loader,
                     run_shape(cfg, world, len(train_ds)))


def run_shape(cfg, world_size: int, train_rows: int) -> dict:
    """What a checkpoint's data position means depends on these; resume refuses a change,
    except of how the global batch is split (ckpt.check_run_shape). `world_size`: the
    ranks that read distinct rows (the sequence-parallel groups: `DistInfo.data_world`)."""
    return {
        "world_size": world_size, "per_device_train_batch_size": cfg.train.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps, "seed": cfg.train.seed,
        "train_file": os.path.abspath(cfg.data.train_file), "train_rows": train_rows,
        "eval_fraction": cfg.data.eval_fraction, "group_by_length": cfg.data.group_by_length,
        "pack_length": packed_length(cfg.data),
    }


def check_packs(cfg, info: dist.DistInfo, sampler: PackedBatchSampler, lengths: list[int], pack_length: int) -> None:
    """Refuse data too small for one packed micro-batch on every rank; log what packing
    saves: the packs' fill against the padding of the same rows unpacked."""
    if not sampler.steps_in(0):
        raise DataError(
            f"{cfg.data.train_file}: {len(lengths)} usable rows fill fewer than the {sampler.step_packs} packs of "
            f"{pack_length} tokens that one optimizer step needs (per_device_train_batch_size "
            f"{sampler.batch_size} x gradient_accumulation_steps {sampler.accumulation} x world size "
            f"{sampler.num_replicas}): lower data.pack_length or the batch size"
        )
    efficiency, used, left = sampler.efficiency(0)
    unpacked = [b for r in range(sampler.num_replicas)
                for b in ShardedBatchSampler(lengths, sampler.batch_size, sampler.num_replicas, r,
                                             cfg.train.seed).batches(0)]
    real = sum(lengths[i] for b in unpacked for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in unpacked)
    log(info, f"packing: epoch 0 packs {used} rows into {sampler.steps_in(0) * sampler.step_packs} rows of "
              f"{pack_length} tokens, {efficiency:.1%} filled ({left} rows wait for the next epoch); "
              f"unpacked, {1 - real / padded:.1%} of the batch would be padding")
