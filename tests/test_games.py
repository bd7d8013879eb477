"""minilib.games: the game contract, the closed-form toy games, TabularGame and CountingGame.

The properties that matter:
- every toy game's closed-form ``shapley_values()`` equals exact enumeration, and matches the
  textbook numbers (gloves 2/3, 1/6, 1/6; Littlechild-Owen airport shares; Shapley-Shubik power
  of [2, 1, 1] with quota 3 and of the UN Security Council);
- the bitmask convention (bit i = player i) is the same everywhere;
- a TabularGame survives save/load with its values and metadata, and malformed tables or
  coalitions are refused with errors that name the argument;
- CountingGame charges each distinct coalition once (``n_evals``) while counting every query
  (``n_queries``).
"""

from __future__ import annotations

from fractions import Fraction
from itertools import permutations
from math import factorial

import numpy as np
import pytest

import minilib as ml

G = ml.games


def exact(game) -> np.ndarray:
    return ml.shapley.exact_shapley(game)


def fraction_shapley(game) -> list[Fraction]:
    """Shapley values as exact fractions, by the permutation definition, calling the game per coalition."""
    n = game.n_players
    phi = [Fraction(0)] * n
    for order in permutations(range(n)):
        mask = np.zeros(n, dtype=bool)
        before = Fraction(game(mask)[0]).limit_denominator()
        for p in order:
            mask[p] = True
            after = Fraction(game(mask)[0]).limit_denominator()
            phi[p] += after - before
            before = after
    return [x / factorial(n) for x in phi]


# ---------------------------------------------------------------- coalitions and bitmasks

def test_all_coalitions_follows_the_bitmask_convention():
    c = G.all_coalitions(3)
    assert c.shape == (8, 3) and c.dtype == bool
    assert c[0].tolist() == [False, False, False]
    assert c[1].tolist() == [True, False, False]      # bitmask 1 = player 0
    assert c[4].tolist() == [False, False, True]      # bitmask 4 = player 2
    assert c[6].tolist() == [False, True, True]
    assert G.coalition_index(c).tolist() == list(range(8))


def test_tabular_game_reads_values_by_bitmask():
    game = G.TabularGame(np.arange(8.0))
    assert game.n_players == 3
    assert game([[True, False, True]])[0] == 5.0      # players 0 and 2: 1 + 4
    assert game.empty_value() == 0.0 and game.grand_value() == 7.0
    assert np.array_equal(game(G.all_coalitions(3)), np.arange(8.0))


# ---------------------------------------------------------------- glove game

def test_glove_one_left_two_right_is_two_thirds_one_sixth():
    game = G.GloveGame(left=[0], right=[1, 2])
    assert np.allclose(game.shapley_values(), [2 / 3, 1 / 6, 1 / 6])
    assert np.allclose(exact(game), [2 / 3, 1 / 6, 1 / 6])
    assert fraction_shapley(game) == [Fraction(2, 3), Fraction(1, 6), Fraction(1, 6)]


@pytest.mark.parametrize("n_left, n_right", [(1, 1), (1, 3), (1, 4), (2, 3), (3, 2), (2, 2), (3, 5), (4, 1)])
def test_glove_closed_form_equals_enumeration(n_left, n_right):
    rng = np.random.default_rng(n_left * 10 + n_right)
    players = rng.permutation(n_left + n_right)        # sides need not be contiguous
    game = G.GloveGame(left=players[:n_left], right=players[n_left:])
    phi = game.shapley_values()
    assert np.allclose(phi, exact(game), atol=1e-12)
    assert np.isclose(phi.sum(), min(n_left, n_right))  # efficiency: every pair is matched in N
    if n_left == 1:                                     # the classic r/(r+1) and 1/(r(r+1))
        r = n_right
        assert np.isclose(phi[players[0]], r / (r + 1))
        assert np.allclose(phi[players[1:]], 1 / (r * (r + 1)))


def test_glove_unequal_sides_exact_fractions():
    """Two left gloves, three right: the scarce side gets 13/20 each, the others 7/30."""
    game = G.GloveGame(left=[0, 1], right=[2, 3, 4])
    expected = [Fraction(13, 20)] * 2 + [Fraction(7, 30)] * 3
    assert fraction_shapley(game) == expected
    assert np.allclose(game.shapley_values(), [float(x) for x in expected])


