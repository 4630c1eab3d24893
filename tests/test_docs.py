"""The documentation keeps its promises: a README a newcomer reads in minutes, and links that lead
somewhere.

README.md stays short and says which Python it needs, and shows the test command CI runs. Every
relative link in README.md and docs/*.md (inline, reference-style, or an HTML `href`/`src`) points
to a file or folder of the repository that exists and, with a `#fragment` into a Markdown file, to
one of its headings as GitHub names them. Plain text parsing only: no torch, no network.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250
TEST_COMMAND = "python -m pytest -q"  # .ci/run runs exactly this; the README must show it

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
CODE_SPAN = re.compile(r"`+[^`]*`+")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HTML_LINK = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""")
HTML_ANCHOR = re.compile(r"""<a\s[^>]*\b(?:name|id)\s*=\s*["']([^"']+)["']""")
EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out.append((number, line))
    return out


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text, lower case, punctuation dropped
    (letters, digits, `_`, `-` and spaces stay), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link reads as its text
    text = re.sub(r"<[^>]+>", "", text)  # so do HTML tags
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every `#fragment` that leads into `path`: heading slugs (repeats get -1, -2, ...) and
    explicit HTML anchors."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        repeat = seen.get(slug, 0)
        seen[slug] = repeat + 1
        found.add(slug if repeat == 0 else f"{slug}-{repeat}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in `path`, code blocks and code spans left out."""
    out = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub("", line)
        targets = INLINE_LINK.findall(line) + HTML_LINK.findall(line)
        reference = REFERENCE_LINK.match(line)
        if reference:
            targets.append(reference.group(1))
        out.extend((number, target) for target in targets)
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """One line per relative link of `path` that leads nowhere."""
    problems = []
    for number, target in links(path):
        if EXTERNAL.match(target):
            continue
        where = f"{path.relative_to(root)}:{number}: {target}"
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / unquote(file_part) if file_part else path).resolve()
        if not resolved.is_relative_to(root.resolve()):
            problems.append(f"{where} (outside the repository)")
        elif not resolved.exists():
            problems.append(f"{where} (no such file)")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            problems.append(f"{where} (no heading with the anchor #{fragment})")
    return problems


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move reference to docs/"
    )


def test_readme_states_the_python_version() -> None:
    target = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["ruff"][
        "target-version"
    ]  # "py311": the oldest Python the code is written for
    version = f"{target[2]}.{target[3:]}"
    readme = README.read_text(encoding="utf-8")
    assert re.search(rf"Python {re.escape(version)}\b", readme), f"README: say 'Python {version}'"


def test_readme_shows_the_test_command() -> None:
    readme = README.read_text(encoding="utf-8").splitlines()
    prose = {number for number, _ in prose_lines("\n".join(readme))}
    in_code = [line.strip() for number, line in enumerate(readme, 1) if number not in prose]
    assert TEST_COMMAND in in_code, f"README: show `{TEST_COMMAND}` in a code block"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Is the comparison fair?", "is-the-comparison-fair"),
        ("Speed: `bench`", "speed-bench"),
        ("A 30-trial study on 2,000 examples", "a-30-trial-study-on-2000-examples"),
        ("Workers: the storage proxy", "workers-the-storage-proxy"),
        ("Checking a GPU machine: `device-check`", "checking-a-gpu-machine-device-check"),
        ("What `peak_mem_mb` / RSS means", "what-peak_mem_mb--rss-means"),
        ("See [usage](docs/usage.md)", "see-usage"),
    ],
)
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_broken_links_are_found(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text(
        '# Guide\n\n## Set up\n\n## Set up\n\n<a id="custom"></a>\n', encoding="utf-8"
    )
    (tmp_path / "README.md").write_text(
        "\n".join(
            [
                "# Title",
                "[fine](docs/guide.md) [fine](docs/guide.md#set-up-1) [fine](docs/guide.md#custom)",
                "[fine](#title) [fine](docs/) [web](https://example.org/x.md#nowhere)",
                "[gone](docs/missing.md)",
                "[no anchor](docs/guide.md#setup)",
                "[no anchor here](#nothing)",
                "[outside](../elsewhere/README.md)",
                '<img src="docs/missing.png">',
                "`[in a code span](nowhere.md)`",
                "```",
                "[in a code block](nowhere.md)",
                "```",
                "[ref]: docs/gone.md",
            ]
        ),
        encoding="utf-8",
    )
    problems = broken_links(tmp_path / "README.md", root=tmp_path)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "docs/missing.md (no such file)",
        "docs/guide.md#setup (no heading with the anchor #setup)",
        "#nothing (no heading with the anchor #nothing)",
        "../elsewhere/README.md (outside the repository)",
        "docs/missing.png (no such file)",
        "docs/gone.md (no such file)",
    ]
