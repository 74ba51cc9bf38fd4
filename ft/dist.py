"""Process-group plumbing: which rank am I, which device do I drive, and the few
collectives the loop needs. Everything here works with one process (no torchrun) too,
so tests and debugging sessions can import the loop's pieces without a launcher."""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    sequence_parallel: int = 1  # ranks per sequence-parallel group (`ft.sequence`): they share micro-batches

    @property
    def data_rank(self) -> int:
        """Which share of every global batch this rank reads: its sequence-parallel group's."""
        return self.rank // self.sequence_parallel

    @property
    def sequence_index(self) -> int:
        """This rank's place in its sequence-parallel group (0 when there are none)."""
        return self.rank % self.sequence_parallel

    @property
    def data_world(self) -> int:
        """How many shares a global batch is dealt in: the sequence-parallel groups."""
        return self.world_size // self.sequence_parallel

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun set up (or run alone when it did not).

    NCCL when this node has GPUs, gloo otherwise. One process drives one GPU: the
    local rank picks it, so `NPROC_PER_NODE` must not exceed the GPU count.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                "set NPROC_PER_NODE to at most the GPU count"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        # device_id binds NCCL's communicator to this GPU eagerly; gloo takes none.
        kwargs = {"device_id": device} if backend == "nccl" else {}
        if "MASTER_ADDR" not in os.environ:
            # Started without torchrun (`python -m ft.loop`): FSDP still needs a process
            # group, so make a one-rank group on an in-memory store.
            kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
        else:
            # torchrun's static rendezvous (--master-addr/--master-port) keeps one store
            # across restarts, while the workers' env:// rendezvous assumes a fresh one:
            # a restarted group could read the dead workers' gloo/NCCL addresses and wait
            # forever to connect (seen in tests/test_resume.py). One key space per attempt;
            # the store itself is kept for what outlives an attempt (`record_refusal`).
            global _STORE
            _STORE, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size,
                                                timeout=datetime.timedelta(seconds=timeout_s)))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            kwargs.update(store=dist.PrefixStore(f"ft/attempt_{attempt}", _STORE), rank=rank,
                          world_size=world_size)
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


_STORE = None  # torchrun's store: it outlives a restart of the group
_REFUSAL_KEY = "ft/refusal"


def record_refusal(message: str) -> None:
    """Leave `message` (why this job cannot go on: bad config, data or checkpoint) in
    torchrun's store, where a restarted attempt finds it (`earlier_refusal`)."""
    if _STORE is not None:
        _STORE.set(_REFUSAL_KEY, message)


def earlier_refusal() -> str | None:
    """The refusal an earlier attempt of this job recorded, if any: a restart cannot fix
    it, so the attempt should stop at once with the same message."""
    if _STORE is None or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        return None
    if not _STORE.check([_REFUSAL_KEY]):
        return None
    return _STORE.get(_REFUSAL_KEY).decode()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over all ranks in one collective (float64, so token counts
    in the billions stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_tensor_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over all ranks, in place (a collective; `t` unchanged on one rank)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum of a few scalars over all ranks, in one collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_gather_object(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_module_state(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers (non-persistent ones such as rotary
    `inv_freq` included) into every other rank's module, in place.

    Every rank must hold the same parameter and buffer list in the same order, shapes
    and dtypes included; otherwise gloo aborts with "collective mismatch" (and NCCL
    hangs). That is why tied weights must be re-tied after `to_empty` before this runs.
    """
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


def cleanup() -> None:
    """Take the process group down while the interpreter still runs; call it once the
    job's objects (model, optimizer) are gone.

    gloo runs each collective on a worker thread which, when done, drops its reference
    to the collective's tensors; for a tensor made in Python that needs the GIL. A group
    still alive at interpreter shutdown can have such a thread ended mid-destructor by
    the finalizing interpreter, and the process aborts with "terminate called without an
    active exception" (seen in about one 2-rank CPU run in four). The group is alive as
    long as anything holds it, and FSDP modules do, in reference cycles: collect them,
    then destroy the group, whose destructor joins its threads with the GIL released.
    """
    global _STORE
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    _STORE = None
