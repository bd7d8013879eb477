"""Budgeted Shapley estimators through a surrogate: uncorrected, and with an unbiased correction (chapter 05).

Both spend a budget of real game evaluations (distinct masks, as in :mod:`minilib.estimators`)
and fit a surrogate of any family of :mod:`minilib.surrogate_models` (``model="auto"`` by
default: the network or a k-additive regression, whichever predicts held-out masks best).
:func:`surrogate_estimate` returns the surrogate's Shapley values, biased by its misfit;
:func:`corrected_shapley` adds an unbiased estimate of the Shapley value of the residual game
v − f, so its error has no surrogate bias and an honest standard error.
"""

from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np

from .estimators import Estimate, _check_budget, _check_keep_sizes, _rng, _uniform_masks, _welch
from .games import CountingGame
from .paper_pipeline import sample_stratified_masks
from .surrogate_models import fit_model
from .surrogate_values import default_surrogate_samples, surrogate_shapley

CORRECTIONS = ("auto", "strata", "chains")
"""Residual corrections of :func:`corrected_shapley`."""
DESIGNS = ("strata", "border")
"""Mask designs of the stratified correction (``design=`` of :func:`corrected_shapley`)."""
BORDER_FACTOR = 2
"""``design="border"`` evaluates a size whole when it costs at most this many times the masks sampling would
give it (``"strata"``: 1). At 40·n evaluations it adds sizes 2 and n−2 for n = 12 (66 coalitions for 48
sampled) and changes nothing for n = 10 (sizes 1, 2, 8, 9 are whole either way)."""
DEFAULT_CHAIN_FRACTION = 0.5


def _fill_stratified(counting: CountingGame, budget: int, sizes, gen: np.random.Generator) -> np.ndarray:
    """Spend what is left of ``budget`` on stratified masks; return the distinct masks drawn.

    Repeats are free (the counting game caches them), so masks are drawn in rounds, each
    asking for as many as the budget has left, until a round adds nothing new.
    """
    n = counting.n_players
    blocks, spent = [np.zeros((0, n), bool)], -1
    while (rest := budget - counting.n_evals) >= len(sizes) and counting.n_evals > spent:
        spent = counting.n_evals
        new = np.unique(sample_stratified_masks(n, rest, sizes, gen), axis=0)
        new = new[gen.permutation(len(new))[:rest]]  # at most `rest` new evaluations: never over budget
        counting(new)
        blocks.append(new)
    return np.unique(np.concatenate(blocks), axis=0)


def _ends(n: int) -> np.ndarray:
    return np.array([np.zeros(n, bool), np.ones(n, bool)])


def surrogate_estimate(game, budget: int, rng=None, keep_sizes=None, n_samples: int | None = None,
                       model="auto", **fit_kwargs) -> Estimate:
    """Shapley values through a surrogate fitted on ``budget`` real evaluations, uncorrected (chapter 05).

    Spends the budget on ∅, the full coalition and distinct masks stratified by Hamming weight
    (``keep_sizes``, default every size 1..n−1, equally many per size), fits a surrogate of the
    family ``model`` on them (:func:`~minilib.surrogate_models.fit_model`: ``"auto"`` chooses
    among the network and k-additive regressions by held-out error; ``fit_kwargs`` configure
    the network, which defaults to full-batch L-BFGS, no test set and, for positive values, the
    ``exp`` head), and returns the exact Shapley values of the surrogate (closed form, or all
    masks for L <= 20; otherwise antithetic permutations through it, ``n_samples`` defaulting
    to 1000·L). Its error is mostly the surrogate's bias, which does not shrink to zero with
    more surrogate queries; :func:`corrected_shapley` removes it.

    ``stderr`` is NaN (unknown, in :class:`~minilib.estimators.Estimate`'s sense): the target
    is the real game's Shapley value, the values vary with ``rng`` through which masks are
    evaluated and how the surrogate is fitted, and one run cannot estimate that spread.
    Like every ``stderr``, it would not include the surrogate's bias anyway. (Contrast
    :func:`~minilib.surrogate_values.surrogate_shapley`, whose target is the surrogate's own
    value: its ``stderr`` is 0 when exact.)
    """
    counting = CountingGame(game)
    gen = _rng(rng)
    n = game.n_players
    sizes = _check_keep_sizes(keep_sizes if keep_sizes is not None else list(range(1, n)), n)
    budget = _check_budget(budget, 2 + 2 * len(sizes), f"surrogate_estimate with {len(sizes)} strata "
                           "(the empty and full coalitions plus two masks per stratum)")
    counting(_ends(n))
    masks = np.unique(np.concatenate([_ends(n), _fill_stratified(counting, budget, sizes, gen)]), axis=0)
    values = counting(masks)
    surrogate = fit_model(model, masks, values, rng=gen, **fit_kwargs)
    est = surrogate_shapley(surrogate, n_samples=n_samples, rng=gen)
    return Estimate(est.values, np.full(n, np.nan), counting.n_evals,
                    f"surrogate (uncorrected: {surrogate.report['model']})")


