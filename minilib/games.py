"""Cooperative games: the contract every game in the book follows.

Introduced in chapter 00 (a model with a calibration set is a game) and developed in
chapter 01. A game has ``n_players`` and maps a batch of coalitions, a bool array of shape
``(m, n_players)`` where ``True`` means "in the coalition", to ``m`` float values.
"""

from __future__ import annotations

import numpy as np


def as_coalitions(coalitions, n_players: int, name: str = "coalitions") -> np.ndarray:
    """Validate a batch of coalitions and return it as a 2-D bool array (chapter 01).

    A single coalition (1-D) becomes a batch of one. Numbers are accepted only when they
    are exactly 0 or 1; anything else raises, naming ``name``.
    """
    arr = np.asarray(coalitions)
    if arr.dtype != bool:
        if arr.dtype.kind not in "iuf":
            raise TypeError(f"{name} must be a bool array (or 0/1 numbers), got dtype {arr.dtype}")
        ok = np.isin(arr, (0, 1))
        if not ok.all():
            raise ValueError(f"{name} must hold only 0/1 (or booleans), found {arr[~ok].ravel()[:5].tolist()}")
        arr = arr.astype(bool)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (m, {n_players}), got {arr.shape}")
    if arr.shape[1] != n_players:
        raise ValueError(f"{name} must have {n_players} columns (one per player), got {arr.shape[1]}")
    return arr


class Game:
    """Base class of batched cooperative games (chapter 01).

    Subclasses set ``n_players`` and implement :meth:`value`, which receives validated
    coalitions as a bool array ``(m, n_players)`` and returns ``m`` floats. Calling the game
    validates its input first, so every game rejects malformed coalitions the same way.
    """

    n_players: int

    def value(self, coalitions: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, coalitions) -> np.ndarray:
        masks = as_coalitions(coalitions, self.n_players)
        return np.asarray(self.value(masks), dtype=float).reshape(len(masks))

    def empty_value(self) -> float:
        """v(∅), the value of the empty coalition."""
        return float(self(np.zeros((1, self.n_players), dtype=bool))[0])

    def grand_value(self) -> float:
        """v(N), the value of the grand coalition."""
        return float(self(np.ones((1, self.n_players), dtype=bool))[0])


def all_coalitions(n_players: int) -> np.ndarray:
    """Every coalition of ``n_players`` as a bool array ``(2**n, n)``; row ``k`` is bitmask ``k`` (chapter 01).

    Bit ``i`` of the row index is player ``i``, the convention of :class:`TabularGame`.
    """
    index = np.arange(2 ** n_players, dtype=np.int64)
    return ((index[:, None] >> np.arange(n_players)) & 1).astype(bool)


def coalition_index(coalitions: np.ndarray) -> np.ndarray:
    """Bitmask index of each coalition (bit ``i`` = player ``i``), the inverse of :func:`all_coalitions` (chapter 01)."""
    weights = np.left_shift(np.int64(1), np.arange(coalitions.shape[1], dtype=np.int64))
    return coalitions.astype(np.int64) @ weights


