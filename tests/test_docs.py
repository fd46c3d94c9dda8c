"""The documents' references hold: every section that code or docs cite by name (``RESULTS.md,
"CPU"``, ``docs/kernels.md, "Tuning: masks"``) is a heading of that file, and every relative
Markdown link points at a file of the repository. A routing rule or a tile choice cites where its
measurement lives; a renamed or deleted section must take its citations with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [*ROOT.glob("src/attend/**/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("benchmarks/*.sh"),
           *ROOT.glob("docs/*.md"), *ROOT.glob("benchmarks/*.md"), ROOT / "README.md"]
# Documents cited by file name alone; a name two folders share (README.md) is not cited that way.
_NAMED = [*ROOT.glob("docs/*.md"), *ROOT.glob("benchmarks/*.md")]
DOCS = {p.name: p for p in _NAMED if [q.name for q in _NAMED].count(p.name) == 1}
# `kernels.md, "Tuning: masks"`, `RESULTS.md), "CPU"`, `flex.md "Tiles"`: a file, then a quoted name
CITATION = re.compile(r"\b(\w+\.md)[`)]?,? \(?\"([^\"]{2,80})\"")
LINK = re.compile(r"\]\(([^)#\s]+\.md)(?:#([^)\s]*))?\)")


def _text(path: Path) -> str:
    """The file with line breaks (and a Python comment's ``#`` leaders) folded into spaces, so a
    citation wrapped across lines reads as one."""
    return re.sub(r"\s*\n\s*(?:#\s*)?", " ", path.read_text())


def _headings(path: Path) -> list[str]:
    """The Markdown headings of ``path``, outside fenced code blocks."""
    heads, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            heads.append(line.lstrip("#").strip())
    return heads


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _citations():
    for src in SOURCES:
        for m in CITATION.finditer(_text(src)):
            if m.group(1) in DOCS:
                yield pytest.param(src, m.group(1), m.group(2), id=f"{src.relative_to(ROOT)}:{m.group(2)[:30]}")


def test_the_scan_finds_citations():
    assert len(list(_citations())) >= 10  # the pattern still matches how the repository cites


@pytest.mark.parametrize("src,doc,section", list(_citations()))
def test_a_cited_section_exists(src, doc, section):
    """The cited name is a heading, or the start of one (headings may add a date or a command)."""
    heads = _headings(DOCS[doc])
    assert any(h == section or h.startswith(section + " ") or h.startswith(section + ",") or
               h.startswith(section + " (") for h in heads), (
        f"{src.relative_to(ROOT)} cites {doc}, \"{section}\": no heading starts with it ({len(heads)} headings)")


@pytest.mark.parametrize("src", [p for p in SOURCES if p.suffix == ".md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_markdown_links_resolve(src):
    """Every relative link names a file that exists, and its ``#anchor``, if any, a heading there."""
    broken = []
    for target, anchor in LINK.findall(src.read_text()):
        if "://" in target:
            continue
        path = (src.parent / target).resolve()
        if not path.exists():
            broken.append(target)
        elif anchor and anchor not in {_anchor(h) for h in _headings(path)}:
            broken.append(f"{target}#{anchor}")
    assert not broken, f"{src.relative_to(ROOT)} links to missing files or sections: {broken}"
