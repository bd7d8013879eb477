"""Draw the book's concept diagrams as small, deterministic SVGs in ``book/figures/``.

The diagrams are schematic (no model is run): the residual stream with a skipped layer, the
lattice of coalitions, the prefix tree of keep/drop decisions, the paper's three-stage pipeline
and a keep-mask with one bit flipped. They are drawn by code so that a change of wording or
colour is a one-line edit, and committed so that the book builds without running this script::

    .venv/bin/python scripts/draw_diagrams.py            # (re)draw into book/figures/
    .venv/bin/python scripts/draw_diagrams.py --check    # exit 1 if a committed SVG differs
    DIAGRAM_PREVIEW=1 .venv/bin/python scripts/draw_diagrams.py   # also PNGs in /tmp/diagram_previews/

Output is byte-identical from run to run (fixed hash salt, text kept as text, no date), so
``--check`` can compare bytes; a different matplotlib version may still write different bytes,
which ``--check`` names. Every figure is checked for overlapping text and too-small fonts
before it is saved. Layers and players are numbered from 0 and masks are written layer 0
first, as in the chapters.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402
from matplotlib.text import Text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "book" / "figures"
PREVIEW_DIR = Path("/tmp/diagram_previews")

# Okabe-Ito: distinguishable under the common colour-vision deficiencies.
BLUE, ORANGE, VERMILLION, SKY, GREEN = "#0072B2", "#E69F00", "#D55E00", "#56B4E9", "#009E73"
GREY, LIGHT, PALE_SKY, INK = "#7F7F7F", "#E4E4E4", "#E3F1FA", "#1A1A1A"

FS = 10.5      # body text (pt); the figures are about 7.2 in wide, i.e. ~700 px at book width
MIN_FS = 10.0  # nothing smaller is allowed
MONO = "monospace"

STYLE = {
    "svg.hashsalt": "minilib-diagrams",
    "svg.fonttype": "none",
    # Layout is measured with the DejaVu fonts matplotlib ships; the SVG names close fallbacks
    # (Verdana is DejaVu's metric cousin) and then the generic family, never the browser's serif.
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Verdana", "Arial", "Helvetica"],
    "font.monospace": ["DejaVu Sans Mono", "Menlo", "Consolas"],
    "font.size": FS,
    "mathtext.fontset": "dejavusans",
    "hatch.linewidth": 0.8,
}
CREATOR = f"scripts/draw_diagrams.py with matplotlib {matplotlib.__version__}"


# --------------------------------------------------------------------------- drawing helpers
def canvas(width: float, height: float) -> tuple[Figure, Axes]:
    """A figure whose data coordinates are inches, so sizes and gaps read directly."""
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_axis_off()
    return fig, ax


def box(ax: Axes, x: float, y: float, w: float, h: float, text: str = "", *, fc: str = "white",
        ec: str = INK, lw: float = 1.2, ls: str = "-", hatch: str | None = None, color: str = INK,
        fs: float = FS, family: str | None = None, weight: str = "normal", pad: float = 0.04) -> None:
    """A rounded box with (optional) centred text; (x, y) is the lower-left corner."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=f"round,pad=0,rounding_size={pad}", fc=fc, ec=ec,
                                lw=lw, ls=ls, hatch=hatch))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fs, color=color,
                family=family, weight=weight, linespacing=1.25)


def arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float], *, color: str = INK,
          lw: float = 1.3, ls: str = "-", head: float = 9.0, style: str = "-|>", shrink: float = 0.0) -> None:
    """A straight arrow from ``start`` to ``end`` (``style='-'`` for a plain line)."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=head, color=color, lw=lw,
                                 ls=ls, shrinkA=shrink, shrinkB=shrink, joinstyle="miter"))


def cells(ax: Axes, x: float, y: float, bits: str, size: float, *, fs: float = FS,
          highlight: int | None = None, text: bool = True) -> None:
    """A keep-mask as a row of square cells (1 = kept: blue, 0 = removed: grey); ``y`` is the row centre."""
    for j, bit in enumerate(bits):
        kept = bit == "1"
        fc = (ORANGE if kept else "white") if j == highlight else (BLUE if kept else LIGHT)
        ec = VERMILLION if j == highlight else "white"
        lw = 2.2 if j == highlight else 1.0
        ax.add_patch(Rectangle((x + j * size, y - size / 2), size, size, fc=fc, ec=ec, lw=lw,
                               zorder=3 if j == highlight else 2))
        if text:
            ax.text(x + (j + 0.5) * size, y, bit, ha="center", va="center", fontsize=fs, family=MONO,
                    color="white" if kept and j != highlight else INK, zorder=4)


# --------------------------------------------------------------------------- the diagrams
def residual_stream() -> Figure:
    """The residual stream: kept layers add x + f(x); a skipped layer (keep bit 0) is the identity."""
    fig, ax = canvas(7.2, 3.55)
    ys, block_y, block_h, block_w = 1.72, 2.37, 0.62, 0.86
    box(ax, 0.06, ys - 0.34, 0.92, 0.68, "token\nembedding", fc=PALE_SKY, ec=BLUE)
    box(ax, 6.22, ys - 0.34, 0.92, 0.68, "final norm\n+ LM head", fc=PALE_SKY, ec=BLUE)
    arrow(ax, (0.98, ys), (6.22, ys), color=BLUE, lw=4.5, head=16)
    ax.text(1.08, ys - 0.13, "residual stream x", ha="left", va="top", fontsize=FS, color=BLUE, style="italic")

    layers = [(1.62, "layer 0", "1"), (2.72, "layer 1", "1"), (3.82, "layer 2", "0"), (4.83, "⋯", "⋯"),
              (5.62, "layer L−1", "1")]
    for cx, name, bit in layers:
        rx, wx = cx - 0.24, cx + 0.24
        if bit == "⋯":
            ax.text(cx, block_y + block_h / 2, "⋯", ha="center", va="center", fontsize=14, color=INK)
            ax.text(cx, ys + 0.17, "⋯", ha="center", va="bottom", fontsize=12, color=BLUE)
            continue
        if bit == "1":
            box(ax, cx - block_w / 2, block_y, block_w, block_h, name, fc="white", ec=INK)
            arrow(ax, (rx, ys + 0.06), (rx, block_y), color=INK)
            arrow(ax, (wx, block_y), (wx, ys + 0.11), color=INK)
            ax.add_patch(Circle((wx, ys), 0.11, fc="white", ec=INK, lw=1.3, zorder=5))
            ax.text(wx, ys, "+", ha="center", va="center", fontsize=12, weight="bold", zorder=6)
        else:
            box(ax, cx - block_w / 2, block_y, block_w, block_h, fc=LIGHT, ec=GREY, ls="--", hatch="////")
            ax.plot([cx - block_w / 2 + 0.06, cx + block_w / 2 - 0.06], [block_y + 0.06, block_y + block_h - 0.06],
                    color=VERMILLION, lw=2)
            ax.plot([cx - block_w / 2 + 0.06, cx + block_w / 2 - 0.06], [block_y + block_h - 0.06, block_y + 0.06],
                    color=VERMILLION, lw=2)
            ax.text(cx, block_y + block_h + 0.05, f"{name} skipped", ha="center", va="bottom", fontsize=FS,
                    color=VERMILLION, weight="bold")
            arrow(ax, (rx, ys + 0.06), (rx, block_y), color=GREY, ls=(0, (3, 2)), style="-")
            arrow(ax, (wx, block_y), (wx, ys + 0.06), color=GREY, ls=(0, (3, 2)), style="-")
    ax.text(0.06, 3.36, "Each kept layer ℓ reads the stream and adds its update:", ha="left", va="center",
            fontsize=FS)
    ax.text(4.3, 3.36, r"$x \leftarrow x + f_\ell(x)$", ha="left", va="center", fontsize=FS + 0.5)
    ax.text(3.82, ys - 0.2, "update not added: the stream passes\nthrough unchanged (identity, x → x)",
            ha="center", va="top", fontsize=FS, color=VERMILLION, linespacing=1.3)

    ax.text(0.98, 0.62, "keep-mask", ha="right", va="center", fontsize=FS, weight="bold")
    size = 0.36
    for cx, _, bit in layers:
        if bit == "⋯":
            ax.text(cx, 0.62, "⋯", ha="center", va="center", fontsize=12)
            continue
        cells(ax, cx - size / 2, 0.62, bit, size)
    ax.text(3.6, 0.2, "bit 1 = layer runs    ·    bit 0 = layer removed = identity on the stream",
            ha="center", va="center", fontsize=FS)
    return fig


def _lattice_rows(n: int) -> list[list[str]]:
    """The 2^n masks of n players by Hamming weight; each row sorted so the picture is symmetric."""
    masks = [format(b, f"0{n}b") for b in range(2 ** n)]
    return [sorted((m for m in masks if m.count("1") == k), reverse=True) for k in range(n + 1)]


def coalition_lattice() -> Figure:
    """Hasse diagram of the 16 coalitions of 4 players, one marginal contribution of player 2 marked."""
    n, player, s_mask = 4, 2, "1001"
    t_mask = s_mask[:player] + "1" + s_mask[player + 1:]
    fig, ax = canvas(7.2, 4.85)
    rows, dx, cx, w, h = _lattice_rows(n), 0.86, 3.35, 0.62, 0.34
    pos = {m: (cx + (j - (len(row) - 1) / 2) * dx, 0.55 + k * 0.93) for k, row in enumerate(rows)
           for j, m in enumerate(row)}
    for m, (x, y) in pos.items():
        for i in range(n):
            if m[i] == "0":
                up = m[:i] + "1" + m[i + 1:]
                (x2, y2) = pos[up]
                if m == s_mask and i == player:
                    color, lw, ls, z = VERMILLION, 3.2, "-", 3
                elif i == player:
                    color, lw, ls, z = ORANGE, 1.8, (0, (4, 2)), 2
                else:
                    color, lw, ls, z = "#BBBBBB", 0.9, "-", 1
                ax.plot([x, x2], [y + h / 2, y2 - h / 2], color=color, lw=lw, ls=ls, zorder=z,
                        solid_capstyle="butt")
    for m, (x, y) in pos.items():
        marked = m in (s_mask, t_mask)
        box(ax, x - w / 2, y - h / 2, w, h, m, fc="#FBE3D0" if marked else "white",
            ec=VERMILLION if marked else INK, lw=2 if marked else 1.1, family=MONO, fs=11, pad=0.05)
        ax.patches[-1].set_zorder(4)
        ax.texts[-1].set_zorder(5)
    for k in range(n + 1):
        ax.text(0.08, 0.55 + k * 0.93, f"size {k}", ha="left", va="center", fontsize=FS, color=GREY)

    ax.text(0.08, 4.68, "digit j = 1: player (layer) j is in S;  players 0 1 2 3, left to right",
            ha="left", va="center", fontsize=FS)
    sx, sy = pos[s_mask]
    tx, ty = pos[t_mask]
    mx, my = (sx + tx) / 2, (sy + h / 2 + ty - h / 2) / 2
    ax.annotate("", xy=(mx + 0.03, my), xytext=(5.19, 3.0),
                arrowprops={"arrowstyle": "-|>", "color": VERMILLION, "lw": 1.3, "mutation_scale": 10,
                            "shrinkA": 2, "shrinkB": 2})
    ax.text(5.23, 3.4, "marginal contribution", ha="left", va="center", fontsize=FS, color=VERMILLION,
            weight="bold")
    ax.text(5.23, 3.14, "v(S ∪ {i}) − v(S)", ha="left", va="center", fontsize=FS, color=VERMILLION)
    ax.text(5.23, 2.88, f"S = {s_mask}, i = {player}", ha="left", va="center", fontsize=FS, family=MONO,
            color=VERMILLION)
    ax.plot([5.62, 5.98], [1.5, 1.5], color=ORANGE, lw=1.8, ls=(0, (4, 2)))
    ax.text(6.04, 1.5, "adds player 2", ha="left", va="center", fontsize=FS)
    ax.text(5.62, 1.2, "φ₂ is a weighted", ha="left", va="center", fontsize=FS)
    ax.text(5.62, 0.95, "average over all 8", ha="left", va="center", fontsize=FS)
    ax.text(5.62, 0.7, "such edges", ha="left", va="center", fontsize=FS)
    return fig


def prefix_tree() -> Figure:
    """The trie of keep/drop decisions over 3 layers: masks sharing a prefix share its computation."""
    fig, ax = canvas(7.2, 5.0)
    n, x0, dx = 3, 1.55, 0.76
    level_y = [4.3, 3.35, 2.4, 1.45]
    leaves = [format(b, f"0{n}b") for b in range(2 ** n)]
    xs = {m: x0 + j * dx for j, m in enumerate(leaves)}
    for depth in range(n - 1, -1, -1):
        for b in range(2 ** depth):
            p = format(b, f"0{depth}b") if depth else ""
            xs[p] = (xs[p + "0"] + xs[p + "1"]) / 2
    # the shared subtree of prefix "1"
    sub = [m for m in xs if m.startswith("1")]
    left = min(xs[m] for m in sub) - 0.42
    ax.add_patch(FancyBboxPatch((left, 0.42), 7.12 - left, level_y[1] + 0.3 - 0.42,
                                boxstyle="round,pad=0,rounding_size=0.08", fc=PALE_SKY, ec=SKY, lw=1.2, zorder=0))
    ax.text(left + 0.12, 0.8, "shared prefix 1: layer 0 runs", ha="left", va="center", fontsize=FS, color=BLUE,
            weight="bold")
    ax.text(left + 0.12, 0.56, "once for these 4 masks", ha="left", va="center", fontsize=FS, color=BLUE,
            weight="bold")

    for p, x in xs.items():
        if len(p) == n:
            continue
        y, y2 = level_y[len(p)], level_y[len(p) + 1]
        for bit in "01":
            c = p + bit
            keep = bit == "1"
            arrow(ax, (x, y - 0.2), (xs[c], y2 + 0.2), color=BLUE if keep else GREY, lw=2 if keep else 1.3,
                  ls="-" if keep else (0, (4, 2.5)))
            lx, ly = (x + xs[c]) / 2, (y + y2) / 2
            label = ("keep (1): run layer 0" if keep else "drop (0)") if not p else bit
            ax.text(lx + (0.1 if keep else -0.1), ly + 0.04, label, ha="left" if keep else "right", va="center",
                    fontsize=FS, color=BLUE if keep else GREY, weight="bold" if keep else "normal")
    box(ax, xs[""] - 0.55, level_y[0] - 0.2, 1.1, 0.4, "embedding", fc="white", ec=INK)
    for p, x in xs.items():
        if not p:
            continue
        y = level_y[len(p)]
        leaf = len(p) == n
        box(ax, x - 0.28, y - 0.2, 0.56, 0.4, p, fc="#FBE3D0" if leaf else "white",
            ec=ORANGE if leaf else INK, family=MONO, fs=11, lw=1.6 if leaf else 1.1)
        if leaf:
            ax.text(x, y - 0.3, f"v({p})", ha="center", va="top", fontsize=FS, family=MONO)
    for depth in range(n):
        ax.text(0.06, (level_y[depth] + level_y[depth + 1]) / 2, f"layer {depth}", ha="left", va="center",
                fontsize=FS, weight="bold")
    ax.text(0.06, level_y[n], "masks", ha="left", va="center", fontsize=FS, weight="bold")
    ax.text(0.06, level_y[n] - 0.38, "→ head", ha="left", va="center", fontsize=FS)
    ax.text(0.06, 4.82, "a node caches the hidden state after its prefix; drop reuses the parent's state",
            ha="left", va="center", fontsize=FS)
    ax.text(0.06, 0.16, "layer forwards: 1 + 2 + 4 = 7 = 2³ − 1 with prefix sharing, 12 if each mask ran alone",
            ha="left", va="center", fontsize=FS)
    return fig


def three_stage_pipeline() -> Figure:
    """The paper's pipeline: sample and evaluate masks, fit a surrogate, rank layers by its Shapley values."""
    fig, ax = canvas(7.2, 4.1)
    bw, gap, top, bottom = 2.14, 0.33, 3.98, 0.08
    xs = [0.06, 0.06 + bw + gap, 0.06 + 2 * (bw + gap)]
    heads = [("Stage 1", "sample & evaluate"), ("Stage 2", "fit a surrogate"), ("Stage 3", "Shapley & prune")]
    texts = [
        "Sample keep-masks\nstratified by Hamming\nweight; evaluate each\nmasked model on\ncalibration text",
        "Fit a small surrogate\nnetwork on the stage-1\npairs: mask → quality",
        "Estimate each layer's\nShapley value from the\nsurrogate; remove the\nlayers with the lowest\nvalues",
    ]
    notes = ["the expensive step", "cheap: no forwards\nof the LLM", "cheap: thousands\nof queries"]
    for x, (h1, h2), body, note in zip(xs, heads, texts, notes):
        box(ax, x, bottom, bw, top - bottom, fc="white", ec=INK, lw=1.3, pad=0.08)
        ax.text(x + 0.12, top - 0.2, h1, ha="left", va="center", fontsize=FS + 0.5, weight="bold")
        ax.text(x + 0.12, top - 0.45, h2, ha="left", va="center", fontsize=FS)
        ax.text(x + 0.12, 1.74, body, ha="left", va="top", fontsize=FS, linespacing=1.3)
        ax.text(x + 0.12, 0.22, note, ha="left", va="bottom", fontsize=FS,
                color=VERMILLION if note.startswith("the exp") else GREEN, weight="bold", linespacing=1.2)
    for x in xs[:2]:
        arrow(ax, (x + bw + 0.03, 2.6), (x + bw + gap - 0.03, 2.6), lw=2.2, head=14)

    # stage 1: masks with their Hamming weight and measured quality
    x = xs[0]
    rows = [("k=7", "11110111", "0.96"), ("k=6", "10111011", "0.91"), ("k=6", "11011110", "0.88"),
            ("k=5", "11010101", "0.79")]
    ax.text(x + 1.9, 3.22, "v", ha="center", va="center", fontsize=FS, style="italic")
    for r, (k, bits, v) in enumerate(rows):
        y = 2.98 - r * 0.27
        ax.text(x + 0.12, y, k, ha="left", va="center", fontsize=FS, color=GREY)
        cells(ax, x + 0.52, y, bits, 0.14, text=False)
        ax.text(x + 1.9, y, v, ha="center", va="center", fontsize=FS)

    # stage 2: a tiny MLP, mask in, quality out
    x = xs[1]
    layers = [(x + 0.4, 5), (x + 1.1, 4), (x + 1.8, 1)]
    nodes = [[(lx, 2.62 + (j - (m - 1) / 2) * 0.25) for j in range(m)] for lx, m in layers]
    for a, b in zip(nodes, nodes[1:]):
        for p in a:
            for q in b:
                ax.plot([p[0], q[0]], [p[1], q[1]], color="#AAAAAA", lw=0.7, zorder=1)
    for li, col in enumerate(nodes):
        for j, (px, py) in enumerate(col):
            fc = (BLUE if j != 2 else LIGHT) if li == 0 else (ORANGE if li == 2 else "white")
            ax.add_patch(Circle((px, py), 0.075, fc=fc, ec=INK, lw=1, zorder=3))
    ax.text(x + 0.4, 1.9, "mask", ha="center", va="center", fontsize=FS)
    ax.text(x + 1.8, 2.35, "v̂", ha="center", va="center", fontsize=FS + 1, style="italic")

    # stage 3: Shapley values per layer, lowest marked for removal
    x = xs[2]
    phi = [0.95, 0.42, 0.3, 0.08, 0.16, 0.05, 0.24, 0.34]
    drop = sorted(range(len(phi)), key=phi.__getitem__)[:2]
    base, scale, bwid = 2.15, 0.82, 0.17
    for j, p in enumerate(phi):
        bx = x + 0.22 + j * 0.22
        low = j in drop
        ax.add_patch(Rectangle((bx, base), bwid, p * scale, fc=VERMILLION if low else BLUE,
                               ec=VERMILLION if low else BLUE, hatch="xxx" if low else None, lw=0.8))
        if low:
            ax.text(bx + bwid / 2, base + p * scale + 0.04, "×", ha="center", va="bottom", fontsize=12,
                    color=VERMILLION, weight="bold")
    ax.plot([x + 0.16, x + 0.22 + len(phi) * 0.22], [base, base], color=INK, lw=1)
    ax.text(x + 0.12, 3.17, "φ per layer", ha="left", va="center", fontsize=FS)
    ax.text(x + 0.12, 1.95, "× lowest φ: remove", ha="left", va="center", fontsize=FS, color=VERMILLION,
            weight="bold")
    return fig


