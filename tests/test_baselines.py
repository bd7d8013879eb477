"""minilib.baselines: every layer-ranking heuristic on a model or game whose right answer is known.

The planted answer: a copy of the teaching model whose layer ``IDENTITY`` has zero ``o_proj`` and
``down_proj`` weights. A pre-norm block then adds exactly 0 to the residual stream, so the layer
is the identity: its Block Influence, leave-one-out loss increase and Taylor importance are 0,
and every criterion that looks at the model must remove it first, unless (for the loss-based ones)
removing some other layer *lowers* the loss.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import minilib as ml
from conftest import assert_same_state, snapshot

IDENTITY = 5


@pytest.fixture(scope="module")
def planted(model) -> torch.nn.Module:
    """The teaching model with layer ``IDENTITY`` turned into an exact identity map."""
    m = copy.deepcopy(model)
    layer = ml.layers.decoder_layers(m)[IDENTITY]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    return m.eval()


def test_identity_layer_is_really_the_identity(planted, small_ids):
    full = np.ones(12, dtype=bool)
    skip = full.copy()
    skip[IDENTITY] = False
    game = ml.evaluation.LayerGame(planted, small_ids, utility="neg_loss")
    assert abs(game.losses(skip)[0] - game.base_loss) < 1e-6


# ---------------------------------------------------------------- Block Influence

@pytest.mark.parametrize("angular", [False, True])
def test_block_influence_of_identity_layer_is_zero(planted, small_ids, angular):
    scores = ml.baselines.block_influence(planted, small_ids, angular=angular)
    assert scores.shape == (12,)
    assert abs(scores[IDENTITY]) < (2e-3 if angular else 1e-5)  # arccos is steep near cos = 1
    others = np.delete(scores, IDENTITY)
    assert (others > 10 * abs(scores[IDENTITY])).all()


@pytest.mark.parametrize("method", ["block_influence", "block_influence_angular"])
def test_identity_layer_is_removed_first(planted, small_ids, method):
    assert ml.baselines.select_layers(planted, small_ids, method, 1) == [IDENTITY]
    assert ml.baselines.rank_layers(planted, small_ids, method)[0] == IDENTITY


@pytest.mark.parametrize("method", ["loo_ppl", "sleb"])
def test_loss_based_methods_remove_the_identity_right_after_harmful_layers(planted, small_ids, method):
    """Removing the identity leaves the loss unchanged; only a layer whose removal *lowers* the loss beats it.

    On the teaching model removing one middle layer alone lowers the calibration loss slightly, so
    "identity first" is not the property: "identity first among the layers that do not hurt" is.
    """
    full = np.ones(12, dtype=bool)
    single = ~np.eye(12, dtype=bool)
    base = ml.evaluation.mask_losses(planted, small_ids, full[None])[0]
    delta = ml.evaluation.mask_losses(planted, small_ids, single) - base
    assert abs(delta[IDENTITY]) < 1e-6
    harmful = [i for i in np.argsort(delta) if delta[i] < -1e-6]   # layers whose removal helps
    order = ml.baselines.rank_layers(planted, small_ids, method)
    if method == "loo_ppl":
        assert order[: len(harmful) + 1] == harmful + [IDENTITY]
    else:  # greedy: the first removal is the best single removal, the identity or a harmful layer
        assert order[0] == (harmful[0] if harmful else IDENTITY)
        assert IDENTITY in order[: len(harmful) + 1]


def test_block_influence_is_one_minus_cosine(model, small_ids):
    """Recompute ShortGPT's score from hidden states returned by the model itself."""
    with torch.no_grad():
        hs = model(input_ids=small_ids, output_hidden_states=True, use_cache=False).hidden_states
    # hidden_states[i] is layer i's input; the last entry is after the final norm, so use layers 0..L-2
    expected = [float((1 - torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)).double().mean())
                for i in range(11)]
    got = ml.baselines.block_influence(model, small_ids)
    np.testing.assert_allclose(got[:11], expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- leave-one-out

def test_leave_one_out_of_identity_layer_is_zero(planted, small_ids):
    loo = ml.baselines.leave_one_out(ml.evaluation.LayerGame(planted, small_ids, utility="neg_loss"))
    assert abs(loo[IDENTITY]) < 1e-6
    assert loo.argmax() == 0  # layer 0 stays essential


def test_loo_ppl_scores_are_leave_one_out(model, small_ids):
    scores = ml.baselines.layer_scores(model, small_ids, "loo_ppl")
    game = ml.evaluation.LayerGame(model, small_ids, utility="neg_loss")
    expected = [game.losses(~np.eye(12, dtype=bool)[i])[0] - game.base_loss for i in range(12)]
    np.testing.assert_allclose(scores, expected, atol=1e-9)


# ---------------------------------------------------------------- SLEB

def brute_force_greedy(model, ids, n_remove):
    """SLEB re-implemented without LayerGame: keep_only + token_nll, one mask at a time."""
    n = len(ml.layers.decoder_layers(model))
    keep, order = np.ones(n, dtype=bool), []
    for _ in range(n_remove):
        losses = {}
        for i in np.flatnonzero(keep):
            trial = keep.copy()
            trial[i] = False
            with ml.layers.keep_only(model, trial):
                losses[int(i)] = float(ml.evaluation.token_nll(model, ids).double().mean())
        best = min(losses, key=losses.get)
        keep[best] = False
        order.append(best)
    return order


def test_sleb_equals_brute_force_greedy(six_layer, small_ids):
    order = ml.baselines.sleb_order(ml.evaluation.LayerGame(six_layer, small_ids, utility="neg_loss"), 5)
    assert order == brute_force_greedy(six_layer, small_ids, 5)
    assert ml.baselines.select_layers(six_layer, small_ids, "sleb", 3) == order[:3]
    assert ml.baselines.rank_layers(six_layer, small_ids, "sleb")[:5] == order


class _TableLosses:
    """A LayerGame stand-in whose losses come from a value table (neg_loss utility)."""

    def __init__(self, table):
        self.table, self.n_players, self.n_calls = table, table.n_players, 0

    def losses(self, masks):
        self.n_calls += 1
        return -self.table(masks)


def test_sleb_on_a_game_follows_the_greedy_path():
    """On an additive game with known costs, greedy removes the cheapest layer each round."""
    costs = np.array([5.0, 0.3, 0.1, 2.0, 0.2])
    coalitions = ml.games.all_coalitions(5)
    table = ml.games.TabularGame(-(~coalitions * costs).sum(axis=1))
    game = _TableLosses(table)
    assert ml.baselines.sleb_order(game, 4) == [2, 4, 1, 3]
    assert game.n_calls == 4  # one batched call per round


def test_sleb_rescoring_differs_from_one_shot_when_layers_interact():
    """Layers 1 and 2 are redundant copies: one alone is cheap, both together are expensive."""
    coalitions = ml.games.all_coalitions(4)
    cost = np.where(~coalitions[:, 1] & ~coalitions[:, 2], 3.0, 0.0) + (~coalitions * [9, 0.0, 0.0, 1.0]).sum(1)
    game = _TableLosses(ml.games.TabularGame(-cost))
    assert ml.baselines.sleb_order(game, 2) == [1, 3]  # after removing 1, layer 2 becomes essential


# ---------------------------------------------------------------- tail and random

def test_tail_removes_last_layers(model, small_ids):
    assert ml.baselines.rank_layers(model, small_ids, "tail") == list(range(11, -1, -1))
    assert ml.baselines.select_layers(model, small_ids, "tail", 3) == [11, 10, 9]


def test_random_is_seeded(model, small_ids):
    a = ml.baselines.rank_layers(model, small_ids, "random", rng=7)
    b = ml.baselines.rank_layers(model, small_ids, "random", rng=np.random.default_rng(7))
    c = ml.baselines.rank_layers(model, small_ids, "random", rng=8)
    assert a == b and sorted(a) == list(range(12)) and a != c
    assert ml.baselines.select_layers(model, small_ids, "random", 4, rng=7) == a[:4]


# ---------------------------------------------------------------- Taylor+

def test_protected_layers():
    assert ml.baselines.protected_layers(32) == {0, 1, 2, 3, 30, 31}  # Kim et al.'s rule for LLaMA-7B
    assert ml.baselines.protected_layers(12) == {0, 1, 11}
    assert ml.baselines.protected_layers(3) == {0, 2}


def test_taylor_importance_of_identity_layer_is_zero(planted, small_ids):
    before = snapshot(planted)
    scores = ml.baselines.taylor_importance(planted, small_ids)
    assert scores[IDENTITY] == 0.0
    assert (np.delete(scores, IDENTITY) > 0).all()
    assert all(p.grad is None for p in planted.parameters())  # gradients cleaned up
    assert_same_state(planted, before)


def test_taylor_plus_never_ranks_protected_layers_first(planted, small_ids):
    protected = ml.baselines.protected_layers(12)
    order = ml.baselines.rank_layers(planted, small_ids, "taylor_plus")
    n_free = 12 - len(protected)
    assert not set(order[:n_free]) & protected
    assert set(order[n_free:]) == protected
    assert order[0] == IDENTITY


# ---------------------------------------------------------------- argument checks

@pytest.mark.parametrize("n_remove", [0, -1, 12, 13, True, 2.0])
def test_select_layers_rejects_bad_n_remove(model, small_ids, n_remove):
    with pytest.raises(ValueError, match="n_remove"):
        ml.baselines.select_layers(model, small_ids, "tail", n_remove)


@pytest.mark.parametrize("fn", ["select_layers", "rank_layers", "layer_scores"])
def test_unknown_method_is_rejected(model, small_ids, fn):
    args = (model, small_ids, "magnitude") + ((2,) if fn == "select_layers" else ())
    with pytest.raises(ValueError, match="method must be one of"):
        getattr(ml.baselines, fn)(*args)


# ---------------------------------------------------------------- every method against its definition

def _mean_nll(model, ids) -> float:
    return float(ml.evaluation.token_nll(model, ids).double().mean())


def independent_loo(model, ids) -> np.ndarray:
    """Loss increase with each layer's weights zeroed (the paper's reference, no LayerGame, no skipping)."""
    n = len(ml.layers.decoder_layers(model))
    full = _mean_nll(model, ids)
    out = []
    for i in range(n):
        with ml.layers.zero_layers(model, [i]):
            out.append(_mean_nll(model, ids) - full)
    return np.array(out)


def independent_taylor_plus(model, ids) -> np.ndarray:
    """Σ|W ⊙ ∂L/∂W| per block from torch.autograd.grad on a copy; the protected blocks score +inf."""
    m = copy.deepcopy(model)
    logits = m(input_ids=ids, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    layers = ml.layers.decoder_layers(m)
    params = [list(layer.parameters()) for layer in layers]
    grads = torch.autograd.grad(loss, [p for ps in params for p in ps])
    scores, k = [], 0
    for ps in params:
        scores.append(float(sum((p.detach() * g).abs().double().sum() for p, g in zip(ps, grads[k: k + len(ps)]))))
        k += len(ps)
    scores = np.array(scores)
    scores[sorted(ml.baselines.protected_layers(len(layers)))] = np.inf
    return scores


def independent_block_influence(model, ids, angular: bool) -> np.ndarray:
    """1 − cos (or arccos(cos)/π) between each layer's input and output, read from output_hidden_states;
    the last layer's output (before the final norm) from a forward hook."""
    last = {}
    layers = ml.layers.decoder_layers(model)
    handle = layers[-1].register_forward_hook(lambda m, a, out: last.update(h=out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            hs = list(model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states)
    finally:
        handle.remove()
    states = hs[:len(layers)] + [last["h"]]
    cos = [torch.nn.functional.cosine_similarity(states[i].double(), states[i + 1].double(), dim=-1).clamp(-1, 1)
           for i in range(len(layers))]
    return np.array([float((torch.arccos(c) / torch.pi if angular else 1 - c).mean()) for c in cos])


def independent_sleb(model, ids) -> np.ndarray:
    """Round of removal by brute-force greedy (the layer never removed ranks last)."""
    n = len(ml.layers.decoder_layers(model))
    order = brute_force_greedy(model, ids, n - 1)
    scores = np.full(n, float(n))
    scores[order] = np.arange(n - 1)
    return scores


INDEPENDENT = {  # method -> its defining score computed without minilib.baselines (larger = more important)
    "loo_ppl": independent_loo,
    "taylor_plus": independent_taylor_plus,
    "block_influence": lambda m, ids: independent_block_influence(m, ids, angular=False),
    "block_influence_angular": lambda m, ids: independent_block_influence(m, ids, angular=True),
    "sleb": independent_sleb,
    "tail": lambda m, ids: -np.arange(len(ml.layers.decoder_layers(m)), dtype=float),
    "random": lambda m, ids: np.random.default_rng(0).permutation(len(ml.layers.decoder_layers(m))).astype(float),
}


@pytest.mark.parametrize("method", ml.baselines.METHODS)
def test_ranking_sorts_the_methods_defining_score(six_layer, small_ids, method):
    """Every baseline's ranking is its defining score, recomputed independently, sorted ascending."""
    expected = INDEPENDENT[method](six_layer, small_ids)
    order = ml.baselines.rank_layers(six_layer, small_ids, method, rng=0)
    assert order == np.argsort(expected, kind="stable").tolist(), (method, expected)
    if method not in ("tail", "random", "sleb"):   # these three are defined by their order alone
        got = ml.baselines.layer_scores(six_layer, small_ids, method, rng=0)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
        gaps = np.diff(np.sort(expected[np.isfinite(expected)]))
        assert gaps.min() > 1e-4 * np.abs(expected[np.isfinite(expected)]).max(), "a near tie makes the order moot"
