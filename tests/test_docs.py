"""The documentation holds together: every relative link and anchor resolves, the README stays
short, and every command's --help names the page that documents it."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import tomllib
from pathlib import Path

import pytest
from helpers import REPO

FENCE = re.compile(r"^(```|~~~)")
# [text](target) and ![alt](target); a target has no spaces (titles are not used in these docs).
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code removed: links and headings live there."""
    found, in_fence = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            found.append((number, line))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a page offers, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(paths: list[Path], root: Path) -> list[str]:
    """'file:line: target (why)' for each relative link whose file or anchor does not exist."""
    problems = []
    for path in paths:
        for number, line in prose_lines(path.read_text(encoding="utf-8")):
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check
                    continue
                file_part, _, anchor = target.partition("#")
                destination = (path.parent / file_part).resolve() if file_part else path
                where = f"{path.relative_to(root)}:{number}: {target}"
                if not destination.exists():
                    problems.append(f"{where} (no such file)")
                elif anchor and (destination.suffix != ".md" or anchor not in anchors(destination)):
                    problems.append(f"{where} (no such anchor in {destination.name})")
    return problems


def test_every_relative_link_and_anchor_resolves():
    assert broken_links(pages(), REPO) == []


def test_the_link_check_finds_a_missing_page_and_a_missing_anchor(tmp_path):
    """The check is real: a link to a page that is not there, or to a heading that is not, is reported."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Weights & Biases and `profile_steps`\n")
    readme = tmp_path / "README.md"
    readme.write_text("[ok](docs/a.md) [ok](docs/a.md#weights--biases-and-profile_steps) [ok](#top)\n"
                      "[gone](docs/b.md) [bad anchor](docs/a.md#profiler)\n"
                      "```\n[in code](nowhere.md)\n```\n`[inline](nowhere.md)` [web](https://example.org/x)\n"
                      "# Top\n")
    assert broken_links([readme, tmp_path / "docs" / "a.md"], tmp_path) == [
        "README.md:2: docs/b.md (no such file)",
        "README.md:2: docs/a.md#profiler (no such anchor in a.md)",
    ]


def test_repeated_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Notes\n## Example\n## Example\n```\n# not a heading\n```\n")
    assert anchors(page) == {"notes", "example", "example-1"}


def test_the_readme_is_short():
    """Details live in docs/: the README is the front page (issue 23: at most 200 lines)."""
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


def console_scripts() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return project["project"]["scripts"]


@pytest.mark.parametrize("command", sorted(console_scripts()))
def test_every_commands_help_names_its_docs_page(command, capsys):
    """`imagenet-X --help` ends by naming the docs page that explains the command, and that page exists."""
    module_name, _, function = console_scripts()[command].partition(":")
    main = getattr(importlib.import_module(module_name), function)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    named = re.findall(r"docs/[a-z0-9-]+\.md", out.getvalue() + capsys.readouterr().out)
    assert named, f"{command} --help names no docs page"
    for page in named:
        assert (REPO / page).is_file(), f"{command} --help names {page}, which does not exist"