def keep_mask_flip() -> Figure:
    """A 12-layer keep-mask S and S ∪ {i}: the difference of their values is i's marginal contribution."""
    fig, ax = canvas(7.2, 2.9)
    s, i, size, x0 = "110111101011", 7, 0.34, 1.05
    t = s[:i] + "1" + s[i + 1:]
    v_s, v_t = 0.712, 0.845
    y_idx, y_s, y_t = 2.64, 2.16, 1.2
    ax.text(x0 - 0.12, y_idx, "layer", ha="right", va="center", fontsize=FS, color=GREY)
    for j in range(len(s)):
        ax.text(x0 + (j + 0.5) * size, y_idx, str(j), ha="center", va="center", fontsize=FS,
                color=VERMILLION if j == i else GREY, weight="bold" if j == i else "normal")
    ax.text(x0 - 0.12, y_s, "S", ha="right", va="center", fontsize=FS + 1, style="italic")
    ax.text(x0 - 0.12, y_t, "S ∪ {i}", ha="right", va="center", fontsize=FS + 1, style="italic")
    cells(ax, x0, y_s, s, size, fs=11, highlight=i)
    cells(ax, x0, y_t, t, size, fs=11, highlight=i)
    xi = x0 + (i + 0.5) * size
    arrow(ax, (xi, y_s - size / 2 - 0.04), (xi, y_t + size / 2 + 0.04), color=VERMILLION, lw=2, head=14)
    ax.text(xi + 0.12, (y_s + y_t) / 2, f"flip bit i = {i}: add layer {i}", ha="left", va="center",
            fontsize=FS, color=VERMILLION)
    xr = x0 + len(s) * size + 0.18
    ax.text(xr, y_s, f"v(S) = {v_s:.3f}", ha="left", va="center", fontsize=FS)
    ax.text(xr, y_t, f"v(S ∪ {{i}}) = {v_t:.3f}", ha="left", va="center", fontsize=FS)
    xb = 7.1
    ax.plot([xb - 0.1, xb, xb, xb - 0.1], [y_s, y_s, y_t, y_t], color=VERMILLION, lw=1.5)
    ax.text(xb - 0.1, (y_s + y_t) / 2, f"+{v_t - v_s:.3f}", ha="right", va="center", fontsize=FS,
            color=VERMILLION, weight="bold")
    ax.text(0.06, 0.58, f"v(S ∪ {{i}}) − v(S) = {v_t:.3f} − {v_s:.3f} = {v_t - v_s:.3f}: "
            f"layer {i}'s marginal contribution to S", ha="left", va="center", fontsize=FS, color=VERMILLION,
            weight="bold")
    ax.text(0.06, 0.22, "v = model quality with only the kept layers (here: illustrative numbers)",
            ha="left", va="center", fontsize=FS, color=GREY)
    return fig


