"""Generate a long-tailed multimodal fine-tuning set, for benchmarking batching.

    python benchmarks/longtail_data.py OUT_DIR [--rows 256] [--seed 0]

The demo set's rows are all about the same length, so padded, length-grouped and packed
batches barely differ on it. Real fine-tuning data is long-tailed: most answers are
short, a few are very long, and images come at many sizes. This script builds such a
set from the bundled demo photos (data/demo/images, public domain / CC0) to compare
padded vs length-grouped vs packed batches where the choice matters.

It writes OUT_DIR/train.jsonl (ft's OpenAI-style messages rows, image paths relative to
OUT_DIR) and OUT_DIR/images/, resized JPEG copies of the demo photos with the longest
side a multiple of 28 from 56 to 448 px. Qwen2.5-VL makes one token per 28x28 pixel
area, so an image takes about 4 to 256 tokens (at the demo's max_pixels, 448x448).

Each row has 0 to 3 images (15% text-only, these with a few lines of context instead),
a short question and an answer whose length in words is lognormal, clipped to 5..500;
its median is 25 words plus 25 per 100 image tokens (larger pictures, longer answers).
Answer words come from a fixed list of common English words, each one token (with its
leading space) in Qwen2's tokenizer, so answers take about 5 to 550 tokens with the
punctuation. With the demo config's pixel bounds, rows take about 40 to 1,350 tokens
(3 images of 256 + a 500-word answer); 256 rows at seed 0 span 39 to 1,036, median 180.
The output depends only on --rows and --seed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections import Counter
from pathlib import Path

from PIL import Image

DEMO_IMAGES = Path(__file__).resolve().parent.parent / "data" / "demo" / "images"
SIDES = list(range(56, 449, 28))  # longest side in pixels: 2 to 16 patches of 28
IMAGES_PER_ROW = ([0, 1, 2, 3], [0.15, 0.55, 0.20, 0.10])
MEDIAN_WORDS, SIGMA, MIN_WORDS, MAX_WORDS = 25, 1.2, 5, 500  # median grows with image area
WORDS = (
    "the a of and to in is it that was for on with as they at one have this from or by "
    "but what some can out other all there when up how each which their time will way "
    "many then them would like so these long make see two more day could come people "
    "over water than first down side been now find new work part take place made live "
    "where after back little only round man year came show every good under name very "
    "through just great help low line turn much before move right old same three air "
    "well also play small end home hand large land here big high light house picture "
    "animal world near head stand page found school grow plant food sun four tree city "
    "farm start story sea night life open white walk paper group music river car book "
    "room fish mountain horse wood red bird dog door black ship rock fire king space "
    "road rain star field green ocean blue moon island boat gold snow face colour"
).split()
QUESTIONS = {
    0: ["Tell me a story about a small town.", "Explain how a river reaches the sea.",
        "Write a short note about the night sky.", "What do you know about old ships?"],
    1: ["What is in this picture?", "Describe this image in detail.",
        "Write a caption for this photo.", "What colours stand out here?",
        "Tell a story about this picture."],
    2: ["Compare these two images.", "What do these pictures have in common?",
        "Describe both images."],
    3: ["Describe each of these images in turn.",
        "Which of these pictures is the odd one out, and why?",
        "Write a short story that uses all three pictures."],
}


def resized(src: Path, side: int, out_images: Path) -> tuple[dict, int]:
    """Write (once) a copy of `src` with longest side `side`; return its image part and
    its approximate token count (one per 28x28 area)."""
    name = f"{src.stem}_{side}.jpg"
    with Image.open(src) as image:
        w, h = image.size
        scale = side / max(w, h)
        size = (max(28, round(w * scale)), max(28, round(h * scale)))
        if not (out_images / name).exists():
            image = image.convert("RGB").resize(size, Image.BICUBIC)
            image.save(out_images / name, "JPEG", quality=90)
    return {"type": "image", "image": f"images/{name}"}, round(size[0] / 28) * round(size[1] / 28)


def prose(rng: random.Random, n: int) -> str:
    """`n` words from WORDS in sentences of 6 to 16 words."""
    sentences, left = [], n
    while left:
        k = min(left, rng.randint(6, 16))
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        left -= k
    return " ".join(sentences)


def generate(out_dir: str | Path, rows: int = 256, seed: int = 0) -> list[dict]:
    """Write OUT_DIR/train.jsonl and OUT_DIR/images/; return the rows written."""
    rng = random.Random(seed)
    out, sources = Path(out_dir), sorted(DEMO_IMAGES.glob("*.jpg"))
    (out / "images").mkdir(parents=True, exist_ok=True)
    data, per_row, words, files = [], Counter(), [], set()
    for _ in range(rows):
        k = rng.choices(*IMAGES_PER_ROW)[0]
        images = [resized(src, rng.choice(SIDES), out / "images") for src in rng.sample(sources, k)]
        parts = [part for part, _ in images]
        files.update(part["image"] for part in parts)
        question = rng.choice(QUESTIONS[k])
        if not k:  # text-only rows give some context instead of a picture
            question = f"Notes: {prose(rng, rng.randint(15, 40))}\n{question}"
        parts.append({"type": "text", "text": question})
        # Lognormal word count: most answers short, a few very long; more and larger
        # pictures get longer answers (median 25 words, plus 25 per 100 image tokens).
        median = MEDIAN_WORDS * (1 + sum(tokens for _, tokens in images) / 100)
        n_words = round(rng.lognormvariate(0.0, SIGMA) * median)
        n_words = min(MAX_WORDS, max(MIN_WORDS, n_words))
        data.append({"messages": [{"role": "user", "content": parts},
                                  {"role": "assistant", "content": prose(rng, n_words)}]})
        per_row[k] += 1
        words.append(n_words)
    with open(out / "train.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in data)
    print(f"{out / 'train.jsonl'}: {rows} rows, {len(files)} distinct image files")
    print("images per row: " + ", ".join(f"{k}: {per_row[k]}" for k in sorted(per_row)))
    print(f"answer words: min {min(words)}, median {statistics.median(words):g}, "
          f"mean {statistics.fmean(words):.1f}, max {max(words)}")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generate(args.out_dir, args.rows, args.seed)


if __name__ == "__main__":
    main()
