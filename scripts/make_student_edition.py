"""Write the student edition of the chapters: every notebook without its solutions (``make student``).

A course hands students the chapters with their exercises but not the answers. This script reads every
``NN_*.ipynb`` chapter, drops the cells tagged ``solution`` (the folded ``<details>`` blocks that follow each
exercise, see ``tests/test_conventions.py``) and writes the rest, outputs included, to ``OUT/notebooks/``::

    .venv/bin/python scripts/make_student_edition.py                      # -> _build/student
    .venv/bin/python scripts/make_student_edition.py --colab-repo me/course   # badges open me/course

It refuses (exit 1, naming the notebook and the cell) to write anything if a solution survives in another
form, e.g. an untagged cell with "Solution to Exercise", a ``{solution}`` directive or an
``{admonition} Solution``: a student edition must never leak. It also copies what the notebooks reference by
relative path (``../book/figures/...``), and ``book/figures`` whole when it exists, and writes a README.md.

Colab badges point at the full book, whose solutions fold but are there, so by default they are removed;
``--colab-repo OWNER/REPO`` points them at a repository that holds this folder's contents instead.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from sync_repository_url import COLAB, COLAB_RE, read_repository

ROOT = Path(__file__).resolve().parents[1]
MARKER = ".student-edition"           # marks a folder this script wrote, so a rerun may replace it
TEACHER_ONLY = {"book/teacher_appendix.md"}
TEXT_SUFFIXES = {".md", ".txt", ".html", ".svg"}
LEAKS = {                                  # what a solution looks like outside its tagged cell
    "Solution to Exercise": re.compile(r"solution\s+to\s+exercise", re.I),
    "{solution} directive": re.compile(r"\{solution(?:-start|-end)?\}", re.I),
    "{admonition} Solution": re.compile(r"\{admonition\}\s*solution", re.I),
    "{dropdown} Solution": re.compile(r"\{dropdown\}\s*solution", re.I),
    '<details class="solution">': re.compile(r"<details[^>]*class\s*=\s*[\"'][^\"']*\bsolution\b", re.I),
}
BADGE_RE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\(https://colab\.research\.google\.com/github/[^)]*\)[ \t]*\n?")
# relative references: markdown links and images, HTML src/href, MyST image/figure directives, "../x" in code
REF_RES = [re.compile(r"\]\(\s*<?([^)\s>]+)"), re.compile(r"(?:src|href)\s*=\s*[\"']([^\"']+)[\"']"),
           re.compile(r"^(?:`{3,}|:{3,})\s*\{(?:image|figure)\}\s*(\S+)", re.M)]
CODE_REF_RE = re.compile(r"[\"'](\.\./[^\"'\s]+)[\"']")


class LeakError(Exception):
    """A solution outside a cell tagged ``solution``, or a reference the edition cannot carry."""


@dataclass
class Chapter:
    path: Path
    notebook: nbformat.NotebookNode
    exercises: int
    dropped: int
    assets: set[Path] = field(default_factory=set)


def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def cell_texts(cell) -> list[str]:
    """The source and every textual output of a cell: everything a reader could see."""
    texts = [cell.source]
    for out in cell.get("outputs", []):
        if "text" in out:
            texts.append("".join(out["text"]) if isinstance(out["text"], list) else out["text"])
        for mime, data in out.get("data", {}).items():
            if mime.startswith("text/") or mime.endswith(("+json", "/json", "+xml", "/svg+xml")):
                texts.append(data if isinstance(data, str) else str(data))
    return texts


def find_leak(texts: list[str]) -> str | None:
    """The name of the first solution form found in ``texts``, or None."""
    for name, pattern in LEAKS.items():
        if any(pattern.search(t) for t in texts):
            return name
    return None


def relative_refs(cell) -> set[str]:
    """Relative paths a cell refers to (no URLs, anchors or absolute paths)."""
    patterns = REF_RES if cell.cell_type == "markdown" else [CODE_REF_RE]
    refs = {m.group(1) for p in patterns for m in p.finditer(cell.source)}
    refs = {r.split("#")[0].split("?")[0] for r in refs}
    return {r for r in refs if r and not re.match(r"^[a-zA-Z][a-zA-Z0-9+.\-]*:|^/|^\{", r)}


def student_chapter(path: Path, root: Path, chapter_names: set[str], colab: tuple[str, str] | None) -> Chapter:
    """Read one chapter, check it, and return its student version (nothing is written here)."""
    nb = nbformat.read(path, as_version=4)
    kept, exercises, dropped, assets = [], 0, 0, set()
    for i, cell in enumerate(nb.cells):
        where = f"{path.name}: cell {i} ({cell.cell_type}, id {cell.get('id', '?')})"
        tags = _tags(cell)
        if "solution" in tags:
            if "exercise" in tags:
                raise LeakError(f"{where} is tagged both 'exercise' and 'solution'; it would be dropped")
            dropped += 1
            continue
        leak = find_leak(cell_texts(cell))
        if leak:
            raise LeakError(f"{where} contains a solution ({leak}) but is not tagged 'solution', so the student "
                            f"edition would leak it. Tag the cell 'solution' or move the solution into a "
                            f"<details class=\"solution\"> cell tagged 'solution'.")
        exercises += "exercise" in tags
        for ref in relative_refs(cell):
            target = (path.parent / ref).resolve()
            if target.suffix == ".ipynb" and target.parent == path.parent and target.name in chapter_names:
                continue                    # another chapter: it is in the edition
            try:
                rel = target.relative_to(root)
            except ValueError:
                raise LeakError(f"{where} refers to {ref!r}, outside the book ({root})") from None
            if rel.as_posix() in TEACHER_ONLY or target.suffix == ".ipynb":
                raise LeakError(f"{where} refers to {ref!r}, which is not part of the student edition")
            if not target.exists():
                raise LeakError(f"{where} refers to {ref!r}, which does not exist ({target})")
            assets.add(rel)
        if cell.cell_type == "markdown":
            cell.source = badge(cell.source, colab)
        kept.append(cell)
    nb.cells = kept
    nbformat.validate(nb)
    return Chapter(path, nb, exercises, dropped, assets)


def badge(source: str, colab: tuple[str, str] | None) -> str:
    """Point Colab links at ``colab`` = (OWNER/REPO, BRANCH), or remove the badge when there is none."""
    if colab:
        repo, branch = colab
        return COLAB_RE.sub(lambda m: f"{COLAB}/github/{repo}/blob/{branch}/{m.group('path')}", source)
    new = BADGE_RE.sub("", source)
    return re.sub(r"\n{3,}", "\n\n", new).rstrip() if new != source else source


def check_asset(path: Path, root: Path) -> None:
    """Copied text files are scanned like cells: a figure or page must not carry a solution either."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f.suffix in TEXT_SUFFIXES:
            leak = find_leak([f.read_text(encoding="utf-8", errors="replace")])
            if leak:
                raise LeakError(f"{f.relative_to(root)} contains a solution ({leak}); it cannot be copied")


