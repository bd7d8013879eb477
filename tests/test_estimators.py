"""minilib.estimators: Monte Carlo Shapley estimators, the paper's Hamming semivalue, metrics.

The properties that matter:
- every Shapley estimator is unbiased: over many seeds its mean lies within 3 standard errors
  of the exact value (permutation with and without antithetic pairs, stratified with
  proportional and with Neyman allocation), and the same check rejects an estimator of
  something else. Neyman allocation used to be biased (4.0 standard errors on the game below:
  its pilot samples both steered the allocation and entered the mean); its allocation is now
  cross-fitted, so no stratum's samples decide its own share, and the check passes;
- the Hamming-weight estimator is unbiased for ``hamming_semivalue_exact``, which equals the
  paper's procedure enumerated exactly, and ``hamming_size_weights`` is the paper's table;
- the budget is never exceeded and ``n_evals`` counts exactly the distinct coalitions the
  game received (checked with a counter of our own around the game);
- a fixed ``rng`` reproduces the values exactly, and different seeds give different values;
- all estimators are exact on additive games, antithetic permutation also on pairwise games;
- minimum budgets never exceed the coalitions an estimator can ask for; Neyman allocation runs
  at 40·n with n = 12 (falling back to proportional allocation, with a warning, below its pilot);
- ``Estimate``: standard errors NaN where unknown (never 0 by accident), t intervals, ranking,
  a DataFrame view, and the old positional construction (the coverage of the intervals is
  measured in test_estimator_coverage.py);
- bad inputs raise clear errors (the message of a too-small budget names the minimum);
- the metrics, the exact strata moments and the budget-sweep helpers give brute-force or
  hand-computed answers.
"""

from __future__ import annotations

import warnings
from functools import partial
from itertools import combinations

import numpy as np
import pandas as pd
import pytest

import minilib as ml

G, S, E = ml.games, ml.shapley, ml.estimators

# budgets below Neyman's pilot fall back to proportional allocation on purpose here; tested on its own below
pytestmark = pytest.mark.filterwarnings("ignore::minilib.estimators.AllocationFallbackWarning")


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
    "stratified_proportional": 2 + 12 + 2 * 6 * 4, "stratified_neyman": 2 + 12 + 2 * 6 * 4,  # Neyman falls back
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


def test_stratified_neyman_is_unbiased(game8, stratified_runs):
    # before the cross-fitted allocation: 4.0 standard errors here (pilots steered their own strata)
    z = z_scores(stratified_runs["neyman"], S.exact_shapley(game8))
    assert np.abs(z).max() < 3, z


def test_stratified_neyman_squared_bias_is_at_the_noise_floor(game8, stratified_runs):
    # for an unbiased estimator bias² measured from 200 runs is about 1/200 of the mean squared error
    est, phi = stratified_runs["neyman"], S.exact_shapley(game8)
    bias2 = np.sum((est.mean(axis=0) - phi) ** 2)
    mse = np.mean(np.sum((est - phi) ** 2, axis=1))
    assert bias2 / mse < 4 / len(est), bias2 / mse


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


# ---- minimum budgets and Neyman's fallback ----------------------------------------------------

@pytest.mark.parametrize("n", range(2, 11))
@pytest.mark.parametrize("allocation", ["neyman", "proportional"])
def test_stratified_minimum_never_exceeds_the_coalitions(n, allocation):
    game = G.PairwiseGame(np.arange(1.0, n + 1), np.zeros((n, n)))
    with pytest.raises(E.BudgetTooSmallError) as info:
        E.stratified_shapley(game, 1, allocation=allocation)
    assert info.value.minimum == min(2 + 2 * n * (n - 1), 2 ** n)    # one sample per middle stratum
    est = E.stratified_shapley(game, info.value.minimum, 0, allocation=allocation)
    assert est.n_evals <= info.value.minimum and np.allclose(est.values, game.main)   # additive: exact


def test_neyman_runs_at_40n_with_12_players_by_falling_back_with_a_warning():
    game = structured_game(12, seed=5)
    with pytest.warns(E.AllocationFallbackWarning, match="below the 506 evaluations"):
        est = E.stratified_shapley(game, 40 * 12, 0)
    assert est.n_evals <= 480 and "proportional" in est.method
    for name in ("permutation", "permutation_antithetic", "stratified_proportional", "kernel_shap"):
        assert ESTIMATORS[name](game, 480, np.random.default_rng(0)).n_evals <= 480   # its peers run too
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # from 506 on: Neyman itself, no warning
        est = E.stratified_shapley(game, 506, 0)
    assert est.method == "stratified (neyman)" and est.n_evals <= 506


