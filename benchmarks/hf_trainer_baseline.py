"""The reference recipe with the Hugging Face Trainer, measured the way ft measures itself.

    python -m torch.distributed.run --nproc-per-node N benchmarks/hf_trainer_baseline.py \\
        --model DIR [--data FILE] [--steps 20] [--batch-size 2] [--accum 1] [--precision auto]
        [--max-length 2048] [--warmup 3] [--json OUT.json]

(benchmarks/compare.py launches it this way; needs `accelerate`, which the Trainer
imports and ft does not depend on.)

Same model, rows, batch shape and optimizer settings as benchmarks/bench.py gives ft:
ft's ConversationDataset and Collator (so both see identical samples, dummy image
included), Adafactor, constant LR, gradient clipping, FSDP `full_shard auto_wrap` as the
recipe configures it, non-reentrant gradient checkpointing. The recipe's arguments that
this transformers version refuses are dropped and reported, and so is what the Trainer
actually ran (FSDP or not, which FSDP version, how the model was wrapped): on CPU
accelerate silently replaces FSDP with DDP.

Measured like ft's loop (ft/loop.py): the step is split at GPU-synchronised points
into data (fetching the step's micro-batches, which the Trainer does before
`on_step_begin`), forward+backward (up to `on_pre_optimizer_step`, gradient clipping
included as in ft), and optimizer (to `on_step_end`); the Trainer's logging after a
step is left out, as ft leaves its own out. Tokens are the collator's
`ft.collate.BatchStats.tokens` (no padding, no dummy image) of all ranks, FLOPs are ft.metrics'
count of the same batches, memory is ft.metrics.memory_stats, highest over ranks.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist

from bench import add_common_args  # run as a script: benchmarks/ is on sys.path

# Arguments as the reference recipe passes them. Kept when this transformers version
# accepts them; `warmup_ratio` is moot anyway: the `constant` schedule ignores it.
RECIPE_ONLY_ARGS = {"warmup_ratio": 0.03, "save_safetensors": True}
FSDP_CONFIG = {
    "backward_prefetch": "backward_pre",
    "limit_all_gathers": True,
    "sync_module_states": True,
    "use_orig_params": False,
    "transformer_layer_cls_to_wrap": ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"],
    # FSDP1, as the recipe's keys assume: transformers 5.24 defaults to FSDP2, which
    # ignores backward_prefetch, limit_all_gathers, sync_module_states, use_orig_params.
    "version": 1,
}


def build_training_args(kwargs: dict, dropped: dict):
    """TrainingArguments(**kwargs), dropping each keyword this version refuses as
    unknown and noting it in `dropped` ({keyword: the error it raised})."""
    from transformers import TrainingArguments

    # TrainingArguments adds its defaults to fsdp_config in place: keep the caller's clean.
    kwargs = dict(kwargs, fsdp_config=dict(kwargs["fsdp_config"]))
    while True:
        try:
            return TrainingArguments(**kwargs)
        except TypeError as e:
            unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
            if not unknown or unknown.group(1) not in kwargs:
                raise
            dropped[unknown.group(1)] = f"TypeError: {e}"
            del kwargs[unknown.group(1)]


def fit_to_machine(recipe: dict, dropped: dict) -> dict:
    """`recipe` as this machine can run it.

    On the CPU (no GPU, or `use_cpu`), accelerate builds its FSDP plugin and then runs DDP (it
    has no FSDP on the CPU), and the plugin refuses `sync_module_states=True` at
    Trainer construction: accelerate 1.15 said "no available devices", 1.16 "FSDP
    parameter initialization with `sync_module_states=True` is not supported on cpu".
    The flag is set to False there and noted in `dropped` (leaving it out is not
    enough: transformers defaults it to true for FSDP1), which changes nothing since
    no FSDP runs. Decided from the condition, so that no wording change breaks it.
    """
    on_cpu = recipe.get("use_cpu") or not torch.cuda.is_available()
    fsdp_config = recipe.get("fsdp_config") or {}
    if not on_cpu or not recipe.get("fsdp") or not fsdp_config.get("sync_module_states"):
        return recipe
    dropped["fsdp_config.sync_module_states"] = (
        "set to False: no accelerator, and accelerate refuses FSDP parameter initialisation with "
        "sync_module_states on the CPU (it runs DDP there instead of FSDP)")
    return dict(recipe, fsdp_config=dict(fsdp_config, sync_module_states=False))


def build_trainer(trainer_class, recipe: dict, dropped: dict, **trainer_kwargs):
    """The Trainer for `recipe`'s arguments, as far as this machine allows (see
    fit_to_machine and build_training_args; what was changed goes in `dropped`)."""
    recipe = fit_to_machine(recipe, dropped)
    return trainer_class(args=build_training_args(recipe, dropped), **trainer_kwargs)


class MeasuredCollator:
    """ft's Collator's inputs, plus the batch's real tokens as `num_real_tokens` and its model FLOPs (ft.metrics conventions) as
    `bench_flops`, computed here on CPU tensors so that nothing waits for the GPU."""

    def __init__(self, collator, model_config):
        self.collator = collator
        self.model_config = model_config

    def __call__(self, samples):
        from ft.metrics import train_flops

        made = self.collator(samples)
        batch, stats = made.inputs, made.stats
        batch["num_real_tokens"] = torch.tensor(stats.tokens)
        batch["bench_flops"] = torch.tensor(train_flops(self.model_config, stats), dtype=torch.float64)
        return batch


def make_trainer_class():
    from transformers import Trainer

    class CountingTrainer(Trainer):
        """Takes the collator's `num_real_tokens` and `bench_flops` out of each
        micro-batch before the model sees it and hands them to the StepTimer.

        Counted here rather than in the collator: accelerate's data loader fetches a
        batch ahead (and the Trainer a whole step's micro-batches), so a count taken
        at collate time would be billed to the wrong step."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.timer.pending.append((inputs.pop("num_real_tokens"), inputs.pop("bench_flops")))
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return CountingTrainer


def make_step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Per-step wall times and token/FLOP counts of this rank."""

        def __init__(self):
            self.pending: list = []  # (tokens, flops) device tensors of this step's micro-batches
            self.steps: list[dict] = []
            self.losses: dict[int, float] = {}
            self.lrs: dict[int, float] = {}

        def _now(self) -> float:
            if torch.cuda.is_available():  # as ft's clock(): bill queued kernels to their phase
                torch.cuda.synchronize()  # the Trainer has made this rank's GPU current
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.ready = self._now()

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = self._now()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.pre_optimizer = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            end = self._now()
            self.steps.append({
                "data_s": self.begin - self.ready,
                "fwd_bwd_s": self.pre_optimizer - self.begin,
                "optim_s": end - self.pre_optimizer,
                "tokens": sum(float(t) for t, _ in self.pending),
                "flops": sum(float(f) for _, f in self.pending),
            })
            self.pending.clear()
            self.ready = end

        def on_log(self, args, state, control, logs=None, **kwargs):
            # The Trainer logs after on_step_end; the next step's data phase starts here.
            self.ready = self._now()
            if logs and "loss" in logs:
                self.losses[state.global_step] = logs["loss"]
                self.lrs[state.global_step] = logs.get("learning_rate")

    return StepTimer()


def what_ran(trainer, dropped: dict) -> dict:
    """What the Trainer actually did with the recipe's settings."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.nn.parallel import DistributedDataParallel as DDP

    try:
        from torch.distributed.fsdp import FSDPModule  # FSDP2 (fully_shard)
    except ImportError:
        FSDPModule = ()
    wrapped = trainer.model_wrapped
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # under AcceleratedOptimizer
    group = optimizer.param_groups[0]
    return {
        "transformers": __import__("transformers").__version__,
        "accelerate": __import__("accelerate").__version__,
        "torch": torch.__version__,
        "is_fsdp_enabled": trainer.is_fsdp_enabled,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "fsdp_version": getattr(plugin, "fsdp_version", None),
        "fsdp_plugin": None if plugin is None else {
            k: str(getattr(plugin, k, None)) for k in (
                "sharding_strategy", "reshard_after_forward", "backward_prefetch", "limit_all_gathers",
                "sync_module_states", "use_orig_params", "activation_checkpointing",
                "mixed_precision_policy")},
        "wrapped_model_class": f"{type(wrapped).__module__}.{type(wrapped).__qualname__}",
        "fsdp1_units": sum(isinstance(m, FSDP) for m in wrapped.modules()),
        "fsdp2_units": sum(isinstance(m, FSDPModule) for m in wrapped.modules()) if FSDPModule else 0,
        "ddp": isinstance(wrapped, DDP),
        # `is_gradient_checkpointing` is a deprecated alias in 5.24 (FutureWarning), the
        # only name in older releases.
        "gradient_checkpointing": bool(getattr(trainer.model, "is_activation_checkpointing", None)
                                       or getattr(trainer.model, "is_gradient_checkpointing", False)),
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
        "optimizer_group": {k: group[k] for k in ("lr", "scale_parameter", "relative_step", "warmup_init")
                            if k in group},
        "lr_scheduler_type": str(trainer.args.lr_scheduler_type),
        "warmup_steps": trainer.args.warmup_steps,
        "fsdp_args": str(trainer.args.fsdp),
        "fsdp_config_args": {k: str(v) for k, v in trainer.args.fsdp_config.items()},
        "dropped_args": dropped,
    }


def aggregate(steps: list[dict], warmup: int, world: int, peak_flops: float | None) -> dict:
    """ft's summary figures over the steps after the first `warmup`. `steps` hold this
    rank's times and all ranks' token and FLOP sums."""
    kept = steps[warmup:]
    if not kept:
        raise ValueError(f"{len(steps)} steps ran, none after the first {warmup} warm-up steps")
    n = len(kept)
    seconds = sum(s["data_s"] + s["fwd_bwd_s"] + s["optim_s"] for s in kept)
    tokens = sum(s["tokens"] for s in kept)
    flops = sum(s["flops"] for s in kept)
    return {
        "warmup_steps": warmup,
        "steps_measured": n,
        "tokens_per_s_per_device": tokens / seconds / world,
        "step_time_s": seconds / n,
        "data_s": sum(s["data_s"] for s in kept) / n,
        "fwd_bwd_s": sum(s["fwd_bwd_s"] for s in kept) / n,
        "optim_s": sum(s["optim_s"] for s in kept) / n,
        "mfu": flops / world / (seconds * peak_flops) if peak_flops else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--seed", type=int, default=42, help="ft's default train.seed")
    parser.add_argument("--output-dir", default="runs/hf-baseline", help="Trainer's output_dir (nothing is saved)")
    parser.add_argument("--json", help="write the result as JSON here (rank 0)")
    args = parser.parse_args(argv)

    try:
        import accelerate  # noqa: F401  (the Trainer needs it; say so before loading anything)
    except ImportError:
        sys.exit("hf_trainer_baseline: the HF Trainer needs `accelerate` (pip install -e .[bench]); ft does not")
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ft.config import DataConfig
    from ft.collate import Collator
    from ft.datacheck import check_data
    from ft.dataset import build_datasets
    from ft.metrics import memory_stats, peak_flops
    from ft.processor import load_processor_for

    on_gpu = torch.cuda.is_available()
    bf16 = args.precision == "bf16" or (args.precision == "auto" and on_gpu)
    recipe = dict(
        output_dir=args.output_dir,
        optim="adafactor",
        learning_rate=args.lr,
        # `constant` ignores warmup_ratio (only `constant_with_warmup` warms up).
        lr_scheduler_type="constant",
        max_grad_norm=args.max_grad_norm,
        bf16=bf16,
        fsdp="full_shard auto_wrap",
        fsdp_config=FSDP_CONFIG,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accum,
        max_steps=args.steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        # ft's loader: in-process loading, pinned memory on GPU, its own seed.
        dataloader_num_workers=0,
        dataloader_pin_memory=on_gpu,
        dataloader_drop_last=True,
        # The torch Dataset's samples go to ft's collator whole; num_real_tokens and
        # bench_flops are taken out in compute_loss, not by the Trainer.
        remove_unused_columns=False,
        seed=args.seed,
        disable_tqdm=True,
        # Without it, on a machine with no GPU accelerate sees no distributed setup under
        # torchrun (DistributedType.NO, one process each) and the Trainer refuses fsdp.
        use_cpu=not on_gpu,
        **RECIPE_ONLY_ARGS,
    )
    # fp32 master weights, as ft loads them; bf16=True then autocasts the compute.
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    model.config.use_cache = False
    # ft's processor and video sampling at the config's defaults, as ft's runs get them.
    data_cfg = DataConfig(train_file=args.data, eval_file="", max_length=args.max_length,
                          min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    processor = load_processor_for(args.model, data_cfg)
    # Every rank checks every row: the same kinds of vision input on all, for the dummies.
    dataset, _, _ = check_data(build_datasets(data_cfg, processor)[0], "error")
    collator = MeasuredCollator(Collator(processor, media=dataset.media), model.config)

    timer = make_step_timer()
    dropped: dict[str, str] = {}
    trainer = build_trainer(make_trainer_class(), recipe, dropped, model=model, train_dataset=dataset,
                            data_collator=collator, callbacks=[timer])
    training_args = trainer.args
    rank0 = training_args.process_index == 0
    if rank0:
        for name, why in dropped.items():
            print(f"[hf] dropped {name}: {why}", flush=True)
    trainer.timer = timer
    start = time.perf_counter()
    trainer.train()
    train_wall = time.perf_counter() - start

    world, device = training_args.world_size, training_args.device
    # All ranks' tokens and FLOPs per step; times are rank 0's, as in ft.
    counts = torch.tensor([[s["tokens"], s["flops"]] for s in timer.steps], dtype=torch.float64, device=device)
    memory = memory_stats(device)
    peaks = torch.tensor(list(memory.values()), dtype=torch.float64, device=device)
    if torch_dist.is_initialized():
        torch_dist.all_reduce(counts)
        torch_dist.all_reduce(peaks, op=torch_dist.ReduceOp.MAX)
    for s, (tokens, flops) in zip(timer.steps, counts.tolist()):
        s["tokens"], s["flops"] = tokens, flops
    ran = what_ran(trainer, dropped)
    if not rank0:
        return 0
    result = {
        "system": "hf_trainer",
        "steps": len(timer.steps),
        **aggregate(timer.steps, args.warmup, world, peak_flops(device)),
        **dict(zip(memory, peaks.tolist())),
        "source": "Trainer callback",
        "train_wall_s": train_wall,
        "losses": timer.losses,
        "learning_rates": sorted(set(timer.lrs.values()) - {None}),
        "ran": ran,
    }
    print("[hf] what the Trainer ran: " + json.dumps(ran, indent=2), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
