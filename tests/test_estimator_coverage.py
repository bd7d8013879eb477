"""Coverage of the standard errors of minilib.estimators and of the corrected surrogate estimator
(minilib.surrogate_estimators.corrected_shapley): do nominal 95 % intervals cover 95 %?

Every estimator that reports a ``stderr`` runs 300 times on a game with closed-form Shapley values
(a sum of minilib's toy games: pairwise terms, two unanimity games, a glove game) at a budget
where its standard error is defined. Counted over player-seed pairs, ``Estimate.confidence_interval``
(t quantiles with the estimator's degrees of freedom) must cover the exact value 90–98 % of the
time, and at these budgets almost no interval may be undefined (NaN). Before the fix (normal
quantiles, NaN variances summed as 0, Neyman's pilots steering their own strata), the same cases
covered: permutation 0.94, antithetic 0.93, proportional 0.93, Neyman 0.68, Hamming 0.92; and
proportional stratification with 7 players at budget 100 covered 0.52, with ``stderr == 0`` for
41 % of player-runs.

Known limits (not tested here, stated in the report of the change): with two or three antithetic
pairs, or on games whose marginals are mostly 0 with rare jumps (an airport game), samples often
agree by chance, the standard error is 0 and coverage falls to 70–85 %.
"""

from __future__ import annotations

import warnings
from functools import partial

import numpy as np
import pytest

import minilib as ml

G, S, E = ml.games, ml.shapley, ml.estimators
SEEDS = 300


class SumGame(G.Game):
    """A weighted sum of closed-form games; its Shapley value is the same sum of theirs."""

    def __init__(self, parts):
        self.parts, self.n_players = parts, parts[0][1].n_players

    def value(self, coalitions):
        return sum(w * g(coalitions) for w, g in self.parts)

    def shapley_values(self):
        return sum(w * g.shapley_values() for w, g in self.parts)


def closed_form_game(n: int, seed: int) -> SumGame:
    rng = np.random.default_rng(seed)
    return SumGame([(1.0, G.PairwiseGame(rng.normal(1.0, 0.5, n), np.triu(rng.normal(0.0, 0.5, (n, n)), 1))),
                    (2.0, G.UnanimityGame(n, [0, 1, 2])), (-1.5, G.UnanimityGame(n, [1, 3, 4])),
                    (1.0, G.GloveGame(range(0, n, 2), range(1, n, 2)))])


def coverage(estimator, game, budget: int, target: np.ndarray, seeds: int = SEEDS) -> tuple[float, float]:
    """(share of defined 95 % intervals that hold the target, share of undefined intervals)."""
    hits, undefined = [], 0
    for seed in range(seeds):
        est = estimator(game, budget, np.random.default_rng(seed))
        low, high = est.confidence_interval(0.95)
        defined = ~np.isnan(low)
        hits += ((low <= target + 1e-12) & (target - 1e-12 <= high))[defined].tolist()
        undefined += int((~defined).sum())
    return float(np.mean(hits)), undefined / (seeds * game.n_players)


def test_the_closed_form_is_the_exact_shapley_value():
    for n, seed in [(7, 1), (8, 2)]:
        game = closed_form_game(n, seed)
        assert np.allclose(game.shapley_values(), S.exact_shapley(game))


CASES = {   # name: (estimator, n, budget); measured coverage (400 seeds) in the comment
    "permutation": (partial(E.permutation_shapley, antithetic=False), 7, 100),         # 0.951
    "permutation_antithetic": (E.permutation_shapley, 7, 100),                          # 0.945
    "stratified_proportional": (partial(E.stratified_shapley, allocation="proportional"), 8, 256),  # 0.947
    "stratified_neyman": (E.stratified_shapley, 8, 220),                                # 0.95
    "hamming": (lambda game, budget, rng: E.hamming_semivalue(game, budget, (6, 4), rng), 7, 64),  # 0.954
    # the stratified residual correction on top of each surrogate family; 120 of the 256 coalitions of 8
    # players (at 2**8 every size is evaluated whole and the estimate is exact, with stderr 0)
    "corrected_kadd2": (partial(ml.surrogate.corrected_shapley, model="kadd2"), 8, 120),   # 0.928
    "corrected_kadd3": (partial(ml.surrogate.corrected_shapley, model="kadd3"), 8, 120),   # 0.917
    "corrected_auto": (ml.surrogate.corrected_shapley, 8, 120),   # 0.938 (200 seeds, 2 folds); ~80 s: many fits
}


@pytest.mark.parametrize("name", list(CASES))
def test_nominal_95_percent_intervals_cover_90_to_98_percent(name):
    estimator, n, budget = CASES[name]
    game = closed_form_game(n, seed=n - 6)
    target = E.hamming_semivalue_exact(game, (6, 4)) if name == "hamming" else game.shapley_values()
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # a real run of each method: no Neyman fallback
        covered, undefined = coverage(estimator, game, budget, target)
    assert 0.90 <= covered <= 0.98, (name, covered)
    assert undefined <= 0.02, (name, undefined)


def test_one_sample_strata_give_nan_not_a_false_zero():
    """The case of the issue: 7 players, budget 100, proportional (stderr was 0 in 41 % of runs)."""
    game = closed_form_game(7, seed=1)
    estimator = partial(E.stratified_shapley, allocation="proportional")
    zeros = sum(int((estimator(game, 100, np.random.default_rng(s)).stderr == 0).sum()) for s in range(50))
    assert zeros == 0
    covered, undefined = coverage(estimator, game, 100, game.shapley_values())
    assert 0.90 <= covered <= 0.98, covered          # measured 0.958
    assert undefined < 0.4, undefined                 # measured 0.25: strata with one sample say "unknown"
