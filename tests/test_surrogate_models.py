"""Tests of the pluggable surrogate families (``minilib.surrogate_models``), the stratified correction of
``corrected_shapley`` and the layout of the modules split out of ``minilib.surrogate`` (chapter 05).

Games have 5-9 players; the k-additive fits take milliseconds, so the module runs in seconds.
"""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from math import comb

import numpy as np
import pytest

import minilib as ml
from minilib import surrogate as S
from minilib import surrogate_estimators as SE
from minilib import surrogate_models as SM
from minilib.estimators import _uniform_masks
from minilib.games import TabularGame, all_coalitions

NEW_MODULES = ["surrogate_accuracy", "surrogate_values", "paper_pipeline", "surrogate_models", "surrogate_estimators"]


def mobius_game(n: int, order: int, seed: int = 0) -> tuple[TabularGame, dict]:
    """A random game with Möbius coefficients on every coalition of 1..order players, and those coefficients."""
    rng = np.random.default_rng(seed)
    coefs = {tuple(np.flatnonzero(t)): rng.normal(0, 1.0 / t.sum()) for t in SM.kadditive_terms(n, order)}
    masks = all_coalitions(n)
    values = 0.5 + sum(c * masks[:, list(t)].all(axis=1) for t, c in coefs.items())
    return TabularGame(values), coefs


# --- k-additive surrogates ---------------------------------------------------------------------

@pytest.mark.parametrize("order", [1, 2, 3])
def test_kadditive_fit_recovers_a_k_additive_game_and_its_shapley_values(order):
    n = 7
    game, coefs = mobius_game(n, order, seed=order)
    masks = all_coalitions(n)[np.random.default_rng(0).permutation(2 ** n)[:100]]
    fit = SM.fit_kadditive(masks, game(masks), order=order)
    assert np.abs(fit.predict(all_coalitions(n)) - game.values).max() < 1e-6      # exact off the training masks
    assert np.allclose(fit.coef, [coefs[tuple(np.flatnonzero(t))] for t in fit.terms], atol=1e-6)
    exact = ml.shapley.exact_shapley(game)
    assert np.allclose(fit.shapley_values(), exact, atol=1e-6)
    # the closed form is what enumerating the surrogate as a game gives, for any fit
    rough = SM.fit_kadditive(masks[:20], game(masks[:20]), order=2)
    assert np.allclose(rough.shapley_values(), ml.shapley.exact_shapley(rough), atol=1e-10)


def test_kadditive_ridge_is_chosen_by_leave_one_out_and_handles_more_terms_than_masks():
    n = 9                                                 # 3-additive: 129 terms from 60 masks
    game, _ = mobius_game(n, 2, seed=1)
    masks = ml.surrogate.sample_stratified_masks(n, 60, range(1, n), rng=0)
    fit = SM.fit_kadditive(masks, game(masks), order=3)
    assert len(fit.terms) == 129 and fit.ridge > 0 and np.isfinite(fit.report["loo_rmse"])
    # leave-one-out by brute force at the chosen penalty equals the closed form
    unique = np.unique(masks, axis=0)
    errors = []
    for row in range(len(unique)):
        keep = np.arange(len(unique)) != row
        one_out = SM.fit_kadditive(unique[keep], game(unique[keep]), order=3, ridge=fit.ridge)
        errors.append(one_out.predict(unique[row: row + 1])[0] - game(unique[row: row + 1])[0])
    again = SM.fit_kadditive(unique, game(unique), order=3, ridge=fit.ridge)
    assert np.sqrt(np.mean(np.square(errors))) == pytest.approx(again.report["loo_rmse"], rel=1e-6)


def test_kadditive_bad_inputs_name_the_argument():
    masks = all_coalitions(4)
    with pytest.raises(ValueError, match=r"order must be an int in 1..n_players=4"):
        SM.fit_kadditive(masks, masks.sum(1), order=5)
    with pytest.raises(ValueError, match="ridge must be a number >= 0"):
        SM.fit_kadditive(masks, masks.sum(1), ridge=-1.0)
    with pytest.raises(ValueError, match="MAX_KADDITIVE_TERMS"):
        SM.kadditive_terms(60, 4)
    with pytest.raises(ValueError, match="3 columns|4 columns"):
        SM.fit_kadditive(masks, masks.sum(1)).predict(np.ones((2, 3), bool))


# --- choosing a family by held-out error ---------------------------------------------------------

