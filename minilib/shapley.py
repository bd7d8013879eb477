"""Exact Shapley values, Banzhaf values and pairwise interactions from a full value table.

Introduced in chapter 01 (cooperative games) and used as ground truth from chapter 03 on.
Every function evaluates the game once on all 2**n coalitions (or reads a
:class:`~minilib.games.TabularGame`), then works on the table with array operations: a loop
runs over players or pairs of players, never over coalitions.
"""

from __future__ import annotations

from math import comb
from typing import Callable

import numpy as np

from .games import TabularGame, all_coalitions, _shapley_weights

MAX_EXACT_PLAYERS = 24
"""Largest n for exact computation: 2**24 values (128 MiB) is the most we hold in memory."""

_CHUNK = 1 << 16


def value_table(game) -> np.ndarray:
    """v over all 2**n coalitions, indexed by bitmask (bit i = player i) (chapter 01).

    A :class:`TabularGame` returns its table; any other game is evaluated in chunks of
    65,536 coalitions, so memory stays bounded for n up to :data:`MAX_EXACT_PLAYERS`.
    """
    if isinstance(game, TabularGame):
        return game.values
    n = getattr(game, "n_players", None)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise TypeError(f"game must have a positive int n_players, got {n!r}")
    if n > MAX_EXACT_PLAYERS:
        raise ValueError(f"exact computation enumerates 2**n coalitions; n_players must be <= "
                         f"{MAX_EXACT_PLAYERS}, got {n} (use minilib.estimators instead)")
    if n <= 16:
        table = np.asarray(game(all_coalitions(n)), dtype=float)
    else:
        players = np.arange(n)
        parts = []
        for start in range(0, 2 ** n, _CHUNK):
            index = np.arange(start, min(start + _CHUNK, 2 ** n), dtype=np.int64)
            parts.append(np.asarray(game(((index[:, None] >> players) & 1).astype(bool)), dtype=float))
        table = np.concatenate(parts)
    if table.shape != (2 ** n,):
        raise ValueError(f"game returned {table.shape} values for {2 ** n} coalitions")
    return table


def _sizes(n: int) -> np.ndarray:
    """Coalition size (popcount) of every bitmask 0 .. 2**n - 1."""
    sizes = np.zeros(1, dtype=np.int64)
    for _ in range(n):
        sizes = np.concatenate([sizes, sizes + 1])
    return sizes