def source_version(root: Path) -> str:
    """``git describe`` of the book, so a teacher can tell which version the students have."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def readme(chapters: list[Chapter], assets: list[Path], root: Path, colab: tuple[str, str] | None) -> str:
    """The README.md of the output folder: what it is, what is in it, how to run it."""
    repo_url = "https://github.com/{}/{}".format(*read_repository(ROOT / "_config.yml")[:2])
    rows = "\n".join(f"| `notebooks/{c.path.name}` | {c.exercises} |" for c in chapters)
    copied = "".join(f"- `{a.as_posix()}{'/' if (root / a).is_dir() else ''}`: copied from the book for the "
                     "chapters' relative paths.\n" for a in assets)
    badge_note = (f"Each chapter's *Open in Colab* badge opens this edition in `{colab[0]}` (branch `{colab[1]}`)."
                  if colab else
                  "The *Open in Colab* badges were removed (they open the full book, which has the solutions): "
                  "upload a notebook with Colab's *File → Upload notebook*, or use the link your teacher gives you.")
    return f"""# Pruning as a Cooperative Game: student edition

The chapters of the book *Pruning as a Cooperative Game* ({repo_url}) for a course: every chapter with its
text, code, stored outputs and exercises, but **without the solutions**. Your teacher has them.

Made by `make student` from version `{source_version(root)}` of the book; run it again rather than editing this
folder by hand.

