"""Predictions for every row of a data file: `python -m ft.predict MODEL_DIR DATA --out preds.jsonl`.

Each row's conversation up to its last assistant turn is the prompt (processed exactly
as training processes it: same chat format, frames and pixel bounds, read from the
model folder's processor files, which ft's exports write from the run's config); the
model's answer is generated greedily (or sampled, with `--temperature`), and the
last assistant turn is kept as the reference. DATA is anything `data.train_file`
takes: JSONL, a `save_to_disk` folder, Parquet or Arrow files.

Writes one JSON line per row, in row order::

    {"index": 0, "id": "data/eval.jsonl:3", "prompt": "<|im_start|>system…", "reference": "…", "prediction": "…"}

`id` is the row's place (`file:line`, or `dataset:row N`); `prompt` is the chat text with
one pad token per image or video. A row that cannot be used is written with an
`"error"` instead of a prediction, and counted at the end.

Under torchrun (`torchrun --nproc-per-node 8 -m ft.predict …`) every rank generates a
share of the batches and rank 0 writes them all, in row order. Batches are formed the
same way whatever the number of ranks (rows sorted by prompt length, cut into batches
of `--batch-size`, dealt out in turn), so the predictions do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from tqdm import tqdm

from ft import dist
from ft.config_load import model_dir_refusal
from ft.collate import vision_inputs
from ft.dataset import ConversationDataset
from ft.deps import MissingDependency
from ft.families import read_family
from ft.processor import load_processor, saved_video_sampling
from ft.rows import DataError, load_rows

USAGE_EXIT = 2


def build_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Rows sorted by prompt length (longest first, ties by row), cut into batches:
    similar lengths share a batch, so little of it is left padding."""
    order = sorted(range(len(lengths)), key=lambda r: (-lengths[r], r))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(samples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts (generation appends on the right) with their vision inputs."""
    length = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    types = torch.zeros((len(samples), length), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, length - n:], mask[i, length - n:], types[i, length - n:] = s["input_ids"], 1, s["mm_token_type_ids"]
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types, **vision_inputs(samples)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ft.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="an export (runs/…/best) or any Qwen VL model folder")
    parser.add_argument("data", help="JSONL file, save_to_disk folder, or Parquet/Arrow file(s)")
    parser.add_argument("--out", required=True, help="where to write the predictions (JSON lines)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    refusal = model_dir_refusal(args.model_dir)
    if refusal:
        print(f"ft.predict: MODEL_DIR {refusal}", file=sys.stderr)
        return USAGE_EXIT
    try:
        processor = load_processor(args.model_dir)
        dataset = ConversationDataset(load_rows(args.data), processor, max_length=1 << 30,
                                      video=saved_video_sampling(args.model_dir))
    except (DataError, MissingDependency, ValueError) as e:
        print(f"ft.predict: {e}", file=sys.stderr)
        return USAGE_EXIT

    # Generation may run for hours; rank 0 then waits for the slowest rank's share.
    info = dist.init_distributed(timeout_s=6 * 3600)
    try:
        results = predict(args, processor, dataset, info)
        gathered = dist.all_gather_object(results)  # SYNC: rank 0 writes every rank's rows
        if info.is_main:
            rows = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
            tmp = f"{args.out}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            os.replace(tmp, args.out)
            failed = sum("error" in r for r in rows)
            print(f"ft.predict: {len(rows)} rows -> {args.out}" + (f" ({failed} could not be used)" if failed else ""),
                  file=sys.stderr)
    finally:
        dist.cleanup()
    return 0


def predict(args, processor, dataset: ConversationDataset, info: dist.DistInfo) -> list[dict]:
    """This rank's share of the rows, each with its prediction (or error)."""
    on_gpu = info.device.type == "cuda"
    model = read_family(args.model_dir).model_class().from_pretrained(
        args.model_dir, dtype=torch.bfloat16 if on_gpu else torch.float32, attn_implementation="sdpa")
    model.to(info.device).eval()
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # The batches follow from the prompts' lengths, which every rank counts alike (as
    # the data check counts: no pixels), so they agree without a collective; each rank
    # then processes only the prompts of its own batches.
    lengths, failed, cache = [], {}, {}
    for index in range(len(dataset)):
        try:
            lengths.append(dataset.prompt_length(index, cache))
        except DataError as e:
            lengths.append(0)
            failed[index] = str(e)
    batches = [rows for rows in ([i for i in b if i not in failed] for b in build_batches(lengths, args.batch_size))
               if rows]
    mine = batches[info.rank::info.world_size]
    results = [{"index": i, "id": _row_id(dataset, i), "error": e} for i, e in failed.items()] if info.is_main else []
    torch.manual_seed(args.seed)
    sampling = ({"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
                if args.temperature > 0 else {"do_sample": False})
    start, new_tokens = time.perf_counter(), 0
    for batch in tqdm(mine, desc=f"predict (rank {info.rank})", disable=not info.is_main, dynamic_ncols=True):
        prompts = {}
        for i in batch:
            try:
                prompts[i] = dataset.prompt(i)
            except DataError as e:  # a file changed since it was counted
                results.append({"index": i, "id": _row_id(dataset, i), "error": str(e)})
        rows = list(prompts)
        if not rows:
            continue
        inputs = {k: v.to(info.device) for k, v in collate([prompts[i][0] for i in rows], pad_id).items()}
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, pad_token_id=pad_id, **sampling)
        answers = out[:, inputs["input_ids"].shape[1]:]
        for i, answer in zip(rows, answers):
            new_tokens += int((answer != pad_id).sum())
            results.append({"index": i, "id": _row_id(dataset, i), "prompt": prompts[i][1],
                            "reference": prompts[i][2],
                            "prediction": tokenizer.decode(answer, skip_special_tokens=True)})
    if mine and info.is_main:
        seconds = time.perf_counter() - start
        print(f"ft.predict: rank 0 generated {new_tokens} tokens in {seconds:.1f} s "
              f"({new_tokens / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return results


def _row_id(dataset: ConversationDataset, index: int) -> str:
    place = dataset.rows.where(index)
    return f"{place.source}:{place.place}"


if __name__ == "__main__":
    sys.exit(main())
