"""The student edition (``make student``): every chapter and exercise, no solution in any form."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_student_edition.py"
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))   # chapters and their sub-pages
FULL_BOOK_COLAB = "colab.research.google.com/github/pruning-as-a-cooperative-game/book"


def _run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _texts(cell: dict) -> list[str]:
    """Source and textual outputs of a cell, as a reader would see them."""
    out = ["".join(cell["source"])]
    for o in cell.get("outputs", []):
        out.append("".join(o.get("text", "")))
        out += ["".join(v) if isinstance(v, list) else v if isinstance(v, str) else json.dumps(v)
                for v in o.get("data", {}).values()]
    return out


@pytest.fixture(scope="module")
def edition(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student") / "edition"
    result = _run("--out", out)
    assert result.returncode == 0, result.stderr
    return out


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def test_same_chapters(edition):
    assert sorted(p.name for p in (edition / "notebooks").glob("*.ipynb")) == [p.name for p in CHAPTERS]
    assert "without the solutions" in (edition / "README.md").read_text()


def test_no_solution_survives_anywhere(edition):
    for path in sorted(edition.rglob("*")):
        if path.suffix == ".ipynb":
            for cell in _cells(path):
                assert "solution" not in _tags(cell), path.name
                for text in _texts(cell):
                    assert "Solution to Exercise" not in text and '<details class="solution"' not in text, path.name
        if path.is_file():
            assert "Solution to Exercise" not in path.read_text(encoding="utf-8", errors="replace"), path


@pytest.mark.parametrize("source", CHAPTERS, ids=lambda p: p.name)
def test_every_other_cell_is_kept_with_its_outputs(edition, source):
    """Exactly the solution cells go; every exercise stays, and all other cells keep source and outputs."""
    original = [c for c in _cells(source) if "solution" not in _tags(c)]
    student = _cells(edition / "notebooks" / source.name)
    assert len(student) == len(original)
    assert sum("exercise" in _tags(c) for c in student) == sum("exercise" in _tags(c) for c in _cells(source))
    pages = [p for p in CHAPTERS if p.name[:2] == source.name[:2]]      # exercises sit on a chapter's last page
    assert sum("exercise" in _tags(c) for p in pages for c in _cells(edition / "notebooks" / p.name)) >= 3
    for k, (mine, theirs) in enumerate(zip(student, original)):
        assert mine.get("outputs") == theirs.get("outputs") and _tags(mine) == _tags(theirs), (source.name, k)
        if k:   # the title cell loses its Colab badge (it opens the full book), nothing else
            assert mine["source"] == theirs["source"], (source.name, k)
    assert FULL_BOOK_COLAB not in "".join(student[0]["source"])
    nbformat.validate(nbformat.read(edition / "notebooks" / source.name, as_version=4))


def test_the_diagrams_travel(edition):
    if (ROOT / "book" / "figures").is_dir():
        assert sorted(p.name for p in (edition / "book" / "figures").iterdir()) == \
            sorted(p.name for p in (ROOT / "book" / "figures").iterdir())


def _tmp_book(tmp_path: Path) -> Path:
    """An empty book in tmp_path with the real diagrams, so chapters that show them find them; its notebooks/."""
    src = tmp_path / "book" / "notebooks"
    src.mkdir(parents=True)
    if (ROOT / "book" / "figures").is_dir():
        shutil.copytree(ROOT / "book" / "figures", src.parent / "book" / "figures")
    return src


def _one_cell_book(tmp_path: Path, source: str) -> Path:
    """A book in tmp_path with one chapter: chapter 00 with ``source`` added as a markdown cell."""
    src = _tmp_book(tmp_path)
    nb = nbformat.read(ROOT / "notebooks" / "00_quick_start.ipynb", as_version=4)
    nb.cells.insert(1, nbformat.v4.new_markdown_cell(source))
    nbformat.write(nb, src / "00_quick_start.ipynb")
    return src


def test_relative_references_travel_or_fail(tmp_path):
    """A file a chapter links by relative path is copied beside it; a missing one stops the build."""
    src = _one_cell_book(tmp_path, "![lattice](../book/figures/lattice.svg) and <img src=\"../data/table.png\">")
    for rel in ("book/figures/lattice.svg", "data/table.png"):
        (src.parent / rel).parent.mkdir(parents=True, exist_ok=True)
        (src.parent / rel).write_text("<svg/>")
    assert _run(src, "--out", tmp_path / "out").returncode == 0
    assert (tmp_path / "out" / "book" / "figures" / "lattice.svg").exists()
    assert (tmp_path / "out" / "data" / "table.png").exists()
    (src.parent / "data" / "table.png").unlink()
    result = _run(src, "--out", tmp_path / "out")
    assert result.returncode != 0 and "cell 1 " in result.stderr and "does not exist" in result.stderr


LEAKS = {
    "untagged details": lambda cell: cell["metadata"].pop("tags"),
    "admonition": lambda cell: cell.update(metadata={}, source="```{admonition} Solution\n:class: dropdown\n42\n```"),
    "solution directive": lambda cell: cell.update(metadata={}, source="```{solution} ex-02-1\n42\n```"),
}


@pytest.mark.parametrize("form", LEAKS)
def test_a_leaked_solution_fails_loudly(tmp_path, form):
    src = _tmp_book(tmp_path)
    chapter = ROOT / "notebooks" / "02_layers_as_players.ipynb"
    nb = json.loads(chapter.read_text(encoding="utf-8"))
    index = next(i for i, c in enumerate(nb["cells"]) if "solution" in _tags(c))
    LEAKS[form](nb["cells"][index])
    (src / chapter.name).write_text(json.dumps(nb), encoding="utf-8")
    result = _run(src, "--out", tmp_path / "out")
    assert result.returncode != 0
    assert f"{chapter.name}: cell {index} " in result.stderr and "not tagged 'solution'" in result.stderr
    assert not (tmp_path / "out").exists(), "nothing is written when a solution leaks"


def test_a_leak_in_an_output_fails_too(tmp_path):
    src = _tmp_book(tmp_path)
    nb = json.loads((ROOT / "notebooks" / "00_quick_start.ipynb").read_text(encoding="utf-8"))
    index = next(i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and c.get("outputs"))
    nb["cells"][index]["outputs"].append({"name": "stdout", "output_type": "stream", "text": "Solution to Exercise 2"})
    (src / "00_quick_start.ipynb").write_text(json.dumps(nb), encoding="utf-8")
    result = _run(src, "--out", tmp_path / "out")
    assert result.returncode != 0 and f"cell {index} " in result.stderr


def test_colab_badges_can_point_at_the_course_repository(tmp_path):
    src = _tmp_book(tmp_path)
    shutil.copy(CHAPTERS[0], src)
    assert _run(src, "--out", tmp_path / "out", "--colab-repo", "teacher/course").returncode == 0
    title = "".join(_cells(tmp_path / "out" / "notebooks" / CHAPTERS[0].name)[0]["source"])
    assert f"colab.research.google.com/github/teacher/course/blob/main/notebooks/{CHAPTERS[0].name}" in title
    assert FULL_BOOK_COLAB not in title


def test_never_overwrites_a_folder_it_did_not_write(tmp_path):
    precious = tmp_path / "out" / "thesis.tex"
    precious.parent.mkdir()
    precious.write_text("years of work")
    result = _run("--out", tmp_path / "out")
    assert result.returncode != 0 and precious.read_text() == "years of work"
    assert _run("--out", tmp_path / "fresh").returncode == 0 and _run("--out", tmp_path / "fresh").returncode == 0