def test_glove_rejects_overlapping_or_gappy_sides():
    with pytest.raises(ValueError, match="disjoint"):
        G.GloveGame(left=[0, 1], right=[1, 2])
    with pytest.raises(ValueError, match="0..n-1"):
        G.GloveGame(left=[0], right=[2])


# ---------------------------------------------------------------- airport game

def test_airport_littlechild_owen_shares():
    costs = [1.0, 3.0, 3.0, 7.0, 2.0]
    game = G.AirportGame(costs)
    # sorted 1, 2, 3, 3, 7: each segment is shared by those who need it
    s1 = 1 / 5
    s2 = s1 + (2 - 1) / 4
    s3 = s2 + (3 - 2) / 3
    s7 = s3 + 0 / 2 + (7 - 3) / 1
    expected = [s1, s3, s3, s7, s2]
    assert np.allclose(game.shapley_values(), expected)
    assert np.allclose(exact(game), expected)
    assert np.isclose(sum(expected), max(costs))      # the whole runway is paid for


@pytest.mark.parametrize("seed", range(4))
def test_airport_closed_form_equals_enumeration(seed):
    rng = np.random.default_rng(seed)
    costs = rng.integers(0, 6, size=7).astype(float)  # ties and zeros included
    game = G.AirportGame(costs)
    assert np.allclose(game.shapley_values(), exact(game), atol=1e-12)


# ---------------------------------------------------------------- weighted voting

def test_weighted_voting_two_one_one_quota_three():
    game = G.WeightedVotingGame([2, 1, 1], quota=3)
    assert np.allclose(game.shapley_values(), [2 / 3, 1 / 6, 1 / 6])
    assert fraction_shapley(game) == [Fraction(2, 3), Fraction(1, 6), Fraction(1, 6)]


def test_weighted_voting_four_three_two_one_one_quota_six():
    game = G.WeightedVotingGame([4, 3, 2, 1, 1], quota=6)
    expected = [Fraction(2, 5), Fraction(7, 30), Fraction(7, 30), Fraction(1, 15), Fraction(1, 15)]
    assert fraction_shapley(game) == expected
    assert np.allclose(game.shapley_values(), [float(x) for x in expected])
    assert np.allclose(exact(game), game.shapley_values())


def test_weighted_voting_un_security_council():
    """5 permanent members (weight 7) and 10 others (weight 1), quota 39 (Shapley-Shubik 1954)."""
    game = G.WeightedVotingGame([7] * 5 + [1] * 10, quota=39)
    # a non-permanent member is pivotal after all 5 permanent and exactly 3 of the other 9
    small = Fraction(84 * factorial(8) * factorial(6), factorial(15))
    big = (1 - 10 * small) / 5
    phi = game.shapley_values()
    assert np.allclose(phi, [float(big)] * 5 + [float(small)] * 10)
    assert round(float(big), 4) == 0.1963 and round(float(small), 5) == 0.00186
    assert np.allclose(exact(game), phi)


@pytest.mark.parametrize("seed", range(4))
def test_weighted_voting_closed_form_equals_enumeration(seed):
    rng = np.random.default_rng(seed)
    weights = rng.integers(0, 6, size=8)
    quota = rng.integers(1, weights.sum() + 2)        # includes an unreachable quota
    game = G.WeightedVotingGame(weights, quota)
    assert np.allclose(game.shapley_values(), exact(game), atol=1e-12)


def test_weighted_voting_closed_form_needs_integer_weights():
    with pytest.raises(ValueError, match="integer weights"):
        G.WeightedVotingGame([1.5, 1.0], quota=2).shapley_values()


# ---------------------------------------------------------------- unanimity and pairwise games

@pytest.mark.parametrize("n, carrier", [(1, [0]), (4, [2]), (5, [1, 3]), (6, [0, 2, 3, 5])])
def test_unanimity_closed_form_equals_enumeration(n, carrier):
    game = G.UnanimityGame(n, carrier)
    expected = np.zeros(n)
    expected[carrier] = 1 / len(carrier)
    assert np.allclose(game.shapley_values(), expected)
    assert np.allclose(exact(game), expected)


def test_unanimity_rejects_bad_carrier():
    with pytest.raises(ValueError, match="coalition"):
        G.UnanimityGame(3, [])
    with pytest.raises(ValueError, match="coalition"):
        G.UnanimityGame(3, [3])