# --- the stratified correction: every evaluation trains one fold's surrogate and corrects the other's

def _strata_plan(n: int, budget: int, folds: int = 2, factor: int = 1) -> tuple[list[int], list[int], int, bool]:
    """(enumerated sizes, sampled sizes, masks per fold and sampled size, feasible) for a budget.

    Every size 1..n−1 is covered. A size with at most factor·folds·max(m, 2) coalitions is evaluated
    whole (exact, and with ``factor`` 1 no dearer than sampling it in every fold); the others get m distinct masks
    in each fold, m as large as the budget allows in the worst case (no mask shared by the
    folds), so the budget is never exceeded. Feasible when m >= 2 (a variance) or nothing is
    left to sample.
    """
    enum: list[int] = []
    while True:
        sampled = [t for t in range(1, n) if t not in enum]
        left = budget - 2 - sum(comb(n, t) for t in enum)
        m = left // (folds * len(sampled)) if sampled else 0
        grow = [t for t in sampled if comb(n, t) <= factor * folds * max(m, 2)]
        if not grow:
            return enum, sampled, m, left >= 0 and (not sampled or m >= 2)
        enum = sorted(enum + grow)


def _distinct_uniform(gen: np.random.Generator, n: int, size: int, m: int) -> np.ndarray:
    """m distinct uniform masks keeping ``size`` of n players: a simple random sample without replacement."""
    found: dict[bytes, np.ndarray] = {}
    while len(found) < m:
        for row in _uniform_masks(gen, n, np.arange(n), size, m - len(found)):
            found.setdefault(row.tobytes(), row)
    return np.array(list(found.values()))[:m]


def _all_of_size(n: int, size: int) -> np.ndarray:
    """Every mask keeping ``size`` of n players, (C(n, size), n)."""
    masks = np.zeros((comb(n, size), n), dtype=bool)
    for row, members in enumerate(combinations(range(n), size)):
        masks[row, list(members)] = True
    return masks


MAX_FOLDS = 4
"""Cross-fitting folds of the stratified correction when the budget allows: each surrogate trains on 3/4
of the masks. Measured at 40·n evaluations, 20 seeds, 3-additive surrogate: 2 folds 1.6e-4 / 1.3e-4
(saturating games), 2.3e-4 (teaching table of model a7179f69...); 4 folds 0.87e-4 / 0.79e-4, 1.5e-4; 6 and 10
folds no better."""


def _design_plan(n: int, budget: int, folds: int, design: str = "strata") -> tuple[list[int], list[int], int, bool]:
    """The plan of ``design``: "border" enumerates sizes up to BORDER_FACTOR times dearer, where still feasible."""
    if design == "border":
        plan = _strata_plan(n, budget, folds, BORDER_FACTOR)
        if plan[3]:
            return plan
    return _strata_plan(n, budget, folds)


def _n_folds(n: int, budget: int, design: str = "strata") -> int:
    """Cross-fitting folds: as many as the budget allows, up to MAX_FOLDS (decided by the budget alone)."""
    return max([k for k in range(2, MAX_FOLDS + 1) if _design_plan(n, budget, k, design)[3]] or [2])


class _Zero:
    """The zero surrogate: with every coalition evaluated, the correction alone is the exact value."""

    def __init__(self, n: int):
        self.n_players, self.n_game_evals, self.report = n, 0, {"model": "none (every coalition evaluated)"}

    def predict(self, masks) -> np.ndarray:
        return np.zeros(len(masks))

    def shapley_values(self) -> np.ndarray:
        return np.zeros(self.n_players)


