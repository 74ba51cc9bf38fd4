"""Accuracy of `ft.predict`'s answers: `python -m ft.score PREDICTIONS DATA [--by kind]`.

PREDICTIONS is what `python -m ft.predict MODEL_DIR DATA --out PREDICTIONS` wrote for
the same DATA. An answer counts as right when it equals the reference once both are
lower-cased, stripped of surrounding blanks and of a final full stop: made for questions
with a short answer ("red", "left"), not for free text.

Prints a few of the rows (question, expected answer, the model's answer), then the
accuracy per group of rows against chance. Rows are grouped by a top-level field of
the data rows (`--by`, default `kind`); rows without it form one group. Chance for a
group is one over the number of different answers its references hold: what guessing
scores, and what always giving the commonest answer scores when each answer is
equally common (the demo's sets are built so). `--json` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from ft.messages import parse
from ft.rows import DataError, load_rows


def normalise(answer: str) -> str:
    """What two answers must share to count as the same."""
    return answer.strip().lower().removesuffix(".").strip()


def question(messages: list[dict]) -> str:
    """The text of the last user turn, its images and videos named by kind."""
    user = [m for m in messages if m["role"] == "user"][-1]
    parts = [user["content"]] if isinstance(user["content"], str) else user["content"]
    words = [p if isinstance(p, str) else p.get("text") or f"[{p['type']}]" for p in parts]
    return " ".join(words)


def score(predictions: list[dict], rows, by: str) -> dict:
    """Per group: rows, right answers, accuracy and chance; and the scored rows."""
    groups: dict[str, dict] = defaultdict(lambda: {"rows": 0, "right": 0, "answers": set()})
    scored = []
    for p in predictions:
        if "error" in p:
            raise DataError(f"{p['id']}: ft.predict could not use this row: {p['error']}")
        raw = rows.raw(p["index"])
        record = json.loads(raw) if isinstance(raw, str) else raw
        group = str(record.get(by, "all")) if isinstance(record, dict) else "all"
        right = normalise(p["prediction"]) == normalise(p["reference"])
        g = groups[group]
        g["rows"] += 1
        g["right"] += right
        g["answers"].add(normalise(p["reference"]))
        scored.append({"group": group, "question": question(parse(rows, p["index"])),
                       "expected": p["reference"], "answer": p["prediction"], "right": right})
    table = {name: {"rows": g["rows"], "right": g["right"], "accuracy": g["right"] / g["rows"],
                    "chance": 1 / len(g["answers"])} for name, g in sorted(groups.items())}
    return {"groups": table, "rows": scored}


def examples(scored: list[dict], count: int) -> list[dict]:
    """`count` rows spread over the groups: the first row of each group in turn."""
    by_group: dict[str, list[dict]] = defaultdict(list)
    for r in scored:
        by_group[r["group"]].append(r)
    picked, depth = [], 0
    while len(picked) < min(count, len(scored)):
        picked += [rs[depth] for rs in by_group.values() if depth < len(rs)][:count - len(picked)]
        depth += 1
    return picked


def render(result: dict, by: str, show: int) -> str:
    """The printed report: example rows, then accuracy per group against chance."""
    shown = examples(result["rows"], show)
    lines = []
    if shown:
        group = max(len(by), *(len(r["group"]) for r in shown)) + 2
        asked = max(len(r["question"]) for r in shown) + 2
        expected = max(len("expected"), *(len(r["expected"]) for r in shown)) + 2
        lines.append(f"{by:<{group}}{'question':<{asked}}{'expected':<{expected}}answer")
        for r in shown:
            lines.append(f"{r['group']:<{group}}{r['question']:<{asked}}{r['expected']:<{expected}}"
                         f"{r['answer']}{'' if r['right'] else '   (wrong)'}")
        lines.append("")
    width = max(len(by), *(len(name) for name in result["groups"])) + 2
    lines.append(f"{by:<{width}}{'rows':>5}{'accuracy':>10}{'chance':>8}")
    for name, g in result["groups"].items():
        lines.append(f"{name:<{width}}{g['rows']:>5}{g['accuracy']:>10.0%}{g['chance']:>8.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ft.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", help="the JSON lines `ft.predict --out` wrote")
    parser.add_argument("data", help="the data file ft.predict read")
    parser.add_argument("--by", default="kind", help="top-level row field to group by (default: kind)")
    parser.add_argument("--show", type=int, default=6, help="example rows to print (default 6)")
    parser.add_argument("--json", help="also write the per-group figures here")
    args = parser.parse_args(argv)
    try:
        rows = load_rows(args.data)
        with open(args.predictions, encoding="utf-8") as f:
            predictions = [json.loads(line) for line in f if line.strip()]
        if len(predictions) != len(rows):
            raise DataError(f"{args.predictions}: {len(predictions)} predictions for the "
                            f"{len(rows)} rows of {args.data}: were they made from it?")
        result = score(predictions, rows, args.by)
    except (DataError, OSError, json.JSONDecodeError) as e:
        print(f"ft.score: {e}", file=sys.stderr)
        return 2  # a usage error, as for ft.predict
    print(render(result, args.by, args.show))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result["groups"], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
