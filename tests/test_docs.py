"""The user documentation: README length, links that resolve, and no citation of documents the repository does not ship.

Oracles: the file system (a linked file exists), the headings of the linked Markdown file under GitHub's anchor rule
(lower case, punctuation dropped, spaces to hyphens), checked itself against anchors derived by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

DOCS = sorted(
    [REPO / "README.md", REPO / "data" / "README.md", *(REPO / "docs").glob("*.md"), *REPO.glob("exp-*/README.md")]
)
"""Markdown files whose relative links must resolve"""

NO_PRIVATE_CITATIONS = sorted({
    *DOCS,
    *REPO.glob("exp-*/configs/*.yaml"),
    *REPO.glob("exp-*/*.sh"),
    *(REPO / "common").rglob("*.py"),
    *(REPO / "common" / "configs").glob("*.yaml"),
    *(REPO / "scripts").glob("*.py"),
    *(REPO / "scripts").glob("*.sh"),
    *(p for p in (REPO / "tests").glob("*.py") if p.name != "test_docs.py"),  # this file names the patterns
})
"""files that must not cite the private spec folder beside the checkout (users do not have it)"""

PRIVATE = re.compile(r"shared/|spec/|§|reference-implementation|reference notes|paper\.md|ARCHITECTURE\.md|STYLE\.md")

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CITED_ANCHOR = re.compile(r"docs/([\w.-]+\.md)(#[\w-]+)?")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, characters other than letters, digits, `_`, `-` and spaces
    dropped, spaces turned into hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    """Every heading anchor of a Markdown file (outside fenced code), with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", md.read_text()).splitlines():
        m = re.match(r"#{1,6} +(.+?) *#*$", line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def test_slug_follows_githubs_rule():
    # anchors derived by hand from the rule, for headings of this repository's docs
    assert slug("The authors' `data.zip` (optional; not in git)") == "the-authors-datazip-optional-not-in-git"
    assert slug("`prompts/`: this project's prompt sets") == "prompts-this-projects-prompt-sets"
    assert slug("Image semantics: CLIP and DINO") == "image-semantics-clip-and-dino"
    assert slug("Precision of the fast-DFT gradient (`python -m scripts.precision`)") == \
        "precision-of-the-fast-dft-gradient-python--m-scriptsprecision"


def test_anchors_number_repeated_headings(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("# A b\n\n```bash\n# not a heading\n```\n\n## A b\n### C: d\n")
    assert anchors(md) == {"a-b", "a-b-1", "c-d"}


def test_readme_is_at_most_160_lines():
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= 160, f"README.md has {n} lines; the user README is kept to 160 (move detail into docs/)"


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(md):
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", md.read_text()))  # links inside code are not links
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, frag = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            broken.append(f"{target} (no heading with anchor #{frag} in {dest.name})")
    assert not broken, f"{md.relative_to(REPO)}: broken links: {broken}"


def test_cited_doc_anchors_exist():
    """Code, tests and configs cite docs/*.md#anchor: every such file and heading exists."""
    files = [p for d in ("common", "scripts", "tests") for p in (REPO / d).rglob("*.py")]
    files += [*REPO.glob("exp-*/configs/*.yaml"), REPO / "common" / "configs" / "toy.yaml"]
    broken = []
    for f in files:
        if f.name == Path(__file__).name:
            continue
        for name, frag in CITED_ANCHOR.findall(f.read_text()):
            doc = REPO / "docs" / name
            if not doc.is_file() or (frag and frag[1:] not in anchors(doc)):
                broken.append(f"{f.relative_to(REPO)}: docs/{name}{frag}")
    assert not broken, f"citations of missing docs or headings: {broken}"


def test_no_citation_of_unshipped_documents():
    hits = [
        f"{f.relative_to(REPO)}:{i}: {line.strip()}"
        for f in NO_PRIVATE_CITATIONS
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if PRIVATE.search(line)
    ]
    assert not hits, "cites a document the repository does not ship (cite docs/ instead):\n" + "\n".join(hits)
