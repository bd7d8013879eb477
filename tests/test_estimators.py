"""minilib.estimators: Monte Carlo Shapley estimators, the paper's Hamming semivalue, metrics.

The properties that matter:
- every Shapley estimator is unbiased: over many seeds its mean lies within 3 standard errors
  of the exact value (permutation with and without antithetic pairs, stratified with
  proportional allocation), and the same check rejects an estimator of something else;
  Neyman allocation is *measurably biased* (its pilot samples both steer the allocation and
  enter the mean), which is pinned down here as a strict xfail plus a bound on its size;
- the Hamming-weight estimator is unbiased for ``hamming_semivalue_exact``, which equals the
  paper's procedure enumerated exactly, and ``hamming_size_weights`` is the paper's table;
- the budget is never exceeded and ``n_evals`` counts exactly the distinct coalitions the
  game received (checked with a counter of our own around the game);
- a fixed ``rng`` reproduces the values exactly, and different seeds give different values;
- all estimators are exact on additive games, antithetic permutation also on pairwise games;
- bad inputs raise clear errors (the message of a too-small budget names the minimum);
- the metrics, the exact strata moments and the budget-sweep helpers give brute-force or
  hand-computed answers.
"""

from __future__ import annotations

from functools import partial
from itertools import combinations

import numpy as np
import pandas as pd
import pytest

import minilib as ml

G, S, E = ml.games, ml.shapley, ml.estimators


def structured_game(n: int, seed: int = 0) -> G.TabularGame:
    """Main effects, random pairwise terms and two unanimity games (third and fourth order)."""
    rng = np.random.default_rng(seed)
    X = G.all_coalitions(n)
    v = G.PairwiseGame(rng.normal(1.0, 0.5, n), np.triu(rng.normal(0.0, 0.5, (n, n)), 1))(X)
    v += 2.0 * G.UnanimityGame(n, [0, 1, 2])(X) - 1.5 * G.UnanimityGame(n, [1, 3, 4, 5])(X)
    return G.TabularGame(v)


class Recorder(G.Game):
    """Our own counter: every coalition the estimator's game wrapper forwards to the game."""

    def __init__(self, game):
        self.game, self.n_players = game, game.n_players
        self.rows = 0
        self.distinct: set[bytes] = set()

    def value(self, coalitions: np.ndarray) -> np.ndarray:
        self.rows += len(coalitions)
        self.distinct.update(np.packbits(c).tobytes() for c in coalitions)
        return self.game(coalitions)


KEEP6 = (5, 4, 3)  # strata of the Hamming estimator on 6 players


def hamming6(game, budget, rng=None):
    return E.hamming_semivalue(game, budget, KEEP6, rng)

ESTIMATORS = {
    "permutation": partial(E.permutation_shapley, antithetic=False),
    "permutation_antithetic": partial(E.permutation_shapley, antithetic=True),
    "stratified_proportional": partial(E.stratified_shapley, allocation="proportional"),
    "stratified_neyman": partial(E.stratified_shapley, allocation="neyman"),
    "hamming": hamming6,
    "kernel_shap": E.kernel_shap,
}
MINIMUM6 = {  # the fewest evaluations each estimator accepts with n = 6 players
    "permutation": 2 + 5, "permutation_antithetic": 2 + 10,
    "stratified_proportional": 2 + 12 + 2 * 6 * 4, "stratified_neyman": 2 + 12 + 2 * 2 * 6 * 4,
    "hamming": 3 * 7, "kernel_shap": 2 * 6 + 2, "shap_permutation": 2 * 6 + 1,
}


