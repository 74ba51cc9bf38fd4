"""Checkpoints: sharded and resumable (torch.distributed.checkpoint), and Hugging Face
exports of the best model (safetensors, loadable with `from_pretrained`).

Layout under `train.output_dir`:

    checkpoints/step-N/     one resumable checkpoint:
        __0_0.distcp ...    DCP shards of model + optimizer (every rank writes its own)
        .metadata           DCP's index, written once all shards are
        rng/rank-R.pt       each rank's python / numpy / torch (/ cuda) RNG state
        train_state.json    the completion marker: train state, data position, run shape;
                            written (fsync'd) by rank 0 after every rank finished. A
                            folder without it is incomplete: reported, never resumed.
    best/                   HF export of the lowest-eval_loss model so far, with the
                            source model's processor/tokenizer files and `ft_export.json`.

Every function here with a `model` argument is a collective: all ranks must call it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass

import numpy as np

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ft.dist import DistInfo, barrier
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


def _rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _optim_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    # ft's Adafactor keeps factored row/column statistics that FSDP's optimizer state
    # dict cannot express (FACTS.md); it exports its own world-size-independent state.
    if hasattr(optimizer, "fqn_state_dict"):
        return optimizer.fqn_state_dict()
    return get_optimizer_state_dict(model, optimizer)


def save_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict,
    output_dir: str,
    info: DistInfo,
    keep_last_n: int = 0,
    _crash_before_marker: bool = False,
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
    model_sd = get_model_state_dict(model)
    optim_sd = _optim_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=dcp.FileSystemWriter(path, sync_files=True))
    rng_dir = os.path.join(path, RNG_DIR)
    os.makedirs(rng_dir, exist_ok=True)
    rng_file = os.path.join(rng_dir, f"rank-{info.rank}.pt")
    with open(rng_file, "wb") as f:
        torch.save(_rng_state(info.device), f)
        f.flush()
        os.fsync(f.fileno())
    if _crash_before_marker:  # test hook: a kill in the middle of a save
        os.kill(os.getpid(), signal.SIGKILL)
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
            raise CheckpointMismatch(
                f"{path}: tensor {key} was saved as {meta.properties.dtype}, but this run keeps it "
                f"as {tensor.dtype}. Resume with the precision and optimizer the checkpoint was "
                "written with (master weights and optimizer state are fp32 under train.precision=bf16)."
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
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str, info: DistInfo
) -> dict:
    """Load a checkpoint written by `save_checkpoint` into an already wrapped model and
    its (fresh) optimizer, restore this rank's RNG state; return the saved meta."""
    why = incomplete_reason(path)
    if why:
        raise CheckpointMismatch(f"{path} is not a complete checkpoint: {why}")
    meta = read_meta(path)
    if meta["world_size"] != info.world_size:
        # Model and optimizer shards could be resharded, but each rank's data position
        # and RNG stream could not: refuse rather than silently train on other samples.
        raise CheckpointMismatch(
            f"{path} was written by {meta['world_size']} ranks; this run has {info.world_size}. "
            "Resume with the same world size, or start over (train.resume=none)."
        )
    model_sd = get_model_state_dict(model)
    if hasattr(optimizer, "load_fqn_state_dict"):
        # ft's Adafactor: full, replicated tensors; make a template from the metadata.
        saved = _saved_tensor_meta(path)
        optim_sd = {
            k[len("optim."):]: torch.empty(tuple(m.size), dtype=m.properties.dtype)
            for k, m in saved.items() if k.startswith("optim.")
        }
    else:
        # Builds the optimizer's state (a zero-lr step) so there is something to load into.
        optim_sd = get_optimizer_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    check_compatible(path, {"model": model_sd} if hasattr(optimizer, "load_fqn_state_dict") else state)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    if hasattr(optimizer, "load_fqn_state_dict"):
        optimizer.load_fqn_state_dict(state["optim"])
    else:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    rng = torch.load(os.path.join(path, RNG_DIR, f"rank-{info.rank}.pt"), weights_only=False)
    _set_rng_state(rng, info.device)
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


def export_hf(
    model: torch.nn.Module,
    path: str,
    source_model_dir: str,
    info: DistInfo,
    export_info: dict,
) -> None:
    """Gather the full weights to rank 0 and write an HF folder at `path`, atomically.

    On GPU the gathered tensors are offloaded to CPU as they arrive (only rank 0 keeps
    them). On CPU offload must stay off: with the model already on CPU it crashes
    ("setStorage ... out of bounds", FACTS.md), so every rank gathers a full copy there.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=info.on_gpu)
    state_dict = get_model_state_dict(model, options=options)  # collective
    if info.is_main:
        tmp = f"{path}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        hf_model = getattr(model, "module", model)  # the HF model under the root FSDP unit
        # Training runs without a KV cache; the export is for inference, which wants it.
        hf_model.config.use_cache = True
        try:
            hf_model.save_pretrained(tmp, state_dict=state_dict)
        finally:
            hf_model.config.use_cache = False
        export_processor_files(source_model_dir, tmp)
        write_json_atomic(os.path.join(tmp, EXPORT_INFO_FILE), export_info)
        _make_readable(tmp)
        _swap_into_place(tmp, path)
    del state_dict
    barrier()