def _split(table: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
    """(v(S), v(S ∪ {i})) for every S not holding i, as two arrays of length 2**(n-1)."""
    view = table.reshape(-1, 2, 2 ** i)
    return view[:, 0, :].ravel(), view[:, 1, :].ravel()


def marginal_table(game, weights: Callable[[int], np.ndarray]) -> np.ndarray:
    """Σ_{S ∌ i} weights(n)[|S|] · (v(S ∪ i) − v(S)) for every player i: any semivalue (chapter 03)."""
    table = value_table(game)
    n = table.size.bit_length() - 1
    w = np.asarray(weights(n), dtype=float)
    if w.shape != (n,):
        raise ValueError(f"weights(n) must return {n} weights, one per coalition size 0..{n - 1}")
    sizes = _sizes(n)
    out = np.empty(n)
    for i in range(n):
        without, with_i = _split(table, i)
        out[i] = np.dot(w[_split(sizes, i)[0]], with_i - without)
    return out


def exact_shapley(game) -> np.ndarray:
    """Exact Shapley values φ_i = Σ_{S ∌ i} |S|!(n−|S|−1)!/n! · (v(S∪i) − v(S)) (chapter 01)."""
    return marginal_table(game, _shapley_weights)


def exact_banzhaf(game) -> np.ndarray:
    """Exact Banzhaf values: the plain mean of i's marginal over all 2**(n−1) coalitions (chapter 03)."""
    return marginal_table(game, lambda n: np.full(n, 1.0 / 2 ** (n - 1)))


def marginals_by_size(game) -> np.ndarray:
    """Mean marginal contribution of each player by coalition size, shape (n, n) (chapter 03).

    Entry ``[i, s]`` is the plain average of v(S ∪ i) − v(S) over the C(n−1, s) coalitions S of
    size s that do not hold i. The Shapley value is the unweighted mean of row i over the n sizes
    (every size counts equally); the Banzhaf value weights size s by C(n−1, s) / 2**(n−1), so the
    middle sizes dominate it.
    """
    table = value_table(game)
    n = table.size.bit_length() - 1
    sizes = _sizes(n)
    out = np.empty((n, n))
    for i in range(n):
        without, with_i = _split(table, i)
        s = _split(sizes, i)[0]
        out[i] = np.bincount(s, weights=with_i - without, minlength=n) / np.bincount(s, minlength=n)
    return out


def interaction_index(game) -> np.ndarray:
    """Pairwise Shapley interaction index (Grabisch & Roubens 1999), shape (n, n), zero diagonal (chapter 03).

    I_ij = Σ_{S ⊆ N∖{i,j}} |S|!(n−|S|−2)!/(n−1)! · [v(S∪ij) − v(S∪i) − v(S∪j) + v(S)]:
    positive when i and j are worth more together than apart (complements), negative when
    either can stand in for the other (substitutes).
    """
    table = value_table(game)
    n = table.size.bit_length() - 1
    if n < 2:
        raise ValueError("interaction_index needs at least 2 players")
    w = np.array([1.0 / ((n - 1) * comb(n - 2, s)) for s in range(n - 1)])
    sizes = _sizes(n)
    out = np.zeros((n, n))
    for i in range(n):
        v0, v1 = _split(table, i)
        s0 = _split(sizes, i)[0]
        for j in range(i + 1, n):
            # in the (n-1)-player tables without i, player j sits at bit j-1
            a0, a1 = _split(v0, j - 1)
            b0, b1 = _split(v1, j - 1)
            out[i, j] = out[j, i] = np.dot(w[_split(s0, j - 1)[0]], b1 - a1 - b0 + a0)
    return out


def shapley_by_permutations(game) -> np.ndarray:
    """Exact Shapley values by averaging marginals over all n! orderings (chapter 01).

    The textbook definition, for cross-checking :func:`exact_shapley` on small games
    (n <= 8: 40,320 orderings).
    """
    from itertools import permutations

    n = game.n_players
    if n > 8:
        raise ValueError(f"n_players must be <= 8 for the permutation definition, got {n}")
    table = value_table(game)
    phi = np.zeros(n)
    orders = list(permutations(range(n)))
    for order in orders:
        mask = 0
        for player in order:
            phi[player] += table[mask | (1 << player)] - table[mask]
            mask |= 1 << player
    return phi / len(orders)


# --- axioms ----------------------------------------------------------------------------------

def efficiency_gap(game, values) -> float:
    """Σ φ_i − (v(N) − v(∅)); zero for the Shapley value (chapter 01)."""
    table = value_table(game)
    return float(np.sum(values) - (table[-1] - table[0]))


def symmetric_pairs(game, atol: float = 1e-9) -> list[tuple[int, int]]:
    """Pairs (i, j) with v(S ∪ i) = v(S ∪ j) for every S holding neither (chapter 01)."""
    table = value_table(game)
    n = table.size.bit_length() - 1
    pairs = []
    for i in range(n):
        v0, v1 = _split(table, i)
        for j in range(i + 1, n):
            # v(S ∪ i) vs v(S ∪ j) over S without i and j
            if np.allclose(_split(v1, j - 1)[0], _split(v0, j - 1)[1], atol=atol):
                pairs.append((i, j))
    return pairs


def dummy_players(game, atol: float = 1e-9) -> dict[int, float]:
    """Players whose marginal v(S ∪ i) − v(S) is the same constant c for every S: {i: c} (chapter 01)."""
    table = value_table(game)
    n = table.size.bit_length() - 1
    found = {}
    for i in range(n):
        without, with_i = _split(table, i)
        marginal = with_i - without
        if np.allclose(marginal, marginal[0], atol=atol):
            found[i] = float(marginal[0])
    return found


def check_axioms(game, values=None, atol: float = 1e-8) -> dict[str, bool]:
    """Check efficiency, symmetry and dummy for ``values`` (default: exact Shapley) (chapter 01).

    Returns ``{"efficiency": ..., "symmetry": ..., "dummy": ...}``; a chapter can ``assert all(...)``.
    Additivity involves two games: see :func:`check_additivity`.
    """
    phi = exact_shapley(game) if values is None else np.asarray(values, dtype=float)
    return {
        "efficiency": bool(abs(efficiency_gap(game, phi)) <= atol * max(1.0, np.abs(phi).sum())),
        "symmetry": all(abs(phi[i] - phi[j]) <= atol for i, j in symmetric_pairs(game)),
        "dummy": all(abs(phi[i] - c) <= atol for i, c in dummy_players(game).items()),
    }


def check_additivity(game_a, game_b, value_fn: Callable = exact_shapley, atol: float = 1e-8) -> bool:
    """φ(v + w) = φ(v) + φ(w) for two games on the same players (chapter 01)."""
    ta, tb = value_table(game_a), value_table(game_b)
    if ta.shape != tb.shape:
        raise ValueError("game_a and game_b must have the same number of players")
    both = value_fn(TabularGame(ta + tb))
    return bool(np.allclose(both, value_fn(TabularGame(ta)) + value_fn(TabularGame(tb)), atol=atol))


def to_shap_explanation(values, game, feature_names=None):
    """Wrap contributions as a ``shap.Explanation`` so shap's bar and waterfall plots show them (chapter 03).

    The base value is v(∅) and the "prediction" v(N); for efficient values (Shapley) the
    waterfall adds up exactly. ``feature_names`` defaults to ``layer 0 … layer n−1``.
    """
    phi = np.asarray(values, dtype=float)
    n = game.n_players
    if phi.shape != (n,):
        raise ValueError(f"values must have one entry per player ({n}), got shape {phi.shape}")
    names = list(feature_names) if feature_names is not None else [f"layer {i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"feature_names must have {n} names, got {len(names)}")
    base = float(game(np.zeros((1, n), dtype=bool))[0])

    import shap  # only now: shap takes seconds to import, and bad inputs should fail fast

    return shap.Explanation(values=phi, base_values=base, data=np.ones(n), feature_names=names)