def z_scores(estimates: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(mean − target) / standard error of the mean, per player."""
    se = estimates.std(axis=0, ddof=1) / np.sqrt(len(estimates))
    return (estimates.mean(axis=0) - target) / se


def many(estimator, game, budget: int, seeds: int) -> np.ndarray:
    return np.array([estimator(game, budget, np.random.default_rng(s)).values for s in range(seeds)])


# ---- unbiasedness --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def game6():
    return structured_game(6)


@pytest.fixture(scope="module")
def game8():
    return structured_game(8, seed=1)


@pytest.mark.parametrize("antithetic", [False, True])
def test_permutation_is_unbiased(game6, antithetic):
    est = many(partial(E.permutation_shapley, antithetic=antithetic), game6, 30, 1500)
    z = z_scores(est, S.exact_shapley(game6))
    assert np.abs(z).max() < 3, z


def test_unbiasedness_check_rejects_an_estimator_of_something_else(game6):
    # the Hamming estimator targets a semivalue, not Shapley: the same check must notice
    est = many(hamming6, game6, 42, 300)
    assert np.abs(z_scores(est, S.exact_shapley(game6))).max() > 10


@pytest.fixture(scope="module")
def stratified_runs(game8):
    """Estimates of both allocations on an 8-player game (budget 220 of 256 coalitions)."""
    return {a: many(partial(E.stratified_shapley, allocation=a), game8, 220, 200) for a in ("proportional", "neyman")}


def test_stratified_proportional_is_unbiased(game8, stratified_runs):
    z = z_scores(stratified_runs["proportional"], S.exact_shapley(game8))
    assert np.abs(z).max() < 3, z


@pytest.mark.xfail(strict=True, reason="Neyman allocation is biased: the two pilot samples per stratum set its "
                   "share of the budget *and* enter its mean, so strata whose pilots happened to agree get few "
                   "samples (measured: 4.0 standard errors on this game with 200 seeds)")
def test_stratified_neyman_is_unbiased(game8, stratified_runs):
    z = z_scores(stratified_runs["neyman"], S.exact_shapley(game8))
    assert np.abs(z).max() < 3, z


def test_stratified_neyman_bias_is_a_small_part_of_its_error(game8, stratified_runs):
    est, phi = stratified_runs["neyman"], S.exact_shapley(game8)
    bias2 = np.sum((est.mean(axis=0) - phi) ** 2)
    mse = np.mean(np.sum((est - phi) ** 2, axis=1))
    assert 0 < bias2 / mse < 0.2, bias2 / mse


def test_hamming_estimator_is_unbiased_for_its_semivalue(game6):
    est = many(hamming6, game6, 42, 1500)
    z = z_scores(est, E.hamming_semivalue_exact(game6, KEEP6))
    assert np.abs(z).max() < 3, z


def test_strata_moments_by_brute_force(game6):
    mean, sd = E.strata_moments(game6)
    for i in range(6):
        others = [j for j in range(6) if j != i]
        for s in range(6):
            d = [game6.values[sum(1 << j for j in c) | 1 << i] - game6.values[sum(1 << j for j in c)]
                 for c in combinations(others, s)]
            assert np.isclose(mean[i, s], np.mean(d)) and np.isclose(sd[i, s], np.std(d), atol=1e-7)
    assert np.allclose(mean.mean(axis=1), S.exact_shapley(game6))   # size strata average to Shapley


# ---- the Hamming semivalue ---------------------------------------------------------------

@pytest.mark.parametrize("n, keep", [(6, KEEP6), (12, (11, 10, 9, 8, 7)), (32, (30, 27, 24, 21, 18)),
                                     (5, (0, 5)), (7, (3, 3, 6))])
def test_hamming_size_weights_sum_to_one(n, keep):
    w = E.hamming_size_weights(n, keep)
    assert w.shape == (n,) and (w >= 0).all() and np.isclose(w.sum(), 1.0)


def test_hamming_size_weights_are_the_papers_table():
    w = E.hamming_size_weights(32, (30, 27, 24, 21, 18))
    table = {30: .0125, 29: .1875, 27: .0312, 26: .1688, 24: .05, 23: .15, 21: .0688, 20: .1313,
             18: .0875, 17: .1125}
    expected = np.array([table.get(s, 0.0) for s in range(32)])
    assert np.allclose(w, expected, atol=6e-5)
    assert set(np.flatnonzero(w)) == set(table)


def test_hamming_semivalue_exact_equals_the_procedure_enumerated(game6):
    """Every base mask of every stratum, every flip: the paper's estimator with infinite samples."""
    n = game6.n_players
    expected = np.zeros(n)
    for k in KEEP6:
        bases = [set(c) for c in combinations(range(n), k)]
        for i in range(n):
            flips = [game6.values[sum(1 << j for j in b | {i})] - game6.values[sum(1 << j for j in b - {i})]
                     for b in bases]
            expected[i] += np.mean(flips) / len(KEEP6)
    assert np.allclose(E.hamming_semivalue_exact(game6, KEEP6), expected, atol=1e-12)


def test_hamming_semivalue_exact_equals_the_brute_force_semivalue(game6):
    n, w = game6.n_players, E.hamming_size_weights(6, KEEP6)
    brute = np.zeros(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for s in range(n):
            for c in combinations(others, s):
                m = sum(1 << j for j in c)
                brute[i] += w[s] / len(list(combinations(others, s))) * (game6.values[m | 1 << i] - game6.values[m])
    assert np.allclose(E.hamming_semivalue_exact(game6, KEEP6), brute, atol=1e-12)
    # and with these weights it is not the Shapley value
    assert not np.allclose(brute, S.exact_shapley(game6), atol=1e-3)


# ---- budgets and evaluation counts ---------------------------------------------------------

@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.parametrize("extra", [0, 1, 7, 23])
def test_budget_is_never_exceeded_and_evaluations_are_counted_exactly(game6, name, extra):
    budget = MINIMUM6[name] + extra
    game = Recorder(game6)
    est = ESTIMATORS[name](game, budget, np.random.default_rng(extra))
    assert est.n_evals == len(game.distinct) == game.rows   # each distinct coalition sent once
    assert est.n_evals <= budget
    assert est.values.shape == est.stderr.shape == (6,)


@pytest.mark.parametrize("name", ["permutation", "permutation_antithetic", "hamming"])
def test_running_trace_ends_at_the_estimate(game8, name):
    if name == "hamming":
        est = E.hamming_semivalue(game8, 120, (7, 5), np.random.default_rng(0))
    else:
        est = ESTIMATORS[name](game8, 120, np.random.default_rng(0))
    assert np.all(np.diff(est.trace_evals) >= 0) and est.trace_evals[-1] == est.n_evals
    assert np.allclose(est.trace_values[-1], est.values)


def test_an_exhausted_game_ends_the_sampling(game6):
    # a budget far above 2**6 coalitions: every estimator stops once nothing new can be bought
    for name, fn in ESTIMATORS.items():
        est = fn(game6, 10_000, np.random.default_rng(0))
        assert est.n_evals <= 64, name


# ---- determinism ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_fixed_rng_is_reproducible_and_seeds_differ(game6, name):
    budget = MINIMUM6[name] + 10
    a = ESTIMATORS[name](game6, budget, np.random.default_rng(7)).values
    b = ESTIMATORS[name](game6, budget, np.random.default_rng(7)).values
    c = ESTIMATORS[name](game6, budget, np.random.default_rng(8)).values
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.array_equal(a, ESTIMATORS[name](game6, budget, 7).values)   # an int seed means the same


# ---- exactness on additive and pairwise games ------------------------------------------------

@pytest.fixture(scope="module")
def additive():
    return G.PairwiseGame(np.random.default_rng(3).normal(size=6), np.zeros((6, 6)))


@pytest.fixture(scope="module")
def pairwise():
    rng = np.random.default_rng(4)
    return G.PairwiseGame(rng.normal(size=6), np.triu(rng.normal(size=(6, 6)), 1))


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_is_exact_on_additive_games(additive, name):
    est = ESTIMATORS[name](additive, MINIMUM6[name], np.random.default_rng(0))
    assert np.allclose(est.values, additive.main, atol=1e-10)


def test_antithetic_permutation_is_exact_on_pairwise_games(pairwise):
    phi = pairwise.shapley_values()
    for seed in range(5):
        est = E.permutation_shapley(pairwise, MINIMUM6["permutation_antithetic"], np.random.default_rng(seed))
        assert np.allclose(est.values, phi, atol=1e-10)
    plain = E.permutation_shapley(pairwise, MINIMUM6["permutation"], np.random.default_rng(0), antithetic=False)
    assert not np.allclose(plain.values, phi, atol=1e-3)   # a single ordering is not


def test_shap_permutation_explainer(pairwise, additive):
    """shap's own antithetic estimator: exact on pairwise games, counted, seeded, budget-checked."""
    phi = pairwise.shapley_values()
    recorder = Recorder(pairwise)
    est = E.shap_permutation(recorder, 40, np.random.default_rng(0))
    assert np.allclose(est.values, phi, atol=1e-10)
    assert est.n_evals == len(recorder.distinct) == recorder.rows and est.n_evals <= 40
    g = structured_game(6)
    a, b = (E.shap_permutation(g, 60, np.random.default_rng(s)).values for s in (1, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, E.shap_permutation(g, 60, 2).values)
    with pytest.raises(E.BudgetTooSmallError, match="at least 13 "):
        E.shap_permutation(additive, 12)


# ---- KernelSHAP ------------------------------------------------------------------------------

def test_kernel_shap_with_every_coalition_is_exact(game6):
    est = E.kernel_shap(game6, 64, np.random.default_rng(0))
    assert np.allclose(est.values, S.exact_shapley(game6), atol=1e-8)
    assert np.isnan(est.stderr).all()


def test_kernel_shap_with_ample_budget_is_close(game8):
    phi = S.exact_shapley(game8)
    errors = [E.relative_squared_error(E.kernel_shap(game8, 200, np.random.default_rng(s)).values, phi)
              for s in range(5)]
    assert max(errors) < 0.01, errors


# ---- bad inputs ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_budget_below_the_minimum_names_the_minimum(game6, name):
    minimum = MINIMUM6[name]
    with pytest.raises(E.BudgetTooSmallError, match=f"at least {minimum} ") as info:
        ESTIMATORS[name](game6, minimum - 1)
    assert info.value.minimum == minimum and isinstance(info.value, ValueError)
    ESTIMATORS[name](game6, minimum)   # the minimum itself is accepted


@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.parametrize("budget, error, message", [(0, ValueError, "positive"), (-5, ValueError, "positive"),
                                                     (100.0, TypeError, "int"), (True, TypeError, "int"),
                                                     ("100", TypeError, "int")])
def test_bad_budgets_raise(game6, name, budget, error, message):
    with pytest.raises(error, match=message):
        ESTIMATORS[name](game6, budget)


def test_numpy_integer_budgets_are_accepted(game6):
    assert E.permutation_shapley(game6, np.int64(30), 0).n_evals <= 30


@pytest.mark.parametrize("keep", [(7,), (-1, 3), (), (2.5,), ((1, 2),), ("a",)])
def test_keep_sizes_out_of_range_raise(game6, keep):
    with pytest.raises(ValueError, match="keep_sizes"):
        E.hamming_semivalue(game6, 100, keep)
    with pytest.raises(ValueError, match="keep_sizes"):
        E.hamming_size_weights(6, keep)


def test_unknown_allocation_and_bad_sizes_raise(game6):
    with pytest.raises(ValueError, match="allocation must be 'neyman' or 'proportional'"):
        E.stratified_shapley(game6, 200, allocation="optimal")
    with pytest.raises(ValueError, match="sizes must be coalition sizes in 0..5"):
        E.stratified_shapley(game6, 200, sizes=[2, 6])


def test_bad_games_and_rngs_raise(game6):
    with pytest.raises(TypeError, match="n_players"):
        E.permutation_shapley(object(), 100)
    with pytest.raises(TypeError, match="rng"):
        E.permutation_shapley(game6, 100, rng=np.random.RandomState(0))


# ---- metrics -------------------------------------------------------------------------------

def test_relative_squared_and_max_error():
    assert E.relative_squared_error([1.0, 2.0, 2.0], [1.0, 2.0, 2.0]) == 0.0
    assert np.isclose(E.relative_squared_error([2.0, 2.0, 2.0], [1.0, 2.0, 2.0]), 1 / 9)
    assert np.isclose(E.relative_squared_error([0.0, 0.0], [3.0, 4.0]), 1.0)
    assert E.max_error([1.0, 5.0, 2.0], [1.5, 2.0, 2.0]) == 3.0


def test_bottom_k_and_its_precision():
    exact = [0.5, 0.1, 0.3, 0.05, 0.9]          # bottom-2 = {3, 1}, bottom-3 = {3, 1, 2}
    assert E.bottom_k(exact, 2) == {1, 3}
    assert E.bottom_k_precision([0.5, 0.2, 0.1, 0.0, 0.9], exact, 2) == 0.5     # finds {3, 2}
    assert E.bottom_k_precision([9, 8, 7, 6, 5], exact, 3) == 2 / 3             # finds {4, 3, 2}
    assert E.bottom_k_precision(exact, exact, 3) == 1.0
    assert E.bottom_k([1.0, 1.0, 1.0], 2) == {0, 1}                             # ties: lowest index
    with pytest.raises(ValueError, match="k must be in 1..5"):
        E.bottom_k(exact, 0)


def test_rank_correlations_by_hand():
    exact = [1.0, 2.0, 3.0, 4.0]
    assert np.isclose(E.spearman([10, 20, 30, 40], exact), 1.0)
    assert np.isclose(E.spearman([4, 3, 2, 1], exact), -1.0)
    # ranks (2, 1, 3, 4): d² = 1 + 1 = 2, ρ = 1 − 6·2 / (4·15) = 0.8
    assert np.isclose(E.spearman([2.0, 1.0, 3.0, 4.0], exact), 0.8)
    # one discordant pair out of 6: τ = (5 − 1) / 6
    assert np.isclose(E.kendall_tau([2.0, 1.0, 3.0, 4.0], exact), 4 / 6)
    assert np.isclose(E.kendall_tau([4, 3, 2, 1], exact), -1.0)


# ---- error-against-budget helpers ------------------------------------------------------------

def test_budget_sweep_scores_runs_and_skips_budgets_below_the_minimum(game6):
    phi = S.exact_shapley(game6)
    sweep = E.budget_sweep(game6, {"perm": ESTIMATORS["permutation"], "neyman": ESTIMATORS["stratified_neyman"]},
                           budgets=[20, 40], seeds=range(3), exact=phi)
    assert list(sweep.columns) == ["estimator", "budget", "seed", "n_evals", "rse", "precision", "spearman"]
    assert len(sweep) == 6 and set(sweep["estimator"]) == {"perm"}     # Neyman needs 110: skipped
    row = sweep.iloc[4]
    est = E.permutation_shapley(game6, 40, np.random.default_rng(1), antithetic=False)
    assert (row["budget"], row["seed"], row["n_evals"]) == (40, 1, est.n_evals)
    assert np.isclose(row["rse"], E.relative_squared_error(est.values, phi))
    assert row["precision"] == E.bottom_k_precision(est.values, phi, 3)


def test_budget_needed_requires_the_criterion_from_that_budget_on():
    rows = [("a", 10, [0, 0, 1]), ("a", 20, [1, 1, 1]), ("a", 40, [1, 1, 0]), ("a", 80, [1, 1, 1]),
            ("b", 10, [1, 1, 1]), ("b", 20, [1, 1, 1]), ("b", 40, [1, 1, 1]), ("b", 80, [1, 1, 1]),
            ("c", 10, [0, 0, 0]), ("c", 20, [0, 1, 0]), ("c", 40, [0, 0, 0]), ("c", 80, [1, 0, 1])]
    sweep = pd.DataFrame([{"estimator": e, "budget": b, "seed": s, "n_evals": b - s, "precision": p}
                          for e, b, ps in rows for s, p in enumerate(ps)])
    table = E.budget_needed(sweep, "precision", 1.0, share=0.9)
    assert table.loc["a", "budget"] == 80 and table.loc["a", "n_evals"] == 79   # 40 fails: 20 does not count
    assert table.loc["b", "budget"] == 10
    assert np.isnan(table.loc["c", "budget"])
    assert E.budget_needed(sweep, "precision", 1.0, share=0.6).loc["c", "budget"] == 80
    low = E.budget_needed(sweep.assign(err=1 - sweep["precision"]), "err", 0.0, lower_is_better=True)
    assert low.loc["a", "budget"] == 80
    with pytest.raises(ValueError, match="share"):
        E.budget_needed(sweep, "precision", 1.0, share=0)


def test_budget_for_error_interpolates_in_log_log():
    budgets = np.array([100, 200, 400, 800])
    errors = 1.0 / budgets                        # a straight line in log-log: exact interpolation
    assert np.isclose(E.budget_for_error(budgets, errors, 1 / 300), 300)
    assert E.budget_for_error(budgets, errors, 0.5) == 100          # already reached at the first budget
    assert np.isnan(E.budget_for_error(budgets, errors, 1e-4))      # never reached on the grid
    assert np.isclose(E.budget_for_error([1, 2, 4], [1.0, 0.1, 0.5], 0.1), 2)   # the first crossing
    assert np.isclose(E.budget_for_error([100, 200, 200, 400], [1.0, 0.5, 0.5, 0.1], 0.25), 200 * 2 ** (np.log(2) / np.log(5)))
    with pytest.raises(ValueError, match="non-decreasing"):
        E.budget_for_error([2, 1], [1.0, 0.5], 0.7)
