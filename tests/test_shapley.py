"""minilib.shapley: exact Shapley, Banzhaf and interaction values, the axioms, and shap agreement.

The properties that matter:
- the vectorised ``exact_shapley`` equals the textbook definitions (all n! orderings; the
  subset formula written out coalition by coalition) on random games, n = 1 .. 7;
- the Shapley value satisfies efficiency, symmetry, dummy and additivity, and the checks
  that say so can also say no;
- Banzhaf and the pairwise interaction index equal brute-force sums;
- exact computation scales to n = 20 and refuses n above ``MAX_EXACT_PLAYERS`` clearly;
- shap's ExactExplainer and KernelExplainer (``l1_reg=False``), with an all-zeros background
  and an all-ones point, give the same numbers, and ``to_shap_explanation`` adds up.
"""

from __future__ import annotations

from itertools import combinations, permutations
from math import factorial

import numpy as np
import pytest

import minilib as ml

G, S = ml.games, ml.shapley


def random_game(n: int, seed: int) -> G.TabularGame:
    return G.TabularGame(np.random.default_rng(seed).normal(size=2 ** n))


def v(game, members) -> float:
    """Value of one coalition given as a collection of players, through the game's own call."""
    mask = np.zeros(game.n_players, dtype=bool)
    mask[list(members)] = True
    return float(game(mask)[0])


def brute_permutations(game) -> np.ndarray:
    n = game.n_players
    phi = np.zeros(n)
    for order in permutations(range(n)):
        for k, p in enumerate(order):
            phi[p] += v(game, order[: k + 1]) - v(game, order[:k])
    return phi / factorial(n)


