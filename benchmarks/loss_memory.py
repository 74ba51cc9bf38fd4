"""Peak memory of the loss head, plain vs chunked (`train.loss_chunk_size`), at the
Qwen2.5-VL-3B shapes: hidden 2048, vocabulary 151,936, bf16 compute as under FSDP
mixed precision.

What is measured: from the final hidden states [1, tokens, hidden] (as the decoder
returns them) and the lm_head weight (as FSDP gathers it), the forward and backward of
the loss, down to the gradients of both. The peak is what that adds on top of those two
inputs; it includes the [vocab, hidden] weight gradient (0.58 GiB), which both paths
produce. The plain path is ft.model.loss_sum's with chunk_size=0 (the model's lm_head
over every position, label rows picked, fp32 cross-entropy); the chunked path calls
ft.model.chunked_cross_entropy_sum, the function loss_sum uses.

On a GPU the tensors are real and the figure is torch.cuda.max_memory_allocated (the
times are printed too). Without one, nothing is computed: the tensors are fake (shapes
only) and a dispatch mode adds up the bytes of every storage while it is alive, which
is what a caching allocator's "allocated" figure counts, minus rounding.

    python benchmarks/loss_memory.py [--tokens 4096] [--label-fraction 1.0 0.25]
"""

from __future__ import annotations

import argparse
import contextlib
import time
import weakref

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from ft.model import chunked_cross_entropy_sum

HIDDEN, VOCAB = 2048, 151_936  # Qwen2.5-VL-3B's published config.json
GiB = 2**30


class LiveStorageBytes(TorchDispatchMode):
    """Bytes of the storages created while the mode is active that are still alive,
    and their peak. A view or an in-place result shares its input's storage and is not
    counted again; a storage is released when its last tensor goes."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            # Storages that existed before (the inputs) are not counted when a view of
            # them comes out of an op.
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self._seen:
                self._seen[t.untyped_storage()] = 0
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self._seen:
                    nbytes = storage.nbytes()
                    self._seen[storage] = nbytes
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, nbytes)
        return out


def plain(hidden, weight, rows, targets, chunk_size):
    logits = F.linear(hidden, weight)  # what the HF forward's lm_head computes
    picked = logits[:, :-1][rows].float()
    return F.cross_entropy(picked, targets, reduction="sum")


def chunked(hidden, weight, rows, targets, chunk_size):
    return chunked_cross_entropy_sum(hidden[:, :-1][rows], weight, targets, chunk_size)


def measure(loss_fn, tokens: int, labels: int, chunk_size: int, device: torch.device) -> tuple[float, float | None]:
    """(peak bytes above the inputs, seconds or None) of one forward + backward."""
    # The label positions, fixed before any fake tensor exists: a boolean-mask index
    # has a data-dependent shape that fake tensors cannot have. The last `labels`
    # positions predict a token, as in a prompt-then-answer sample.
    keep = torch.zeros(1, tokens, dtype=torch.bool)
    keep[:, tokens - labels:] = True
    rows = keep.nonzero(as_tuple=True)
    targets = torch.randint(0, VOCAB, (labels,))

    on_gpu = device.type == "cuda"
    fake = contextlib.nullcontext() if on_gpu else FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        hidden = torch.randn(1, tokens + 1, HIDDEN, dtype=torch.bfloat16, device=device).requires_grad_()
        weight = (torch.randn(VOCAB, HIDDEN, dtype=torch.bfloat16, device=device) / 50).requires_grad_()
        rows = tuple(r.to(device) for r in rows)
        targets = targets.to(device)
        if on_gpu:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            loss_fn(hidden, weight, rows, targets, chunk_size).backward()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - base, time.perf_counter() - start
        with LiveStorageBytes() as tracker:
            loss_fn(hidden, weight, rows, targets, chunk_size).backward()
        return tracker.peak, None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--label-fraction", type=float, nargs="+", default=[1.0, 0.25])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[512, 1024, 2048])
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    how = (f"torch.cuda.max_memory_allocated on {torch.cuda.get_device_name(device)}"
           if device.type == "cuda" else "live storage bytes of fake (shape-only) tensors, CPU")
    print(f"loss head, hidden {HIDDEN}, vocab {VOCAB}, bf16; peak above the inputs ({how})")
    for fraction in args.label_fraction:
        labels = max(1, round(args.tokens * fraction))
        print(f"\n{args.tokens} tokens, {labels} of them labelled")
        if device.type == "cuda":  # warm-up: cuBLAS workspaces would count in the first run
            measure(chunked, args.tokens, labels, args.chunk_sizes[0], device)
        base, seconds = measure(plain, args.tokens, labels, 0, device)
        timing = f"  {seconds * 1e3:7.1f} ms" if seconds is not None else ""
        print(f"  plain              {base / GiB:6.2f} GiB{timing}")
        for chunk_size in args.chunk_sizes:
            peak, seconds = measure(chunked, args.tokens, labels, chunk_size, device)
            timing = f"  {seconds * 1e3:7.1f} ms" if seconds is not None else ""
            print(f"  chunked {chunk_size:>5}      {peak / GiB:6.2f} GiB{timing}  ({base / peak:.1f}x less)")


if __name__ == "__main__":
    main()