def test_auto_keeps_the_candidate_with_the_lowest_held_out_error():
    n = 7
    game, _ = mobius_game(n, 3, seed=2)                    # exactly 3-additive: kadd3 has no held-out error
    masks = ml.surrogate.sample_stratified_masks(n, 200, range(1, n), rng=0)
    fit = SM.fit_model("auto", masks, game(masks), rng=0, max_epochs=20)
    scores = fit.report["selection"]
    assert set(scores) == set(SM.AUTO_MODELS)
    assert fit.report["model"] == min(scores, key=scores.get) == "kadd3"
    assert scores["kadd3"] < 1e-4 * min(scores["mlp"], scores["kadd2"])         # ~0: only the ridge's pull
    assert isinstance(fit, SM.KAdditiveSurrogate) and fit.n_game_evals == len(np.unique(masks, axis=0))
    # a product game (like ppl_ratio) is smooth but of every order: the exp-headed network fits it best
    w = np.linspace(0.2, 1.2, n)
    product = TabularGame(np.exp(-(~all_coalitions(n)).astype(float) @ w))
    best = SM.fit_model(["kadd2", "mlp"], masks, product(masks), rng=0)
    assert best.report["model"] == "mlp" and best.report["selection"]["mlp"] < best.report["selection"]["kadd2"]


def test_factories_and_single_models_and_their_errors():
    n = 5
    masks = all_coalitions(n)
    values = masks @ np.arange(1.0, n + 1)

    def mean_model(m, v, rng):
        return SM.fit_kadditive(m, v, order=1)

    fit = SM.fit_model(mean_model, masks, values, rng=0)
    assert fit.report["model"] == "mean_model" and fit.report["selection"] == {}   # one candidate: no selection
    with pytest.raises(ValueError, match=r"model must be 'auto', one of \(.mlp., .kadd2., .kadd3., .kadd4., .kadd2h."):
        SM.fit_model("gbm", masks, values)
    with pytest.raises(ValueError, match=r"fit options \['max_epochs'\] configure the 'mlp' surrogate"):
        SM.fit_model("kadd2", masks, values, max_epochs=3)
    with pytest.raises(ValueError, match="at least one candidate"):
        SM.fit_model([], masks, values)


def test_surrogate_shapley_of_a_kadditive_surrogate_in_every_mode():
    n = 7
    game, _ = mobius_game(n, 2, seed=3)
    fit = SM.fit_kadditive(all_coalitions(n), game.values, order=2)
    exact = ml.shapley.exact_shapley(game)
    closed = S.surrogate_shapley(fit)
    assert closed.method == "surrogate (exact through the net)" and np.allclose(closed.values, exact, atol=1e-8)
    perm = S.surrogate_shapley(fit, n_samples=40, rng=0, method="permutation")
    assert np.allclose(perm.values, exact, atol=1e-8)      # antithetic pairs are exact on 2-additive games
    sizes = [6, 3]
    ham = S.surrogate_shapley(fit, n_samples=400, rng=0, method="hamming", keep_sizes=sizes)
    target = S.surrogate_semivalue_exact(fit, ml.estimators.hamming_size_weights(n, sizes))
    assert np.all(np.abs(ham.values - target) <= 4 * ham.stderr + 1e-9)
    # the generic kernel makes the same draws as the network's: brute force on the same base masks
    fast = ml.surrogate_values._hamming_marginals(fit, 20, sizes, np.random.default_rng(5))
    gen = np.random.default_rng(5)
    bases = np.concatenate([_uniform_masks(gen, n, np.arange(n), k, 10) for k in sizes])
    brute = np.array([[fit.predict(b | np.eye(n, dtype=bool)[i])[0] - fit.predict(b & ~np.eye(n, dtype=bool)[i])[0]
                       for i in range(n)] for b in bases])
    assert np.allclose(fast, brute, atol=1e-10)


# --- the stratified correction ---------------------------------------------------------------------

def test_strata_plan_never_exceeds_the_budget_and_the_minimum_is_the_least_that_runs():
    for n in range(1, 14):
        low = S.corrected_min_budget(n)
        assert low == 2 + sum(min(comb(n, t), 4) for t in range(1, n)) or n <= 3
        assert not SE._strata_plan(n, low - 1)[3] if low > 2 else True
        for budget in range(low, low + 12 * n):
            folds = SE._n_folds(n, budget)                            # up to 4 where the budget allows
            assert 2 <= folds <= SE.MAX_FOLDS and (n < 3 or SE._n_folds(n, 10 * n * n) == SE.MAX_FOLDS)
            enum, sampled, m, feasible = SE._strata_plan(n, budget, folds)
            assert feasible and sorted(enum + sampled) == list(range(1, n))
            assert 2 + sum(comb(n, t) for t in enum) + folds * m * len(sampled) <= budget, (n, budget)
            assert all(comb(n, t) > folds * max(m, 2) for t in sampled)   # small sizes are evaluated whole