| chapter | exercises |
|---|---|
{rows}

{copied}
## Running the chapters

- **Read** them as they are: the stored outputs show what each cell printed when the book was built.
- **Colab**: the first code cell of each chapter installs `minilib` (it never reinstalls torch or numpy).
  {badge_note}
- **Locally** (Python 3.10 or newer): `pip install "minilib @ git+{repo_url}" jupyterlab`, then open the
  chapters from the `notebooks/` folder, so that relative paths resolve.

Each exercise is a markdown cell that opens with `{{exercise}}` and its title (the book shows it as a numbered
box). Write your answer in new cells below it.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="?", type=Path, default=ROOT / "notebooks",
                        help="folder of NN_*.ipynb chapters (default: the book's notebooks/)")
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "student",
                        help="output folder (default: _build/student); replaced if an earlier run wrote it")
    parser.add_argument("--colab-repo", metavar="OWNER/REPO",
                        help="point the Colab badges at this GitHub repository, which holds this folder's contents")
    parser.add_argument("--colab-branch", default="main", help="branch for --colab-repo (default: main)")
    args = parser.parse_args(argv)
    src, out = args.notebooks.resolve(), args.out.resolve()
    root = src.parent
    if args.colab_repo and not re.fullmatch(r"[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+", args.colab_repo):
        parser.error(f"--colab-repo must look like OWNER/REPO, got {args.colab_repo!r}")
    colab = (args.colab_repo, args.colab_branch) if args.colab_repo else None

    paths = sorted(src.glob("[0-9][0-9]*_*.ipynb"))   # chapters NN_topic and their sub-pages NNb_..., NNc_...
    if not paths:
        raise SystemExit(f"no chapters (NN_*.ipynb) in {src}")
    if out == src or src.is_relative_to(out):
        raise SystemExit(f"--out {out} would overwrite the chapters in {src}")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise SystemExit(f"{out} exists and was not written by this script; choose a new or empty --out")

    # read and check everything first, so a leak leaves no half-written edition behind
    chapters = [student_chapter(p, root, {p.name for p in paths}, colab) for p in paths]
    assets = set().union(*(c.assets for c in chapters))
    if (root / "book" / "figures").is_dir():
        assets = {a for a in assets if not a.is_relative_to("book/figures")} | {Path("book/figures")}
    assets = sorted(assets)
    for asset in assets:
        check_asset(root / asset, root)

    if out.exists():
        shutil.rmtree(out)
    (out / "notebooks").mkdir(parents=True)
    (out / MARKER).write_text("written by scripts/make_student_edition.py; replaced on every run\n")
    for c in chapters:
        nbformat.write(c.notebook, out / "notebooks" / c.path.name)
    for asset in assets:
        target = out / asset
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (root / asset).is_dir() else shutil.copy2)(root / asset, target)
    (out / "README.md").write_text(readme(chapters, assets, root, colab), encoding="utf-8")
    n_ex, n_sol = sum(c.exercises for c in chapters), sum(c.dropped for c in chapters)
    print(f"student edition: {len(chapters)} chapters, {n_ex} exercises, {n_sol} solution cells dropped -> {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LeakError as err:
        print(f"make_student_edition: {err}", file=sys.stderr)
        sys.exit(1)
