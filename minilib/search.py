"""Searching keep-masks directly: evolution on the real game, and search through a surrogate (chapter 07).

Ranking layers (Shapley, leave-one-out) scores players and then keeps the best-scored ones;
a search instead scores whole keep-masks of a fixed size. Two searches live here:

- :func:`evolutionary_search`, in the manner of EvoPress (Sieberling et al., ICML 2025): a
  (1+λ) evolution whose mutations swap kept and dropped layers, with offspring selected in
  several steps on growing calibration samples (cheap small-sample games weed out most of
  them, only the survivors reach the full calibration set);
- :func:`surrogate_search` (this book's, not a published method): search a fitted surrogate
  (:class:`~minilib.surrogate.Surrogate`), which answers any mask in microseconds, and spend
  real evaluations only on verifying its few best candidates per size.

Both report real evaluations honestly: what reached the model, never cache hits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from math import comb
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from .estimators import _rng
from .games import CountingGame

SURROGATE_METHODS = ("auto", "enumerate", "local")
"""How :func:`surrogate_search` explores each size: every mask, or beam search plus swap hill-climbing."""

MAX_ENUMERATE = 1 << 16
"""``method="auto"`` enumerates a size when it has at most this many masks (C(L, k))."""


@dataclass
class SearchResult:
    """A chosen keep-mask, its real value and what finding it cost (chapter 07).

    ``keep``: bool mask (L,); ``value``: its value on the real game (the full calibration
    level); ``n_evals``: real evaluations charged to the search, including ``setup_evals``
    (evaluations the given games had already made, e.g. one per fresh
    :class:`~minilib.evaluation.LayerGame`: the full model at construction); ``history``: the
    best value after each generation, at ``history_evals`` real evaluations (for plotting);
    ``details``: method-specific extras (for the evolution: generations, survivors and
    ``evals_per_level``, since an evaluation on a small calibration sample costs less compute).
    """

    keep: np.ndarray
    value: float
    n_evals: int
    history: list[float]
    history_evals: list[int]
    setup_evals: int = 0
    details: dict = field(default_factory=dict)

    @property
    def kept(self) -> tuple[int, ...]:
        """Indices of the kept layers."""
        return tuple(int(i) for i in np.flatnonzero(self.keep))

    @property
    def removed(self) -> tuple[int, ...]:
        """Indices of the removed layers."""
        return tuple(int(i) for i in np.flatnonzero(~self.keep))


def _key(mask: np.ndarray) -> bytes:
    return np.packbits(mask).tobytes()


def _is_game(obj) -> bool:
    return callable(obj) and isinstance(getattr(obj, "n_players", None), (int, np.integer))


def _counted(game):
    """The game itself when it counts its real evaluations (``n_evals``), else a :class:`CountingGame` around it."""
    return game if isinstance(getattr(game, "n_evals", None), (int, np.integer)) else CountingGame(game)


class _Levels:
    """Games on growing calibration samples, each with its own cache; ``spent`` counts real evaluations."""

    def __init__(self, fitness):
        games = [fitness] if _is_game(fitness) else list(fitness) if isinstance(fitness, (list, tuple)) else []
        if not games or not all(_is_game(g) for g in games):
            raise ValueError("fitness must be a Game or a non-empty list of Games (growing calibration samples, "
                             f"full set last), got {type(fitness).__name__}")
        if len({int(g.n_players) for g in games}) != 1 or len({id(g) for g in games}) != len(games):
            raise ValueError("fitness games must be distinct objects over the same players (layers)")
        self.games = [_counted(g) for g in games]
        self.start = [int(g.n_evals) for g in self.games]
        self.setup = sum(self.start)
        self.n_players = int(games[0].n_players)
        self.cache: list[dict[bytes, float]] = [{} for _ in games]

    def __len__(self) -> int:
        return len(self.games)

    @property
    def spent(self) -> int:
        return self.setup + sum(self.per_level())

    def per_level(self) -> list[int]:
        """Real evaluations made at each level during the search (without the setup)."""
        return [int(g.n_evals) - s for g, s in zip(self.games, self.start)]

    def values(self, level: int, masks: np.ndarray) -> np.ndarray:
        cache = self.cache[level]
        todo = {_key(m): m for m in masks if _key(m) not in cache}
        if todo:
            fresh = np.asarray(self.games[level](np.stack(list(todo.values()))), dtype=float)
            cache.update(zip(todo, fresh.tolist()))
        return np.array([cache[_key(m)] for m in masks])


def _check_int(value, name: str, low: int, high: int | None = None, why: str = "") -> int:
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer))
    if not ok or value < low or (high is not None and value > high):
        span = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {span}{why}, got {value!r}")
    return int(value)


def _random_masks(gen: np.random.Generator, n: int, k: int, count: int) -> np.ndarray:
    """``count`` distinct uniform masks keeping ``k`` of ``n`` (fewer if C(n, k) < count)."""
    count = min(count, comb(n, k))
    found: dict[bytes, np.ndarray] = {}
    while len(found) < count:
        chosen = np.argsort(gen.random((count, n)), axis=1)[:, :k]
        masks = np.zeros((count, n), dtype=bool)
        masks[np.arange(count)[:, None], chosen] = True
        for m in masks:
            if len(found) < count:
                found.setdefault(_key(m), m)
    return np.stack(list(found.values()))


def _mutate(parent: np.ndarray, gen: np.random.Generator, max_swaps: int) -> np.ndarray:
    """Swap s kept and s dropped layers, s = min of two uniform draws in 1..max_swaps (single swaps most often)."""
    kept, dropped = np.flatnonzero(parent), np.flatnonzero(~parent)
    top = min(max_swaps, len(kept), len(dropped))
    s = int(min(gen.integers(1, top + 1), gen.integers(1, top + 1)))
    child = parent.copy()
    child[gen.choice(kept, s, replace=False)] = False
    child[gen.choice(dropped, s, replace=False)] = True
    return child


def _plan(remaining: int, want: int, survivors: tuple[int, ...]) -> tuple[int, tuple[int, ...]] | None:
    """Candidates and survivors for one selection whose worst-case cost fits in ``remaining``."""
    surv = tuple(min(s, want) for s in survivors)
    if want + sum(surv) <= remaining:
        return want, surv
    want = min(want, remaining - len(survivors))
    return (want, (1,) * len(survivors)) if want >= 1 else None


def _select(levels: _Levels, pool: np.ndarray, parent: np.ndarray | None, survivors: tuple[int, ...]) -> np.ndarray:
    """Multi-step selection: rank ``pool`` (and the parent) level by level, keeping ``survivors[l]`` after level l.

    Returns the best mask on the last level; ties go to the parent (it is ranked first).
    """
    for level in range(len(levels)):
        both = pool if parent is None else np.concatenate([parent[None], pool])
        ranked = both[np.argsort(-levels.values(level, both), kind="stable")]
        if level == len(levels) - 1:
            return ranked[0]
        top = ranked[: survivors[level]]
        pool = top if parent is None else top[[_key(m) != _key(parent) for m in top]]
        if len(pool) == 0:
            return parent
    raise AssertionError("unreachable")


def evolutionary_search(fitness, n_keep: int, budget: int, rng=None, init=None, offspring: int = 16,
                        survivors: Sequence[int] | None = None, max_swaps: int = 3, n_init: int | None = None,
                        progress: bool = True) -> SearchResult:
    """(1+λ) evolutionary search for the best mask keeping ``n_keep`` layers, in the manner of EvoPress (chapter 07).

    ``fitness`` is a Game (e.g. the exact table: one level) or a list of Games on growing
    calibration samples, the full set last (e.g. :func:`calibration_levels`); values are
    maximised. Each generation mutates the parent into ``offspring`` new masks (swaps of kept
    and dropped layers, so the count stays ``n_keep``), scores them on the first level, sends
    the best ``survivors[l]`` (the parent competes too) on to level l + 1, and on the last level
    the best replaces the parent. ``survivors`` defaults to offspring // 4, then // 16, … (at
    least 1). ``init``: a mask or masks keeping ``n_keep`` (e.g. a ranking's choice) selected
    the same way; default the best of ``n_init`` (default ``offspring``) random masks.

    Real evaluations are counted exactly: distinct masks per level, measured by the games'
    own ``n_evals`` (LayerGame's cache and store hits are free) or through a
    :class:`~minilib.games.CountingGame`; evaluations the games had made before the call (one
    per fresh LayerGame) are charged too. The search stops before exceeding ``budget`` or when
    no new offspring can be found.
    """
    levels = _Levels(fitness)
    n, n_levels = levels.n_players, len(levels)
    n_keep = _check_int(n_keep, "n_keep", 1, n - 1, " (a search needs kept and dropped layers)")
    offspring = _check_int(offspring, "offspring", 1)
    max_swaps = _check_int(max_swaps, "max_swaps", 1)
    if survivors is None:
        survivors = tuple(max(1, offspring // 4 ** (i + 1)) for i in range(n_levels - 1))
    surv = tuple(survivors)
    if len(surv) != n_levels - 1 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1
                                        for s in surv) or list(surv) != sorted(surv, reverse=True):
        raise ValueError(f"survivors must be {n_levels - 1} non-increasing positive ints (one per level after the "
                         f"first), got {survivors!r}")
    gen = _rng(rng)
    if init is None or (isinstance(init, str) and init == "random"):
        n_init = _check_int(offspring if n_init is None else n_init, "n_init", 1)
        start, fixed = None, False
    elif isinstance(init, str):
        raise ValueError(f"init must be 'random', None or keep-mask(s) of shape (m, {n}), got {init!r}")
    else:
        start = np.atleast_2d(np.asarray(init))
        if start.ndim != 2 or start.shape[1] != n or start.dtype != bool or (start.sum(axis=1) != n_keep).any():
            raise ValueError(f"init must be 'random', None or bool keep-mask(s) of shape (m, {n}) keeping n_keep="
                             f"{n_keep} layers each, got {np.asarray(init).dtype} array of shape {start.shape}")
        start, fixed = np.unique(start, axis=0), True
    minimum = levels.setup + (len(start) if fixed else 1) + n_levels - 1
    budget = _check_int(budget, "budget", minimum, why=f" (the games' {levels.setup} earlier evaluations, then "
                        f"{'the init masks' if fixed else 'one mask'} through all {n_levels} level(s))")
    bar = tqdm(total=budget, initial=levels.spent, desc=f"evolutionary search (keep {n_keep})", disable=not progress)

    def step(pool_size: int, parent, make_pool) -> np.ndarray | None:
        plan = _plan(budget - levels.spent, pool_size, surv)
        if plan is None:
            return None
        pool = make_pool(plan[0])
        if len(pool) == 0:
            return None
        best = _select(levels, pool, parent, plan[1])
        bar.update(levels.spent - bar.n)
        return best

    if fixed:  # the minimum budget guarantees the init masks fit with one survivor per level
        parent = step(len(start), None, lambda k: start)
    else:
        parent = step(n_init, None, lambda k: _random_masks(gen, n, n_keep, k))
    top = n_levels - 1
    history, history_evals = [levels.values(top, parent[None])[0]], [levels.spent]

    def children(count: int) -> np.ndarray:
        seen, found = levels.cache[0], {}
        for _ in range(50 * count):
            if len(found) == count:
                break
            child = _mutate(parent, gen, max_swaps)
            if _key(child) not in seen:
                found.setdefault(_key(child), child)
        return np.stack(list(found.values())) if found else np.zeros((0, n), dtype=bool)

    while True:
        best = step(offspring, parent, children)
        if best is None:
            break
        parent = best
        history.append(levels.values(top, parent[None])[0])
        history_evals.append(levels.spent)
    bar.close()
    return SearchResult(parent.copy(), float(history[-1]), levels.spent, [float(h) for h in history],
                        history_evals, levels.setup, {"generations": len(history) - 1, "survivors": surv,
                                                      "evals_per_level": levels.per_level()})


def calibration_levels(model, input_ids, n_seqs: Sequence[int] = (2, 5), utility: str = "ppl_ratio",
                       **game_kwargs) -> list:
    """Fresh LayerGames on ``input_ids[:s]`` for s in ``n_seqs``, then on all of ``input_ids`` (chapter 07).

    The growing calibration samples of :func:`evolutionary_search`: early levels are cheap and
    noisy, the last is the real objective. Each game evaluates the full model once when built
    (its baseline), which the search charges to its budget.
    """
    from .evaluation import LayerGame

    total = int(input_ids.shape[0])
    sizes = list(n_seqs)
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in sizes) or sizes != sorted(set(sizes)) \
            or (sizes and not 1 <= sizes[0] <= sizes[-1] < total):
        raise ValueError(f"n_seqs must be increasing ints in 1..{total - 1} (numbers of calibration sequences), "
                         f"got {n_seqs!r}")
    return [LayerGame(model, input_ids[:s], utility=utility, **game_kwargs) for s in sizes] + \
        [LayerGame(model, input_ids, utility=utility, **game_kwargs)]


def greedy_search(game, n_keep: int) -> SearchResult:
    """SLEB-style greedy removal on any game: drop the layer whose removal keeps the value highest, repeat (chapter 07).

    Round r scores every remaining layer's removal (L − r masks), so keeping k of L costs
    about (L − k)(L + k + 1)/2 real evaluations, counted like :func:`evolutionary_search`.
    """
    levels = _Levels(game)
    n = levels.n_players
    n_keep = _check_int(n_keep, "n_keep", 0, n - 1)
    keep = np.ones(n, dtype=bool)
    history, history_evals = [], []
    while keep.sum() > n_keep:
        kept = np.flatnonzero(keep)
        masks = np.repeat(keep[None], len(kept), axis=0)
        masks[np.arange(len(kept)), kept] = False
        values = levels.values(0, masks)
        keep = masks[int(np.argmax(values))]
        history.append(float(values.max()))
        history_evals.append(levels.spent)
    return SearchResult(keep, history[-1], levels.spent, history, history_evals, levels.setup)


# --- search through a surrogate ------------------------------------------------------------

def _top_unique(masks: np.ndarray, scores: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` distinct masks with the highest scores, best first (ties: by bitmask order)."""
    _, first = np.unique(np.packbits(masks, axis=1), axis=0, return_index=True)
    order = first[np.argsort(-scores[first], kind="stable")][:count]
    return masks[order], scores[order]


def _removals(masks: np.ndarray) -> np.ndarray:
    """Every mask with one kept layer dropped, for each row of ``masks`` (all keep the same count)."""
    p, n = masks.shape
    k = int(masks[0].sum())
    kept = np.nonzero(masks)[1].reshape(p, k)
    out = np.repeat(masks, k, axis=0)
    out[np.arange(p * k), kept.ravel()] = False
    return out


def _swaps(masks: np.ndarray) -> np.ndarray:
    """Every mask one swap (a kept layer out, a dropped one in) away, grouped per row: (p, k·(n−k), n)."""
    p, n = masks.shape
    k = int(masks[0].sum())
    kept, dropped = np.nonzero(masks)[1].reshape(p, k), np.nonzero(~masks)[1].reshape(p, n - k)
    out = np.broadcast_to(masks[:, None, None, :], (p, k, n - k, n)).copy()
    pi, ai, bi = np.ix_(np.arange(p), np.arange(k), np.arange(n - k))
    out[pi, ai, bi, kept[:, :, None]] = False
    out[pi, ai, bi, dropped[:, None, :]] = True
    return out.reshape(p, k * (n - k), n)


def _climb(predict, starts: np.ndarray, n_best: int) -> tuple[np.ndarray, np.ndarray]:
    """Steepest-ascent swap hill-climbing from every start; the ``n_best`` best masks scored on the way."""
    current, scores = _top_unique(starts, predict(starts), len(starts))
    best = (current, scores)
    while len(current):
        nbrs = _swaps(current)
        pred = predict(nbrs.reshape(-1, current.shape[1])).reshape(len(current), -1)
        best = _top_unique(np.concatenate([best[0], nbrs.reshape(-1, current.shape[1])]),
                           np.concatenate([best[1], pred.ravel()]), n_best)
        arg = pred.argmax(axis=1)
        better = pred[np.arange(len(current)), arg] > scores + 1e-12
        current, scores = nbrs[np.flatnonzero(better), arg[better]], pred[np.flatnonzero(better), arg[better]]
        if len(current):
            current, scores = _top_unique(current, scores, len(current))
    return best


def surrogate_search(surrogate, game, keep_sizes, n_verify: int = 5, rng=None, method: str = "auto",
                     beam_width: int = 64, n_starts: int = 16, progress: bool = True) -> dict[int, SearchResult]:
    """Best keep-mask per size found on a surrogate, verified on the real game (chapter 07).

    For each k in ``keep_sizes`` the surrogate (``.predict(masks)``, e.g. from
    :func:`~minilib.surrogate.fit_surrogate`) ranks masks keeping k layers: all of them
    (``method="enumerate"``; ``"auto"`` does so when C(L, k) <= :data:`MAX_ENUMERATE`), or
    (``"local"``) a beam search removing one layer at a time from the full model
    (``beam_width`` masks per size) plus ``n_starts`` random masks, each improved by
    steepest-ascent swaps. Only the ``n_verify`` best predicted masks per size are evaluated
    on ``game``; the best of them by real value is returned. ``n_evals`` counts those real
    evaluations (cache hits free, as in :func:`evolutionary_search`); the surrogate's own
    training cost is ``surrogate.n_game_evals``. ``details`` holds every verified candidate
    with its predicted and real value.
    """
    n = int(surrogate.n_players)
    if not _is_game(game) or int(game.n_players) != n:
        raise ValueError(f"game must be a Game over the surrogate's {n} players, got {game!r}")
    if method not in SURROGATE_METHODS:
        raise ValueError(f"method must be one of {SURROGATE_METHODS}, got {method!r}")
    sizes = np.atleast_1d(np.asarray(keep_sizes))
    if sizes.ndim != 1 or sizes.size == 0 or sizes.dtype.kind not in "iu" or sizes.min() < 1 or sizes.max() > n - 1:
        raise ValueError(f"keep_sizes must be a non-empty list of ints in 1..{n - 1} (numbers of kept layers), "
                         f"got {keep_sizes!r}")
    n_verify = _check_int(n_verify, "n_verify", 1)
    beam_width = _check_int(beam_width, "beam_width", 1)
    n_starts = _check_int(n_starts, "n_starts", 0)
    gen = _rng(rng)
    real = _counted(game)
    predict = surrogate.predict
    beams: dict[int, np.ndarray] = {}
    if method != "enumerate":   # one beam sweep serves every size
        current = np.ones((1, n), dtype=bool)
        for size in range(n - 1, int(sizes.min()) - 1, -1):
            cand = _removals(current)
            current = _top_unique(cand, predict(cand), beam_width)[0]
            beams[size] = current
    results: dict[int, SearchResult] = {}
    for k in tqdm([int(s) for s in dict.fromkeys(sizes.tolist())], desc="surrogate search", disable=not progress):
        how = method if method != "auto" else ("enumerate" if comb(n, k) <= MAX_ENUMERATE else "local")
        if how == "enumerate":
            masks = np.zeros((comb(n, k), n), dtype=bool)
            for row, kept in enumerate(combinations(range(n), k)):
                masks[row, list(kept)] = True
            cand, pred = _top_unique(masks, predict(masks), n_verify)
        else:
            starts = np.concatenate([beams[k], _random_masks(gen, n, k, n_starts)]) if n_starts else beams[k]
            cand, pred = _climb(predict, starts, n_verify)
        before = int(real.n_evals)
        values = np.asarray(real(cand), dtype=float)
        used = int(real.n_evals) - before
        best = int(np.argmax(values))
        results[k] = SearchResult(cand[best].copy(), float(values[best]), used, [float(values[best])], [used],
                                  details={"method": how, "predicted": pred.tolist(), "verified": values.tolist(),
                                           "candidates": [tuple(int(i) for i in np.flatnonzero(c)) for c in cand]})
    return results