def _corrected_strata(counting: CountingGame, budget: int, gen, model, n_samples, fit_kwargs,
                      design: str = "strata") -> Estimate:
    """K folds of size-stratified masks; each is corrected by the surrogate fitted on the others (see corrected_shapley)."""
    n = counting.n_players
    n_folds = _n_folds(n, budget, design)
    enum, sampled, m, _ = _design_plan(n, budget, n_folds, design)
    whole_masks = np.concatenate([_ends(n)] + [_all_of_size(n, t) for t in enum])
    folds = [{t: _distinct_uniform(gen, n, t, m) for t in sampled} for _ in range(n_folds)]
    everything = np.concatenate([whole_masks] + [f[t] for f in folds for t in sampled])
    values = counting(everything)
    whole_values = values[: len(whole_masks)]
    fold_values, pos = [{} for _ in folds], len(whole_masks)
    for k in range(n_folds):
        for t in sampled:
            fold_values[k][t], pos = values[pos: pos + m], pos + m
    estimates, parts, counts, names = [], [], [], []
    for k in range(n_folds):
        others = [j for j in range(n_folds) if j != k]
        if sampled:
            train_m = np.concatenate([whole_masks] + [folds[j][t] for j in others for t in sampled])
            train_v = np.concatenate([whole_values] + [fold_values[j][t] for j in others for t in sampled])
            surrogate = fit_model(model, train_m, train_v, rng=gen, **fit_kwargs)
        else:
            surrogate = _Zero(n)
        names.append(surrogate.report["model"])
        phi = surrogate_shapley(surrogate, n_samples=n_samples, rng=gen)
        resid = whole_values - surrogate.predict(whole_masks)
        total = np.full(n, resid[1] - resid[0])                      # r(N) − r(∅): sizes 0 and n
        pos = 2
        for t in enum:                                               # whole sizes: exact stratum terms
            block, r = whole_masks[pos: pos + comb(n, t)], resid[pos: pos + comb(n, t)]
            pos += comb(n, t)
            total += r @ block / comb(n - 1, t - 1) - r @ ~block / comb(n - 1, t)
        for t in sampled:                                            # sampled sizes: unbiased means
            block = folds[k][t]
            r = fold_values[k][t] - surrogate.predict(block)
            # a constant from the other folds (independent of this one) centres r: unbiased, lower variance
            centre = float(np.mean([fold_values[j][t] - surrogate.predict(folds[j][t]) for j in others]))
            x = (r - centre)[:, None] * (n / t * block - n / (n - t) * ~block)
            total += x.mean(axis=0)
            parts.append((1 - m / comb(n, t)) * x.var(axis=0, ddof=1) / m / (n_folds * n) ** 2)
            counts.append(m)
        estimates.append(phi.values + total / n)
        if np.any(phi.stderr > 0):                                   # φ(f) sampled through the net
            parts.append((phi.stderr / n_folds) ** 2)
            counts.append((n_samples or default_surrogate_samples(n)) // 2)
    var_parts = np.stack(parts, axis=1) if parts else np.zeros((n, 1))
    var, dof = _welch(var_parts, np.broadcast_to(np.array(counts or [np.inf], float), var_parts.shape))
    label = "strata" if design == "strata" else f"strata, {design}"
    return Estimate(np.mean(estimates, axis=0), np.sqrt(var), counting.n_evals,
                    f"surrogate + correction ({label}; {', '.join(dict.fromkeys(names))})", dof=dof)


# --- the chain correction (the first version): antithetic permutation chains, two-fold cross-fitting

def _chain_pairs(n: int, budget: int, chain_fraction: float) -> int:
    """Antithetic chain pairs of :func:`corrected_shapley` that fit ``chain_fraction`` of ``budget``.

    A pair costs at most 2·(n − 1) new masks, plus ∅ and the full coalition once for all
    chains; capping the chains' share at budget − 2 keeps those two inside the budget when
    ``chain_fraction`` is close to 1 (0.999 of 57 rounded down to 56 = 4·14 went one over).
    """
    return min(int(chain_fraction * budget), budget - 2) // (2 * (n - 1))


def _fill_from_pool(counting: CountingGame, budget: int, sizes, pool, gen: np.random.Generator) -> np.ndarray:
    """What is left of ``budget`` as distinct ``pool`` masks of the ``sizes`` strata, drawn uniformly (chapter 07)."""
    n = counting.n_players
    pool = np.unique(np.asarray(pool, dtype=bool).reshape(-1, n), axis=0)
    pool = pool[np.isin(pool.sum(axis=1), sizes)]
    rest = max(0, budget - counting.n_evals)
    chosen = pool[gen.permutation(len(pool))[:rest]]
    if len(chosen):
        counting(chosen)
    return chosen


def _corrected_chains(counting: CountingGame, budget: int, gen, model, n_samples, fit_kwargs,
                      keep_sizes, chain_fraction: float, pool) -> Estimate:
    """Antithetic chains correct, chains and stratified masks train, two-fold cross-fitted (see corrected_shapley)."""
    n = counting.n_players
    pairs = _chain_pairs(n, budget, chain_fraction)
    orders = np.argsort(gen.random((pairs, n)), axis=1)
    orders = np.concatenate([orders, orders[:, ::-1]])
    ranks = np.argsort(orders, axis=1)
    prefixes = ranks[:, None, :] < np.arange(n + 1)[None, :, None]           # (2p, n+1, n)
    chain_values = counting(prefixes.reshape(-1, n)).reshape(2 * pairs, n + 1)
    sizes = _check_keep_sizes(keep_sizes if keep_sizes is not None else list(range(1, n)), n)
    if pool is not None:
        strata = _fill_from_pool(counting, budget, sizes, pool, gen)
    else:
        strata = _fill_stratified(counting, budget, sizes, gen)
    strata_values = counting(strata) if len(strata) else np.zeros(0)
    fold = np.arange(pairs) % 2
    corrections, phis, phi_se, names = [], [], [], []
    for k in (0, 1):
        train_chains = np.concatenate([fold != k, fold != k])
        train_masks = np.concatenate([prefixes[train_chains].reshape(-1, n), strata])
        train_vals = np.concatenate([chain_values[train_chains].reshape(-1), strata_values])
        surrogate = fit_model(model, train_masks, train_vals, rng=gen, **fit_kwargs)
        names.append(surrogate.report["model"])
        phi = surrogate_shapley(surrogate, n_samples=n_samples, rng=gen)
        phis.append(phi.values)
        phi_se.append(phi.stderr)
        test_chains = np.concatenate([fold == k, fold == k])
        pre = prefixes[test_chains]
        resid = chain_values[test_chains] - surrogate.predict(pre.reshape(-1, n)).reshape(len(pre), n + 1)
        steps = np.diff(resid, axis=1)
        marg = np.empty_like(steps)
        marg[np.arange(len(steps))[:, None], orders[test_chains]] = steps
        half = len(marg) // 2
        corrections.append((marg[:half] + marg[half:]) / 2)
    samples = np.concatenate([phis[k] + corrections[k] for k in (0, 1)])
    share = np.array([len(c) for c in corrections]) / len(samples)          # each fold's weight in the mean
    mc_var = sum((w * se) ** 2 for w, se in zip(share, phi_se))             # φ(f) through the net (0 if exact)
    stderr = np.sqrt(samples.var(axis=0, ddof=1) / len(samples) + mc_var)
    return Estimate(samples.mean(axis=0), stderr, counting.n_evals,
                    f"surrogate + correction (chains; {', '.join(dict.fromkeys(names))})")


def _resolve_correction(correction: str, chain_fraction, keep_sizes, pool) -> str:
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    chain_only = [name for name, value in (("chain_fraction", chain_fraction), ("keep_sizes", keep_sizes),
                                           ("pool", pool)) if value is not None]
    if correction == "auto":
        return "chains" if chain_only else "strata"
    if correction == "strata" and chain_only:
        raise ValueError(f"{', '.join(chain_only)} apply to correction='chains' only (the stratified correction "
                         f"samples every size 1..n−1 afresh), got correction='strata'")
    return correction


def corrected_min_budget(n: int, chain_fraction: float | None = None) -> int:
    """The fewest real evaluations :func:`corrected_shapley` accepts (chapter 05).

    With ``chain_fraction=None`` (the stratified correction): ∅, N and, for every size 1..n−1,
    two masks in each of two folds or the whole size if it is that small, e.g. 4n − 2 for n >= 5. With a
    ``chain_fraction`` (the chain correction): 4 antithetic chains on that share of the budget.
    """
    if chain_fraction is None:
        budget = 2
        while not _strata_plan(n, budget)[3]:
            budget += 1
        return budget
    budget = int(np.ceil(8 * (n - 1) / chain_fraction))
    while _chain_pairs(n, budget, chain_fraction) < 4:
        budget += 1
    return budget


def corrected_shapley(game, budget: int, rng=None, keep_sizes=None, chain_fraction: float | None = None,
                      n_samples: int | None = None, pool=None, model="auto", correction: str = "auto",
                      design: str = "strata", **fit_kwargs) -> Estimate:
    """Surrogate Shapley plus an unbiased Monte Carlo correction of its error (chapter 05).

    Shapley values are linear in the game, so φ(v) = φ(f) + φ(v − f) for any surrogate f.
    φ(f) is computed through the surrogate (closed form for k-additive ones, all masks for
    L <= 20, else ``n_samples`` permutations, default 1000·L); φ(v − f) is estimated from real
    evaluations where the residual v − f is known. Cross-fitting keeps it unbiased: the budget
    is split into two independent halves, the surrogate that corrects one half was fitted on the
    other, so surrogate error cannot bias the estimate, whatever its size; a good surrogate
    only makes the correction's variance small. ``model`` picks the surrogate family
    (:func:`~minilib.surrogate_models.fit_model`): ``"auto"`` (default) fits the network and
    2-, 3- and 4-additive regressions on part of each half's training masks and keeps the one
    with the lowest held-out error; ``"mlp"``, ``"kadd2"``, ``"kadd3"``, ``"kadd4"``, a factory
    or a list of candidates also work. ``fit_kwargs`` configure the network (defaults: full-batch L-BFGS,
    no test set, ``exp`` head for positive values).

    ``correction="strata"`` (the default when neither ``chain_fraction``, ``keep_sizes`` nor
    ``pool`` is given): the halves are generalised to :data:`MAX_FOLDS` (4) independent folds
    when the budget allows (2 at the smallest budgets): every coalition size 1..n−1 gets the
    same number of distinct uniform masks in each fold (sizes with few coalitions are evaluated
    whole). Each fold is corrected by the surrogate fitted on all the other folds, and each
    evaluation corrects every player at once: within size t, φ_i(r) needs
    E[r(T) | i ∈ T] − E[r(T) | i ∉ T], estimated without bias by the mean of
    r(T)·(n/t·[i ∈ T] − n/(n−t)·[i ∉ T]), r centred by a constant from the other folds. Masks
    shared by folds are evaluated once, so it may spend a little less than ``budget``.
    ``design`` (stratified correction only): ``"strata"`` (default) evaluates a size whole when
    that costs no more than sampling it; ``"border"`` (shapiq's border trick, softened) also when
    it costs up to :data:`BORDER_FACTOR` (2) times as much, so every fold's surrogate trains on
    all the coalitions of the sizes nearest ∅ and N and their correction is exact (falls back to
    ``"strata"`` where the budget cannot afford it). With ``model="auto+"``
    (:func:`~minilib.surrogate_models.fit_auto_plus`) it is the most accurate configuration
    measured in ``benchmarks/shapiq_comparison.py``; neither is the default.
    ``correction="chains"`` (the first version; the default when one of those three is given):
    ``chain_fraction`` (default 0.5) of the budget on antithetic permutation chains that correct
    and train, the rest on distinct masks of the ``keep_sizes`` strata (default 1..n−1) that
    only train. ``pool`` (chapter 07, chains only): masks evaluated before, e.g. a shipped
    stage-1 table behind a store-backed game, from which the training masks are drawn uniformly
    instead of afresh; each still counts as a real evaluation.

    The target is the real game's Shapley value and the estimate is unbiased for it, so
    ``stderr`` is an honest standard error in :class:`~minilib.estimators.Estimate`'s sense,
    surrogate error included (the correction's standard error combined with φ(f)'s Monte Carlo
    error, zero when exact), with Welch–Satterthwaite degrees of freedom for the stratified
    correction. A budget below :func:`corrected_min_budget` raises
    :class:`~minilib.estimators.BudgetTooSmallError`.
    """
    counting = CountingGame(game)
    gen = _rng(rng)
    n = game.n_players
    if not isinstance(design, str) or design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
    correction = _resolve_correction(correction, chain_fraction, keep_sizes, pool)
    if design != "strata" and correction != "strata":
        raise ValueError(f"design={design!r} applies to the stratified correction only, got correction="
                         f"{correction!r} (chain_fraction, keep_sizes or pool select the chain correction)")
    if correction == "strata":
        budget = _check_budget(budget, corrected_min_budget(n), f"corrected_shapley with n={n} "
                               "(the empty and full coalitions, two masks per size in each half)")
        return _corrected_strata(counting, budget, gen, model, n_samples, fit_kwargs, design)
    chain_fraction = DEFAULT_CHAIN_FRACTION if chain_fraction is None else chain_fraction
    if not 0 < chain_fraction < 1:
        raise ValueError(f"chain_fraction must be in (0, 1), got {chain_fraction}")
    budget = _check_budget(budget, corrected_min_budget(n, chain_fraction),
                           f"corrected_shapley(chain_fraction={chain_fraction}) with n={n} (4 antithetic chains)")
    if pool is not None and (np.asarray(pool).ndim != 2 or np.asarray(pool).shape[1] != n
                             or np.asarray(pool).dtype != bool):
        raise ValueError(f"pool must be a bool array of keep-masks with shape (m, {n}), got "
                         f"{np.asarray(pool).dtype} array of shape {np.asarray(pool).shape}")
    return _corrected_chains(counting, budget, gen, model, n_samples, fit_kwargs, keep_sizes, chain_fraction, pool)
