"""Links into docs/algorithms.md resolve: code and docs point at its sections by anchor.

Anchors follow GitHub's rule for headings: lower case, punctuation other than ``-`` and
``_`` removed, spaces turned into ``-``. Headings must be unique, so that no anchor gets a
``-1`` suffix that would silently change when a section is added.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ROOT / "docs" / "algorithms.md"


def slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return [slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)]


def test_slug_rule():
    assert slug("Shapes: merge, block, skip") == "shapes-merge-block-skip"
    assert slug("The LogDet-optimal sparse preconditioner") == (
        "the-logdet-optimal-sparse-preconditioner"
    )


def test_headings_are_unique():
    found = anchors(ALGORITHMS)
    assert len(found) == len(set(found)), sorted(a for a in found if found.count(a) > 1)


def test_every_link_into_algorithms_md_resolves():
    known = set(anchors(ALGORITHMS))
    refs = []
    own = ALGORITHMS.read_text(encoding="utf-8")
    refs += [(ALGORITHMS.name, a) for a in re.findall(r"\]\(#([^)\s]+)\)", own)]
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    for sub in ("src", "tests", "benchmarks"):
        files += (ROOT / sub).rglob("*.py")
    for f in files:
        if f.exists():
            text = f.read_text(encoding="utf-8")
            refs += [(f.name, a) for a in re.findall(r"algorithms\.md#([\w\-]+)", text)]
    assert refs, "expected at least the table of contents to link into the document"
    missing = [(f, a) for f, a in refs if a not in known]
    assert not missing, f"links to missing sections of docs/algorithms.md: {missing}"
