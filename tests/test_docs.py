"""Every relative link in README.md and docs/*.md resolves: the target file or folder
exists, and an `#anchor` into a Markdown file matches one of its headings (GitHub's
slugs). External links (http, https, mailto) are not checked: the tests never touch
the network. Links inside code blocks and code spans are not links and are skipped."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parent.parent

_FENCE = re.compile(r"^(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target), with an optional "title"; the text may hold one
# level of brackets.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_EXTERNAL = ("http://", "https://", "mailto:")


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, in_fence = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line.lstrip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append((number, line))
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: Markdown and HTML dropped, lower case,
    punctuation removed (letters, digits, `_`, `-` and spaces kept), spaces to `-`."""
    text = re.sub(r"<[^>]+>", "", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; repeated slugs get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        m = _HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(md: Path, root: Path = REPO) -> list[str]:
    """`file:line: target: reason` for each relative link of `md` that does not resolve."""
    problems = []
    for number, line in _prose_lines(md.read_text(encoding="utf-8")):
        for m in _LINK.finditer(_CODE_SPAN.sub("", line)):
            target = m.group(1)
            if not target or target.startswith(_EXTERNAL):
                continue
            where = f"{md.relative_to(root)}:{number}: {target}"
            file_part, _, anchor = target.partition("#")
            dest = (md.parent / unquote(file_part)).resolve() if file_part else md
            if not dest.exists():
                problems.append(f"{where}: no such file or folder")
                continue
            if root.resolve() not in (dest, *dest.parents):
                problems.append(f"{where}: outside the repository")
                continue
            if anchor:
                if dest.is_dir() or dest.suffix.lower() != ".md":
                    problems.append(f"{where}: an anchor into something not Markdown")
                elif unquote(anchor).lower() not in anchors(dest):
                    problems.append(f"{where}: no heading with this anchor in {dest.name}")
    return problems


def doc_files(root: Path = REPO) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def test_every_relative_link_resolves():
    files = doc_files()
    assert len(files) > 1, "docs/ holds no Markdown file"
    problems = [p for md in files for p in broken_links(md)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_checker_finds_broken_links(tmp_path):
    """The check above can fail: a missing file, a missing anchor in this file and in
    another, and an anchor into a folder are each reported; good links, external links
    and links in code are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## Two FSDP backends: fsdp1 and fsdp2\n")
    (tmp_path / "README.md").write_text(
        "# Top\n\n## What's `here`, (really)?\n\n"
        "[ok](docs/other.md#two-fsdp-backends-fsdp1-and-fsdp2) [ok](#whats-here-really)\n"
        "[ok](docs/) [ext](https://example.com/nowhere.md#x) `[code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n"
        "[gone](docs/missing.md)\n"
        "[bad anchor](docs/other.md#no-such-heading) [bad local](#nowhere)\n"
        "[folder anchor](docs/#x)\n"
    )
    problems = broken_links(tmp_path / "README.md", tmp_path)
    assert [p.split(": ", 2)[1] for p in problems] == [
        "docs/missing.md", "docs/other.md#no-such-heading", "#nowhere", "docs/#x",
    ], problems
    assert all(p.startswith("README.md:") for p in problems)


def test_github_slugs():
    assert github_slug("Two FSDP backends: fsdp1 and fsdp2") == "two-fsdp-backends-fsdp1-and-fsdp2"
    assert github_slug("bf16 weights: half the memory") == "bf16-weights-half-the-memory"
    assert github_slug("The Trainer recipe's settings in ft") == "the-trainer-recipes-settings-in-ft"
    assert github_slug("The fit check (dry run)") == "the-fit-check-dry-run"
    assert github_slug("### `model`".lstrip("# ")) == "model"
