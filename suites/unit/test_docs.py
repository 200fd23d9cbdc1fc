"""README is the front door: short, with the two set-up commands CI reads, and every page under docs/ reachable
from it through links that resolve. Links are followed as a reader would, from README outwards."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _links(page: Path) -> list[Path]:
    return [(page.parent / target).resolve() for target in LINK.findall(page.read_text())
            if not re.match(r"[a-z]+://", target)]


def test_readme_is_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= 12 * 1024, f"README.md is {size} bytes; details belong in docs/"


def test_readme_keeps_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    cmds = re.findall(r"^    (python3 -m pip install nox && nox -s \S+)$", text, flags=re.M)
    assert cmds == ["python3 -m pip install nox && nox -s correctness",
                    "python3 -m pip install nox && nox -s tests"], cmds


def test_every_link_resolves_and_every_docs_page_is_reachable():
    seen, todo, broken = set(), [ROOT / "README.md"], []
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        for target in _links(page):
            if not target.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
            elif target.suffix == ".md":
                todo.append(target)
    assert not broken, broken
    pages = {p.resolve() for p in (ROOT / "docs").glob("*.md")}
    assert pages and not pages - seen, sorted(str(p.relative_to(ROOT)) for p in pages - seen)
