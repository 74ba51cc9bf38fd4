"""Make the demo's shapes set: pictures and clips whose answers only the pixels hold.

    python data/demo/make_shapes.py                   # writes data/demo/shapes/
    python data/demo/make_shapes.py --out DIR --control

Three kinds of question, each answered with one word:

    kind      what it shows                           question                                answers                 chance
    colour    a square, circle or triangle anywhere   What colour is the shape?               red green blue yellow   25 %
    position  a white ball, high or low               Is the ball at the top or the bottom?   top bottom              50 %
    motion    4 frames of the ball moving sideways    Which way does the ball move?           left right              50 %

Every split holds each answer of a kind equally often, so chance is one over the number
of answers, and always giving the commonest answer scores exactly that. A clip moving
left is one moving right played backwards: both show the same frames, so only their
order tells the way.

`--control` writes the same rows with the information taken out: every picture is the
same grey, and each clip's frames are shuffled. A model trained and evaluated on it can
only learn how often each answer comes; its accuracy stays at chance.

Nothing is random but the generator seeded with `--seed` (SEED by default), so the
output is the same on every run. Per split: `train.jsonl` (240 shape pictures, 240
ball pictures and 240 clips: 720 rows) and `eval.jsonl` (48 new ones of each: 144
rows), each row with a `kind` field; paths are relative to the JSONL file, as
ft reads them.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

SEED = 2026
SIZE = 112  # pixels per side: 4 x 4 tokens of 28 x 28 px reach the language model
FRAMES = 4  # two temporal patches of two frames
BACKGROUND = (24, 24, 24)
GREY = (128, 128, 128)
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")
BALL = (240, 240, 240)  # the white ball of the position and motion questions
STEP = (4, 7)  # pixels the ball moves per frame

QUESTIONS = {
    "colour": "What colour is the shape?",
    "position": "Is the ball at the top or the bottom?",
    "motion": "Which way does the ball move?",
}
ANSWERS = {"colour": tuple(COLOURS), "position": ("top", "bottom"), "motion": ("left", "right")}
SPLITS = {"train": 240, "eval": 48}  # per kind: shape pictures, ball pictures, clips


def draw(shape: str, fill: tuple[int, int, int], cx: float, cy: float, size: float) -> Image.Image:
    """One picture: `shape` of side (or diameter) `size`, centred at (cx, cy)."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    pen = ImageDraw.Draw(image)
    half = size / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "circle":
        pen.ellipse(box, fill=fill)
    else:
        pen.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return image


def balanced(n: int, values: tuple[str, ...], rng: random.Random) -> list[str]:
    """`n` values, each of `values` equally often (n is a multiple), in random order."""
    assert n % len(values) == 0, (n, values)
    out = list(values) * (n // len(values))
    rng.shuffle(out)
    return out


def fresh(make, seen: set[bytes]) -> list[Image.Image]:
    """Frames from `make()`, drawn again until no earlier picture or clip had the same
    pixels: every eval item is new to training, every training item distinct."""
    while True:
        frames = make()
        key = b"".join(frame.tobytes() for frame in frames)
        if key not in seen:
            seen.add(key)
            return frames


def shapes(n: int, rng: random.Random, seen: set[bytes]) -> list[dict]:
    """`n` pictures of a coloured shape anywhere: colours and shapes each balanced."""
    out = []
    for colour, shape in zip(balanced(n, ANSWERS["colour"], rng), balanced(n, SHAPES, rng)):
        def make():
            size = rng.uniform(34, 42)
            return [draw(shape, COLOURS[colour], rng.uniform(24, SIZE - 24), rng.uniform(24, SIZE - 24), size)]
        out.append({"colour": colour, "image": fresh(make, seen)[0]})
    return out


def balls(n: int, rng: random.Random, seen: set[bytes]) -> list[dict]:
    """`n` pictures of the ball in the top or the bottom third, anywhere across."""
    out = []
    for place in balanced(n, ANSWERS["position"], rng):
        def make():
            cy = rng.uniform(18, 34)
            return [draw("circle", BALL, rng.uniform(18, SIZE - 18), cy if place == "top" else SIZE - cy,
                         rng.uniform(20, 30))]
        out.append({"position": place, "image": fresh(make, seen)[0]})
    return out


def clips(n: int, rng: random.Random, seen: set[bytes]) -> list[dict]:
    """`n` clips of the ball moving left or right a few pixels a frame; ways balanced."""
    out = []
    for way in balanced(n, ANSWERS["motion"], rng):
        def make():
            size, cy, step = rng.uniform(20, 30), rng.uniform(20, SIZE - 20), rng.uniform(*STEP)
            start = rng.uniform(16, SIZE - 16 - (FRAMES - 1) * step)
            frames = [draw("circle", BALL, start + i * step, cy, size) for i in range(FRAMES)]
            return frames if way == "right" else frames[::-1]
        out.append({"motion": way, "frames": fresh(make, seen)})
    return out


def row(media: dict, kind: str, answer: str) -> dict:
    return {"kind": kind, "messages": [
        {"role": "user", "content": [media, {"type": "text", "text": QUESTIONS[kind]}]},
        {"role": "assistant", "content": answer}]}


def save(image: Image.Image, out: Path, name: str) -> dict:
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    image.save(out / name, optimize=True)
    return {"type": "image", "image": name}


def write_split(out: Path, split: str, n: int, rng: random.Random, seen: set[bytes],
                control: random.Random | None) -> list[dict]:
    """Write `split`'s pictures, clips and rows under `out`; return the rows. With
    `control` (the generator that shuffles the frames), the control's pictures and clips."""
    grey = Image.new("RGB", (SIZE, SIZE), GREY)
    rows = []
    for i, p in enumerate(shapes(n, rng, seen)):
        media = save(grey if control else p["image"], out, f"shapes/{split}-{i:03d}.png")
        rows.append(row(media, "colour", p["colour"]))
    for i, p in enumerate(balls(n, rng, seen)):
        rows.append(row(save(grey if control else p["image"], out, f"balls/{split}-{i:03d}.png"),
                        "position", p["position"]))
    for i, c in enumerate(clips(n, rng, seen)):
        frames = list(c["frames"])
        if control:
            control.shuffle(frames)
        names = [save(frame, out, f"clips/{split}-{i:03d}/{f}.png")["image"] for f, frame in enumerate(frames)]
        rows.append(row({"type": "video", "video": names}, "motion", c["motion"]))
    rng.shuffle(rows)
    with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def make(out: Path, control: bool = False, seed: int = SEED) -> dict[str, list[dict]]:
    """Write both splits under `out` (replacing what is there); return their rows."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rng = random.Random(seed)
    # The control's shuffles draw from a generator of their own, so both sets ask the same
    # questions in the same order.
    seen, shuffler = set(), random.Random(seed + 1) if control else None
    return {split: write_split(out, split, n, rng, seen, shuffler) for split, n in SPLITS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "shapes")
    parser.add_argument("--control", action="store_true", help="grey pictures and shuffled clips")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    rows = make(args.out, args.control, args.seed)
    for split, rs in rows.items():
        counts = {k: sum(r["kind"] == k for r in rs) for k in QUESTIONS}
        print(f"{args.out / split}.jsonl: {len(rs)} rows " + ", ".join(f"{k} {n}" for k, n in counts.items()))


if __name__ == "__main__":
    main()