@pytest.mark.parametrize("seed", range(3))
def test_pairwise_closed_forms_equal_enumeration(seed):
    rng = np.random.default_rng(seed)
    n = 6
    sym = rng.normal(size=(n, n))
    sym = np.triu(sym, 1) + np.triu(sym, 1).T
    game = G.PairwiseGame(rng.normal(size=n), sym)
    assert np.allclose(game.shapley_values(), exact(game), atol=1e-12)
    assert np.allclose(game.interaction_values(), sym)
    assert np.allclose(game.interaction_values(), ml.shapley.interaction_index(game), atol=1e-12)


def test_pairwise_value_counts_each_pair_once():
    main = np.array([1.0, 2.0, 4.0])
    sym = np.array([[0, 10, 0], [10, 0, 100], [0, 100, 0]], dtype=float)
    game = G.PairwiseGame(main, sym)
    assert game([[True, True, False]])[0] == 1 + 2 + 10
    assert game([[True, True, True]])[0] == 7 + 10 + 100
    # an upper- or lower-triangular matrix means the same game
    for tri in (np.triu(sym), np.tril(sym)):
        assert np.allclose(G.PairwiseGame(main, tri)(G.all_coalitions(3)), game(G.all_coalitions(3)))


def test_pairwise_rejects_ambiguous_matrices():
    with pytest.raises(ValueError, match="symmetric or triangular"):
        G.PairwiseGame([0, 0], [[0, 1], [2, 0]])
    with pytest.raises(ValueError, match="diagonal"):
        G.PairwiseGame([0, 0], np.eye(2))
    with pytest.raises(ValueError, match="pairwise"):
        G.PairwiseGame([0, 0, 0], np.zeros((2, 2)))


# ---------------------------------------------------------------- TabularGame

def test_tabular_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    meta = {"model": "teaching", "hash": "abc123", "n_seqs": 8, "ppl": 19.46, "layers": [0, 3, 5]}
    game = G.TabularGame(rng.normal(size=2 ** 5), metadata=meta)
    for name in ("table.npz", "table-without-suffix"):
        game.save(tmp_path / name)
        back = G.TabularGame.load(tmp_path / name)
        assert back.n_players == 5
        assert np.array_equal(back.values, game.values)           # bit-exact
        assert back.metadata == meta
        assert np.array_equal(back(G.all_coalitions(5)), game(G.all_coalitions(5)))


def test_tabular_metadata_is_copied():
    meta = {"a": 1}
    game = G.TabularGame(np.zeros(4), metadata=meta)
    meta["a"] = 2
    assert game.metadata == {"a": 1}


@pytest.mark.parametrize("values", [np.zeros(7), np.zeros(1), np.zeros(0), np.zeros((2, 4))])
def test_tabular_rejects_wrong_length(values):
    with pytest.raises(ValueError, match="values") as err:
        G.TabularGame(values)
    assert "2**n" in str(err.value)


def test_tabular_rejects_non_finite_values_and_lists_them():
    values = np.zeros(16)
    values[[3, 9]] = np.nan
    values[12] = np.inf
    with pytest.raises(ValueError, match="values") as err:
        G.TabularGame(values)
    assert "[3, 9, 12]" in str(err.value)


# ---------------------------------------------------------------- coalition validation

def test_coalitions_of_wrong_width_are_refused():
    game = G.TabularGame(np.zeros(8))
    with pytest.raises(ValueError, match="coalitions") as err:
        game(np.ones((2, 4), dtype=bool))
    assert "3 columns" in str(err.value)
    with pytest.raises(ValueError, match="coalitions"):
        game(np.ones(2, dtype=bool))                  # a single coalition of the wrong length
    with pytest.raises(ValueError, match="coalitions"):
        game(np.ones((2, 3, 1), dtype=bool))


def test_coalitions_of_strings_raise_type_error():
    game = G.UnanimityGame(3, [0])
    with pytest.raises(TypeError, match="coalitions"):
        game(np.array([["1", "0", "1"]]))


@pytest.mark.parametrize("bad", [2, 0.5, -1, np.nan])
def test_coalitions_with_numbers_other_than_zero_one_raise_value_error(bad):
    game = G.UnanimityGame(3, [0])
    with pytest.raises(ValueError, match="coalitions"):
        game(np.array([[1, 0, bad]]))


