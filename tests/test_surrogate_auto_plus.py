"""Tests of the opt-in surrogate ``model="auto+"`` and mask ``design="border"`` of ``corrected_shapley``
(issue 11: beat the best shapiq approximator at equal budget; chapter 05).

``auto+`` is a hierarchically shrunk k-additive regression (``fit_kadditive(decay="loo")``), blended with an
exp-link 2-additive one for positive values by held-out error; ``border`` evaluates the sizes next to ∅ and
N whole where that costs up to twice what sampling them would. Neither is a default: the defaults' results
are pinned below. Properties: the budget is never exceeded and counts distinct evaluations, the estimate
is unbiased and its standard error covers about nominally, bad values name the argument.
"""

from __future__ import annotations

import warnings
from functools import partial
from math import comb

import numpy as np
import pytest

import minilib as ml
from minilib import surrogate as S
from minilib import surrogate_estimators as SE
from minilib import surrogate_models as SM
from minilib.games import TabularGame, all_coalitions

from test_estimator_coverage import closed_form_game, coverage
from test_surrogate_models import mobius_game


def positive_game(n: int, seed: int) -> TabularGame:
    """exp of a random 3-additive game plus a gate: positive, multiplicative, not k-additive."""
    game, _ = mobius_game(n, 3, seed=seed)
    masks = all_coalitions(n)
    return TabularGame(np.exp(0.6 * game.values) * (0.2 + masks[:, 0]))


class DistinctGame:
    """Records every distinct coalition asked for (the budget counts distinct evaluations)."""

    def __init__(self, game):
        self.game, self.n_players, self.seen = game, game.n_players, set()

    def __call__(self, coalitions):
        masks = np.asarray(coalitions, dtype=bool)
        self.seen.update(row.tobytes() for row in masks)
        return self.game(masks)


# --- the defaults are unchanged ----------------------------------------------------------------------

def test_default_results_are_unchanged():
    """Pinned before the new options existed (closed-form game, 8 players, budget 120, rng=7)."""
    game = closed_form_game(8, 2)
    est = S.corrected_shapley(game, 120, rng=7, model="kadd3")
    assert est.n_evals == 100 and est.method == "surrogate + correction (strata; kadd3)"
    assert np.allclose(est.values, [2.095189104931, 1.529137784346, 1.245927556823, -1.066751923084,
                                    2.059743650662, 2.318817007867, 1.389108180111, 2.350191499804], atol=1e-10)
    assert np.allclose(est.stderr[:2], [0.051520449624, 0.041353735057], atol=1e-10)
    again = S.corrected_shapley(game, 120, rng=7, model="kadd3", design="strata")
    assert np.array_equal(again.values, est.values) and np.array_equal(again.stderr, est.stderr)
    masks = all_coalitions(8)[::3]
    fit = SM.fit_kadditive(masks, game(masks), order=3)
    assert fit.report["decay"] == 1.0 and fit.ridge == pytest.approx(0.0031622776601683794)
    assert np.allclose(fit.shapley_values()[:2], [1.997844306897, 1.584152303294], atol=1e-10)
    assert SM.AUTO_MODELS == ("mlp", "kadd2", "kadd3", "kadd4")          # "auto" does not use the new families


# --- the new surrogate families -------------------------------------------------------------------------

def test_hierarchical_decay_keeps_exact_fits_and_chooses_gamma_from_the_grid():
    n = 7
    game, _ = mobius_game(n, 3, seed=1)
    masks = all_coalitions(n)
    one = SM.fit_kadditive(masks, game.values, order=3, decay=1.0)
    plain = SM.fit_kadditive(masks, game.values, order=3)
    assert np.allclose(one.coef, plain.coef) and one.ridge == plain.ridge
    hier = SM.fit_kadditive(masks, game.values, order=4, decay="loo")
    assert hier.report["decay"] in SM.DECAY_GRID
    assert np.allclose(hier.shapley_values(), ml.shapley.exact_shapley(game), atol=1e-5)
    fixed = SM.fit_kadditive(masks[::2], game.values[::2], order=4, decay=0.1)
    assert fixed.report["decay"] == 0.1 and np.all(np.isfinite(fixed.coef))


def test_exp_kadditive_recovers_a_multiplicative_game():
    n = 8
    base, _ = mobius_game(n, 2, seed=2)
    masks = all_coalitions(n)
    values = np.exp(base.values)
    rows = np.random.default_rng(0).choice(len(masks), 120, replace=False)
    fit = SM.fit_exp_kadditive(masks[rows], values[rows], order=2)
    assert np.allclose(fit.predict(masks), values, rtol=1e-5)
    est = ml.surrogate.surrogate_shapley(fit)                          # no closed form: all 2**8 masks
    assert np.allclose(est.values, ml.shapley.exact_shapley(TabularGame(values)), rtol=1e-4)


def test_auto_plus_blends_only_for_positive_values_and_fits_exact_games_exactly():
    n = 8
    game, _ = mobius_game(n, 3, seed=3)                                # has negative values: k-additive only
    masks = all_coalitions(n)[np.random.default_rng(0).choice(2 ** n, 128, replace=False)]
    fit = SM.fit_model("auto+", masks, game(masks), rng=0)
    assert isinstance(fit, SM.KAdditiveSurrogate) and fit.report["blend"] == 1.0 and fit.report["model"] == "auto+"
    assert fit.report["max_order"] == 4 and fit.order == 3            # order 4 by room, 3 by leave-one-out
    assert np.allclose(fit.shapley_values(), ml.shapley.exact_shapley(game), atol=1e-6)
    base, _ = mobius_game(n, 2, seed=4)
    mult = TabularGame(np.exp(base.values))                            # exactly exp-2-additive: the exp part wins
    fit = SM.fit_model("auto+", masks, mult(masks), rng=0)
    assert fit.report["blend"] < 1.0 and np.allclose(fit.predict(all_coalitions(n)), mult.values, rtol=1e-4)
    assert SM.auto_plus_order(10, 300) == 4 and SM.auto_plus_order(30, 1000) == 2 and SM.auto_plus_order(5, 2) == 1