def test_strata_correction_spends_at_most_the_budget_and_is_exact_with_every_coalition():
    n = 6
    game, _ = mobius_game(n, 4, seed=4)
    exact = ml.shapley.exact_shapley(game)
    for budget in (S.corrected_min_budget(n), 40, 63):
        for seed in range(3):
            est = S.corrected_shapley(game, budget, rng=seed, model="kadd2")
            assert est.n_evals <= budget and np.all(np.isfinite(est.stderr)) and np.all(est.stderr > 0)
            assert est.method.startswith("surrogate + correction (strata")
    whole = S.corrected_shapley(game, 2 ** n, rng=0)          # every size evaluated whole: no surrogate needed
    assert np.allclose(whole.values, exact, atol=1e-12) and np.all(whole.stderr == 0) and whole.n_evals == 2 ** n


def test_strata_correction_is_unbiased_whatever_the_surrogate():
    """A 2-additive surrogate of a game with 4- and 5-way terms: biased alone, unbiased corrected (150 seeds)."""
    n, seeds = 7, 150
    game, _ = mobius_game(n, 5, seed=5)
    exact = ml.shapley.exact_shapley(game)
    est = np.array([S.corrected_shapley(game, 60, rng=s, model="kadd2").values for s in range(seeds)])
    se = est.std(axis=0, ddof=1) / np.sqrt(seeds)
    assert np.all(np.abs(est.mean(axis=0) - exact) <= 3.5 * se), (est.mean(axis=0) - exact) / se
    plain = np.array([S.surrogate_estimate(game, 60, rng=s, model="kadd2").values for s in range(20)])
    assert np.abs(plain.mean(axis=0) - exact).max() > 10 * se.max()      # the test has teeth


def test_correction_modes_and_their_options():
    n = 6
    game, _ = mobius_game(n, 3, seed=6)
    assert "chains" in S.corrected_shapley(game, 120, rng=0, chain_fraction=0.5, model="kadd2").method
    assert "chains" in S.corrected_shapley(game, 120, rng=0, keep_sizes=[5, 4], model="kadd2").method
    assert "strata" in S.corrected_shapley(game, 120, rng=0, model="kadd2").method
    with pytest.raises(ValueError, match=r"keep_sizes apply to correction='chains' only"):
        S.corrected_shapley(game, 120, keep_sizes=[5, 4], correction="strata")
    with pytest.raises(ValueError, match=r"correction must be one of \('auto', 'strata', 'chains'\)"):
        S.corrected_shapley(game, 120, correction="kernel")


def test_auto_corrected_finds_the_family_that_is_exact():
    """A 3-additive game: auto picks kadd3 in both halves, so the correction has nothing left to do."""
    n = 8
    game, _ = mobius_game(n, 3, seed=7)
    est = S.corrected_shapley(game, 160, rng=0)
    assert "kadd3" in est.method and np.allclose(est.values, ml.shapley.exact_shapley(game), atol=1e-8)


# --- the module layout -----------------------------------------------------------------------------

@pytest.mark.parametrize("module", NEW_MODULES)
def test_new_modules_import_on_their_own_and_name_their_chapters(module):
    """Each module imports first in a fresh interpreter (no import cycle) and follows the docstring convention."""
    proc = subprocess.run([sys.executable, "-c", f"import minilib.{module}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    mod = importlib.import_module(f"minilib.{module}")
    assert re.search(r"[Cc]hapter \d\d", mod.__doc__)
    missing = [name for name, obj in vars(mod).items()
               if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
               and obj.__module__ == mod.__name__ and not re.search(r"[Cc]hapter \d\d", inspect.getdoc(obj) or "")]
    assert not missing, missing


def test_every_name_of_the_old_surrogate_module_still_resolves():
    old = ["MAX_EXACT_SURROGATE_PLAYERS", "SURROGATE_SAMPLES_PER_PLAYER", "OUTPUTS", "OPTIMIZERS", "SurrogateMLP",
           "Surrogate", "check_training_data", "stratified_split", "accuracy_report", "fit_surrogate",
           "default_surrogate_samples", "surrogate_shapley", "surrogate_semivalue_exact", "sample_stratified_masks",
           "stage3_query_weights", "learning_curve", "PipelineResult", "paper_pipeline", "surrogate_estimate",
           "corrected_min_budget", "corrected_shapley"]
    for name in old:
        assert getattr(ml.surrogate, name) is not None, name
        assert name in dir(ml.surrogate)
    assert ml.surrogate.corrected_shapley is ml.surrogate_estimators.corrected_shapley
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ml.surrogate.nope
