"""What videos cost at the config's defaults: tokens, data-check and loading time per
clip, and forward+backward tokens/s next to images.

    python benchmarks/video.py [--config configs/demo.yaml] [--long-seconds 60] [--repeats 3]

Three parts, one process:

1. Each video row of the demo data, and a generated long clip (`--long-seconds` at 30
   fps, 640x360, H.264): frames taken, video tokens, time the data check spends on it
   (``ConversationDataset.layout``: the header and first frame only) and time to load
   the sample (``dataset[i]``: decode the taken frames, resize, normalise, tokenise:
   the work of one DataLoader worker).
2. Tokens/s of the data pipeline per worker, videos against images.
3. Forward+backward tokens/s of the config's model on batches of video rows against
   batches of image rows (fp32, CPU unless a GPU is there; activation checkpointing
   off), and the FLOPs per token ``ft.metrics`` counts for each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

import torch

from ft.config_load import load_config
from ft.collate import Collator
from ft.datacheck import check_data
from ft.dataset import build_datasets
from ft.messages import IMAGE, VIDEO
from ft.rows import load_rows
from ft.metrics import forward_flops
from ft.model import loss_sum
from ft.processor import load_processor_for
from ft.tinymodel import save_tiny
from ft.video import probe


def long_clip(path: str, seconds: int, fps: int = 30, size: tuple[int, int] = (640, 360)) -> str:
    """A moving-gradient H.264 clip of `seconds` at `fps`."""
    import av
    import numpy as np

    width, height = size
    ys, xs = np.mgrid[0:height, 0:width]
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(seconds * fps):
            frame = np.stack([(xs + 4 * k) % 256, (ys + 2 * k) % 256, np.full_like(xs, (3 * k) % 256)], -1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--long-seconds", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="rows per forward+backward batch")
    args = parser.parse_args()
    cfg = load_config(args.config)
    save_tiny(cfg.model.path, vocab=cfg.model.tiny_vocab, if_missing=True)
    processor = load_processor_for(cfg.model.path, cfg.data)
    d = cfg.data
    print(f"defaults: video_fps {d.video_fps}, video_max_frames {d.video_max_frames}, video pixels "
          f"{d.video_min_pixels}..{d.video_max_pixels}, image pixels {d.min_pixels}..{d.max_pixels}, "
          f"max_length {d.max_length}; torch {torch.__version__}, {os.cpu_count()} CPUs")

    # The demo rows plus one long generated clip, in one JSONL beside the demo data (so
    # that the demo's relative paths still resolve).
    workdir = tempfile.mkdtemp(prefix="ft-video-bench-")
    start = time.perf_counter()
    clip = long_clip(os.path.join(workdir, "long.mp4"), args.long_seconds)
    info = probe(clip)
    print(f"generated {clip}: {info.frames} frames at {info.rate:g} fps, {info.width}x{info.height}, "
          f"{os.path.getsize(clip) / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s")
    demo = load_rows(d.train_file)
    rows = [json.loads(demo.raw(i)) for i in range(len(demo))]
    rows.append({"messages": [
        {"role": "user", "content": [{"type": "video", "video": clip}, {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": "Colour gradients drift to the lower right."}]})
    data_file = os.path.join(os.path.dirname(os.path.abspath(d.train_file)), f".bench-video-{os.getpid()}.jsonl")
    try:
        with open(data_file, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        dataset, _ = build_datasets(dataclasses.replace(d, train_file=data_file, eval_file=""), processor)
        dataset, lengths, _ = check_data(dataset, "error")
        kinds = [frozenset(dataset.layout(i)["mm_token_type_ids"].unique().tolist()) - {0}
                 for i in range(len(dataset))]
        videos = [i for i, k in enumerate(kinds) if VIDEO in k]
        images = [i for i, k in enumerate(kinds) if k == {IMAGE}]

        print("\n| row | video | frames taken | video tokens | row tokens | data check ms | load ms |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        load_s = {}
        for i in videos:
            check, _ = timed(lambda: dataset.layout(i, {}), args.repeats)
            load, sample = timed(lambda: dataset[i], args.repeats)
            load_s[i] = load
            grid = sample["video_grid_thw"]
            part = next(p for m in dataset.messages(i) for p in m["content"] if p["type"] == "video")
            name = (os.path.basename(part["video"]) if isinstance(part["video"], str)
                    else f"{len(part['video'])} frames in {os.path.basename(os.path.dirname(part['video'][0]))}/")
            print(f"| {i} | {name} | {int(grid[:, 0].sum()) * 2} | {int(grid.prod(-1).sum()) // 4} | "
                  f"{lengths[i]} | {check * 1e3:.1f} | {load * 1e3:.1f} |")
        for i in images:
            load_s[i], _ = timed(lambda: dataset[i], 1)
        for name, rows_ in (("video rows", [i for i in videos if i != len(dataset) - 1]),
                            ("image rows", images)):
            tokens = sum(lengths[i] for i in rows_)
            print(f"\ndata pipeline, {name} ({len(rows_)}): {tokens / sum(load_s[i] for i in rows_):.0f} "
                  f"tokens/s per worker")

        model = _model(cfg)
        collate = Collator(processor, media=dataset.media)
        print("\n| batch | rows | tokens | fwd+bwd s | tokens/s | model GFLOP per token |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, rows_ in (("video", [i for i in videos if i != len(dataset) - 1]), ("image", images)):
            batches = [rows_[k:k + args.batch] for k in range(0, len(rows_) - args.batch + 1, args.batch)]
            batches = [collate([dataset[i] for i in b]) for b in batches]
            seconds = tokens = flops = 0.0
            for k, batch in enumerate(batches):
                start = time.perf_counter()
                total, _ = loss_sum(model, batch.inputs, 0)
                total.backward()
                model.zero_grad(set_to_none=True)
                if k:  # the first batch warms up
                    seconds += time.perf_counter() - start
                    tokens += batch.stats.tokens
                    flops += forward_flops(model.config, batch.stats).total * 3
            print(f"| {name} | {args.batch} x {len(batches) - 1} | {tokens:.0f} | {seconds:.2f} | "
                  f"{tokens / seconds:.0f} | {flops / tokens / 1e9:.4f} |")
    finally:
        os.remove(data_file)


def _model(cfg):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(cfg.model.path, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    model.config.use_cache = False
    return model.train()


if __name__ == "__main__":
    main()
