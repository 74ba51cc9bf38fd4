"""Checkpoints: sharded and resumable (torch.distributed.checkpoint), and Hugging Face
exports of the best model (safetensors, loadable with `from_pretrained`).

Layout under `train.output_dir`:

    checkpoints/step-N/     one resumable checkpoint:
        __0_0.distcp ...    DCP shards of model + optimizer (every rank writes its own)
        .metadata           DCP's index, written once all shards are
        rng/rank-R.pt       each rank's python / numpy / torch (/ cuda) RNG state, as
                            tensors only (`ft.rng`: loaded without unpickling)
        train_state.json    the completion marker: train state, data position, run shape;
                            written (fsync'd) by rank 0 after every rank finished. A
                            folder without it is incomplete: reported, never resumed.
    best/                   HF export of the best model so far (train.metric_for_best), with the
                            source model's processor/tokenizer files and `ft_export.json`;
                            weights in `train.export_dtype` (`export_dtype_name`).

Every function here with a `model` argument is a collective: all ranks must call it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ft import faults, rng
from ft.backends import backend_of
from ft.dist import DistInfo, all_gather_object, barrier
from ft.rounding import MASTER_DTYPES
from ft.optim import spec_of
from ft.processor import export_processor_files

TRAIN_STATE_FILE = "train_state.json"
RNG_DIR = "rng"
EXPORT_INFO_FILE = "ft_export.json"


def write_json_atomic(path: str, obj: dict) -> None:
    """Write, fsync, then rename: a reader sees the old file or the new one, never half."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# =====================================================================================
# Resumable sharded checkpoints
# =====================================================================================
@dataclass
class TrainState:
    """Everything that changes as training advances and is not a tensor; checkpointed
    (`train_state` in train_state.json)."""

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
        for k, v in d.items():
            setattr(self, k, v)


@dataclass
class Checkpoint:
    step: int
    path: str
    why_incomplete: str  # "" when complete

    @property
    def complete(self) -> bool:
        return not self.why_incomplete


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, "checkpoints", f"step-{step}")


