"""Check the built book as a reader sees it: no test scaffolding on any chapter page (``make test``).

The chapters check their key numbers with nbval (cell tags ``nbval-check-output``) and their key
claims with assert-only cells (tag ``remove-input``). Both must keep running under nbval and
stay out of the rendered HTML: no page may contain an ``NBVAL`` marker, and no code cell shown on a
page may be one of the chapter's assert-only cells. Run after ``jupyter-book build``; exits 1 and
lists the offending pages otherwise.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parents[1]


def _only_asserts(nodes) -> bool:
    return all(isinstance(n, ast.Assert) or (isinstance(n, (ast.For, ast.If)) and _only_asserts(n.body)
                                             and _only_asserts(n.orelse)) for n in nodes)


def is_assert_only(source: str) -> bool:
    """Whether a code cell only asserts (possibly inside for/if): a test, hidden from the book (design.md §4)."""
    body = ast.parse(source).body
    return bool(body) and _only_asserts(body)


def _squash(text: str) -> str:
    return "".join(text.split())


def assert_only_sources(notebook: Path) -> list[str]:
    """The whitespace-free sources of a chapter's assert-only code cells."""
    cells = json.loads(notebook.read_text())["cells"]
    out = []
    for cell in cells:
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and is_assert_only(source):
            out.append(_squash(source))
    return out


def problems(html_dir: Path) -> list[str]:
    found = []
    for notebook in sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb")):   # chapters and their sub-pages
        page = html_dir / "notebooks" / f"{notebook.stem}.html"
        if not page.is_file():
            found.append(f"{page}: missing (build the book first)")
            continue
        html = page.read_text(encoding="utf-8")
        if "NBVAL" in html:
            found.append(f"{page.name}: contains an NBVAL marker")
        shown = {_squash(div.get_text()) for div in BeautifulSoup(html, "html.parser").select("div.cell_input")}
        hidden = assert_only_sources(notebook)
        leaked = [s[:60] for s in hidden if s in shown]
        if leaked:
            found.append(f"{page.name}: shows assert-only cells {leaked}")
    return found


def main() -> int:
    html_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "_build" / "html"
    found = problems(html_dir)
    for line in found:
        print(line)
    print(f"book pages: {'clean' if not found else f'{len(found)} problem(s)'}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
