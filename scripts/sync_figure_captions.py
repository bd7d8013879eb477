"""Number and caption every figure of every chapter, for the book and for Colab alike (issue: numbered figures).

A figure is either a code cell whose output is an image or a ``{figure}`` directive in a markdown cell (the
concept diagrams). A plot cell is followed by a markdown caption cell ``*Figure N.k. text*``: Colab and Jupyter
show that cell, while the book hides it (tag ``remove-cell``) and shows the same text as the plot's numbered
caption, taken from the cell's ``mystnb.figure`` metadata. This script keeps the three in step: it numbers the
figures in order (chapters 01-08 as N.k, the unnumbered quick start as k, as Sphinx does), writes the caption and a
stable ``fig-NN-slug`` name into the plot cell's metadata and tags the caption cell. ``--check`` only reports.

A chapter may span several pages: ``NN_topic.ipynb`` first, then its sub-pages ``NNb_...``, ``NNc_...`` (listed under
the chapter's ``sections:`` in ``_toc.yml``). Sphinx numbers their figures on, in that order (Figure 4.3 on the
first sub-page follows Figure 4.2 on the chapter's first page), and so does this script.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
CAPTION = re.compile(r"^\*Figure(?: [\d.]+\.|:) (?P<text>.*)\*\s*$", re.S)
LOWER_CASE_NAMES = {"shap", "minilib", "torchao", "peft"}
DIRECTIVE = re.compile(r"^(`{3,}|:{3,})\{figure\}", re.M)


def _images(cell: nbformat.NotebookNode) -> int:
    """How many image outputs a cell has (0 for markdown)."""
    return sum(cell.cell_type == "code" and any(key.startswith("image/") for key in out.get("data", {}))
               for out in cell.get("outputs", []))


def _sentence_case(text: str) -> str:
    """A caption starts with a capital, as a sentence after "Figure 4.3" does, unless it starts with a name
    written in lower case (a library such as shap, or code)."""
    first = text.split(maxsplit=1)[0] if text else ""
    if not first[:1].islower() or first.split("'")[0] in LOWER_CASE_NAMES:
        return text
    return text[0].upper() + text[1:]


def _slug(text: str, chapter: int, taken: set[str]) -> str:
    words = re.findall(r"[a-z0-9]+", re.sub(r"\$[^$]*\$|`[^`]*`|\{[^}]*\}", " ", text.lower()))[:5]
    base = f"fig-{chapter:02d}-" + "-".join(words)
    name, k = base, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    return name


def chapter_pages(path: Path) -> list[Path]:
    """The pages of ``path``'s chapter in book order: ``NN_topic.ipynb``, then its sub-pages ``NNb_...``, ``NNc_...``."""
    return [p for p in sorted(path.parent.glob("[0-9][0-9]*_*.ipynb")) if p.name[:2] == path.name[:2]]


def _n_figures(nb: nbformat.NotebookNode) -> int:
    return sum(len(DIRECTIVE.findall(c.source)) if c.cell_type == "markdown" else min(_images(c), 1) for c in nb.cells)


def sync(path: Path, write: bool) -> list[str]:
    """Bring one page's figures in step; return what was (or, without ``write``, would be) changed.

    Numbering starts after the figures of the chapter's earlier pages; names are kept unique across its pages.
    """
    nb = nbformat.read(path, as_version=4)
    chapter = int(path.name[:2])
    changes: list[str] = []
    pages = [p for p in chapter_pages(path) if p.resolve() != path.resolve()]
    others = {p: nbformat.read(p, as_version=4) for p in pages}
    taken = {c.metadata["mystnb"]["figure"]["name"] for page in [nb, *others.values()] for c in page.cells
             if "name" in c.metadata.get("mystnb", {}).get("figure", {})}
    number = sum(_n_figures(page) for p, page in others.items() if p.name < path.name)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            number += len(DIRECTIVE.findall(cell.source))
            continue
        if not _images(cell):
            continue
        number += 1
        label = f"{chapter}.{number}" if chapter else f"{number}"
        if (images := _images(cell)) > 1:   # the book would wrap each in a figure with the same name (a -W error), or show a stray plot
            raise SystemExit(f"{path.name}, cell {i}: {images} images in one figure cell; show one figure per cell")
        caption_cell = nb.cells[i + 1] if i + 1 < len(nb.cells) else None
        match = CAPTION.match(caption_cell.source) if caption_cell and caption_cell.cell_type == "markdown" else None
        if not match:
            raise SystemExit(f"{path.name}, cell {i}: a plot is followed by a markdown cell '*Figure {label}. ...*'")
        text = _sentence_case(" ".join(match["text"].split()))
        figure = cell.metadata.setdefault("mystnb", {}).setdefault("figure", {})
        wanted = {"caption": text, "name": figure.get("name") or _slug(text, chapter, taken)}
        taken.add(wanted["name"])
        if figure != wanted:
            figure.clear(), figure.update(wanted)
            changes.append(f"{path.name} cell {i}: figure metadata")
        colab = f"*Figure {label}. {_sentence_case(match['text'].strip())}*"
        if caption_cell.source != colab:
            caption_cell.source = colab
            changes.append(f"{path.name} cell {i + 1}: caption numbered {label}")
        tags = caption_cell.metadata.setdefault("tags", [])
        if "remove-cell" not in tags:
            tags.append("remove-cell")
            changes.append(f"{path.name} cell {i + 1}: tagged remove-cell")
    if write and changes:
        nbformat.write(nb, path)
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("paths", nargs="*", type=Path, help="chapter pages (default: notebooks/[0-9][0-9]*_*.ipynb)")
    parser.add_argument("--check", action="store_true", help="report what is out of step and exit 1; write nothing")
    args = parser.parse_args()
    paths = args.paths or sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))
    changes = [c for p in paths for c in sync(p, write=not args.check)]
    print("\n".join(changes) or "figures: in step")
    sys.exit(1 if args.check and changes else 0)


if __name__ == "__main__":
    main()
