"""The docs hold together: every link resolves, every `docs/design.md, "Section"` pointer names a section, and every
raw measurement file is listed in docs/README.md."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
MARKDOWN = [REPO / "README.md", *DOCS.glob("*.md")]


def test_every_markdown_link_resolves():
    broken = []
    for page in MARKDOWN:
        for target in re.findall(r"\]\(([^)#\s]+)\)", page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_every_design_pointer_names_a_section():
    headings = set(re.findall(r"^#+ (.+)$", (DOCS / "design.md").read_text(encoding="utf-8"), re.MULTILINE))
    sources = [*REPO.glob("specctl/**/*.py"), *REPO.glob("benchmarks/*.py"), *MARKDOWN, *DOCS.rglob("*.md"),
               *REPO.glob("profiles/**/*.toml")]
    pointers = {(path.relative_to(REPO), title) for path in sources
                for title in re.findall(r'design\.md,\s+(?:\\?")([^"\\]+)', path.read_text(encoding="utf-8"))}
    assert pointers, "no pointer found: the pattern is wrong"
    assert not {p for p in pointers if p[1] not in headings}, sorted(headings)


def test_every_raw_measurement_is_listed_in_the_docs_index():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    raw = [p for p in (DOCS / "measurements").rglob("*") if p.is_file() and p.parent.name != "plots"]
    unlisted = [str(p.relative_to(DOCS)) for p in raw if p.stem not in index and p.name not in index]
    assert raw and not unlisted, unlisted


def test_results_names_only_files_that_exist():
    text = (DOCS / "results.md").read_text(encoding="utf-8")
    names = set(re.findall(r"`(?:[\w.-]+/)*([\w.*-]+\.(?:md|csv|jsonl?))`", text))
    files = [p.name for p in (DOCS / "measurements").rglob("*") if p.is_file()]
    known = {"llm_bench.md", "README.md",  # the benchmark's output in its command line; the docs index
             "ETTh1.csv", "ETTh2.csv", "ETTm1.csv", "weather.csv"}  # data files
    missing = [n for n in names - known if not any(Path(f).match(n) for f in files)]
    assert not missing, missing
