"""Every Markdown file the code, tests, scripts and READMEs cite is in the repository, and every cited section
(``docs/reference/training.md §4.1``) is a heading of that page."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ["packages", "tests", "benchmarks", "scripts", "examples", ".ci", ".github"]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".txt", ".cfg", ".ini", ""}
# a path-like token ending in .md (URLs are skipped below)
MD_PATH = re.compile(r"(?<![\w/.:-])((?:[\w.-]+/)*[\w.-]+\.md)\b")
# "<page>.md §N" or "<page>.md`` §N": the first section number right after a docs page
SECTION = re.compile(r"(docs/reference/[\w-]+\.md)`{0,2}\s*§\s*(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,4}\s+(\d+(?:\.\d+)*)\.?\s", re.M)


def _files() -> list[Path]:
    """The scanned files (this module's own examples excepted)."""
    found = [ROOT / "README.md"]
    for top in SCANNED:
        base = ROOT / top
        if base.is_dir():
            found += [
                p
                for p in base.rglob("*")
                if p.is_file()
                and p.suffix in SUFFIXES
                and "__pycache__" not in p.parts
                and "results" not in p.parts
                and not any(part.endswith(".egg-info") for part in p.parts)  # build metadata, may be stale
            ]
    return [p for p in found if p != Path(__file__).resolve()]


def _resolves(cited: str, source: Path) -> bool:
    rel = cited.lstrip("/")
    return (ROOT / rel).is_file() or (source.parent / rel).is_file()


def test_cited_markdown_files_exist() -> None:
    missing = []
    for path in _files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in MD_PATH.finditer(text):
            start = text.rfind("\n", 0, m.start()) + 1
            if "://" in text[start : m.end()].split()[-1]:
                continue  # part of a URL
            if not _resolves(m.group(1), path):
                line = text.count("\n", 0, m.start()) + 1
                missing.append(f"{path.relative_to(ROOT)}:{line}: {m.group(1)}")
    assert not missing, "citations of Markdown files that are not in the repository:\n" + "\n".join(missing)


def test_cited_sections_exist() -> None:
    sections: dict[str, set[str]] = {}
    wrong = []
    for path in _files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in SECTION.finditer(text):
            page, number = m.group(1), m.group(2).rstrip(".")
            if page not in sections:
                doc = ROOT / page
                sections[page] = set(HEADING.findall(doc.read_text())) if doc.is_file() else set()
            if number not in sections[page]:
                line = text.count("\n", 0, m.start()) + 1
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {page} §{number}")
    assert not wrong, "citations of sections that the page does not have:\n" + "\n".join(wrong)


def test_the_checks_see_a_broken_citation(tmp_path: Path) -> None:
    # the patterns themselves: a bare page name does not resolve, a cited section must be a heading
    source = tmp_path / "module.py"
    assert [m.group(1) for m in MD_PATH.finditer("see training.md §4.1 and docs/reference/training.md")] == [
        "training.md",
        "docs/reference/training.md",
    ]
    assert not _resolves("training.md", source) and _resolves("docs/reference/training.md", source)
    headings = set(HEADING.findall((ROOT / "docs/reference/training.md").read_text()))
    assert {"1", "1.4", "3.10", "4.7"} <= headings and "9.9" not in headings
    match = SECTION.search("(spec ``docs/reference/architecture.md`` §2–§4)")
    assert match is not None and match.groups() == (
        "docs/reference/architecture.md",
        "2",
    )
