"""The concept diagrams in ``book/figures/`` are exactly what ``scripts/draw_diagrams.py`` draws
(chapters 01, 02, 03 and 07 show them).

The SVGs are committed, so the book builds without drawing them; these tests catch a diagram
edited by hand or a script changed without re-drawing, and check that each file is valid SVG
carrying the labels its caption refers to.
"""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "book" / "figures"
SVG_NS = "{http://www.w3.org/2000/svg}"

# each diagram and labels that must appear in it as text (one line of text each)
KEY_LABELS = {
    "residual_stream": ["token", "embedding", "residual stream x", "layer 2 skipped", "keep-mask",
                        "through unchanged (identity, x → x)", "+ LM head"],
    "coalition_lattice": ["marginal contribution", "v(S ∪ {i}) − v(S)", "S = 1001, i = 2", "0000", "1011",
                          "1111", "adds player 2"],
    "prefix_tree": ["embedding", "keep (1): run layer 0", "drop (0)", "shared prefix 1: layer 0 runs",
                    "v(101)", "2³ − 1"],
    "three_stage_pipeline": ["Stage 1", "Stage 2", "Stage 3", "stratified by Hamming", "the expensive step",
                             "Fit a small surrogate", "lowest φ: remove"],
    "keep_mask_flip": ["v(S) = 0.712", "v(S ∪ {i}) = 0.845", "marginal contribution to S", "flip bit i = 7"],
}


def svg_text(path: Path) -> str:
    """All text of an SVG, one line per <text> element (the diagrams keep text as text)."""
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG_NS}svg", root.tag
    return "\n".join("".join(el.itertext()) for el in root.iter(f"{SVG_NS}text"))


def test_committed_diagrams_are_what_the_script_draws(tmp_path):
    """Byte for byte under the matplotlib that drew them; under another version, the same text in every diagram
    (matplotlib may write the same drawing with other bytes, which is no reason to fail CI)."""
    import matplotlib

    drawn_by = re.search(r"with matplotlib ([^<\s]+)", (FIGURES / "prefix_tree.svg").read_text(encoding="utf-8"))
    if drawn_by and drawn_by[1] == matplotlib.__version__:
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / "draw_diagrams.py"), "--check"],
                                capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "draw_diagrams.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in KEY_LABELS:
        assert svg_text(tmp_path / f"{name}.svg") == svg_text(FIGURES / f"{name}.svg"), name


@pytest.mark.parametrize("name", sorted(KEY_LABELS))
def test_diagram_is_small_valid_svg_with_its_labels(name):
    path = FIGURES / f"{name}.svg"
    assert path.exists(), f"{path} missing: run scripts/draw_diagrams.py"
    assert path.stat().st_size < 60_000, f"{path.name}: {path.stat().st_size} bytes"
    text = svg_text(path)
    missing = [label for label in KEY_LABELS[name] if label not in text]
    assert not missing, f"{path.name} lacks {missing}"
    raw = path.read_text(encoding="utf-8")
    assert "<dc:date>" not in raw, "a date in the SVG would make re-drawing change the file"
