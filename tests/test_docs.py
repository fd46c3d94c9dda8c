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
DOCS = {p.name: p for p in [*ROOT.glob("docs/*.md"), *ROOT.glob("benchmarks/*.md")]}
# `kernels.md, "Tuning: masks"`, `RESULTS.md), "CPU"`, `flex.md "Tiles"`: a file, then a quoted name
CITATION = re.compile(r"\b(\w+\.md)[`)]?,? \(?\"([^\"]{2,80})\"")
LINK = re.compile(r"\]\(([^)#\s]+\.md)(#[^)]*)?\)")


def _text(path: Path) -> str:
    """The file with line breaks (and a Python comment's ``#`` leaders) folded into spaces, so a
    citation wrapped across lines reads as one."""
    return re.sub(r"\s*\n\s*(?:#\s*)?", " ", path.read_text())


def _headings(path: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]


def _citations():
    for src in SOURCES:
        for m in CITATION.finditer(_text(src)):
            if m.group(1) in DOCS:
                yield pytest.param(src, m.group(1), m.group(2), id=f"{src.relative_to(ROOT)}:{m.group(2)[:30]}")


def test_the_scan_finds_citations():
    assert len(list(_citations())) >= 10  # the pattern still matches how the repository cites


@pytest.mark.parametrize("src,doc,section", list(_citations()))
def test_a_cited_section_exists(src, doc, section):
    heads = _headings(DOCS[doc])
    assert any(h.startswith(section) or section in h for h in heads), (
        f"{src.relative_to(ROOT)} cites {doc}, \"{section}\": no such heading ({len(heads)} headings)")


@pytest.mark.parametrize("src", [p for p in SOURCES if p.suffix == ".md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_markdown_links_resolve(src):
    missing = [t for t, _ in LINK.findall(src.read_text()) if "://" not in t and not (src.parent / t).resolve().exists()]
    assert not missing, f"{src.relative_to(ROOT)} links to missing files: {missing}"
