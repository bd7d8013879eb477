"""Execute chapters top to bottom in place and strip noisy metadata (``make book``).

Readers on GitHub and Colab see the committed outputs, so they are regenerated here,
on CPU, from a clean kernel; execution counts are renumbered 1, 2, ... and per-cell timing
metadata is removed, so that re-running a chapter only changes what its results change.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from tqdm.auto import tqdm


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Renumber execution counts 1, 2, ... and drop volatile metadata; keep tags, outputs and widget state.

    The widget state (``metadata.widgets``, stored by nbclient) is what lets the HTML book draw a chapter's
    widgets as they were left by the run; without it a static reader sees only their text repr.

    Counts are not stripped: nbval fails every cell that has outputs but no execution count
    ("Unrun reference cell has outputs") and checks ``nbval-check-output`` cells only when they ran.
    Renumbering executed cells in order makes them depend on the notebook alone, not on the run.
    """
    count = 0
    for cell in nb.cells:
        if cell.cell_type == "code":
            if cell.execution_count is not None:
                count += 1
                cell.execution_count = count
            for out in cell.outputs:
                if "execution_count" in out:
                    out["execution_count"] = cell.execution_count
        cell.metadata.pop("execution", None)
        cell.metadata.pop("ExecuteTime", None)
    return nb


def execute(path: Path, timeout: int) -> float:
    """Run a chapter in place; cells tagged ``skip-execution`` (GPU-only, design.md §4) are left unrun, as in the book."""
    nb = nbformat.read(path, as_version=4)
    skipped = {i: cell.source for i, cell in enumerate(nb.cells)
               if cell.cell_type == "code" and "skip-execution" in cell.metadata.get("tags", [])}
    for i in skipped:
        nb.cells[i].source = ""
    start = time.time()
    code = sum(cell.cell_type == "code" for cell in nb.cells)
    with tqdm(total=code, desc=path.name, unit="cell") as bar:   # a stuck cell shows as a stalled bar
        NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                       on_cell_executed=lambda **_: bar.update(),
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    for i, source in skipped.items():
        nb.cells[i].source, nb.cells[i].outputs, nb.cells[i].execution_count = source, [], None
    nbformat.write(clean(nb), path)
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("paths", nargs="+", type=Path, help="notebooks or folders of notebooks")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args()
    notebooks = sorted(p for arg in args.paths
                       for p in ([arg] if arg.suffix == ".ipynb" else arg.glob("*.ipynb")))
    for path in notebooks:
        print(f"{path}: {execute(path, args.timeout):.0f} s", flush=True)


if __name__ == "__main__":
    main()
