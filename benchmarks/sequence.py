"""Sequence parallelism (`parallel.sequence_parallel_size`, ft.sequence): memory and step
time per rank for SP = 1, 2, 4, on one long synthetic video sample, on the CPU.

    python benchmarks/sequence.py [--sp 1 2 4] [--tokens 16384] [--video-tokens 1024]
        [--frame-side 16] [--labels 256] [--text-layers 2] [--vision-depth 2]
        [--vocab 151936] [--checkpointing] [--steps 1] [--json OUT.json]

The model is Qwen2.5-VL-3B's layer shapes (configs/qwen2_5_vl_3b/config.json: hidden
2048, 16 query and 2 key/value heads, MLP 11008, the 151,936-row tied vocabulary, the
1280-wide vision tower and its merger) with `--text-layers` decoder layers and
`--vision-depth` vision blocks (benchmarks/build_model.py's shaped_config), randomly
initialised, in bf16 (the compute dtype of FSDP's mixed precision), sdpa attention.

The sample is one row built directly as the model's inputs (no processor): text, then
one video of `--video-tokens` tokens (frames of `--frame-side` x `--frame-side` patches
of 14 px, two frames per temporal patch, 4 patches merged into a token), then more text
of which the last `--labels` tokens are the labelled answer. Its length is `--tokens`
rounded up to a multiple of every SP size asked for, so every run sees the same row.

SP = 1 runs as one plain process; SP = K > 1 under torchrun, K gloo ranks in one
sequence-parallel group (world size K). Every rank holds the whole model, replicated,
without FSDP and without an optimizer: the point is the activations, which FSDP does
not change. Each rank runs ft.model.loss_sum (the chunked loss) and backward on its 1/K
of the row's tokens in the language model, and on what ft.sequence.apply gives it of the
vision tower's work (the whole tower on every rank, or its share of the video's frames
where ft.sequence splits them): the line apply returns is printed with each run, and
a digest of the ft/sequence.py the ranks imported.
One thread per rank (OMP_NUM_THREADS=1, as launch.sh), so SP = 4 puts 4 ranks on a
2-core machine: its step time is then that of 2 cores shared by 4.

What is measured, per rank, for one forward + backward:

* the activation peak: the peak of live tensor storage bytes created during the step
  (benchmarks/loss_memory.py's LiveStorageBytes, a dispatch mode: torch's CPU allocator
  has no peak counter). The weights and the batch exist before and are not in it; the
  all-to-alls' buffers, the vision tower's activations, the loss chunk and each
  parameter's gradient as backward makes it are;
* the live-tensor peak: that plus the baseline, weights + gradient buffers + batch. The
  gradient buffers (one per parameter, its size) are counted, not allocated: each
  gradient is dropped once accumulated (as FSDP frees an unsharded gradient once
  reduce-scattered), which changes nothing in the activation peak (a gradient adds
  into a kept buffer in place, or is kept as the buffer: the same bytes made either
  way) and leaves 4 ranks of the 3B shapes room in 24 GiB;
* the step time (forward + backward, from a barrier to the end of this rank's backward;
  the table shows the slowest rank), timed on the tracked step, and its CPU seconds
  (process time, the largest rank's): on a shared machine the steadier figure;
* the peak RSS (ft.metrics.memory_stats: the model build, the libraries, allocator
  slack; no gradient buffers).

The table shows the largest figure over the ranks of each run. Activation
checkpointing is off unless `--checkpointing` (transformers' gradient checkpointing,
non-reentrant, on every decoder layer and vision block).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs/qwen2_5_vl_3b/config.json"
GiB = 2**30
PATCH_DIM = 3 * 2 * 14 * 14  # channels x temporal patch x patch side^2: a row of pixel_values_videos


def _load(name: str):
    """A sibling benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sp", type=int, nargs="+", default=[1, 2, 4], help="sequence-parallel sizes to run")
    parser.add_argument("--tokens", type=int, default=16384, help="row length (rounded up to every SP size)")
    parser.add_argument("--video-tokens", type=int, default=1024,
                        help="tokens of the video (a multiple of (frame-side/2)^2)")
    parser.add_argument("--frame-side", type=int, default=16, help="frame side in 14-px patches (even)")
    parser.add_argument("--labels", type=int, default=256, help="labelled answer tokens at the end of the row")
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--vision-depth", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary rows (151,936: the 3B's)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="train.loss_chunk_size")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing on")
    parser.add_argument("--steps", type=int, default=1, help="tracked steps per run (median time, largest peak)")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--json", help="write every rank's figures here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one SP size, write here
    args = parser.parse_args(argv)
    merged = (args.frame_side // 2) ** 2
    if args.frame_side % 2 or args.video_tokens <= 0 or args.video_tokens % merged:
        parser.error(f"--video-tokens must be a positive multiple of (frame-side/2)^2 = {merged}, "
                     f"--frame-side even")
    args.tokens = math.lcm(*args.sp) * -(-args.tokens // math.lcm(*args.sp))
    if args.tokens < args.video_tokens + args.labels + 4:
        parser.error(f"--tokens {args.tokens} leaves no room for the video, 2 markers and the answer")
    return args


def model_config(args):
    """The 3B's config at the asked depth (and vocabulary, with the special tokens moved
    to its top rows when it is cut)."""
    config = _load("build_model").shaped_config(args.config, args.text_layers, args.vision_depth)
    text = config.text_config
    if args.vocab != text.vocab_size:
        text.vocab_size = config.vocab_size = args.vocab
        for offset, name in enumerate(("image_token_id", "video_token_id", "vision_start_token_id",
                                       "vision_end_token_id", "bos_token_id", "eos_token_id"), 1):
            for holder in (config, text):
                if getattr(holder, name, None) is not None:
                    setattr(holder, name, args.vocab - offset)
    config.use_cache = text.use_cache = False
    return config


def layout(args) -> dict[str, int]:
    """How the row's tokens are spent."""
    side = args.frame_side
    temporal = args.video_tokens // (side // 2) ** 2
    text = args.tokens - args.video_tokens - 2
    return {"tokens": args.tokens, "text": text, "video": args.video_tokens, "labels": args.labels,
            "frames": 2 * temporal, "grid": (temporal, side, side), "patches": temporal * side * side}


def sample(config, args) -> dict:
    """The model inputs of the one row: text, <|vision_start|>, the video pads,
    <|vision_end|>, text ending in the labelled answer. The same on every rank."""
    import torch

    from ft.messages import IGNORE_INDEX, VIDEO

    shape = layout(args)
    g = torch.Generator().manual_seed(0)
    words = min(config.vision_start_token_id, config.image_token_id, config.video_token_id,
                config.text_config.bos_token_id or config.vision_start_token_id) - 1
    before = (shape["text"] - args.labels) // 2
    after = shape["text"] - before
    ids = torch.cat([torch.randint(0, words, (before,), generator=g),
                     torch.tensor([config.vision_start_token_id]),
                     torch.full((shape["video"],), config.video_token_id),
                     torch.tensor([config.vision_end_token_id]),
                     torch.randint(0, words, (after,), generator=g)])[None]
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -args.labels:] = ids[:, -args.labels:]
    types = torch.zeros_like(ids)
    types[ids == config.video_token_id] = VIDEO
    return {
        "input_ids": ids,
        "labels": labels,
        "mm_token_type_ids": types,
        "pixel_values_videos": torch.randn(shape["patches"], PATCH_DIM, generator=g).to(torch.bfloat16),
        "video_grid_thw": torch.tensor([shape["grid"]]),
        "second_per_grid_ts": torch.tensor([1.0]),  # 2 fps, 2 frames per temporal patch
    }


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def worker(args) -> None:
    """One SP size: build, split, run `--steps` tracked forward + backward, and have
    rank 0 write every rank's figures to `args.worker`."""
    import torch
    import torch.distributed as dist
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ft import sequence
    from ft.dist import init_distributed
    from ft.metrics import memory_stats
    from ft.model import loss_sum

    live_storage_bytes = _load("loss_memory").LiveStorageBytes
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))
    info = sequence.grouped(init_distributed(), int(os.environ.get("WORLD_SIZE", "1")))
    config = model_config(args)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                             dtype=torch.bfloat16)
    model.train()
    built_s = time.perf_counter() - start
    applied = sequence.apply(model, info, "sdpa")  # nothing at SP = 1
    source = hashlib.sha1(Path(sequence.__file__).read_bytes()).hexdigest()[:12]
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = sample(config, args)
    params = list(model.parameters())
    weights = _storage_bytes(params)
    grads = weights  # one gradient buffer per parameter, of its dtype: counted, not allocated

    def drop(p):
        p.grad = None

    for p in params:
        p.register_post_accumulate_grad_hook(drop)
    inputs = _storage_bytes(batch.values())
    peaks, times, cpu = [], [], []
    for _ in range(args.steps):
        dist.barrier()
        with live_storage_bytes() as tracker:
            start, start_cpu = time.perf_counter(), time.process_time()
            loss, labelled = loss_sum(model, batch, args.chunk_size)
            loss.backward()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        peaks.append(tracker.peak)
        del loss
    mine = {"rank": info.rank, "sp": info.sequence_parallel,
            "tokens_per_rank": args.tokens // info.sequence_parallel, "labelled": labelled,
            "parameters": sum(p.numel() for p in params), "weights": weights, "grads": grads, "inputs": inputs,
            "activation_peak": max(peaks), "step_s": statistics.median(times), "cpu_s": statistics.median(cpu),
            "build_s": built_s, "peak_rss_gib": memory_stats(torch.device("cpu"))["peak_rss_gib"],
            "threads": torch.get_num_threads(), "applied": applied, "sequence_py": source}
    everyone = [None] * info.world_size
    dist.all_gather_object(everyone, mine)
    if info.is_main:
        Path(args.worker).write_text(json.dumps(everyone))
    dist.destroy_process_group()