# --- the border design ------------------------------------------------------------------------------

def test_border_plan_never_exceeds_the_budget_and_evaluates_more_sizes_whole():
    for n in range(2, 14):
        low = S.corrected_min_budget(n)
        for budget in range(low, low + 40 * n, 7):
            folds = SE._n_folds(n, budget, "border")
            assert folds == SE._n_folds(n, budget)                     # the folds do not depend on the design
            enum, sampled, m, feasible = SE._design_plan(n, budget, folds, "border")
            assert feasible and sorted(enum + sampled) == list(range(1, n))
            assert 2 + sum(comb(n, t) for t in enum) + folds * m * len(sampled) <= budget, (n, budget)
            assert set(SE._strata_plan(n, budget, folds)[0]) <= set(enum)
    assert SE._design_plan(12, 480, 4, "border")[0] == [1, 2, 10, 11]  # the teaching table at 40·n
    assert SE._design_plan(10, 400, 4, "border") == SE._strata_plan(10, 400, 4)


@pytest.mark.parametrize("n,budget", [(6, None), (8, 120), (9, 250)])
def test_border_spends_at_most_the_budget_counted_in_distinct_evaluations(n, budget):
    budget = budget or S.corrected_min_budget(n)
    for seed in range(3):
        game = DistinctGame(positive_game(n, seed))
        est = S.corrected_shapley(game, budget, rng=seed, model="auto+", design="border")
        assert est.n_evals == len(game.seen) <= budget
        assert est.method.startswith("surrogate + correction (strata, border; auto+")
        assert np.all(np.isfinite(est.values)) and np.all(np.isfinite(est.stderr))


def test_border_with_every_coalition_is_exact():
    game = positive_game(6, 0)
    est = S.corrected_shapley(game, 2 ** 6, rng=0, model="auto+", design="border")
    assert np.allclose(est.values, ml.shapley.exact_shapley(game), atol=1e-12) and np.all(est.stderr == 0)


@pytest.mark.parametrize("kind", ["signed", "positive"])
def test_auto_plus_border_is_unbiased(kind):
    """A game with 4- and 5-way terms (k-additive path) and a positive gated one (blend path), 150 seeds."""
    n, seeds = 7, 150
    game = mobius_game(n, 5, seed=5)[0] if kind == "signed" else positive_game(n, 5)
    exact = ml.shapley.exact_shapley(game)
    est = np.array([S.corrected_shapley(game, 60, rng=s, model="auto+", design="border").values
                    for s in range(seeds)])
    se = est.std(axis=0, ddof=1) / np.sqrt(seeds)
    assert np.all(se > 0)
    assert np.all(np.abs(est.mean(axis=0) - exact) <= 3.5 * se), (est.mean(axis=0) - exact) / se


@pytest.mark.parametrize("kind", ["signed", "positive"])
def test_auto_plus_border_intervals_cover_about_nominally(kind):
    """Nominal 95 % intervals over 200 seeds and 8 players (budget 120 of 256 coalitions) cover 90-98 %.

    Measured: 0.943 (signed: the k-additive path) and 0.943 (positive: the exp-link part wins the blend)."""
    n = 8
    game = closed_form_game(n, seed=2) if kind == "signed" else positive_game(n, 6)
    target = game.shapley_values() if kind == "signed" else ml.shapley.exact_shapley(game)
    estimator = partial(S.corrected_shapley, model="auto+", design="border")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        covered, undefined = coverage(estimator, game, 120, target, seeds=200)
    assert 0.90 <= covered <= 0.98, covered
    assert undefined <= 0.02, undefined


# --- bad inputs ------------------------------------------------------------------------------------------

def test_bad_inputs_name_the_argument():
    game = positive_game(6, 1)
    for design in ("grid", None, 2):
        with pytest.raises(ValueError, match=r"design must be one of \('strata', 'border'\)"):
            S.corrected_shapley(game, 40, design=design)
    with pytest.raises(ValueError, match=r"design='border' applies to the stratified correction only"):
        S.corrected_shapley(game, 120, design="border", chain_fraction=0.5)
    masks = all_coalitions(6)
    for decay in (0, 1.5, -0.1, "yes", True):
        with pytest.raises(ValueError, match=r"decay must be None, 'loo' or a number in \(0, 1\]"):
            SM.fit_kadditive(masks, game(masks), decay=decay)
    with pytest.raises(ValueError, match=r"values must be positive for an exp-link surrogate"):
        SM.fit_exp_kadditive(masks, game(masks) - 1.0)
    with pytest.raises(ValueError, match=r"fit options \['max_epochs'\] configure the 'mlp' surrogate"):
        SM.fit_model("auto+", masks, game(masks), max_epochs=3)
    with pytest.raises(ml.estimators.BudgetTooSmallError):
        S.corrected_shapley(game, S.corrected_min_budget(6) - 1, model="auto+", design="border")
