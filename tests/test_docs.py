"""The README is a front door: short, and every relative link in it and in docs/ leads somewhere.

Links are markdown's ``[text](target)`` and ``![alt](target)`` outside code. A target is a path
relative to the file that holds it, optionally with ``#anchor``; an anchor must match a heading of
the target file, as GitHub turns headings into anchors. Links to other sites are not followed.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 260

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file (lowercase, punctuation dropped,
    spaces to hyphens, a repeated one suffixed -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for title in HEADING.findall(FENCE.sub("", path.read_text())):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "")  # link text, code text
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text())) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_readme_is_a_front_door():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move depth into docs/ (at most {README_MAX_LINES})"


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists() or not dest.is_relative_to(ROOT):
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: {dest.relative_to(ROOT)} has no heading with that anchor")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_are_closed(doc):
    """An unclosed ``` turns the rest of the page into code, and hides its links from the check."""
    fences = [n for n, line in enumerate(doc.read_text().splitlines(), 1) if line.lstrip().startswith("```")]
    assert len(fences) % 2 == 0, f"{doc.relative_to(ROOT)}: code fences at lines {fences}, one is not closed"


def test_readme_links_every_doc():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    missing = [str(d.relative_to(ROOT)) for d in DOCS if d.resolve() not in linked]
    assert not missing, f"docs not linked from README.md: {missing}"


def test_link_check_sees_links_and_anchors(tmp_path):
    """The checker itself: a link in prose counts, one in code does not, and anchors follow
    GitHub's rules."""
    page = tmp_path / "page.md"
    page.write_text("# What `moe-tune plan` shows\n## A, b & c\n## A, b & c\n"
                    "[x](other.md#y) ![img](pic.png) `[not](a-link.md)`\n```\n[nor](this.md)\n```\n"
                    "[site](https://example.org)\n")
    assert relative_links(page) == ["other.md#y", "pic.png"]
    assert anchors(page) == {"what-moe-tune-plan-shows", "a-b--c", "a-b--c-1"}