class TabularGame(Game):
    """A game given by its full value table, ``values[k]`` = v(coalition with bitmask ``k``) (chapter 01).

    The ground-truth format of the book: an exact table computed once (by enumeration or by
    :func:`minilib.evaluation.exact_values`) answers any coalition instantly. ``metadata`` is a
    JSON-serialisable dict saved alongside the values (e.g. model hash, calibration spec).
    """

    def __init__(self, values, metadata: dict | None = None):
        table = np.asarray(values, dtype=float)
        if table.ndim != 1 or table.size < 2 or table.size & (table.size - 1):
            raise ValueError(f"values must be a 1-D table of length 2**n (n >= 1), got shape {table.shape}")
        if not np.isfinite(table).all():
            bad = np.flatnonzero(~np.isfinite(table))[:5].tolist()
            raise ValueError(f"values must be finite; non-finite entries at bitmasks {bad}")
        self.values = table
        self.n_players = int(table.size).bit_length() - 1
        self.metadata = dict(metadata or {})

    def value(self, coalitions: np.ndarray) -> np.ndarray:
        return self.values[coalition_index(coalitions)]

    def save(self, path) -> None:
        """Save values and metadata to a compressed ``.npz`` file at exactly ``path``.

        The file is written where asked even without an ``.npz`` suffix (NumPy would append
        one), so ``TabularGame.load(path)`` always reads back what ``save(path)`` wrote.
        Metadata goes through JSON: tuples come back as lists, non-string keys as strings.
        """
        import json

        with open(path, "wb") as f:
            np.savez_compressed(f, values=self.values, metadata=np.array(json.dumps(self.metadata)))

    @classmethod
    def load(cls, path) -> "TabularGame":
        """Load a game written by :meth:`save`."""
        import json

        with np.load(path, allow_pickle=False) as data:
            return cls(data["values"], json.loads(str(data["metadata"])))

    def __repr__(self) -> str:
        return f"TabularGame(n_players={self.n_players})"


class CountingGame(Game):
    """Wrap a game to count evaluations and cache values by coalition (chapter 01).

    ``n_queries`` counts coalitions asked for; ``n_evals`` counts distinct coalitions that
    reached the wrapped game, i.e. the cost an estimator really paid. Set ``cache=False`` to
    pass every query through (then both counters agree).
    """

    def __init__(self, game, cache: bool = True):
        self.game = game
        self.n_players = game.n_players
        self.cache = cache
        self.n_evals = 0
        self.n_queries = 0
        self._values: dict[bytes, float] = {}

    def value(self, coalitions: np.ndarray) -> np.ndarray:
        self.n_queries += len(coalitions)
        if not self.cache:
            self.n_evals += len(coalitions)
            return np.asarray(self.game(coalitions), dtype=float)
        keys = [np.packbits(c).tobytes() for c in coalitions]
        todo: dict[bytes, int] = {}
        for row, key in enumerate(keys):
            if key not in self._values and key not in todo:
                todo[key] = row
        if todo:
            fresh = np.asarray(self.game(coalitions[list(todo.values())]), dtype=float)
            self._values.update(zip(todo, fresh.tolist()))
            self.n_evals += len(todo)
        return np.array([self._values[k] for k in keys])

    def reset(self) -> None:
        """Forget cached values and zero the counters."""
        self._values.clear()
        self.n_evals = self.n_queries = 0


def _shapley_weights(n: int) -> np.ndarray:
    """w[s] = s! (n-s-1)! / n!, the Shapley weight of a coalition of size s not holding the player."""
    from math import comb

    return np.array([1.0 / (n * comb(n - 1, s)) for s in range(n)])


class PairwiseGame(Game):
    """v(S) = Σ_{i∈S} main[i] + Σ_{i<j, i,j∈S} pairwise[i, j]: a game with known interactions (chapter 01).

    Closed forms: Shapley φ_i = main[i] + ½ Σ_j pairwise[i, j]; the pairwise Shapley
    interaction index of (i, j) is exactly pairwise[i, j]. With ``pairwise = 0`` it is the
    additive game, where every estimator in the book must be exact.

    ``pairwise`` is an ``(n, n)`` matrix with a zero diagonal that gives each pair's
    interaction once: either symmetric (the upper triangle is used) or triangular (upper or
    lower). Any other matrix is ambiguous and raises. The stored ``pairwise`` attribute is
    always the strictly upper-triangular form.
    """

    def __init__(self, main, pairwise=None):
        self.main = np.asarray(main, dtype=float)
        if self.main.ndim != 1:
            raise ValueError(f"main must be 1-D, got shape {self.main.shape}")
        n = self.n_players = len(self.main)
        p = np.zeros((n, n)) if pairwise is None else np.asarray(pairwise, dtype=float)
        if p.shape != (n, n):
            raise ValueError(f"pairwise must have shape ({n}, {n}), got {p.shape}")
        if np.any(np.diag(p) != 0):
            raise ValueError("pairwise must have a zero diagonal (a player's own effect belongs in main)")
        upper, lower = np.triu(p, k=1), np.tril(p, k=-1).T
        if np.allclose(upper, lower):        # symmetric: each pair appears twice, count it once
            self.pairwise = upper
        elif not upper.any() or not lower.any():  # triangular: each pair appears once
            self.pairwise = upper + lower
        else:
            raise ValueError("pairwise must be symmetric or triangular; a matrix with different "
                             "p[i, j] and p[j, i] does not say which is the pair's interaction")

    def value(self, coalitions: np.ndarray) -> np.ndarray:
        x = coalitions.astype(float)
        return x @ self.main + np.einsum("mi,ij,mj->m", x, self.pairwise, x)

    def shapley_values(self) -> np.ndarray:
        sym = self.pairwise + self.pairwise.T
        return self.main + sym.sum(axis=1) / 2

    def interaction_values(self) -> np.ndarray:
        """The pairwise Shapley interaction index (symmetric, zero diagonal)."""
        return self.pairwise + self.pairwise.T


