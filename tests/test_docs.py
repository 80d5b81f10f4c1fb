"""The project's Markdown documents link to files that exist and to headings those files have."""
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([*REPO_ROOT.glob("*.md"), *(REPO_ROOT / "docs").glob("*.md"), REPO_ROOT / "datasets" / "README.md"])
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"^```.*?^```", re.S | re.M)


def heading_anchors(text: str):
    """GitHub's anchors of a document's headings: lower case, punctuation other than '-' and '_'
    dropped, spaces as '-'."""
    anchors = set()
    for line in CODE_BLOCK.sub("", text).splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            title = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(title.replace(" ", "-"))
    return anchors


def relative_links(path: Path):
    for target in LINK.findall(CODE_BLOCK.sub("", path.read_text())):
        if not re.match(r"[a-z]+:", target):  # not http:, https:, mailto:
            yield target


def test_heading_anchors_follow_github():
    text = "# Speed\n## Where it stands\n### Train on your own data\n```\n# not a heading\n```\n## A `key`, (x)\n"
    assert heading_anchors(text) == {"speed", "where-it-stands", "train-on-your-own-data", "a-key-x"}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_resolve(document):
    broken = []
    for target in relative_links(document):
        file_part, _, anchor = target.partition("#")
        linked = (document.parent / file_part).resolve() if file_part else document
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text()):
            broken.append(f"{target}: {linked.name} has no heading with anchor #{anchor}")
    assert not broken, f"{document.name}: " + "; ".join(broken)
