"""Monte Carlo estimators of Shapley values (and the paper's semivalue) under a fixed budget.

Introduced in chapter 04. Every estimator takes a game, a ``budget`` counted in game
evaluations — distinct coalitions sent to the game, the empty and full coalitions included —
and an explicit ``rng``; it plans its samples so that the budget can never be exceeded, sends
them to the game in large batches (a :class:`~minilib.evaluation.LayerGame` evaluates many
masks per forward pass) and returns an :class:`Estimate`.

Every sampling estimator here is unbiased for its target (the Shapley value; the semivalue of
:func:`hamming_semivalue`), including Neyman allocation, whose allocation is cross-fitted so
that no stratum's own samples decide how many samples it gets. Each reports a standard error
with the same meaning (see :class:`Estimate`) and degrees of freedom for t intervals; the
standard error is NaN where the samples cannot estimate it, never 0 by accident.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from math import comb
from typing import Sequence

import numpy as np

from .games import CountingGame

_BATCH = 4096  # coalitions per game call


@dataclass
class Estimate:
    """An estimate with its uncertainty and its cost (chapter 04).

    ``values`` (n,) estimates the exact target of the method: the Shapley value for the Shapley
    estimators, the semivalue of :func:`hamming_semivalue_exact` for :func:`hamming_semivalue`,
    the truncated value for a ``sizes`` window of :func:`stratified_shapley`.

    ``stderr`` (n,) means the same for every method: the standard error of ``values`` as an
    estimate of that exact value over the method's own randomness (its ``rng``), so that
    ``values ± t·stderr`` is a confidence interval for the exact value. It is NaN where the method
    gives none or its samples cannot estimate one (e.g. a stratum with a single sample; KernelSHAP
    and shap's explainers) and 0 only where ``values`` is exact or every sample agreed. It does not
    include any systematic error the method knows nothing about (a surrogate network's misfit,
    say).

    ``dof`` is the number of degrees of freedom of ``stderr`` (a scalar or one per player;
    ``inf``, the default, means a normal quantile), used by :meth:`confidence_interval`.
    ``n_evals`` is the number of game evaluations actually spent, never above the budget;
    ``trace_evals`` (T,) and ``trace_values`` (T, n) record the running estimate as samples
    accumulated. ``player_names`` (optional, n distinct strings) label the players in
    :meth:`to_dataframe`.
    """

    values: np.ndarray
    stderr: np.ndarray
    n_evals: int
    method: str
    trace_evals: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    trace_values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    dof: float | np.ndarray = np.inf
    player_names: Sequence[str] | None = None

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=float)
        self.stderr = np.asarray(self.stderr, dtype=float)
        if self.values.ndim != 1:
            raise ValueError(f"values must be a 1-D array (one value per player), got shape {self.values.shape}")
        n = len(self.values)
        if self.stderr.shape != (n,):
            raise ValueError(f"stderr must have the shape of values, ({n},), got {self.stderr.shape}")
        if np.any(self.stderr < 0):
            raise ValueError("stderr must be >= 0 or NaN (unknown)")
        dof = np.asarray(self.dof, dtype=float)
        if dof.shape not in ((), (n,)) or np.any(dof <= 0):
            raise ValueError(f"dof must be a positive number or an array of {n} (NaN: unknown, inf: normal), "
                             f"got {self.dof!r}")
        self.dof = float(dof) if dof.ndim == 0 else dof
        if self.player_names is not None:
            names = [str(name) for name in self.player_names]
            if len(names) != n or len(set(names)) != n:
                raise ValueError(f"player_names must be {n} distinct names (one per player), got {self.player_names!r}")
            self.player_names = names

    def __repr__(self) -> str:
        return f"Estimate(method={self.method!r}, n_evals={self.n_evals}, values={np.round(self.values, 4)})"

    def confidence_interval(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """``(low, high)`` arrays: ``values ∓ q·stderr`` with q the t quantile for ``dof`` (chapter 04).

        Normal quantile where ``dof`` is infinite; NaN where ``stderr`` (or ``dof``) is NaN.
        """
        from scipy.stats import t

        if isinstance(level, bool) or not isinstance(level, (int, float, np.floating)) or not 0 < level < 1:
            raise ValueError(f"level must be a number in (0, 1), e.g. 0.95, got {level!r}")
        q = t.ppf((1 + level) / 2, self.dof)
        half = np.where(self.stderr == 0, 0.0, q * self.stderr)   # exact: a zero-width interval
        return self.values - half, self.values + half

    def ranking(self) -> np.ndarray:
        """Players ordered least important (smallest value) first, ties by index: the pruning order (chapter 04)."""
        return np.argsort(self.values, kind="stable")

    def to_dataframe(self, level: float = 0.95):
        """A ``pandas.DataFrame`` indexed by player (chapter 04).

        Columns ``value``, ``stderr``, ``ci_low``, ``ci_high`` (:meth:`confidence_interval` at
        ``level``) and ``rank`` (1 = least important, the first to prune; :meth:`ranking`). The
        index holds ``player_names`` when given, else the player numbers, and is named ``player``.
        """
        import pandas as pd

        low, high = self.confidence_interval(level)
        rank = np.empty(len(self.values), dtype=int)
        rank[self.ranking()] = np.arange(1, len(self.values) + 1)
        index = pd.Index(self.player_names if self.player_names is not None else range(len(self.values)),
                         name="player")
        return pd.DataFrame({"value": self.values, "stderr": self.stderr, "ci_low": low, "ci_high": high,
                             "rank": rank}, index=index)


class BudgetTooSmallError(ValueError):
    """A positive budget below the fewest evaluations an estimator can work with (chapter 04).

    A ``ValueError``; ``minimum`` holds that fewest number, which the message also states.
    :func:`budget_sweep` catches it to skip budgets an estimator cannot run at.
    """

    def __init__(self, message: str, minimum: int):
        super().__init__(message)
        self.minimum = int(minimum)


class AllocationFallbackWarning(UserWarning):
    """:func:`stratified_shapley` fell back from Neyman to proportional allocation (chapter 04).

    Issued when the budget cannot pay for the pilot samples Neyman allocation needs in every
    stratum; silence it with ``warnings.simplefilter("ignore", AllocationFallbackWarning)``.
    """


def _check_budget(budget, minimum: int, what: str) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise TypeError(f"budget must be an int (game evaluations), got {type(budget).__name__}")
    if budget <= 0:
        raise ValueError(f"budget must be a positive int (game evaluations), got {budget}")
    if budget < minimum:
        raise BudgetTooSmallError(f"budget={budget} is too small: {what} needs at least {minimum} "
                                  f"game evaluations", minimum)
    return int(budget)


def _rng(rng) -> np.random.Generator:
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator, an int seed or None, got {type(rng).__name__}")
    return rng


def _evaluate(game: CountingGame, coalitions: np.ndarray) -> np.ndarray:
    return np.concatenate([game(coalitions[s: s + _BATCH]) for s in range(0, len(coalitions), _BATCH)]) \
        if len(coalitions) else np.zeros(0)


def _counting(game) -> CountingGame:
    n = getattr(game, "n_players", None)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise TypeError(f"game must have a positive int n_players, got {n!r}")
    return CountingGame(game, cache=True)


def _running(samples: np.ndarray, evals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    means = np.cumsum(samples, axis=0) / np.arange(1, len(samples) + 1)[:, None]
    return evals, means


# --- permutation sampling ---------------------------------------------------------------------

def permutation_shapley(game, budget: int, rng=None, antithetic: bool = True) -> Estimate:
    """Shapley values by averaging marginals along random player orderings (Castro et al. 2009) (chapter 04).

    Each ordering walks from ∅ to N adding one player at a time: n − 1 new coalitions
    besides ∅ and N, which all orderings share. With ``antithetic=True`` every ordering is paired
    with its reverse, whose marginals are negatively correlated with the first's; the pair's
    mean is one sample (exact for games with at most pairwise interactions). Needs ``n + 1``
    evaluations (``2n`` when antithetic). Coalitions met twice are evaluated once, so orderings
    are drawn in rounds until the budget cannot pay for another one. ``stderr`` is the spread of
    the m independent samples (orderings, or antithetic pairs) over √m, with m − 1 degrees of
    freedom; NaN when m = 1.
    """
    if not isinstance(antithetic, (bool, np.bool_)):
        raise ValueError(f"antithetic must be True or False, got {antithetic!r}")
    counting, gen = _counting(game), _rng(rng)
    n = counting.n_players
    per = 2 if antithetic else 1
    cost = max(1, per * (n - 1))
    budget = _check_budget(budget, 2 + cost, f"permutation_shapley(antithetic={antithetic}) with n={n}")
    seen: set[bytes] = set()
    rounds, evals = [], []
    spent = -1
    while (k := (budget - max(counting.n_evals, 2)) // cost) >= 1 and counting.n_evals > spent:
        spent = counting.n_evals  # a round that finds everything cached ends the loop
        orders = np.stack([gen.permutation(n) for _ in range(k)])
        if antithetic:
            orders = np.concatenate([orders, orders[:, ::-1]])
        ranks = np.empty_like(orders)
        ranks[np.arange(len(orders))[:, None], orders] = np.arange(n)
        prefixes = ranks[:, None, :] < np.arange(n + 1)[None, :, None]    # (m, n+1, n): first t players
        values = _evaluate(counting, prefixes.reshape(-1, n)).reshape(len(orders), n + 1)
        marginals = np.empty((len(orders), n))
        marginals[np.arange(len(orders))[:, None], orders] = np.diff(values, axis=1)
        if antithetic:
            marginals = (marginals[:k] + marginals[k:]) / 2
            prefixes = np.concatenate([prefixes[:k], prefixes[k:]], axis=1)
        rounds.append(marginals)
        evals.extend(_cumulative_distinct(prefixes, seen))
    samples = np.concatenate(rounds)
    trace_evals, trace_values = _running(samples, np.array(evals))
    m = len(samples)   # independent samples (orderings or antithetic pairs): t with m - 1 dof
    stderr = samples.std(axis=0, ddof=1) / np.sqrt(m) if m > 1 else np.full(n, np.nan)
    return Estimate(samples.mean(axis=0), stderr, counting.n_evals,
                    "permutation" + (" (antithetic)" if antithetic else ""), trace_evals, trace_values,
                    dof=m - 1 if m > 1 else np.nan)


def _cumulative_distinct(blocks: np.ndarray, seen: set[bytes]) -> list[int]:
    """After each block of coalitions (rows of ``blocks[j]``), how many distinct coalitions so far."""
    out = []
    for block in blocks:
        seen.update(np.packbits(block, axis=1).view(f"V{(block.shape[1] + 7) // 8}").ravel().tolist())
        out.append(len(seen))
    return out


# --- stratified by coalition size ------------------------------------------------------------

def _uniform_masks(gen: np.random.Generator, n: int, pool: np.ndarray, size: int, k: int) -> np.ndarray:
    """k uniform subsets of ``size`` players drawn from ``pool``, as masks (k, n)."""
    chosen = np.argsort(gen.random((k, len(pool))), axis=1)[:, :size]
    masks = np.zeros((k, n), dtype=bool)
    masks[np.arange(k)[:, None], pool[chosen]] = True
    return masks


def _apportion(total: int, share: np.ndarray, owner: np.ndarray, gen: np.random.Generator) -> np.ndarray:
    """Integer counts summing to ``total`` close to ``total * share``: floors, then the largest
    remainders. Ties go player by player in a random order of the players (``owner``: each
    stratum's player), so that strata left with fewer samples gather in few players."""
    exact = total * share / share.sum()
    counts = np.minimum(np.floor(exact).astype(int), total)
    left = total - counts.sum()
    if left > 0:
        player_rank = gen.permutation(owner.max() + 1)[owner]
        order = np.lexsort((gen.random(len(share)), player_rank, -np.round(exact - counts, 12)))
        counts[order[:left]] += 1
    return counts


def _welch(var_parts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the variance Σ_h v_h of a sum of independent stratum means (NaN if any v_h is) and
    its Welch–Satterthwaite degrees of freedom (Σ v_h)² / Σ v_h² / (k_h − 1); inf when it is 0."""
    var = var_parts.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = np.where(counts > 1, var_parts ** 2 / np.maximum(counts - 1, 1), 0.0).sum(axis=1)
        dof = np.where(var > 0, var ** 2 / denom, np.inf)
    return var, np.where(np.isnan(var), np.nan, dof)


def stratified_shapley(game, budget: int, rng=None, allocation: str = "neyman",
                       sizes=None, pilot: int = 2, defensive: float = 0.1) -> Estimate:
    """Shapley values stratified by coalition size (Maleki et al. 2013) (chapter 04).

    φ_i = (1/n) Σ_s E[v(S ∪ i) − v(S)] over uniform S ⊆ N∖{i} of size s: one stratum per
    (player, size). The end strata (s = 0 and s = n − 1) hold a single coalition and are
    computed exactly (2n + 2 evaluations). Each middle-stratum sample costs 2 evaluations.

    ``allocation="proportional"`` gives every stratum the same number of samples (one at the
    minimum budget). ``"neyman"`` first draws ``pilot`` samples in every stratum, then shares the
    rest in proportion to each stratum's estimated standard deviation, mixed with a
    ``defensive`` share of uniform allocation so that no stratum is starved. It stays unbiased
    because the allocation is *cross-fitted*: strata are split like a chessboard by the parity
    of player + size, each half gets a fixed share of the budget, and a stratum's standard
    deviation is estimated from the pilots of its neighbours in the other half (the same player
    at sizes s ± 1, else other players at size s), never from its own samples. All samples,
    pilots included, then enter the stratum means. When the budget cannot pay for the pilots,
    Neyman allocation falls back to proportional allocation with an
    :class:`AllocationFallbackWarning`.

    The minimum budget is ``2 + 2n + 2n(n − 2)`` (one sample per middle stratum), Neyman
    allocation needs ``2 + 2n + 2·pilot·n(n − 2)``; neither is ever above the number of
    coalitions the estimator can ask for (2**n for the full window), since coalitions met twice
    are evaluated once. ``stderr`` is the stratified standard error Σ_h s_h²/k_h over the
    strata of a player (divided by n²), with Welch–Satterthwaite degrees of freedom; it is NaN
    for a player with a stratum that holds a single sample. ``sizes`` restricts the estimate to
    a window of coalition sizes (strata outside it count as 0: a truncated, not a full, Shapley
    value; values and stderr then refer to that truncated value).
    """
    if allocation not in ("neyman", "proportional"):
        raise ValueError(f"allocation must be 'neyman' or 'proportional', got {allocation!r}")
    if isinstance(pilot, bool) or not isinstance(pilot, (int, np.integer)) or pilot < 2:
        raise ValueError(f"pilot must be an int >= 2 (samples per stratum; a variance needs two), got {pilot!r}")
    if isinstance(defensive, bool) or not isinstance(defensive, (int, float, np.integer, np.floating)) \
            or not 0 <= defensive <= 1:
        raise ValueError(f"defensive must be a number in [0, 1] (the uniform share of Neyman allocation), "
                         f"got {defensive!r}")
    counting, gen = _counting(game), _rng(rng)
    n = counting.n_players
    window = np.arange(n) if sizes is None else np.unique(np.asarray(sizes))
    if window.size == 0 or window.dtype.kind not in "iu" or window.min() < 0 or window.max() > n - 1:
        raise ValueError(f"sizes must be coalition sizes (ints) in 0..{n - 1}, got {sizes!r}")
    middle = [int(s) for s in window if 0 < s < n - 1]
    ends = [int(s) for s in window if s in (0, n - 1)]
    strata = [(i, s) for i in range(n) for s in middle]
    n_strata = len(strata)
    fixed = (2 if ends else 0) + n * len(ends)
    touched = {k for s in middle for k in (s, s + 1)} | ({0, n} if ends else set()) \
        | ({1} if 0 in ends else set()) | ({n - 1} if n - 1 in ends else set())
    reachable = sum(comb(n, k) for k in touched)  # distinct coalitions the estimator can ever ask for
    budget = _check_budget(budget, min(fixed + 2 * n_strata, reachable),
                           f"stratified_shapley with n={n} and {len(middle)} middle sizes (one sample per stratum)")
    method = f"stratified ({allocation})"
    if allocation == "neyman" and budget < (needs := min(fixed + 2 * pilot * n_strata, reachable)):
        warnings.warn(f"stratified_shapley: budget={budget} is below the {needs} evaluations Neyman allocation "
                      f"needs with n={n} and pilot={pilot}; using proportional allocation",
                      AllocationFallbackWarning, stacklevel=2)
        allocation, method = "proportional", "stratified (proportional: budget below Neyman's minimum)"
    end_sum = np.zeros(n)
    if ends:
        empty, full = np.zeros(n, dtype=bool), np.ones(n, dtype=bool)
        singles, leave_one = np.eye(n, dtype=bool), ~np.eye(n, dtype=bool)
        coal = np.concatenate([[empty, full]] + ([singles] if 0 in ends else []) +
                              ([leave_one] if n - 1 in ends else []))
        vals = _evaluate(counting, coal)
        v0, vn, rest = vals[0], vals[1], vals[2:]
        if 0 in ends:
            end_sum, rest = end_sum + rest[:n] - v0, rest[n:]
        if n - 1 in ends and n > 1:
            end_sum = end_sum + vn - rest[:n]
    samples: list[list[float]] = [[] for _ in strata]

    def draw(plan: np.ndarray) -> None:
        blocks, keys = [], []
        for h, k in enumerate(plan.tolist()):
            if k > 0:
                i, s = strata[h]
                base = _uniform_masks(gen, n, np.delete(np.arange(n), i), s, k)
                with_i = base.copy()
                with_i[:, i] = True
                blocks += [base, with_i]
                keys.append((h, k))
        if not blocks:
            return
        vals = _evaluate(counting, np.concatenate(blocks))
        pos = 0
        for h, k in keys:
            samples[h].extend((vals[pos + k: pos + 2 * k] - vals[pos: pos + k]).tolist())
            pos += 2 * k

    draw(np.full(n_strata, pilot if allocation == "neyman" else 1))
    owner = np.array([i for i, _ in strata], dtype=int)
    groups = [(np.arange(n_strata), np.ones(n_strata))]         # (strata, share within the group)
    if allocation == "neyman" and n_strata:
        groups = _neyman_groups(strata, samples, pilot, n, defensive)
    spent = -1
    while (remaining := (budget - counting.n_evals) // 2) >= 1 and n_strata and counting.n_evals > spent:
        spent = counting.n_evals  # a round that finds everything cached ends the loop
        plan, given = np.zeros(n_strata, dtype=int), 0
        for g, (members, share) in enumerate(groups):   # each group's part of the budget is fixed
            part = remaining - given if g == len(groups) - 1 else remaining * len(members) // n_strata
            plan[members] = _apportion(part, share, owner[members], gen)
            given += part
        draw(plan)
    counts = np.array([len(v) for v in samples], dtype=float).reshape(n, len(middle))
    means = np.array([np.mean(v) for v in samples]).reshape(n, len(middle))
    var_parts = np.array([np.var(v, ddof=1) / len(v) if len(v) > 1 else np.nan for v in samples]
                         ).reshape(n, len(middle))
    values = (end_sum + means.sum(axis=1)) / n
    var, dof = _welch(var_parts, counts)
    return Estimate(values, np.sqrt(var) / n, counting.n_evals, method,
                    np.array([counting.n_evals]), values[None, :], dof=dof)


def _neyman_groups(strata: list, samples: list, pilot: int, n: int, defensive: float) -> list:
    """Cross-fitted Neyman shares: two chessboard halves of the strata, each stratum's standard
    deviation estimated from its neighbours' pilot samples in the other half."""
    index = {key: h for h, key in enumerate(strata)}
    half = np.array([(i + s) % 2 for i, s in strata])
    pilot_var = np.array([np.var(v[:pilot], ddof=1) for v in samples])
    sd = np.empty(len(strata))
    for h, (i, s) in enumerate(strata):
        nb = [index[(i, t)] for t in (s - 1, s + 1) if (i, t) in index] or \
             [index[(j, s)] for j in range(n) if (j, s) in index and half[index[(j, s)]] != half[h]]
        sd[h] = np.sqrt(np.mean(pilot_var[nb])) if nb else np.nan
    groups = []
    for g in (0, 1):
        members = np.flatnonzero(half == g)
        if members.size == 0:
            continue
        s_g = np.nan_to_num(sd[members])
        share = s_g / s_g.sum() if s_g.sum() > 0 else np.full(members.size, 1 / members.size)
        groups.append((members, (1 - defensive) * share + defensive / members.size))
    return groups


def strata_moments(game) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and standard deviation of every stratum of :func:`stratified_shapley` (chapter 04).

    Entry ``[i, s]`` is over the coalitions S ⊆ N∖{i} of size s, each equally likely, of the
    marginal v(S ∪ i) − v(S); needs the full value table (e.g. a
    :class:`~minilib.games.TabularGame`). ``mean.mean(axis=1)`` is the Shapley value; ``std``
    says how many samples each stratum deserves (Neyman allocation) and what proportional
    allocation costs.
    """
    from .shapley import _sizes, _split, value_table

    table = value_table(game)
    n = table.size.bit_length() - 1
    sizes = _split(_sizes(n), 0)[0]  # sizes of the coalitions without player i, in _split's order
    counts = np.bincount(sizes, minlength=n)
    mean, std = np.zeros((n, n)), np.zeros((n, n))
    for i in range(n):
        without, with_i = _split(table, i)
        d = with_i - without
        mean[i] = np.bincount(sizes, d, minlength=n) / counts
        std[i] = np.sqrt(np.maximum(np.bincount(sizes, d * d, minlength=n) / counts - mean[i] ** 2, 0.0))
    return mean, std


# --- the paper's Hamming-weight semivalue ----------------------------------------------------

def _check_keep_sizes(keep_sizes, n: int) -> np.ndarray:
    sizes = np.asarray(keep_sizes)
    if sizes.ndim != 1 or sizes.size == 0 or sizes.dtype.kind not in "iu":
        raise ValueError(f"keep_sizes must be a non-empty list of ints in 0..{n}, got {keep_sizes!r}")
    if sizes.min() < 0 or sizes.max() > n:
        raise ValueError(f"keep_sizes must lie in 0..{n} (numbers of kept players), got {keep_sizes!r}")
    return sizes.astype(int)


def hamming_size_weights(n: int, keep_sizes) -> np.ndarray:
    """Weight the paper's estimator puts on each coalition size |S| = 0..n−1 (chapter 04).

    Base masks are uniform among masks keeping k players, k drawn equally from
    ``keep_sizes``. Player i's marginal is then taken at a coalition of the *other* kept players
    of size k − 1 (when i is in the base mask, probability k/n) or k (probability (n − k)/n).
    Shapley's weights are uniform, 1/n each; these are concentrated next to the strata.
    """
    sizes = _check_keep_sizes(keep_sizes, n)
    weights = np.zeros(n)
    for k in sizes:
        if k >= 1:
            weights[k - 1] += k / n / len(sizes)
        if k <= n - 1:
            weights[k] += (n - k) / n / len(sizes)
    return weights


def hamming_semivalue_exact(game, keep_sizes) -> np.ndarray:
    """The exact value the paper's estimator converges to, from a full value table (chapter 04)."""
    from .shapley import marginal_table

    def per_coalition(n: int) -> np.ndarray:
        w = hamming_size_weights(n, keep_sizes)
        return np.array([w[s] / comb(n - 1, s) for s in range(n)])

    return marginal_table(game, per_coalition)


def hamming_semivalue(game, budget: int, keep_sizes, rng=None) -> Estimate:
    """The paper's estimator: base masks stratified by Hamming weight, marginals averaged (chapter 04).

    Draws equally many base masks b uniformly within each stratum (k kept players, k in
    ``keep_sizes``), and for every player i averages v(b with i) − v(b without i) over all base
    masks. One of the two is b itself, so a base mask costs n + 1 evaluations. The result is a
    semivalue with the size weights of :func:`hamming_size_weights`, not the Shapley value:
    it ranks, but it is not efficient. ``stderr`` is the stratified standard error for that
    semivalue (:func:`hamming_semivalue_exact`), with Welch–Satterthwaite degrees of freedom;
    NaN with a single base mask per stratum.
    """
    counting, gen = _counting(game), _rng(rng)
    n = counting.n_players
    sizes = _check_keep_sizes(keep_sizes, n)
    budget = _check_budget(budget, len(sizes) * (n + 1),
                           f"hamming_semivalue with n={n} and {len(sizes)} strata (n + 1 per base mask)")
    seen: set[bytes] = set()
    rounds, strata, evals = [], [], []
    spent = -1
    while (k := (budget - counting.n_evals) // ((n + 1) * len(sizes))) >= 1 and counting.n_evals > spent:
        spent = counting.n_evals  # a round that finds everything cached ends the loop
        bases = np.concatenate([_uniform_masks(gen, n, np.arange(n), size, k) for size in sizes])
        order = gen.permutation(len(bases))  # interleave strata: the trace is unbiased at every step
        bases = bases[order]
        flips = bases[:, None, :] ^ np.eye(n, dtype=bool)[None]           # (m, n, n): flip player i
        vals = _evaluate(counting, np.concatenate([bases, flips.reshape(-1, n)]))
        v_base, v_flip = vals[: len(bases)], vals[len(bases):].reshape(len(bases), n)
        rounds.append(np.where(bases, v_base[:, None] - v_flip, v_flip - v_base[:, None]))
        strata.append(np.repeat(np.arange(len(sizes)), k)[order])
        evals.extend(_cumulative_distinct(np.concatenate([bases[:, None], flips], axis=1), seen))
    marginals, stratum = np.concatenate(rounds), np.concatenate(strata)
    trace_evals, trace_values = _running(marginals, np.array(evals))
    per_stratum = len(marginals) // len(sizes)
    # strata hold equal numbers of base masks, so the stratified standard error applies
    if per_stratum > 1:
        parts = np.stack([marginals[stratum == j].var(axis=0, ddof=1) / per_stratum
                          for j in range(len(sizes))], axis=1)                      # (n, strata)
        var, dof = _welch(parts, np.full(parts.shape, per_stratum))
    else:
        var, dof = np.full(n, np.nan), np.full(n, np.nan)
    return Estimate(marginals.mean(axis=0), np.sqrt(var) / len(sizes), counting.n_evals, "hamming semivalue",
                    trace_evals, trace_values, dof=dof)


# --- KernelSHAP through shap -------------------------------------------------------------------

def kernel_shap(game, budget: int, rng=None) -> Estimate:
    """KernelSHAP (Lundberg & Lee 2017) through ``shap.KernelExplainer`` (chapter 04).

    The game is explained at the all-ones point against a single all-zeros background row, so
    every model call of shap is one coalition. ``l1_reg=False`` keeps every player (shap's
    default drops players above 10). The weighted regression has n − 1 free coefficients after
    the efficiency constraint, so the budget must leave shap at least ``2n`` sampled coalitions
    besides ∅ and N. shap reports no standard error: ``stderr`` is NaN.
    """
    import shap

    counting, gen = _counting(game), _rng(rng)
    n = counting.n_players
    budget = _check_budget(budget, 2 * n + 2, f"kernel_shap with n={n} (a well-posed regression)")

    def f(x: np.ndarray) -> np.ndarray:
        return _evaluate(counting, np.asarray(x) > 0.5)

    explainer = shap.KernelExplainer(f, np.zeros((1, n)), link="identity")
    # shap seeds its sampler from numpy's global generator; derive that seed from rng
    state = np.random.get_state()
    np.random.seed(int(gen.integers(2 ** 31)))
    try:
        values = np.asarray(explainer.shap_values(np.ones((1, n)), nsamples=budget - 2, l1_reg=False,
                                                  silent=True)).reshape(-1)[:n]
    finally:
        np.random.set_state(state)
    if counting.n_evals > budget:  # pragma: no cover - guards a change in shap's accounting
        raise RuntimeError(f"shap used {counting.n_evals} evaluations, above budget={budget}")
    return Estimate(values, np.full(n, np.nan), counting.n_evals, "kernel SHAP (shap)",
                    np.array([counting.n_evals]), values[None, :])


def shap_permutation(game, budget: int, rng=None) -> Estimate:
    """shap's own ``PermutationExplainer`` with ``max_evals=budget``, for comparison (chapter 04).

    Set up as :func:`kernel_shap`: the all-ones point explained against one all-zeros
    background row. shap's budget counts *model calls*, not distinct coalitions: each of its
    antithetic permutation pairs walks ∅ → N → ∅ in ``2n + 1`` calls and nothing is reused
    between pairs, so it needs ``budget >= 2n + 1`` and usually sends fewer distinct coalitions
    to the game than ``budget``. ``n_evals`` counts those distinct coalitions, the real cost for a
    caching game such as :class:`~minilib.evaluation.LayerGame`. shap reports no standard
    error here: ``stderr`` is NaN.
    """
    import shap

    counting, gen = _counting(game), _rng(rng)
    n = counting.n_players
    budget = _check_budget(budget, 2 * n + 1, f"shap's PermutationExplainer with n={n} (one permutation pair)")

    def f(x: np.ndarray) -> np.ndarray:
        return _evaluate(counting, np.asarray(x) > 0.5)

    state = np.random.get_state()  # shap shuffles with numpy's global generator: seed it from rng
    try:
        explainer = shap.PermutationExplainer(f, np.zeros((1, n)), seed=int(gen.integers(2 ** 31)))
        values = np.asarray(explainer(np.ones((1, n)), max_evals=budget, silent=True).values).reshape(-1)[:n]
    finally:
        np.random.set_state(state)
    return Estimate(values, np.full(n, np.nan), counting.n_evals, "permutation (shap)",
                    np.array([counting.n_evals]), values[None, :])


# --- accuracy metrics --------------------------------------------------------------------------

def relative_squared_error(estimate, exact) -> float:
    """‖φ̂ − φ‖² / ‖φ‖² (chapter 04)."""
    est, ex = np.asarray(estimate, dtype=float), np.asarray(exact, dtype=float)
    return float(np.sum((est - ex) ** 2) / np.sum(ex ** 2))


def max_error(estimate, exact) -> float:
    """max_i |φ̂_i − φ_i| (chapter 04)."""
    return float(np.max(np.abs(np.asarray(estimate, dtype=float) - np.asarray(exact, dtype=float))))


def spearman(estimate, exact) -> float:
    """Spearman rank correlation between estimated and exact values (chapter 04)."""
    from scipy.stats import spearmanr

    return float(spearmanr(estimate, exact).statistic)


def kendall_tau(estimate, exact) -> float:
    """Kendall's τ between estimated and exact values (chapter 04)."""
    from scipy.stats import kendalltau

    return float(kendalltau(estimate, exact).statistic)


def bottom_k(values, k: int) -> set[int]:
    """Indices of the k smallest values: the layers that would be pruned (chapter 04)."""
    values = np.asarray(values, dtype=float)
    if not 1 <= k <= len(values):
        raise ValueError(f"k must be in 1..{len(values)}, got {k}")
    return set(np.argsort(values, kind="stable")[:k].tolist())


def bottom_k_precision(estimate, exact, k: int) -> float:
    """Fraction of the exact bottom-k that the estimate's bottom-k recovers (chapter 04)."""
    return len(bottom_k(estimate, k) & bottom_k(exact, k)) / k


# --- error against budget ----------------------------------------------------------------------

def budget_sweep(game, estimators: dict, budgets, seeds, exact, k: int = 3):
    """Run every estimator at every budget for every seed and score it against ``exact`` (chapter 04).

    ``estimators`` maps a name to ``f(game, budget, rng) -> Estimate``; each run gets
    ``rng = np.random.default_rng(seed)``. A budget below an estimator's minimum
    (:class:`BudgetTooSmallError`) is skipped for that estimator. Returns a ``pandas.DataFrame``
    with one row per run: ``estimator, budget, seed, n_evals`` (evaluations actually spent),
    ``rse`` (:func:`relative_squared_error`), ``precision`` (:func:`bottom_k_precision` with
    ``k``) and ``spearman``.
    """
    import pandas as pd

    exact = np.asarray(exact, dtype=float)
    rows = []
    for name, estimate in estimators.items():
        for budget in budgets:
            for seed in seeds:
                try:
                    est = estimate(game, int(budget), np.random.default_rng(seed))
                except BudgetTooSmallError:
                    break
                rows.append({"estimator": name, "budget": int(budget), "seed": seed, "n_evals": est.n_evals,
                             "rse": relative_squared_error(est.values, exact),
                             "precision": bottom_k_precision(est.values, exact, k),
                             "spearman": spearman(est.values, exact)})
    return pd.DataFrame(rows, columns=["estimator", "budget", "seed", "n_evals", "rse", "precision", "spearman"])


def budget_needed(sweep, metric: str = "precision", target: float = 1.0, share: float = 0.9,
                  lower_is_better: bool = False):
    """Per estimator, the smallest budget of the grid from which on ``share`` of the seeds reach ``target`` (chapter 04).

    ``sweep`` is a :func:`budget_sweep` table. A run reaches the target when its ``metric`` is
    ``>= target`` (``<= target`` with ``lower_is_better``). The budget returned is the smallest
    one at which the criterion holds *and keeps holding at every larger budget of the grid*, so
    a lucky small budget does not count. Returns a ``pandas.DataFrame`` indexed by estimator
    with ``budget`` and the median ``n_evals`` spent there; both are NaN when no budget qualifies.
    """
    import pandas as pd

    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    if metric not in sweep.columns:
        raise ValueError(f"metric must be a column of sweep, one of {list(sweep.columns)}, got {metric!r}")
    hit = sweep[metric] <= target if lower_is_better else sweep[metric] >= target
    rows = {}
    for name, runs in sweep.assign(hit=hit).groupby("estimator", sort=False):
        by_budget = runs.groupby("budget").agg(ok=("hit", "mean"), n_evals=("n_evals", "median"))
        ok = (by_budget["ok"] >= share).to_numpy()
        tail_ok = np.logical_and.accumulate(ok[::-1])[::-1]  # holds here and at every larger budget
        first = np.flatnonzero(tail_ok)
        rows[name] = (by_budget.index[first[0]], by_budget["n_evals"].iloc[first[0]]) if first.size \
            else (np.nan, np.nan)
    return pd.DataFrame.from_dict(rows, orient="index", columns=["budget", "n_evals"])


def budget_for_error(budgets, errors, target: float) -> float:
    """The budget at which an error curve first falls to ``target``, interpolated linearly in log-log (chapter 04).

    ``budgets`` non-decreasing (e.g. the evaluations spent at each budget of a grid; equal
    neighbours are fine) and ``errors`` positive (e.g. the median relative squared error at
    each budget). Returns ``budgets[0]`` if the first error is already at or below ``target``
    and NaN if no error on the grid reaches it.
    """
    b = np.asarray(budgets, dtype=float)
    x, y = np.log(b), np.log(np.asarray(errors, dtype=float))
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError("budgets and errors must be 1-D arrays of the same length")
    if np.any(np.diff(x) < 0):
        raise ValueError("budgets must be non-decreasing")
    t = np.log(target)
    below = np.flatnonzero(y <= t)
    if below.size == 0:
        return float("nan")
    j = below[0]
    if j == 0:
        return float(b[0])
    frac = (y[j - 1] - t) / (y[j - 1] - y[j])
    return float(np.exp(x[j - 1] + frac * (x[j] - x[j - 1])))
