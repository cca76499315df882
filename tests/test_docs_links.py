"""Every relative link in README.md and docs/*.md leads somewhere: the README's short sections send a newcomer to
docs/ for the rest, and a moved or renamed heading must not leave them at a dead end."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
EXTERNAL = ("http://", "https://", "mailto:")


def anchors(markdown: Path) -> set[str]:
    """GitHub's ids for the headings of ``markdown``: lowercased, punctuation dropped, spaces turned into hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", markdown.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def broken_links(markdown: Path) -> list[str]:
    """The relative links of ``markdown`` (outside code blocks) whose file or heading does not exist."""
    broken = []
    for target in LINK.findall(FENCE.sub("", markdown.read_text())):
        if target.startswith(EXTERNAL):
            continue
        path, _, anchor = target.partition("#")
        linked = (markdown.parent / path).resolve() if path else markdown
        if not linked.exists() or (anchor and (linked.suffix != ".md" or anchor not in anchors(linked))):
            broken.append(target)
    return broken


def test_every_relative_link_of_the_readme_and_docs_resolves() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(pages) > 1
    assert {page.name: broken_links(page) for page in pages} == {page.name: [] for page in pages}


def test_a_missing_file_or_heading_is_reported(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page: `reference`\n\n```bash\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text(
        "## Here (`it`)\n[ok](other.md#other-page-reference) [ok](#here-it) [web](https://example.com/x#y)\n"
        "[gone](nowhere.md) [no heading](other.md#not-a-heading) [no anchor](#nope)\n"
        "```\n[in code](ignored.md)\n```\n"
    )
    assert broken_links(page) == ["nowhere.md", "other.md#not-a-heading", "#nope"]
