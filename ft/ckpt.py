"""Checkpoints: sharded and resumable (torch.distributed.checkpoint), and Hugging Face
exports of the best model (safetensors, loadable with `from_pretrained`).

Layout under `train.output_dir`:

    checkpoints/step-N/     DCP shards of model + optimizer (every rank writes its own),
                            plus `train_state.json`, written by rank 0 after all ranks
                            finished: a folder without it is incomplete.
    best/                   HF export of the lowest-eval_loss model so far, with the
                            source model's processor/tokenizer files and `ft_export.json`.

Every function here with a `model` argument is a collective: all ranks must call it.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ft.dist import DistInfo, barrier
from ft.processor import export_processor_files

TRAIN_STATE_FILE = "train_state.json"
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
def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, "checkpoints", f"step-{step}")


def save_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict,
    output_dir: str,
    info: DistInfo,
) -> str:
    """Save model and optimizer shards for `train_state["step"]`; returns the folder."""
    path = checkpoint_path(output_dir, train_state["step"])
    # Sharded state dicts: each rank writes only its own shards, no gather to rank 0.
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    barrier()  # every rank's shards are on disk before the marker says "complete"
    if info.is_main:
        write_json_atomic(os.path.join(path, TRAIN_STATE_FILE), train_state)
    barrier()
    return path


def load_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str) -> dict:
    """Load a checkpoint written by `save_checkpoint` into an already wrapped model and
    its optimizer; returns the saved train state."""
    marker = os.path.join(path, TRAIN_STATE_FILE)
    if not os.path.isfile(marker):
        raise FileNotFoundError(f"{path} is not a complete checkpoint: {TRAIN_STATE_FILE} is missing")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with open(marker) as f:
        return json.load(f)


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