def test_zero_one_numbers_are_accepted_as_coalitions():
    game = G.TabularGame(np.arange(8.0))
    assert game(np.array([[1, 0, 1]]))[0] == 5.0
    assert game(np.array([1.0, 1.0, 0.0]))[0] == 3.0  # a single 1-D coalition is a batch of one


# ---------------------------------------------------------------- CountingGame

class Spy(G.Game):
    """A game that records every batch it is asked to evaluate."""

    def __init__(self, n):
        self.n_players = n
        self.batches = []

    def value(self, coalitions):
        self.batches.append(coalitions.copy())
        return coalitions.sum(axis=1).astype(float)


def test_counting_game_caches_and_counts():
    spy = Spy(4)
    game = G.CountingGame(spy)
    a, b, c = [1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 1, 1]
    out = game(np.array([a, b, a, a], dtype=bool))   # a duplicate row in one call
    assert out.tolist() == [2.0, 2.0, 2.0, 2.0]
    assert (game.n_queries, game.n_evals) == (4, 2)
    assert len(spy.batches) == 1 and len(spy.batches[0]) == 2   # evaluated once each
    out = game(np.array([b, c], dtype=bool))           # b is cached, c is new
    assert out.tolist() == [2.0, 4.0]
    assert (game.n_queries, game.n_evals) == (6, 3)
    assert spy.batches[1].tolist() == [c]
    game(np.array([a, b, c], dtype=bool))              # all cached: the wrapped game is not called
    assert (game.n_queries, game.n_evals) == (9, 3) and len(spy.batches) == 2


def test_counting_game_results_keep_row_order():
    inner = G.TabularGame(np.random.default_rng(0).normal(size=2 ** 5))
    game = G.CountingGame(inner)
    masks = G.all_coalitions(5)[np.random.default_rng(1).integers(0, 32, size=100)]
    assert np.array_equal(game(masks), inner(masks))
    assert game.n_evals == len(np.unique(G.coalition_index(masks)))


def test_counting_game_without_cache_and_reset():
    spy = Spy(3)
    game = G.CountingGame(spy, cache=False)
    game(np.array([[1, 0, 0], [1, 0, 0]], dtype=bool))
    assert (game.n_queries, game.n_evals) == (2, 2) and len(spy.batches[0]) == 2
    cached = G.CountingGame(Spy(3))
    cached(np.array([[1, 0, 0]], dtype=bool))
    cached.reset()
    assert (cached.n_queries, cached.n_evals) == (0, 0)
    cached(np.array([[1, 0, 0]], dtype=bool))
    assert cached.n_evals == 1 and len(cached.game.batches) == 2   # the cache was forgotten too


def test_counting_game_validates_like_any_game():
    game = G.CountingGame(Spy(3))
    with pytest.raises(ValueError, match="coalitions"):
        game(np.ones((1, 2), dtype=bool))
    assert (game.n_queries, game.n_evals) == (0, 0)


def test_synthetic_layer_game_is_chapter_04s_game():
    """The harder game chapter 04 builds on its first page and its later pages load from minilib."""
    from minilib import shapley as S

    game = G.synthetic_layer_game()
    assert game.n_players == 12 and game.values[0] == 0
    assert np.isclose(game.values[-1], 0.5 + 0.035 + 0.06 + 0.05 + 0.03 + 0.09 + 0.01 + 0.02 + 0.03 + 0.2
                      + 2.0 + 0.3 + 0.3 + 0.4 + 0.5)                       # every effect at the full coalition
    nine, eight = np.zeros((1, 12), bool), np.zeros((1, 12), bool)
    nine[0, :9], eight[0, :8] = True, True                                 # player 8 adds nothing but the cliff
    assert np.isclose(game(nine)[0] - game(eight)[0], 2.0)
    only_1, only_2 = np.zeros((1, 12), bool), np.zeros((1, 12), bool)
    only_1[0, 1], only_2[0, 2] = True, True
    both = only_1 | only_2
    assert np.isclose(game(both)[0], 0.035 + 0.06 + 0.3)                   # substitutes: +0.3 once
    phi = S.exact_shapley(game)
    assert np.isclose(phi.sum(), game.values[-1]) and sorted(np.argsort(phi)[:3].tolist()) == [3, 4, 8]
