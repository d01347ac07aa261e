"""The README stays short, and its links and those of docs/ and CONTRIBUTING.md lead somewhere."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def links(page: Path) -> list[str]:
    """The relative link targets of a markdown page, outside code blocks."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


def test_the_readme_is_short_enough_for_a_new_user():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 350


def test_every_relative_link_reaches_a_file_and_its_heading():
    prose = {p: re.sub(r"```.*?```", "", p.read_text(), flags=re.DOTALL) for p in PAGES}
    headings = {p: {anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)} for p, text in prose.items()}
    broken = []
    for page in PAGES:
        for target in links(page):
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or (fragment and fragment not in headings.get(dest, ())):
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_readme_links_every_page_of_docs():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(ROOT / "README.md")}
    assert set(PAGES[1:]) <= linked
    assert anchor("Structure guidance (ControlNet), in short") == "structure-guidance-controlnet-in-short"