DIAGRAMS: dict[str, Callable[[], Figure]] = {
    "residual_stream": residual_stream,
    "coalition_lattice": coalition_lattice,
    "prefix_tree": prefix_tree,
    "three_stage_pipeline": three_stage_pipeline,
    "keep_mask_flip": keep_mask_flip,
}


# --------------------------------------------------------------------------- checks and output
def layout_problems(fig: Figure) -> list[str]:
    """Text that overlaps other text or is smaller than MIN_FS; text or shapes that run off the canvas."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    page = fig.bbox
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    boxes = [(t, t.get_window_extent(renderer)) for t in texts]
    problems = [f"font {t.get_fontsize():.1f} pt < {MIN_FS}: {t.get_text()!r}" for t in texts
                if t.get_fontsize() < MIN_FS]
    problems += [f"off the canvas: {t.get_text()!r}" for t, b in boxes
                 if b.x0 < page.x0 - 0.5 or b.x1 > page.x1 + 0.5 or b.y0 < page.y0 - 0.5 or b.y1 > page.y1 + 0.5]
    for ax in fig.axes:
        problems += [f"shape off the canvas: {p}" for p in ax.patches
                     if not page.expanded(1.001, 1.001).contains(*p.get_window_extent(renderer).min)
                     or not page.expanded(1.001, 1.001).contains(*p.get_window_extent(renderer).max)]
    for k, (t1, b1) in enumerate(boxes):
        for t2, b2 in boxes[k + 1:]:
            if b1.shrunk(0.98, 0.9).overlaps(b2.shrunk(0.98, 0.9)):
                problems.append(f"overlap: {t1.get_text()!r} and {t2.get_text()!r}")
    return problems


def render(name: str, out_dir: Path, preview: bool = False) -> Path:
    """Draw one diagram, check its layout, save it as ``out_dir/name.svg`` (and a PNG preview)."""
    with plt.rc_context(STYLE):
        fig = DIAGRAMS[name]()
        if preview:  # before the checks, so a failing layout can be looked at
            PREVIEW_DIR.mkdir(parents=True, exist_ok=True)
            fig.savefig(PREVIEW_DIR / f"{name}.png", dpi=150)
        problems = layout_problems(fig)
        if problems:
            plt.close(fig)
            raise SystemExit(f"{name}: " + "; ".join(problems))
        path = out_dir / f"{name}.svg"
        fig.savefig(path, format="svg", metadata={"Date": None, "Creator": CREATOR})
        plt.close(fig)
    return path


def iter_differences(committed: Path, fresh: Path) -> Iterator[str]:
    """One line per diagram whose committed SVG is missing or differs from a fresh drawing."""
    for name in DIAGRAMS:
        old, new = committed / f"{name}.svg", fresh / f"{name}.svg"
        if not old.exists():
            yield f"{old}: missing"
        elif old.read_bytes() != new.read_bytes():
            diff = difflib.unified_diff(old.read_text().splitlines(), new.read_text().splitlines(), lineterm="", n=0)
            lines = [d for d in diff if d[:1] in "+-" and d[:3] not in ("+++", "---")]
            yield f"{old}: differs ({len(lines)} changed lines, first: {lines[0][:200] if lines else '?'})"


def main(argv: list[str] | None = None) -> int:
    """Draw every diagram into ``--out``, or with ``--check`` compare a fresh drawing with it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the SVGs (default: book/figures)")
    parser.add_argument("--check", action="store_true",
                        help="draw into a temporary folder and exit 1 if any SVG in --out differs")
    args = parser.parse_args(argv)
    preview = os.environ.get("DIAGRAM_PREVIEW") == "1"
    if not args.check:
        args.out.mkdir(parents=True, exist_ok=True)
        for name in DIAGRAMS:
            path = render(name, args.out, preview)
            print(f"{path} ({path.stat().st_size / 1024:.1f} KB)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in DIAGRAMS:
            render(name, Path(tmp), preview)
        differences = list(iter_differences(args.out, Path(tmp)))
    for line in differences:
        print(line)
    if differences:
        print(f"re-draw with: python scripts/draw_diagrams.py (this is {CREATOR}; the committed files name "
              "the matplotlib that drew them in their metadata)")
        return 1
    print(f"{len(DIAGRAMS)} diagrams up to date in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
