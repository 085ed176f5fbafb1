"""The README and docs/ as a newcomer reads them.

The README stays a start (at most 300 lines, the two commands first); prose lines are wrapped;
every relative link of README.md and docs/*.md, anchors included, reaches a file and a heading of
this repository; nothing refers to a place outside it; and every Python snippet runs as written (one marked
``<!-- not run: why -->`` on the line before its fence is left out, e.g. one that needs the network).
"""
from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_LINES = 300
WIDTH = 110  # prose lines; the first command and table rows may be longer
FIRST = "python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt "
TESTS = ". .venv/bin/activate && python -m pytest -q tests"  # what CI runs
FENCE = re.compile(r"^```(\S*)\n(.*?)^```\n", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")
NOT_RUN = "<!-- not run:"
OPTIONAL = {"trl", "datasets"}  # the test extra's packages; the GPU machine lacks them


def prose(text: str) -> str:
    """The page without its fenced blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slugs(page: pathlib.Path) -> set[str]:
    """The anchors GitHub gives a page's headings (a repeated heading gets -1, -2, ...)."""
    found, seen = set(), {}
    for line in FENCE.sub("", page.read_text()).splitlines():
        if m := re.match(r"#{1,6} (.*)", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen[slug] = seen.get(slug, -1) + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def snippets() -> list:
    found = []
    for page in PAGES:
        text = page.read_text()
        for i, m in enumerate(m for m in FENCE.finditer(text) if m.group(1) == "python"):
            before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            if not before.startswith(NOT_RUN):
                found.append(pytest.param(m.group(2), id=f"{page.relative_to(ROOT)}:{i}"))
    return found


def test_readme_is_a_start_with_the_two_commands_first():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; the reference belongs in docs/"
    first = FENCE.search(text)
    assert first.group(1) == "bash" and text[:first.start()].strip() == "# medix_fast", "the commands come first"
    setup, tests = first.group(2).splitlines()
    assert setup.startswith(FIRST) and setup.endswith(" && python -m medix_fast.train"), setup
    assert tests == TESTS


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_prose_is_wrapped(page):
    long = [line[:40] for line in FENCE.sub("", page.read_text()).splitlines()
            if len(line) > WIDTH and not line.startswith("|")]
    assert not long, f"{page.relative_to(ROOT)}: lines over {WIDTH} characters: {long}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(page):
    text = page.read_text()
    assert "/work/" not in text and "shared/" not in text, f"{page.name} refers outside the repository"
    broken = []
    for target in LINK.findall(prose(text)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if ROOT not in file.parents or not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in slugs(file):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


@pytest.mark.parametrize("code", snippets())
def test_python_snippet_runs_as_written(code, tmp_path, monkeypatch):
    for module in set(re.findall(r"^(?:from|import) (\w+)", code, re.M)) & OPTIONAL:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}")
    monkeypatch.chdir(tmp_path)  # what a snippet writes (runs/...) lands here
    exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})