def brute_banzhaf(game) -> np.ndarray:
    n = game.n_players
    out = np.zeros(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        diffs = [v(game, s + (i,)) - v(game, s) for k in range(n) for s in combinations(others, k)]
        out[i] = np.mean(diffs)
    return out


def brute_interactions(game) -> np.ndarray:
    """I_ij = Σ_{S ⊆ N∖{i,j}} |S|!(n−|S|−2)!/(n−1)! · Δ_ij v(S), as a double loop over pairs and subsets."""
    n = game.n_players
    out = np.zeros((n, n))
    for i, j in combinations(range(n), 2):
        others = [k for k in range(n) if k not in (i, j)]
        total = 0.0
        for size in range(n - 1):
            w = factorial(size) * factorial(n - size - 2) / factorial(n - 1)
            for s in combinations(others, size):
                total += w * (v(game, s + (i, j)) - v(game, s + (i,)) - v(game, s + (j,)) + v(game, s))
        out[i, j] = out[j, i] = total
    return out


# ---------------------------------------------------------------- exact Shapley

@pytest.mark.parametrize("n", range(1, 8))
def test_exact_shapley_equals_all_permutations(n):
    game = random_game(n, seed=n)
    phi = S.exact_shapley(game)
    assert phi.shape == (n,)
    assert np.allclose(phi, S.shapley_by_permutations(game), atol=1e-12)


@pytest.mark.parametrize("n", range(1, 6))
def test_permutation_definition_equals_a_brute_force_through_the_game(n):
    """Independent of value_table's bit layout: coalitions go through game(...) one at a time."""
    game = random_game(n, seed=10 + n)
    assert np.allclose(S.shapley_by_permutations(game), brute_permutations(game), atol=1e-12)


def test_exact_shapley_accepts_any_game_not_only_tables():
    game = G.GloveGame([0, 1], [2, 3, 4])
    table = G.TabularGame(S.value_table(game))
    assert np.array_equal(S.value_table(game), game(G.all_coalitions(5)))
    assert np.allclose(S.exact_shapley(game), S.exact_shapley(table))


def test_relabelling_players_permutes_the_values():
    """Relabelling players permutes the values the same way (catches a swapped bit order)."""
    game = random_game(5, seed=3)
    perm = np.array([2, 0, 4, 1, 3])                 # new player k is old player perm[k]
    relabelled = G.TabularGame(game(G.all_coalitions(5)[:, np.argsort(perm)]))
    assert np.allclose(S.exact_shapley(relabelled), S.exact_shapley(game)[perm])


def test_shapley_by_permutations_refuses_large_games():
    with pytest.raises(ValueError, match="n_players"):
        S.shapley_by_permutations(random_game(9, seed=0))


# ---------------------------------------------------------------- axioms

@pytest.mark.parametrize("seed", range(5))
def test_axioms_hold_on_random_games(seed):
    game = random_game(6, seed)
    checks = S.check_axioms(game)
    assert checks == {"efficiency": True, "symmetry": True, "dummy": True}
    assert abs(S.efficiency_gap(game, S.exact_shapley(game))) < 1e-12


def dummy_and_symmetric_game() -> G.TabularGame:
    """Players 0 and 1 are symmetric, player 3 is a dummy worth 0.5, players 2 and 4 are neither."""
    values = []
    for mask in G.all_coalitions(5):
        a, b, c, d, e = mask
        values.append(2.0 * (a and b) + 1.0 * (a or b) + 3.0 * (c and e) + 0.7 * e + 0.5 * d + 0.25)
    return G.TabularGame(values)


def test_constructed_game_dummy_and_symmetric_pair():
    game = dummy_and_symmetric_game()
    assert S.dummy_players(game) == pytest.approx({3: 0.5})
    assert S.symmetric_pairs(game) == [(0, 1)]
    phi = S.exact_shapley(game)
    assert np.isclose(phi[3], 0.5)                     # a dummy gets exactly its constant marginal
    assert np.isclose(phi[0], phi[1])                  # symmetric players get the same
    assert np.isclose(phi[0], 1.0 + 0.5)               # half of the pair's 2, half of the "either" 1
    assert np.allclose(phi[[2, 4]], [1.5, 1.5 + 0.7])
    assert S.check_axioms(game) == {"efficiency": True, "symmetry": True, "dummy": True}


def test_axiom_checks_can_fail():
    game = dummy_and_symmetric_game()
    phi = S.exact_shapley(game)
    swapped = phi.copy()
    swapped[[0, 4]] = swapped[[4, 0]]                  # keeps the sum, breaks symmetry
    assert S.check_axioms(game, swapped) == {"efficiency": True, "symmetry": False, "dummy": True}
    moved = phi.copy()
    moved[3] -= 0.1
    moved[4] += 0.1                                    # keeps the sum, cheats the dummy
    assert S.check_axioms(game, moved) == {"efficiency": True, "symmetry": True, "dummy": False}
    gloves = G.GloveGame([0], [1, 2])
    banzhaf = S.exact_banzhaf(gloves)                  # Banzhaf is not efficient here
    assert not S.check_axioms(gloves, banzhaf)["efficiency"]
    assert S.efficiency_gap(gloves, banzhaf) == pytest.approx(0.25)


def test_additivity():
    a, b = random_game(5, 1), random_game(5, 2)
    assert S.check_additivity(a, b)
    assert S.check_additivity(G.GloveGame([0, 1], [2, 3, 4]), G.UnanimityGame(5, [1, 4]))
    assert not S.check_additivity(a, b, value_fn=lambda g: S.exact_shapley(g) ** 2)
    with pytest.raises(ValueError, match="same number of players"):
        S.check_additivity(random_game(3, 0), random_game(4, 0))


# ---------------------------------------------------------------- Banzhaf

def test_banzhaf_of_an_additive_game_is_its_weights():
    weights = np.array([0.3, -1.2, 2.0, 0.0, 5.5, 1.1])
    game = G.PairwiseGame(weights)
    assert np.allclose(S.exact_banzhaf(game), weights)
    assert np.allclose(S.exact_shapley(game), weights)


@pytest.mark.parametrize("n", [1, 2, 4, 6])
def test_banzhaf_equals_mean_marginal_over_all_coalitions(n):
    game = random_game(n, seed=20 + n)
    assert np.allclose(S.exact_banzhaf(game), brute_banzhaf(game), atol=1e-12)


def test_banzhaf_of_gloves_differs_from_shapley():
    game = G.GloveGame([0], [1, 2])
    assert np.allclose(S.exact_banzhaf(game), [3 / 4, 1 / 4, 1 / 4])   # sums to 1.25, not v(N) = 1


def test_marginals_by_size_average_to_shapley_and_banzhaf():
    from math import comb

    n = 5
    game = random_game(n, seed=40)
    by_size = S.marginals_by_size(game)
    assert by_size.shape == (n, n)
    for i, s in [(0, 0), (2, 2), (4, 4), (3, 1)]:    # spot checks against a direct average
        others = [j for j in range(n) if j != i]
        direct = np.mean([v(game, c + (i,)) - v(game, c) for c in combinations(others, s)])
        assert by_size[i, s] == pytest.approx(direct)
    assert np.allclose(by_size.mean(axis=1), S.exact_shapley(game))
    size_weights = np.array([comb(n - 1, s) for s in range(n)]) / 2 ** (n - 1)
    assert np.allclose(by_size @ size_weights, S.exact_banzhaf(game))


# ---------------------------------------------------------------- interactions

@pytest.mark.parametrize("seed", range(3))
def test_interaction_index_recovers_pairwise_matrix(seed):
    rng = np.random.default_rng(seed)
    n = 7
    upper = np.triu(rng.normal(size=(n, n)), 1)
    game = G.PairwiseGame(rng.normal(size=n), upper)
    inter = S.interaction_index(game)
    assert np.allclose(inter, upper + upper.T, atol=1e-12)
    assert np.allclose(inter, game.interaction_values(), atol=1e-12)


@pytest.mark.parametrize("n", [2, 3, 5, 6])
def test_interaction_index_equals_brute_force_double_sum(n):
    game = random_game(n, seed=30 + n)
    inter = S.interaction_index(game)
    assert np.allclose(inter, inter.T) and np.all(np.diag(inter) == 0)
    assert np.allclose(inter, brute_interactions(game), atol=1e-12)


def test_interaction_signs_complements_and_substitutes():
    complements = G.UnanimityGame(2, [0, 1])          # worth something only together
    substitutes = G.TabularGame([0.0, 1.0, 1.0, 1.0])  # either one is enough
    assert S.interaction_index(complements)[0, 1] == pytest.approx(1.0)
    assert S.interaction_index(substitutes)[0, 1] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="2 players"):
        S.interaction_index(random_game(1, 0))