def run(size: int, argv: list[str], out: str) -> list[dict]:
    """Every rank's figures for SP = `size`: one process, or `size` under torchrun."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), *filter(None, [env.get("PYTHONPATH")])])
    script = [str(HERE / "sequence.py"), *argv, "--sp", str(size), "--worker", out]
    if size == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1",
                   "--nproc-per-node", str(size), *script]
    subprocess.run(command, env=env, check=True)
    return json.loads(Path(out).read_text())


def summarize(ranks: list[dict]) -> dict:
    """One run's row: the largest figure over its ranks."""
    top = max(ranks, key=lambda r: r["activation_peak"])
    baseline = max(r["weights"] + r["grads"] + r["inputs"] for r in ranks)
    live = max(r["weights"] + r["grads"] + r["inputs"] + r["activation_peak"] for r in ranks)
    return {"sp": ranks[0]["sp"], "ranks": len(ranks), "tokens_per_rank": ranks[0]["tokens_per_rank"],
            "baseline_gib": baseline / GiB, "live_peak_gib": live / GiB,
            "activation_gib": top["activation_peak"] / GiB,
            "activation_low_gib": min(r["activation_peak"] for r in ranks) / GiB,
            "step_s": max(r["step_s"] for r in ranks),
            "cpu_s": max(r["cpu_s"] for r in ranks),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in ranks)}


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["sp"] == 1), rows[0])
    lines = ["| SP | ranks | tokens per rank | live-tensor peak per rank GiB | activation peak per rank GiB "
             "(lowest rank) | activation vs SP=1 | step s | step vs SP=1 | step CPU s per rank | peak RSS GiB |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['sp']} | {r['ranks']} | {r['tokens_per_rank']:,} | {r['live_peak_gib']:.2f} | "
                     f"{r['activation_gib']:.2f} ({r['activation_low_gib']:.2f}) | "
                     f"{r['activation_gib'] / base['activation_gib']:.2f}x | {r['step_s']:.1f} | "
                     f"{r['step_s'] / base['step_s']:.2f}x | {r['cpu_s']:.1f} | {r['peak_rss_gib']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return []
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    # The workers get the row length already rounded, so that every SP size sees the same row.
    forward = _without_option(argv, "--sp", many=True)
    forward = _without_option(forward, "--tokens") + ["--tokens", str(args.tokens)]
    forward = _without_option(forward, "--json")
    shape = layout(args)
    config = model_config(args)
    text, vision = config.text_config, config.vision_config
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {os.environ.get('OMP_NUM_THREADS', '1')} thread(s) "
          f"per rank, gloo; bf16 weights and compute, sdpa, no FSDP (the model replicated on every rank), "
          f"activation checkpointing {'on' if args.checkpointing else 'off'}, loss chunk {args.chunk_size}")
    print(f"model: Qwen2.5-VL-3B shapes, {text.num_hidden_layers} decoder layers (hidden {text.hidden_size}, "
          f"{text.num_attention_heads}/{text.num_key_value_heads} heads, MLP {text.intermediate_size}), "
          f"{vision.depth} vision blocks (hidden {vision.hidden_size}), vocab {text.vocab_size:,}, random init")
    print(f"sample: one row of {shape['tokens']:,} tokens = {shape['text']:,} text (the last {shape['labels']} "
          f"labelled) + 2 vision markers + {shape['video']:,} video tokens; the video: {shape['frames']} frames "
          f"of {args.frame_side * 14}x{args.frame_side * 14} px, grid (t, h, w) = {shape['grid']}, "
          f"{shape['patches']:,} vision patches of {PATCH_DIM} values")
    rows, every = [], []
    with tempfile.TemporaryDirectory(prefix="ft-sp-bench-") as tmp:
        for size in args.sp:
            start = time.perf_counter()
            ranks = run(size, forward, os.path.join(tmp, f"sp{size}.json"))
            every += ranks
            rows.append(summarize(ranks))
            print(f"SP={size}: {len(ranks)} rank(s) done in {time.perf_counter() - start:.0f} s wall "
                  f"(model built in {max(r['build_s'] for r in ranks):.0f} s; "
                  f"{ranks[0]['parameters'] / 1e9:.3f}B parameters, weights + gradient buffers + batch "
                  f"{rows[-1]['baseline_gib']:.2f} GiB per rank); ft/sequence.py {ranks[0]['sequence_py']}"
                  + (f": {ranks[0]['applied']}" if ranks[0]["applied"] else ""), flush=True)
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "layout": shape, "rows": rows, "ranks": every},
                                              indent=1))
    return rows


def _without_option(argv: list[str], name: str, many: bool = False) -> list[str]:
    """`argv` without `name` and its value(s) (`--name v`, `--name=v`)."""
    out, skipping = [], False
    for a in argv:
        if skipping and not a.startswith("--"):
            if not many:
                skipping = False
            continue
        skipping = False
        if a == name:
            skipping = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


if __name__ == "__main__":
    main()