class UnanimityGame(Game):
    """v(S) = 1 if ``coalition`` ⊆ S else 0: the building block of every game (chapter 01).

    Closed form: φ_i = 1/|T| for i in T, 0 otherwise.
    """

    def __init__(self, n: int, coalition):
        self.n_players = int(n)
        self.coalition = sorted({int(i) for i in coalition})
        if not self.coalition or not all(0 <= i < n for i in self.coalition):
            raise ValueError(f"coalition must be a non-empty set of players in 0..{n - 1}, got {coalition}")

    def value(self, coalitions: np.ndarray) -> np.ndarray:
        return coalitions[:, self.coalition].all(axis=1).astype(float)

    def shapley_values(self) -> np.ndarray:
        phi = np.zeros(self.n_players)
        phi[self.coalition] = 1.0 / len(self.coalition)
        return phi


class GloveGame(Game):
    """Gloves: v(S) = number of matched pairs, min(|S ∩ left|, |S ∩ right|) (chapter 01).

    Closed form by counting (polynomial, no enumeration): a left player's marginal is 1 exactly
    when S holds more right than left gloves, so φ sums Shapley weights over the counts
    (a, b) of other left and right players. One left glove and r right gloves give the
    classic r/(r+1) to the left player and 1/(r(r+1)) to each right player.
    """

    def __init__(self, left, right):
        self.left, self.right = sorted({int(i) for i in left}), sorted({int(i) for i in right})
        if set(self.left) & set(self.right):
            raise ValueError("left and right must be disjoint sets of players")
        players = self.left + self.right
        if sorted(players) != list(range(len(players))):
            raise ValueError(f"left and right together must be the players 0..n-1, got {sorted(players)}")
        self.n_players = len(players)

    def value(self, coalitions: np.ndarray) -> np.ndarray:
        return np.minimum(coalitions[:, self.left].sum(1), coalitions[:, self.right].sum(1)).astype(float)

    def shapley_values(self) -> np.ndarray:
        from math import comb

        n, w = self.n_players, _shapley_weights(self.n_players)

        def share(same: int, other: int) -> float:  # a player whose side has `same` players
            return sum(w[a + b] * comb(same - 1, a) * comb(other, b)
                       for a in range(same) for b in range(other + 1) if b > a)

        phi = np.zeros(n)
        phi[self.left] = share(len(self.left), len(self.right))
        phi[self.right] = share(len(self.right), len(self.left))
        return phi