# ---------------------------------------------------------------- scale and limits

def test_twenty_players_exact():
    rng = np.random.default_rng(5)
    n = 20
    game = G.PairwiseGame(rng.normal(size=n), np.triu(rng.normal(size=(n, n)), 1))
    counted = G.CountingGame(game, cache=False)
    phi = S.exact_shapley(counted)
    assert counted.n_evals == 2 ** n                   # evaluated once, in chunks
    assert np.allclose(phi, game.shapley_values(), atol=1e-9)


def test_more_players_than_the_exact_limit_is_refused():
    n = S.MAX_EXACT_PLAYERS + 1
    game = G.PairwiseGame(np.ones(n))
    for fn in (S.exact_shapley, S.exact_banzhaf, S.interaction_index):
        with pytest.raises(ValueError, match="n_players") as err:
            fn(game)
        assert str(S.MAX_EXACT_PLAYERS) in str(err.value) and str(n) in str(err.value)


def test_value_table_rejects_objects_that_are_not_games():
    class NotAGame:
        n_players = "three"

    with pytest.raises(TypeError, match="n_players"):
        S.exact_shapley(NotAGame())


# ---------------------------------------------------------------- shap agreement

N_SHAP = 7

# shap is imported in a fresh interpreter with numba's JIT off (NUMBA_DISABLE_JIT is read when
# numba is imported). ExactExplainer's inner loops are numba functions whose compilation costs
# 10-20 s per process on 2 cores, more than everything else in this file; as plain Python
# they take milliseconds for 2**7 coalitions, and the maths checked is the same. The
# interpreter also keeps shap's import (several seconds) out of this test process.
SHAP_SCRIPT = """
import json, sys
import numpy as np, shap
from minilib.games import TabularGame
from minilib.shapley import to_shap_explanation
game = TabularGame.load(sys.argv[1])
n = game.n_players
f = lambda x: game(np.asarray(x) > 0.5)        # a model whose features are membership indicators
background, point = np.zeros((1, n)), np.ones((1, n))
kernel = shap.KernelExplainer(f, background)
kernel_values = kernel.shap_values(point, l1_reg=False, silent=True)
exact = shap.ExactExplainer(f, background)(point, silent=True)
phi = np.array(json.loads(sys.argv[2]))
wrapped = to_shap_explanation(phi, game)
named = to_shap_explanation(phi, game, feature_names="abcdefg")
print(json.dumps({
    "kernel": kernel_values[0].tolist(), "kernel_base": float(kernel.expected_value),
    "exact": exact.values[0].tolist(), "exact_base": float(exact.base_values[0]),
    "wrapped_type": type(wrapped).__module__ + "." + type(wrapped).__name__,
    "wrapped_base": float(wrapped.base_values), "wrapped_values": np.asarray(wrapped.values).tolist(),
    "wrapped_names": list(wrapped.feature_names), "named_names": list(named.feature_names),
}))
"""


