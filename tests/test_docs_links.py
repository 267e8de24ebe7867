"""Every relative link in README.md and docs/*.md leads somewhere: the file exists, and a ``#anchor`` into a
Markdown file names one of its headings (GitHub's slug rule). External links (http, https, mailto) are not
fetched."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: ``[text](target)`` and ``![alt](target)``; the target stops at whitespace or the closing parenthesis, so an
#: optional ``"title"`` after it is left out.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = ("http://", "https://", "mailto:")


def documents():
    """README.md and every Markdown page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text):
    """The lines of a Markdown text outside fenced code blocks."""
    inside = False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            inside = not inside
            continue
        if not inside:
            yield line


def strip_code_spans(line):
    """``line`` without its inline code spans, whose brackets are not links."""
    return re.sub(r"`[^`]*`", "", line)


def github_slug(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes for repeated headings."""
    seen = {}
    result = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        result.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return result


def broken_links(path):
    """``(target, reason)`` for each relative link of ``path`` that does not resolve."""
    problems = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(strip_code_spans(line)):
            if target.startswith(EXTERNAL):
                continue
            file_part, _, anchor = target.partition("#")
            destination = (path.parent / file_part).resolve() if file_part else path
            if not destination.exists():
                problems.append((target, f"no file {destination}"))
                continue
            if anchor and destination.suffix == ".md" and anchor not in anchors(destination):
                problems.append((target, f"no heading '#{anchor}' in {destination.name}"))
    return problems


@pytest.mark.parametrize("path", documents(), ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


def test_the_readme_shows_its_picture():
    assert "](docs/images/decoded.png)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_checker_finds_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# A heading: with `code`, punctuation!\n\n## Repeated\n\n## Repeated\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Own heading\n\n"
        "[fine](other.md#a-heading-with-code-punctuation) [second](other.md#repeated-1) [self](#own-heading)\n"
        "[web](https://example.org/missing) [mail](mailto:someone@example.org)\n"
        "[gone](missing.md) [no anchor](other.md#nowhere) ![image](missing.png)\n"
        "`[in code](missing-too.md)`\n\n"
        "```\n[in a fence](missing-three.md)\n```\n")
    assert [target for target, _ in broken_links(page)] == ["missing.md", "other.md#nowhere", "missing.png"]


def test_github_slug_follows_githubs_rule():
    assert github_slug("Brain -> embedding, and which embedding") == "brain---embedding-and-which-embedding"
    assert github_slug("SC-MBM at MinD-Vis's scale ratio") == "sc-mbm-at-mind-viss-scale-ratio"
    assert github_slug("`make decode` on the default") == "make-decode-on-the-default"
