"""Start-up on a large Hugging Face dataset: how long until the first training step.

    python benchmarks/hf_dataset.py [--rows 100000] [--nproc 2] [--workers 0]

Writes a synthetic `save_to_disk` dataset in TRL's vision format (`messages` with an
`{"type": "image"}` placeholder, `images` with one embedded 96x72 JPEG per row, every
image different, short questions and answers), then:

1. reads it with `ft.rows.load_rows` and prints the time and this process's resident
   memory: the rows stay on disk (memory-mapped Arrow), so no copy of them is made;
2. runs `./launch.sh configs/demo.yaml` on it for one step on `--nproc` ranks (the
   tiny demo model, no eval set) and prints the wall time to the end of step 1, the
   data check's time (every row parsed, tokenised and its image decoded) and the peak
   RSS per rank from metrics.jsonl.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mib() -> dict[str, float]:
    """This process's resident memory, MiB: anonymous (heap: copies of data) and
    file-backed (pages of memory-mapped files, which the kernel can drop and reread)."""
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in f
                if line.startswith(("RssAnon", "RssFile"))}


def write_dataset(path: str, rows: int) -> None:
    import datasets
    import numpy as np
    from PIL import Image

    def generate():
        rng = np.random.default_rng(0)
        ys, xs = np.mgrid[0:72, 0:96]
        for i in range(rows):
            tint = rng.integers(0, 256, 3)
            pixels = (np.stack([xs * 2, ys * 3, np.full_like(xs, i % 256)], -1) + tint) % 256
            buffer = io.BytesIO()
            Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=80)
            yield {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "text": None},
                                                 {"type": "text", "text": f"What is in picture {i}?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": f"A gradient, tinted {tint.tolist()}."}]},
                ],
                "images": [{"bytes": buffer.getvalue(), "path": None}],
            }

    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    features = datasets.Features({
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(part)}),
        "images": datasets.List(datasets.Image()),
    })
    datasets.Dataset.from_generator(generate, features=features).save_to_disk(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="train.dataloader_num_workers")
    parser.add_argument("--dir", help="reuse or create the dataset here (default: a temporary folder)")
    args = parser.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="ft-hf-bench-")
    data = os.path.join(work, f"synthetic-{args.rows}")
    os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(work, "cache"))
    if not os.path.isdir(data):
        start = time.perf_counter()
        write_dataset(data, args.rows)
        size = sum(os.path.getsize(os.path.join(data, f)) for f in os.listdir(data))
        print(f"wrote {data}: {args.rows} rows, {size / 2**20:.0f} MiB, in {time.perf_counter() - start:.0f} s")

    from ft.rows import load_rows  # imports datasets and pyarrow: before the measurement

    before = rss_mib()
    start = time.perf_counter()
    rows = load_rows(data)
    after = rss_mib()
    print(f"load_rows: {len(rows)} rows in {time.perf_counter() - start:.2f} s; anonymous memory "
          f"{before['RssAnon']:.0f} -> {after['RssAnon']:.0f} MiB, memory-mapped file pages "
          f"{before['RssFile']:.0f} -> {after['RssFile']:.0f} MiB")

    out = os.path.join(work, f"run-{args.rows}-{args.nproc}x{args.workers}")
    env = {**os.environ, "WANDB_MODE": "disabled", "NPROC_PER_NODE": str(args.nproc),
           "PYTHON": sys.executable}
    cmd = [os.path.join(REPO, "launch.sh"), os.path.join(REPO, "configs/demo.yaml"), f"data.train_file={data}",
           "data.eval_file=", "train.max_steps=1", "train.save_steps=0", f"train.output_dir={out}",
           "train.overwrite_output_dir=true", f"train.dataloader_num_workers={args.workers}", "wandb.mode=disabled"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"launch.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    checked = re.search(r"data checked in ([\d.]+) s", proc.stdout)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    peak = max(r.get("peak_rss_gib", 0) for r in records)
    print(f"launch.sh, {args.nproc} ranks, {args.workers} data workers: data check "
          f"{checked.group(1) if checked else '?'} s, first step done and exported, process exit after "
          f"{wall:.0f} s; peak RSS per rank {peak:.2f} GiB; this process's max RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