def test_neyman_runs_itself_with_every_coalition_of_7_players():
    game = structured_game(7, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = E.stratified_shapley(game, 128, 0)                # 2 + 14 + 4·35 = 156 > 128 coalitions
    assert est.method == "stratified (neyman)" and est.n_evals <= 128 and np.isfinite(est.stderr).all()
    with pytest.warns(E.AllocationFallbackWarning):
        E.stratified_shapley(game, 127, 0)


def test_neyman_pilots_enter_the_means_and_every_stratum_gets_samples(game8):
    game = Recorder(game8)
    est = E.stratified_shapley(game, 220, np.random.default_rng(3))
    assert est.n_evals == len(game.distinct) <= 220 and np.isfinite(est.stderr).all() and (est.stderr > 0).all()


# ---- Estimate: standard errors, intervals, ranking -------------------------------------------

def test_a_stratum_with_one_sample_gives_nan_not_zero(game6):
    runs = [E.stratified_shapley(game6, 62, s, allocation="proportional") for s in range(20)]
    for est in runs:
        assert not (est.stderr == 0).any()                     # never 0 by accident
        lo, hi = est.confidence_interval()
        assert np.array_equal(np.isnan(lo), np.isnan(est.stderr)) and np.array_equal(np.isnan(hi), np.isnan(lo))
    assert any(np.isnan(est.stderr).any() for est in runs)
    one = E.permutation_shapley(game6, 7, 0, antithetic=False)     # a single ordering: no spread to measure
    assert np.isnan(one.stderr).all() and np.isnan(one.confidence_interval()[0]).all()


def test_exact_estimates_have_zero_width_intervals(pairwise):
    est = E.permutation_shapley(pairwise, 40, 0)                 # antithetic: exact on pairwise games
    lo, hi = est.confidence_interval(0.99)
    assert np.allclose(lo, est.values) and np.allclose(hi, est.values)


def test_confidence_interval_uses_t_quantiles():
    from scipy.stats import norm, t

    est = E.Estimate(np.array([1.0, 2.0, 3.0]), np.array([0.5, np.nan, 0.0]), 10, "test", dof=4)
    lo, hi = est.confidence_interval(0.9)
    q = t.ppf(0.95, 4)
    assert np.isclose(lo[0], 1 - q * 0.5) and np.isclose(hi[0], 1 + q * 0.5)
    assert np.isnan(lo[1]) and np.isnan(hi[1]) and lo[2] == hi[2] == 3.0
    normal = E.Estimate(np.array([1.0]), np.array([1.0]), 1, "test")          # dof defaults to a normal
    assert np.isclose(normal.confidence_interval()[1][0], 1 + norm.ppf(0.975))
    per_player = E.Estimate(np.zeros(2), np.ones(2), 1, "test", dof=np.array([2.0, np.inf]))
    assert np.allclose(per_player.confidence_interval()[1], [t.ppf(0.975, 2), norm.ppf(0.975)])
    for level in (0, 1, 1.5, -0.1, "0.95", True):
        with pytest.raises(ValueError, match=r"level must be a number in \(0, 1\)"):
            est.confidence_interval(level)


def test_estimators_report_their_degrees_of_freedom(game6):
    perm = E.permutation_shapley(game6, 37, 0, antithetic=False)     # m orderings (one trace point each)
    assert perm.dof == len(perm.trace_evals) - 1 >= 6
    strat = E.stratified_shapley(game6, 64, 0, allocation="proportional")   # Welch: at least min(k_h) − 1
    assert np.array_equal(np.isnan(strat.dof), np.isnan(strat.stderr)) and np.all(strat.dof[~np.isnan(strat.dof)] >= 1)
    ham = hamming6(game6, 42, 0)                                    # 2 base masks per stratum, 3 strata
    assert np.all((ham.dof >= 1) & (ham.dof <= 3))
    assert E.kernel_shap(game6, 20, 0).dof == np.inf


def test_ranking_and_dataframe():
    est = E.Estimate(np.array([0.3, 0.1, 0.3, 0.2]), np.array([0.01, 0.02, np.nan, 0.0]), 9, "test",
                     dof=np.inf, player_names=["a", "b", "c", "d"])
    assert est.ranking().tolist() == [1, 3, 0, 2]                   # least important first, ties by index
    df = est.to_dataframe()
    assert list(df.columns) == ["value", "stderr", "ci_low", "ci_high", "rank"]
    assert df.index.name == "player" and list(df.index) == ["a", "b", "c", "d"]
    assert df["rank"].tolist() == [3, 1, 4, 2] and df.loc["b", "value"] == 0.1
    assert np.isnan(df.loc["c", "ci_low"]) and df.loc["d", "ci_low"] == df.loc["d", "ci_high"] == 0.2
    assert np.isclose(df.loc["a", "ci_high"], 0.3 + 1.959964 * 0.01)
    plain = E.Estimate(np.array([2.0, 1.0]), np.zeros(2), 3, "test").to_dataframe()
    assert list(plain.index) == [0, 1] and plain["rank"].tolist() == [2, 1]


def test_estimate_positional_construction_still_works():
    est = E.Estimate(np.array([1.0, 2.0]), np.array([0.1, 0.2]), 5, "old style")
    assert est.n_evals == 5 and est.method == "old style" and est.dof == np.inf and est.player_names is None
    assert est.trace_evals.shape == (0,)
    full = E.Estimate([1.0, 2.0], [0.1, 0.2], 5, "m", np.array([5]), np.array([[1.0, 2.0]]))
    assert isinstance(full.values, np.ndarray) and full.trace_values.shape == (1, 2)


@pytest.mark.parametrize("kwargs, message", [
    ({"stderr": np.zeros(3)}, "stderr must have the shape of values"),
    ({"stderr": np.array([-1.0, 0.0])}, "stderr must be >= 0"),
    ({"dof": 0}, "dof must be a positive number"),
    ({"dof": np.ones(3)}, "dof must be a positive number"),
    ({"player_names": ["a"]}, "player_names must be 2 distinct names"),
    ({"player_names": ["a", "a"]}, "player_names must be 2 distinct names"),
    ({"values": np.zeros((2, 2))}, "values must be a 1-D array"),
])
def test_bad_estimates_raise(kwargs, message):
    args = {"values": np.zeros(2), "stderr": np.zeros(2), "n_evals": 1, "method": "m"} | kwargs
    with pytest.raises(ValueError, match=message):
        E.Estimate(**args)


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
    for sizes in ([2, 6], [-1], [], [2.5]):
        with pytest.raises(ValueError, match=r"sizes must be coalition sizes \(ints\) in 0..5"):
            E.stratified_shapley(game6, 200, sizes=sizes)
    for pilot in (1, 2.0, True):
        with pytest.raises(ValueError, match="pilot must be an int >= 2"):
            E.stratified_shapley(game6, 200, pilot=pilot)
    for defensive in (-0.1, 1.5, "0.1"):
        with pytest.raises(ValueError, match=r"defensive must be a number in \[0, 1\]"):
            E.stratified_shapley(game6, 200, defensive=defensive)
    with pytest.raises(ValueError, match="antithetic must be True or False"):
        E.permutation_shapley(game6, 200, antithetic="yes")


def test_a_sizes_window_estimates_the_truncated_value(game6):
    mean = E.strata_moments(game6)[0]
    est = E.stratified_shapley(game6, 64, 0, sizes=[0, 2, 3])
    assert est.n_evals <= 64
    truncated = mean[:, [0, 2, 3]].sum(axis=1) / 6
    assert np.all(np.abs(est.values - truncated) < 5 * est.stderr + 1e-12)
    only_ends = E.stratified_shapley(game6, 14, 0, sizes=[0, 5])   # single coalitions: exact, stderr 0
    assert np.allclose(only_ends.values, mean[:, [0, 5]].sum(axis=1) / 6) and (only_ends.stderr == 0).all()


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
    assert len(sweep) == 6 and set(sweep["estimator"]) == {"perm"}     # stratified needs 62: skipped
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
    with pytest.raises(ValueError, match="metric must be a column of sweep"):
        E.budget_needed(sweep, "accuracy", 1.0)


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
