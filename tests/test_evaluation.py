"""minilib.evaluation: token NLL, perplexity and the layer game.

The properties that matter:
- perplexity is exp(mean token NLL) computed by hand, whatever the batch size, and a 1-D
  stream drops its incomplete tail window;
- LayerGame's values equal an independent per-mask computation, for both utilities, with
  every distinct mask evaluated once (cache) and v(empty) the embeddings-to-head model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import minilib as ml
from conftest import assert_no_forward_overrides, logits_of

RTOL = 1e-5


def nll_by_hand(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL in float64 from logits: token t is predicted from positions < t."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


# ---------------------------------------------------------------- token_nll and perplexity

def test_token_nll_matches_log_softmax_by_hand(model, calib_ids, base_logits):
    nll = ml.evaluation.token_nll(model, calib_ids)
    assert nll.shape == (calib_ids.shape[0], calib_ids.shape[1] - 1)
    assert nll.dtype == torch.float32
    torch.testing.assert_close(nll.double(), nll_by_hand(base_logits, calib_ids), rtol=1e-5, atol=1e-5)


def test_perplexity_is_exp_mean_nll_and_ignores_batch_size(model, calib_ids, base_logits):
    ids = calib_ids[:, :32]        # causal: the first 32 positions' logits don't see the rest
    by_hand = math.exp(float(nll_by_hand(base_logits[:, :32], ids).mean()))
    for batch_size in (1, 3, 16):
        ppl = ml.evaluation.perplexity(model, ids, window=32, batch_size=batch_size)
        assert ppl == pytest.approx(by_hand, rel=RTOL), batch_size
    assert 1 < by_hand < model.config.vocab_size


def test_perplexity_cuts_rows_into_windows(model, calib_ids):
    """Rows longer than the window are cut; each window starts fresh (no context carried)."""
    window = 32
    cut = calib_ids.reshape(-1, window)
    by_hand = math.exp(float(nll_by_hand(logits_of(model, cut), cut).mean()))
    assert torch.equal(ml.evaluation.windows(calib_ids, window), cut)
    assert ml.evaluation.perplexity(model, calib_ids, window=window) == pytest.approx(by_hand, rel=RTOL)
    # not the same as the uncut rows: the window really changes what is measured
    assert ml.evaluation.perplexity(model, calib_ids, window=64) != pytest.approx(by_hand, rel=1e-3)


def test_perplexity_of_a_stream_drops_the_incomplete_tail(model, calib_ids):
    window = 32
    stream = calib_ids.flatten()[: 3 * window + 10]
    rows = ml.evaluation.windows(stream, window)
    assert torch.equal(rows, stream[: 3 * window].view(3, window))
    ppl = ml.evaluation.perplexity(model, stream, window=window)
    assert ppl == pytest.approx(ml.evaluation.perplexity(model, rows, window=window), rel=1e-12)
    other_tail = stream.clone()
    other_tail[3 * window:] = (other_tail[3 * window:] + 1) % model.config.vocab_size
    assert ml.evaluation.perplexity(model, other_tail, window=window) == pytest.approx(ppl, rel=1e-12)
    other_body = stream.clone()
    other_body[5] = (other_body[5] + 1) % model.config.vocab_size   # a counted token does matter
    assert ml.evaluation.perplexity(model, other_body, window=window) != pytest.approx(ppl, rel=1e-9)


@pytest.mark.parametrize("window", [1, 0, -4, 2.5, True])
def test_perplexity_rejects_bad_windows(model, calib_ids, window):
    with pytest.raises(ValueError, match="window"):
        ml.evaluation.perplexity(model, calib_ids, window=window)


def test_windows_rejects_bad_input():
    with pytest.raises(TypeError, match="input_ids"):
        ml.evaluation.windows(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="input_ids"):
        ml.evaluation.windows(torch.zeros(2, 2, 2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="2 tokens"):
        ml.evaluation.windows(torch.zeros(3, 1, dtype=torch.long), 4)


def test_perplexity_rejects_bad_batch_size(model, calib_ids):
    with pytest.raises(ValueError, match="batch_size"):
        ml.evaluation.perplexity(model, calib_ids, window=64, batch_size=0)


# ---------------------------------------------------------------- LayerGame values

@pytest.fixture(scope="module")
def game_masks(n_layers) -> np.ndarray:
    rng = np.random.default_rng(7)
    masks = rng.random((5, n_layers)) < 0.6
    masks[0] = True          # the full model
    masks[1] = False         # the empty coalition
    masks[2, 0] = False      # without the essential first layer
    return masks


@pytest.fixture(scope="module")
def independent_losses(model, calib_ids, game_masks) -> np.ndarray:
    """Mean token NLL under each mask, one keep_only forward per mask: no LayerGame involved."""
    losses = []
    for keep in game_masks:
        with ml.layers.keep_only(model, keep):
            losses.append(float(ml.evaluation.token_nll(model, calib_ids).double().mean()))
    return np.array(losses)


@pytest.mark.parametrize("utility,mask_batch_size", [("neg_loss", 2), ("ppl_ratio", 8)])
def test_layer_game_values_match_independent_computation(model, calib_ids, game_masks, independent_losses,
                                                         utility, mask_batch_size):
    game = ml.evaluation.LayerGame(model, calib_ids, utility=utility, mask_batch_size=mask_batch_size,
                                   progress=False)
    assert game.n_players == 12
    values = game(game_masks)
    assert values.shape == (len(game_masks),)
    base_loss = independent_losses[0]
    if utility == "neg_loss":
        expected = -independent_losses
    else:
        expected = math.exp(base_loss) / np.exp(independent_losses)   # base_ppl / ppl
    np.testing.assert_allclose(values, expected, rtol=RTOL)
    assert game.base_ppl == pytest.approx(math.exp(base_loss), rel=RTOL)
    assert np.isfinite(values).all()
    assert_no_forward_overrides(model)


def test_layer_game_grand_and_empty_coalitions(model, calib_ids, n_layers):
    game = ml.evaluation.LayerGame(model, calib_ids, utility="ppl_ratio", progress=False)
    assert game.grand_value() == 1.0
    assert game(np.ones(n_layers, dtype=bool))[0] == 1.0
    # v(empty): every layer skipped, embeddings go through the final norm straight into the head
    empty = game.empty_value()
    with torch.no_grad():
        head_logits = model.lm_head(model.model.norm(model.model.embed_tokens(calib_ids)))
    empty_loss = float(nll_by_hand(head_logits, calib_ids).mean())
    assert math.isfinite(empty) and 0 < empty < 1
    assert empty == pytest.approx(math.exp(game.base_loss - empty_loss), rel=RTOL)
    assert game.perplexity(np.zeros(n_layers, dtype=bool)) == pytest.approx(math.exp(empty_loss), rel=RTOL)

    neg = ml.evaluation.LayerGame(model, calib_ids, utility="neg_loss", progress=False)
    assert neg.empty_value() == pytest.approx(-empty_loss, rel=RTOL)
    assert neg.grand_value() == pytest.approx(-game.base_loss, rel=1e-12)


def test_layer_game_perplexity_matches_perplexity_under_keep_only(model, calib_ids, n_layers):
    game = ml.evaluation.LayerGame(model, calib_ids, progress=False)
    keep = np.ones(n_layers, dtype=bool)
    keep[[2, 9]] = False
    with ml.layers.keep_only(model, keep):
        expected = ml.evaluation.perplexity(model, calib_ids, window=calib_ids.shape[1])
    assert game.perplexity(keep) == pytest.approx(expected, rel=RTOL)
    assert game.perplexity(np.ones(n_layers, dtype=bool)) == pytest.approx(game.base_ppl, rel=1e-12)


# ---------------------------------------------------------------- LayerGame cache and counting

@pytest.fixture
def small_game(model, calib_ids):
    return ml.evaluation.LayerGame(model, calib_ids[:2, :32], utility="neg_loss", mask_batch_size=4,
                                   progress=False)


def test_layer_game_caches_masks(small_game, n_layers):
    game = small_game
    assert (game.n_evals, game.n_queries) == (1, 1)        # the full model, for the baseline
    masks = np.ones((3, n_layers), dtype=bool)
    masks[0, 5] = False
    masks[1, :6] = False
    masks[2, ::2] = False
    first = game(masks)
    assert (game.n_evals, game.n_queries) == (4, 4)
    again = game(masks)
    assert game.n_evals == 4                               # nothing re-evaluated
    assert game.n_queries == 7                             # but every request is counted
    np.testing.assert_array_equal(first, again)


def test_layer_game_evaluates_duplicates_once(small_game, n_layers):
    game = small_game
    a = np.zeros(n_layers, dtype=bool)
    a[:4] = True
    b = ~a
    values = game(np.stack([a, a, b, a.astype(int).astype(bool), np.ones(n_layers, dtype=bool)]))
    assert game.n_evals == 1 + 2                           # a and b; the full mask was cached at init
    assert game.n_queries == 1 + 5
    assert values[0] == values[1] == values[3]
    assert values[0] != values[2]
    assert values[4] == pytest.approx(-game.base_loss, rel=1e-12)


def test_layer_game_works_on_other_architectures(tiny, tiny_ids):
    kind, model = tiny
    game = ml.evaluation.LayerGame(model, tiny_ids, utility="neg_loss", progress=False)
    masks = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 1]], dtype=bool)
    for keep, value in zip(masks, game(masks)):
        with ml.layers.keep_only(model, keep):
            expected = -float(ml.evaluation.token_nll(model, tiny_ids).double().mean())
        assert value == pytest.approx(expected, rel=RTOL), (kind, keep)


# ---------------------------------------------------------------- LayerGame bad inputs

def test_layer_game_rejects_unknown_utility(model, calib_ids):
    with pytest.raises(ValueError) as err:
        ml.evaluation.LayerGame(model, calib_ids, utility="accuracy")
    assert "utility" in str(err.value) and "ppl_ratio" in str(err.value)


@pytest.mark.parametrize("kwargs,word", [({"mask_batch_size": 0}, "mask_batch_size"),
                                         ({"mask_batch_size": 2.0}, "mask_batch_size")])
def test_layer_game_rejects_bad_options(model, calib_ids, kwargs, word):
    with pytest.raises(ValueError, match=word):
        ml.evaluation.LayerGame(model, calib_ids, **kwargs)


def test_layer_game_rejects_bad_input_ids(model, calib_ids):
    with pytest.raises(ValueError, match="input_ids"):
        ml.evaluation.LayerGame(model, calib_ids[0])
    with pytest.raises(ValueError, match="input_ids"):
        ml.evaluation.LayerGame(model, calib_ids[:, :1])


@pytest.mark.parametrize("bad,exc,word", [
    ("short", ValueError, "coalitions"),
    ("long", ValueError, "coalitions"),
    ("two", ValueError, "coalitions"),
    ("half", ValueError, "coalitions"),
    ("strings", TypeError, "coalitions"),
])
def test_layer_game_call_rejects_bad_masks(small_game, n_layers, bad, exc, word):
    masks = {"short": np.ones((2, n_layers - 1), dtype=bool), "long": np.ones(n_layers + 1, dtype=bool),
             "two": [[2] + [1] * (n_layers - 1)], "half": [[0.5] + [0.0] * (n_layers - 1)],
             "strings": [["1"] * n_layers]}[bad]
    with pytest.raises(exc) as err:
        small_game(masks)
    assert word in str(err.value)
    assert small_game.n_evals == 1


def test_layer_game_perplexity_rejects_bad_mask(small_game, n_layers):
    with pytest.raises(ValueError, match="keep"):
        small_game.perplexity(np.ones(n_layers - 1, dtype=bool))