class AirportGame(Game):
    """The airport cost game: v(S) = max_{i∈S} costs[i], the runway S needs (chapter 01).

    Closed form (Littlechild & Owen 1973): sort costs ascending; each runway segment's cost
    is split equally among the players who need it, so the k-th smallest pays
    Σ_{j<=k} (c_(j) − c_(j−1)) / (n − j + 1).
    """

    def __init__(self, costs):
        self.costs = np.asarray(costs, dtype=float)
        if self.costs.ndim != 1 or (self.costs < 0).any():
            raise ValueError("costs must be a 1-D array of non-negative numbers")
        self.n_players = len(self.costs)

    def value(self, coalitions: np.ndarray) -> np.ndarray:
        return np.where(coalitions, self.costs, 0.0).max(axis=1)

    def shapley_values(self) -> np.ndarray:
        order = np.argsort(self.costs, kind="stable")
        c = np.concatenate([[0.0], self.costs[order]])
        n = self.n_players
        shares = np.cumsum(np.diff(c) / (n - np.arange(n)))
        phi = np.empty(n)
        phi[order] = shares
        return phi


class WeightedVotingGame(Game):
    """v(S) = 1 if Σ_{i∈S} weights[i] >= quota else 0: a committee vote (chapter 01).

    Closed form for integer weights (the Shapley–Shubik power index) by dynamic programming
    over (coalition size, total weight): φ_i sums the Shapley weights of the coalitions where
    player i is pivotal, counted without enumerating them.
    """

    def __init__(self, weights, quota: float):
        self.weights = np.asarray(weights, dtype=float)
        if self.weights.ndim != 1 or (self.weights < 0).any():
            raise ValueError("weights must be a 1-D array of non-negative numbers")
        self.quota = float(quota)
        self.n_players = len(self.weights)

    def value(self, coalitions: np.ndarray) -> np.ndarray:
        return (coalitions.astype(float) @ self.weights >= self.quota).astype(float)

    def shapley_values(self) -> np.ndarray:
        if not np.allclose(self.weights, np.round(self.weights)):
            raise ValueError("the closed form needs integer weights")
        wts = np.round(self.weights).astype(int)
        n, total, w = self.n_players, int(wts.sum()), _shapley_weights(self.n_players)
        phi = np.zeros(n)
        for i in range(n):
            # counts[s, t] = number of coalitions of the others with size s and weight t
            counts = np.zeros((n, total + 1))
            counts[0, 0] = 1
            for j in range(n):
                if j != i:
                    counts[1:, wts[j]:] = counts[1:, wts[j]:] + counts[:-1, : total + 1 - wts[j]]
            t = np.arange(total + 1)
            pivotal = (t < self.quota) & (t + wts[i] >= self.quota)
            phi[i] = (w[:, None] * counts * pivotal).sum()
        return phi


def synthetic_layer_game() -> TabularGame:
    """Chapter 04's harder 12-player game: strong interactions of every kind, as a full table (chapter 04).

    Built from the effects chapter 02 looked for, all strong: main effects ``main`` (player 0 worth 0.5,
    player 11 worth 0.2, the others 0-0.09); **substitutes**, +0.3 if any of players 1, 2 is present and
    +0.3 if any of 3, 4, 5 is; **complements**, +0.4 if both 6 and 7 are present and +0.5 if all of 8, 9,
    10 are; and a **cliff**, +2 once at least 9 of the 12 players are present. About 37 % of its variance
    over the 4,096 coalitions is not additive (the teaching model's table: about 10 %). Chapter 04 builds
    it step by step on its first page and checks it equals this function; its later pages load it here.
    """
    x = all_coalitions(12)
    main = np.array([0.5, 0.035, 0.06, 0.05, 0.03, 0.09, 0.0, 0.01, 0.0, 0.02, 0.03, 0.2])
    v = x @ main + 2.0 * (x.sum(axis=1) >= 9)
    v += 0.3 * x[:, [1, 2]].any(axis=1) + 0.3 * x[:, [3, 4, 5]].any(axis=1)
    v += 0.4 * x[:, [6, 7]].all(axis=1) + 0.5 * x[:, [8, 9, 10]].all(axis=1)
    return TabularGame(v, metadata={"name": "synthetic layer game (chapter 04)"})
