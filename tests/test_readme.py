"""The README as a user reads it: its links land on headings, its first commands exist, and the repository cites
papers and public code rather than files that exist only on a development machine."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_internal_link_lands_on_a_heading() -> None:
    anchors = {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", README, flags=re.MULTILINE)}
    links = re.findall(r"\]\(#([^)]+)\)", README)
    assert links, "no table of contents"
    assert sorted(set(links) - anchors) == []


def test_the_contents_list_the_sections_it_names_in_order() -> None:
    contents = README.split("## Contents", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- \[(.+?)\]\(#", contents, flags=re.MULTILINE)
    sections = re.findall(r"^## (.+)$", README, flags=re.MULTILINE)
    assert listed == [s for s in sections if s in listed]  # same order as the sections themselves
    for name in ("Install", "Measurements", "Command line", "Data"):
        assert name in listed


def test_the_first_screen_commands_exist() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.DOTALL)[1]
    assert [line.split()[:2] for line in first_block.strip().splitlines()] == [["make", "train"], ["make", "test"]]
    makefile = (REPO / "Makefile").read_text()
    for target in ("install", "train", "test", "sample"):
        assert re.search(rf"^{target}:", makefile, flags=re.MULTILINE), target


def test_no_citation_of_development_only_files() -> None:
    # Cite the paper and equation, or public code by its repository and path; never notes or paths of one machine.
    # (Written so that this file does not match itself.)
    pattern = re.compile(r"seed 00\d|seeds[/]|[/]work[/]|the seed[']s", flags=re.IGNORECASE)
    found = []
    for folder in ("src", "tests", "scripts", "notebooks", "benchmarks", "configs"):
        for path in sorted((REPO / folder).rglob("*")):
            relative = str(path.relative_to(REPO))
            if not path.is_file() or path.suffix not in {".py", ".sh", ".ipynb", ".yaml", ".md"}:
                continue
            found += [f"{relative}: {m[0]}" for m in pattern.finditer(path.read_text(errors="replace"))]
    found += [f"README.md: {m[0]}" for m in pattern.finditer(README)]
    assert found == []
