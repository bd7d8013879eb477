"""House conventions (design.md §2–4) checked on every run: chapters, docstrings, links."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from check_book_html import is_assert_only  # noqa: E402  (one definition of an assert-only cell, shared with the page check)
# A chapter is NN_topic.ipynb, optionally followed by sub-pages NNb_..., NNc_... (its `sections:` in _toc.yml):
# every page is checked; the chapter's last page carries its summary, exercises and further reading.
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))
MODULES = ["games", "shapley", "estimators", "surrogate", "layers", "evaluation", "baselines", "pruning", "teaching",
           "models", "data", "store", "search", "efficiency", "zero_shot", "surrogate_accuracy", "surrogate_values",
           "surrogate_models", "surrogate_estimators", "paper_pipeline", "healing", "quantization"]


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _text(cell: dict) -> str:
    return "".join(cell["source"])


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _chapter_pages(path: Path) -> list[Path]:
    """The pages of ``path``'s chapter in book order (the chapter's own notebook first, then its sub-pages)."""
    return [p for p in NOTEBOOKS if p.name[:2] == path.name[:2]]


def _is_first_page(path: Path) -> bool:
    return path == _chapter_pages(path)[0]


def _is_last_page(path: Path) -> bool:
    return path == _chapter_pages(path)[-1]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_follows_the_skeleton(path):
    cells = _cells(path)
    markdown = "\n".join(_text(c) for c in cells if c["cell_type"] == "markdown")
    assert _text(cells[0]).lstrip().startswith("# "), "a chapter opens with its title"
    assert f"blob/main/notebooks/{path.name}" in markdown, "Colab badge pointing at the chapter itself"
    headings = (["Learning goals"] if _is_first_page(path) else []) + (
        ["Summary", "Exercises", "Further reading"] if _is_last_page(path) else [])
    for heading in headings:
        assert re.search(rf"^(#+ |\*\*).*{heading}", markdown, flags=re.M | re.I), f"missing section {heading!r}"
    assert any(c["cell_type"] == "code" and "assert " in _text(c) for c in cells), "key claims are asserted"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_cells_are_short_and_clean(path):
    code = [c for c in _cells(path) if c["cell_type"] == "code"]
    lengths = sorted(sum(1 for line in _text(c).splitlines() if line.strip()) for c in code)
    assert lengths[len(lengths) // 2] <= 6, f"median code cell has {lengths[len(lengths) // 2]} lines"
    assert lengths[-1] <= 20, f"longest code cell has {lengths[-1]} lines"
    errors = [i for i, c in enumerate(code) for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"stored error outputs in code cells {errors}"
    assert all(c.get("outputs") for c in code if "nbval-check-output" in _tags(c)), "checked cells keep outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_exercises_are_numbered_and_solutions_fold(path):
    """Each exercise is a sphinx-exercise directive labelled ex-NN-k, in order, followed by its solution cell.

    Solutions are <details> blocks: they fold in the book, in Jupyter and in Colab, where a MyST dropdown shows as
    plain text; `make student` drops the cells tagged `solution`.
    """
    chapter = int(path.name[:2])
    cells = _cells(path)
    exercises = [i for i, c in enumerate(cells) if "exercise" in _tags(c)]
    if not _is_last_page(path):
        assert not exercises, "a chapter's exercises are on its last page, so they number 1, 2, ... in one place"
        return
    assert len(exercises) >= 3, "a chapter has at least three exercises"
    for k, i in enumerate(exercises, 1):
        text, label = _text(cells[i]), f"ex-{chapter:02d}-{k}"
        assert re.match(r"````\{exercise\} \S.*\n:label: " + label + "\n", text), f"exercise {k}: header or label {label}"
        assert text.rstrip().endswith("````"), f"exercise {k}: unclosed directive"
        solution = cells[i + 1]
        number = f"{chapter}.{k}" if chapter else f"{k}"
        assert "solution" in _tags(solution), f"exercise {k} is followed by its solution cell"
        assert _text(solution).startswith(f'<details class="solution"><summary>Solution to Exercise {number}</summary>\n\n')
        assert _text(solution).rstrip().endswith("</details>") and _text(solution).count("<details") == 1
    tagged = [i for i, c in enumerate(cells) if "solution" in _tags(c)]
    assert tagged == [i + 1 for i in exercises], "every solution cell follows an exercise"
    markdown = "\n".join(_text(c) for c in cells if c["cell_type"] == "markdown")
    assert "{admonition} Solution" not in markdown, "solutions are <details> cells, not MyST dropdowns"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_assert_only_cells_run_but_do_not_show(path):
    """A cell that only asserts is a test, not teaching: it runs under nbval and is removed from the HTML."""
    for c in (c for c in _cells(path) if c["cell_type"] == "code"):
        if is_assert_only(_text(c)):
            assert "remove-input" in _tags(c), f"assert-only cell without the remove-input tag: {_text(c)[:60]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_nbval_markers_are_cell_tags(path):
    """nbval honours a ``# NBVAL_...`` comment only on a line of its own (a trailing one is silently
    ignored, so the check never runs), and a comment shows in the rendered book: markers are tags."""
    code = [c for c in _cells(path) if c["cell_type"] == "code"]
    comments = [i for i, c in enumerate(code) if re.search(r"#\s*NBVAL_", _text(c))]
    assert not comments, f"code cells {comments} carry NBVAL comments; use the tags nbval-check-output / nbval-skip"
    checked = [c for c in code if "nbval-check-output" in _tags(c)]
    assert checked, "a chapter checks some of its printed numbers"
    for c in code:
        if "skip-execution" in _tags(c):
            assert "nbval-skip" in _tags(c), "a cell the book skips must be skipped by nbval too (design.md §4)"


def test_toc_lists_every_chapter():
    toc = (ROOT / "_toc.yml").read_text()
    for path in NOTEBOOKS:
        assert f"notebooks/{path.stem}" in toc, f"{path.name} is not in _toc.yml"


@pytest.mark.parametrize("module", MODULES)
def test_public_functions_name_their_chapter(module):
    mod = importlib.import_module(f"minilib.{module}")
    missing = [name for name, obj in vars(mod).items()
               if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
               and obj.__module__ == mod.__name__
               and not re.search(r"[Cc]hapter \d\d", inspect.getdoc(obj) or "")]
    assert not missing, f"minilib.{module}: docstrings without '(chapter NN)': {missing}"


def test_repository_url_is_in_sync():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "sync_repository_url.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_notebook_imports_a_notebook_and_no_module_is_named_after_a_chapter():
    for path in (ROOT / "minilib").glob("*.py"):
        assert not re.match(r"(ch|chapter)?_?\d", path.stem), path.name
    for path in NOTEBOOKS:
        assert "import notebooks" not in path.read_text()


def test_figures_are_numbered_and_captioned():
    """Every plot has a numbered caption in the book (cell metadata) and the same numbered text for Colab."""
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "sync_figure_captions.py"), "--check"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    for path in NOTEBOOKS:
        for cell in _cells(path):
            figure = cell.get("metadata", {}).get("mystnb", {}).get("figure")
            if figure:
                assert figure["name"].startswith(f"fig-{path.name[:2]}-") and len(figure["caption"]) > 40


def test_key_equations_are_labelled():
    """The formulas other pages cite carry MyST labels, so the book numbers them (1.1) and links to them."""
    labels = {"01": ["eq-shapley", "eq-interaction-index"], "03": ["eq-shapley-layers", "eq-size-means"],
              "05": ["eq-residual-correction"], "08": ["eq-lora"]}
    for path in filter(_is_first_page, NOTEBOOKS):   # a label may sit on any page of its chapter
        markdown = "\n".join(_text(c) for page in _chapter_pages(path) for c in _cells(page) if c["cell_type"] == "markdown")
        for label in labels.get(path.name[:2], []):
            assert re.search(r"\$\$ \(" + label + r"\)", markdown), f"{path.name}: equation {label} is not labelled"


WIDGET = "application/vnd.jupyter.widget-view+json"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_widgets_have_state_and_a_static_fallback(path):
    """A widget is drawn from its saved state in the HTML book, says that it cannot run there, and is followed by
    a plain printed fallback showing what it would show, so a static reader loses nothing."""
    notebook = json.loads(path.read_text())
    cells = notebook["cells"]
    state = notebook.get("metadata", {}).get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    for i, cell in enumerate(cells):
        views = [o["data"] for o in cell.get("outputs", []) if WIDGET in o.get("data", {})]
        assert all(v[WIDGET]["model_id"] in state.get("state", {}) for v in views), f"cell {i}: widget state not saved"
        if all(re.search(r"\[\d\d:\d\d", "".join(v.get("text/plain", ""))) for v in views):
            continue   # only tqdm progress bars (or nothing): they render from their saved state, nothing to fall back to
        note = "\n".join(_text(c) for c in cells[max(0, i - 3):i] if c["cell_type"] == "markdown")
        assert re.search(r"static (book|page)", note), f"cell {i}: no note that the widget does not run in the static book"
        fallback = [c for c in cells[i:i + 3] if c["cell_type"] == "code"
                    and any(o.get("output_type") == "stream" for o in c.get("outputs", []))]
        assert fallback, f"cell {i}: no printed static fallback in this cell or the next two"
