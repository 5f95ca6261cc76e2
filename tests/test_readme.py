"""The README and docs/ as a user reads them: links land on files and headings, the contents list every section,
the first commands exist, the layout names every module, measurements say when and where they were taken, and the
repository cites papers and public code rather than files that exist only on a development machine. (That their
commands and snippets run is tests/test_docs_commands.py.)"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "notebooks" / "README.md"]


def headings(text: str) -> list[str]:
    return re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)


def test_every_link_lands_on_a_file_and_a_heading() -> None:
    # README.md and docs/*.md: [text](#anchor), [text](other.md) and [text](other.md#anchor), relative to the file.
    broken = []
    for document in DOCUMENTS:
        text = document.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            linked = (document.parent / path).resolve() if path else document
            if not linked.exists():
                broken.append(f"{document.name}: {target} (no such file)")
            elif anchor and anchor not in {github_anchor(h) for h in headings(linked.read_text())}:
                broken.append(f"{document.name}: {target} (no such heading)")
    assert broken == []


def test_the_contents_list_every_section_in_order() -> None:
    contents = README.split("## Contents", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\s*- \[(.+?)\]\(#", contents, flags=re.MULTILINE)
    sections = [h for h in re.findall(r"^#{2,3} (.+)$", README, flags=re.MULTILINE) if h != "Contents"]
    assert listed == sections  # every ## and ### heading, in the order of the README
    for name in ("How do I ...", "Install", "Command line", "Layout", "Documentation"):
        assert name in listed


def test_the_readme_stays_a_ten_minute_read() -> None:
    # Measurements, design notes and long tables belong in docs/ (the README was 881 lines before they moved).
    assert len(README.splitlines()) <= 270
    assert "| ---" not in README and "|---" not in README, "tables go in docs/"


def test_the_layout_names_every_module_and_only_existing_ones() -> None:
    layout = re.search(r"## Layout\n\n```\n(.*?)```", README, flags=re.DOTALL)[1]
    # A group starts at an unindented line; each foo.py in it is relative to the folder of its first word.
    named = set()
    for group in re.split(r"\n(?=\S)", layout):
        folder = group.split()[0]
        folder = folder if folder.endswith("/") else folder.rsplit("/", 1)[0] + "/"
        for name in re.findall(r"(?<![\w/.])([\w/]+\.py)\b", group):
            top_level = "/" in name and (REPO / name.split("/")[0]).is_dir()  # src/main.py, tests/test_x.py
            named.add(name if top_level else folder + name)
    modules = {str(p.relative_to(REPO)) for p in (REPO / "src").rglob("*.py") if p.name != "__init__.py"}
    assert sorted(modules - named) == [], "modules missing from the README's layout"
    assert sorted(n for n in named if not (REPO / n).is_file()) == [], "the layout names files that do not exist"


def test_measurement_tables_carry_their_date_and_commit() -> None:
    # Each table of measured numbers in docs/ says, in its section, when and at which commit it was measured.
    missing = []
    for name in ("measurements.md", "quality.md", "samplers.md"):
        text = (REPO / "docs" / name).read_text()
        for match in re.finditer(r"(?:^\|.*\n)+", text, flags=re.MULTILINE):
            section = re.split(r"^#{1,6} .*$", text[: match.start()], flags=re.MULTILINE)[-1]
            if not (re.search(r"\b20\d\d-\d\d-\d\d\b", section) and re.search(r"commits? [0-9a-f]{7}", section)):
                missing.append(f"{name}: {match[0].splitlines()[0][:60]}")
    assert missing == []


def test_only_the_make_train_config_calls_itself_the_quickstart() -> None:
    default = re.search(r"^CONFIG \?= (\S+)$", (REPO / "Makefile").read_text(), flags=re.MULTILINE)[1]
    for config in sorted((REPO / "configs").rglob("*.yaml")):
        header = config.read_text().split("\n", 1)[0]  # "# The quickstart (`make train`): ..."
        if re.match(r"#\s*(the |offline )?quickstart\b", header, flags=re.IGNORECASE):
            assert str(config.relative_to(REPO)) == default, f"{config.name} calls itself the quickstart"


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
    for document in DOCUMENTS:
        found += [f"{document.name}: {m[0]}" for m in pattern.finditer(document.read_text())]
    assert found == []