@pytest.fixture(scope="module")
def shap_run(tmp_path_factory):
    """``(game, phi, results)``: what shap computes for a random 7-player game, from a fresh interpreter."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("shap") is None:
        pytest.skip("shap is not installed")
    game = random_game(N_SHAP, seed=99)
    phi = S.exact_shapley(game)
    path = tmp_path_factory.mktemp("shap") / "game.npz"
    game.save(path)
    run = subprocess.run([sys.executable, "-c", SHAP_SCRIPT, str(path), json.dumps(phi.tolist())],
                         capture_output=True, text=True, env={**os.environ, "NUMBA_DISABLE_JIT": "1"},
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return game, phi, json.loads(run.stdout.strip().splitlines()[-1])


def test_shap_kernel_explainer_agrees(shap_run):
    game, phi, out = shap_run
    assert np.allclose(out["kernel"], phi, atol=1e-6)
    assert np.isclose(out["kernel_base"], game.empty_value())


def test_shap_exact_explainer_agrees(shap_run):
    game, phi, out = shap_run
    assert np.allclose(out["exact"], phi, atol=1e-6)
    assert np.isclose(out["exact_base"], game.empty_value())


def test_to_shap_explanation_adds_up(shap_run):
    game, phi, out = shap_run
    assert out["wrapped_type"] == "shap._explanation.Explanation"
    assert out["wrapped_base"] == pytest.approx(game.empty_value())
    assert np.allclose(out["wrapped_values"], phi)
    assert out["wrapped_base"] + sum(out["wrapped_values"]) == pytest.approx(game.grand_value())
    assert out["wrapped_names"] == [f"layer {i}" for i in range(N_SHAP)]
    assert out["named_names"] == list("abcdefg")


def test_to_shap_explanation_rejects_mismatched_inputs():
    game = random_game(3, seed=0)
    with pytest.raises(ValueError, match="values"):
        S.to_shap_explanation(np.zeros(2), game)
    with pytest.raises(ValueError, match="feature_names"):
        S.to_shap_explanation(np.zeros(3), game, feature_names=["a"])