def _fsync_dir(path: str) -> None:
    # A rename or a new file is durable only once its directory entry is: without this a
    # power loss can leave the marker file's name pointing nowhere.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def incomplete_reason(path: str) -> str:
    """'' when `path` is a complete checkpoint, else what is missing."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        return "no .metadata (the sharded save did not finish)"
    marker = os.path.join(path, TRAIN_STATE_FILE)
    if not os.path.isfile(marker):
        return f"no {TRAIN_STATE_FILE} (a rank did not finish writing)"
    try:
        with open(marker) as f:
            meta = json.load(f)
        world = int(meta["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {TRAIN_STATE_FILE} ({e})"
    missing = [r for r in range(world) if not os.path.isfile(os.path.join(path, RNG_DIR, f"rank-{r}.pt"))]
    if missing:
        return f"no RNG state for rank(s) {missing}"
    return ""


def list_checkpoints(output_dir: str) -> list[Checkpoint]:
    """Every `checkpoints/step-N` folder, oldest first, complete or not."""
    root = os.path.join(output_dir, "checkpoints")
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        m = re.fullmatch(r"step-(\d+)", name)
        if m:
            path = os.path.join(root, name)
            found.append(Checkpoint(int(m.group(1)), path, incomplete_reason(path)))
    return sorted(found, key=lambda c: c.step)


def save_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict,
    output_dir: str,
    info: DistInfo,
    keep_last_n: int = 0,
) -> str:
    """Save everything needed to continue exactly: model and optimizer shards (every rank
    writes its own, no gather), each rank's RNG state, and `meta` (train state, data
    position, run shape). Returns the folder.

    Complete only once `train_state.json` exists: rank 0 writes it (fsync'd) after a
    barrier that every rank reaches with its shards and RNG file already fsync'd. A crash
    anywhere before leaves a folder that `list_checkpoints` reports as incomplete.
    Then, older checkpoints beyond `keep_last_n` (0 keeps all) are deleted.
    """
    path = checkpoint_path(output_dir, meta["train_state"]["step"])
    if info.is_main and os.path.isdir(path):
        # A partial save of this step from a crashed attempt: never mix its shards
        # (maybe from another world size) with the new ones.
        shutil.rmtree(path)
    barrier()  # SYNC
    model_sd = backend_of(model).model_state_dict(model)
    optim_sd = spec_of(optimizer).checkpoint.state_dict(model, optimizer)  # SYNC (ft's Adafactor: an all-reduce)
    dcp.save({"model": model_sd, "optim": optim_sd},  # SYNC
             storage_writer=dcp.FileSystemWriter(path, sync_files=True))
    rng_dir = os.path.join(path, RNG_DIR)
    os.makedirs(rng_dir, exist_ok=True)
    rng.save(os.path.join(rng_dir, f"rank-{info.rank}.pt"), info.device)
    faults.hook("kill_in_save", meta["train_state"]["step"], info.rank)
    barrier()  # SYNC: every rank's shards and RNG state are on disk
    if info.is_main:
        _fsync_dir(rng_dir)
        write_json_atomic(os.path.join(path, TRAIN_STATE_FILE), {**meta, "world_size": info.world_size})
        _fsync_dir(path)
        if keep_last_n:
            prune_checkpoints(output_dir, keep_last_n)
    barrier()  # SYNC: nobody reads or prunes while rank 0 is still writing
    return path


def prune_checkpoints(output_dir: str, keep_last_n: int) -> list[str]:
    """Keep the newest `keep_last_n` complete checkpoints; delete older ones, and any
    incomplete folder older than the newest complete one (a leftover of a crash). Only
    called right after a checkpoint completed, so a complete one always survives.
    The best export lives outside `checkpoints/` and is never touched."""
    ckpts = list_checkpoints(output_dir)
    complete = [c for c in ckpts if c.complete]
    if not complete:
        return []
    keep = {c.path for c in complete[-keep_last_n:]}
    newest = complete[-1].step
    doomed = [c.path for c in ckpts if c.path not in keep and c.step < newest]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _saved_tensor_meta(path: str) -> dict:
    """{key: TensorStorageMetadata} of a DCP checkpoint, keys as flattened by DCP
    ("model.lm_head.weight", "optim.state.<fqn>.exp_avg_sq", ...)."""
    md = dcp.FileSystemReader(path).read_metadata()
    return {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def _flat_tensors(prefix: str, obj) -> dict:
    """DCP's flattening of nested dicts: {"a": {"b": t}} -> {"a.b": t}."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat_tensors(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: obj} if isinstance(obj, (torch.Tensor, ShardedTensor)) else {}


def check_compatible(path: str, expected: dict) -> None:
    """Refuse a checkpoint whose tensors do not fit this run, before anything is loaded:
    a different architecture (missing, extra or reshaped tensors) or a different dtype
    (e.g. bf16 weights where this run keeps fp32 master weights) — DCP would otherwise
    cast silently, or fail deep inside with a message that names no tensor."""
    saved = _saved_tensor_meta(path)
    want = _flat_tensors("", expected)
    missing = sorted(k for k in want if k not in saved)
    extra = sorted(k for k in saved if k.startswith("model.") and k not in want)
    if missing or extra:
        lines = [f"{path} does not match this model (different architecture or config?):"]
        if missing:
            lines.append(f"  not in the checkpoint: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if extra:
            lines.append(f"  only in the checkpoint: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""))
        raise CheckpointMismatch("\n".join(lines))
    for key, tensor in want.items():
        meta = saved[key]
        if meta.properties.dtype != tensor.dtype:
            if key.startswith("model."):
                masters = {v: k for k, v in MASTER_DTYPES.items()}
                hint = (f"the checkpoint's run had train.master_weights={masters.get(meta.properties.dtype, '?')}, "
                        f"this one has train.master_weights={masters.get(tensor.dtype, '?')}: resume with "
                        f"train.master_weights={masters.get(meta.properties.dtype, '?')}")
            else:
                hint = ("resume with the optimizer the checkpoint was written with (ft's optimizer state "
                        "is fp32 whatever train.precision and train.master_weights)")
            raise CheckpointMismatch(
                f"{path}: tensor {key} was saved as {meta.properties.dtype}, but this run keeps it "
                f"as {tensor.dtype}: {hint}."
            )
        if tuple(meta.size) != tuple(tensor.size()):
            raise CheckpointMismatch(
                f"{path}: tensor {key} has shape {tuple(meta.size)} in the checkpoint but "
                f"{tuple(tensor.size())} in this model (different architecture or config?)"
            )


class CheckpointMismatch(RuntimeError):
    pass


def read_meta(path: str) -> dict:
    with open(os.path.join(path, TRAIN_STATE_FILE)) as f:
        return json.load(f)


def load_checkpoint(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str, info: DistInfo, seed: int = 0
) -> dict:
    """Load a checkpoint written by `save_checkpoint` into an already wrapped model and
    its (fresh) optimizer, at its world size or another: DCP reshards the model and
    optimizer shards. Restore this rank's RNG state when the world size is the one that
    wrote it; at another, there is no such state for every rank, and each rank's is
    derived from (`seed`, step, rank) instead (`ft.rng.derive`). Returns the saved meta."""
    why = incomplete_reason(path)
    if why:
        raise CheckpointMismatch(f"{path} is not a complete checkpoint: {why}")
    meta = read_meta(path)
    backend, io = backend_of(model), spec_of(optimizer).checkpoint
    if meta["world_size"] != info.world_size and not io.reshards:
        raise CheckpointMismatch(
            f"{path} was written by {meta['world_size']} ranks; this run has {info.world_size}, and the "
            f"state of train.optim={spec_of(optimizer).name} cannot be resharded: {io.why_not_reshard} "
            "Resume on the same number of ranks, or start over (train.resume=none)."
        )
    model_sd = backend.model_state_dict(model)
    saved_optim = {k[len("optim."):]: m for k, m in _saved_tensor_meta(path).items() if k.startswith("optim.")}
    state = {"model": model_sd, "optim": io.template(model, optimizer, saved_optim)}
    check_compatible(path, state if io.check_saved else {"model": model_sd})
    dcp.load(state, checkpoint_id=path)  # SYNC
    backend.load_model_state_dict(model, state["model"])
    io.load(model, optimizer, state["optim"])
    if meta["world_size"] != info.world_size:
        rng.derive(seed, meta["train_state"]["step"], info.rank, info.device)
        return meta
    try:
        rng.load(os.path.join(path, RNG_DIR, f"rank-{info.rank}.pt"), info.device)
        error = None
    except ValueError as e:  # pickled objects, or not the RNG state ft writes
        error = str(e)
    # One rank's file may be bad and the others' not: all ranks refuse together.
    errors = [e for e in all_gather_object(error) if e]  # SYNC
    if errors:
        raise CheckpointMismatch(errors[0])
    return meta


# =====================================================================================
# Hugging Face export of the best model
# =====================================================================================
def recover_export(path: str) -> None:
    """Finish an export swap that a crash interrupted (see `_swap_into_place`)."""
    old = f"{path}.old"
    if os.path.isdir(old):
        if os.path.isdir(path):
            shutil.rmtree(old)
        else:
            os.rename(old, path)
    shutil.rmtree(f"{path}.tmp", ignore_errors=True)


def _make_readable(folder: str) -> None:
    # transformers writes model.safetensors owner-only (0600); an export is meant to be
    # shared (other users of the cluster, a serving job), so apply the usual umask.
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def _swap_into_place(tmp: str, path: str) -> None:
    # A directory cannot be replaced atomically while it has files, so: move the current
    # export aside, move the new one in, delete the old one. A crash at any point leaves
    # either `path` or `path.old` complete, and `recover_export` puts it back.
    old = f"{path}.old"
    if os.path.isdir(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes an export is written in, by the name config.json records."""


def source_dtype_name(source_model_dir: str) -> str:
    """The dtype the source checkpoint's config.json records (`dtype`, or `torch_dtype`
    as transformers < 5 writes it), if one of `EXPORT_DTYPES`; else (no entry, another
    dtype, no readable config.json) "float32"."""
    try:
        with open(os.path.join(source_model_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return "float32"
    name = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
    name = name.removeprefix("torch.") if isinstance(name, str) else None  # "torch.bfloat16" too
    return name if name in EXPORT_DTYPES else "float32"


def export_dtype_name(setting: str, source_model_dir: str) -> str:
    """`train.export_dtype` (`auto`, `bf16`, `fp32`) as a key of `EXPORT_DTYPES`: `auto`
    is the source checkpoint's dtype (`source_dtype_name`), which may be float16."""
    if setting == "auto":
        return source_dtype_name(source_model_dir)
    names = {"bf16": "bfloat16", "fp32": "float32"}
    if setting not in names:
        raise ValueError(f"export dtype {setting!r} is not one of auto, bf16, fp32")
    return names[setting]


def _cast_floating(state_dict: dict, dtype: torch.dtype) -> None:
    """Cast the floating-point tensors of `state_dict` to `dtype` in place, one at a time,
    so each full-precision tensor can be freed as soon as its cast replaces it. Integer
    tensors are left alone. Tensors that share storage (tied embeddings, where the
    gathered state dict keeps them shared) are cast once and stay shared, so that
    `save_pretrained` still sees them as tied."""
    cast: dict[tuple, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dtype == dtype:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()))
        if key not in cast:
            cast[key] = tensor.to(dtype)
        state_dict[name] = cast[key]
        del tensor


def _ties_embeddings(config) -> bool:
    """Whether the model's lm_head is its input embedding. Released Qwen2.5-VL configs
    (3B: true, 7B: false) say it at the top level only; their text config has no such
    attribute. Configs that say it in the text config too are read the same way."""
    tied = getattr(config, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    return bool(tied)


def export_hf(
    model: torch.nn.Module,
    path: str,
    source_model_dir: str,
    info: DistInfo,
    export_info: dict,
    processor_settings: dict[str, dict] | None = None,
    export_dtype: str = "auto",
) -> None:
    """Gather the full weights and write an HF folder at `path` from rank 0, atomically
    (see the backend's `full_state_dict` for where the gathered copy lives), with the
    source model's processor files updated by `processor_settings`
    (``ft.processor.training_settings``). Floating-point weights are written in
    `export_dtype` (`train.export_dtype`, resolved by `export_dtype_name`), cast on rank
    0 from the gathered master weights, and config.json records that dtype, so that
    `from_pretrained` without a dtype loads them in it."""
    dtype_name = export_dtype_name(export_dtype, source_model_dir)  # every rank: a bad value fails on all
    backend = backend_of(model)
    state_dict = backend.full_state_dict(model, info)  # SYNC
    if info.is_main:
        tmp = f"{path}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _cast_floating(state_dict, EXPORT_DTYPES[dtype_name])
        hf_model = backend.unwrap(model)
        config = hf_model.config
        if _ties_embeddings(config) and "lm_head.weight" in state_dict:
            # The gathered state dict holds the tied lm_head as a tensor of its own, so
            # save_pretrained would write the embedding twice (0.6 GB more in bf16 on
            # the 3B). from_pretrained ties it back from the config.
            del state_dict["lm_head.weight"]
        configs = [config] + [c for c in (getattr(config, k, None) for k in config.sub_configs) if c is not None]
        dtypes = [c.dtype for c in configs]
        # Training runs without a KV cache; the export is for inference, which wants it.
        config.use_cache = True
        try:
            _on_meta(hf_model).save_pretrained(tmp, state_dict=state_dict)
            # save_pretrained records the in-memory model's dtype (the fp32 master
            # weights): record the export's, on the config and its sub-configs, as
            # from_pretrained sets it.
            for c in configs:
                c.dtype = dtype_name
            config.save_pretrained(tmp)
        finally:
            config.use_cache = False
            for c, dtype in zip(configs, dtypes):
                c.dtype = dtype
        export_processor_files(source_model_dir, tmp, processor_settings)
        write_json_atomic(os.path.join(tmp, EXPORT_INFO_FILE), export_info)
        _make_readable(tmp)
        _swap_into_place(tmp, path)
    del state_dict
    barrier()  # SYNC


def _on_meta(hf_model: torch.nn.Module) -> torch.nn.Module:
    """The model's architecture on the meta device, with its config and generation
    config: what `save_pretrained` reads besides the state dict. transformers converts
    some weights back to the layout the family's checkpoints store (Qwen3-VL-MoE's
    fused experts are stored transposed) and asks the model each parameter's shape;
    under FSDP1 the wrapped model holds its weights as plain tensors (views into the
    flat parameter), which that lookup refuses."""
    with torch.device("meta"):
        twin = type(hf_model)._from_config(hf_model.config)
    twin.generation_config = hf_model.generation_config
    return twin


# =====================================================================================
# Which checkpoint a run continues from
# =====================================================================================
# What a previous run leaves in output_dir; `resume=none` refuses to mix with it.
RUN_OUTPUTS = ("checkpoints", "best", "metrics.jsonl", "wandb", "wandb_run_id")


class ResumeError(RuntimeError):
    """This run cannot continue from what is in output_dir as configured (the same on
    every rank; a restart would not change it)."""


def find_resume_checkpoint(train_cfg, out: str, info: DistInfo, log=print) -> str | None:
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
        barrier()  # SYNC: every rank has looked before rank 0 deletes
        if leftovers and info.is_main:
            for name in leftovers:
                path = os.path.join(out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            log(f"train.overwrite_output_dir: deleted {', '.join(leftovers)} in {out}")
        return None
    if mode != "auto":  # a given checkpoint folder
        if not os.path.isdir(mode):
            raise ResumeError(f"train.resume={mode}: no such checkpoint folder")
        why = incomplete_reason(mode)
        if why:
            raise ResumeError(f"train.resume={mode} is not a complete checkpoint: {why}")
        return mode
    ckpts = list_checkpoints(out)
    for c in ckpts:
        if not c.complete:
            log(f"ignoring incomplete checkpoint {c.path}: {c.why_incomplete}")
    complete = [c for c in ckpts if c.complete]
    return complete[-1].path if complete else None


GLOBAL_BATCH_KEYS = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps")
"""The run-shape keys whose product is the global batch: each may change on resume, as
long as the product does not."""


def global_batch(shape: dict) -> str:
    """'6 (2 ranks x 1 per device x 3 accumulation)': a run shape's global batch."""
    world, bs, accum = (shape.get(k) for k in GLOBAL_BATCH_KEYS)
    total = world * bs * accum if None not in (world, bs, accum) else None
    return f"{total} ({world} rank{'s' if world != 1 else ''} x {bs} per device x {accum} accumulation)"


def check_run_shape(path: str, saved: dict, now: dict) -> None:
    """A checkpoint's data position (epoch, steps into it) means the same thing only with
    the same global batch, seed and data: the data order is a function of them alone
    (`ft.sampler`, `ft.packing`). How the global batch is split (world size, batch per
    device, accumulation) may change: another world size continues the same order."""
    changed = [f"{k}: {saved.get(k)} -> {v}" for k, v in now.items()
               if k not in GLOBAL_BATCH_KEYS and saved.get(k) != v]
    before, after = global_batch(saved), global_batch(now)
    if before.split()[0] != after.split()[0]:
        changed.insert(0, f"global batch {before} -> {after}")
    if changed:
        raise ResumeError(
            f"cannot resume from {path}: the run changed ({'; '.join(changed)}). Resume with the original "
            "settings (another number of ranks is fine if per_device_train_batch_size x "
            "gradient_accumulation_steps x world size stays the same), or start over with train.resume=none."
        )
