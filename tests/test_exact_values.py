"""Prefix-shared exact evaluation (`exact_values`) and the shipped 2**12 tables (chapter 03)."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import torch

import minilib as ml
from conftest import TINY_VOCAB, logits_of, max_abs_diff, tiny_model


@pytest.fixture(scope="module")
def small_game(model, tokenizer):
    """The teaching model cut to its first 7 layers, on 2 x 32 calibration tokens: 128 masks."""
    short = ml.layers.prune_layers(copy.deepcopy(model), drop=list(range(7, 12)))
    ids = ml.teaching.calibration_ids(tokenizer, 2, 32)
    return short, ids


@pytest.mark.parametrize("utility", ["neg_loss", "ppl_ratio"])
def test_prefix_shared_equals_independent(small_game, utility):
    short, ids = small_game
    table = ml.evaluation.exact_values(ml.evaluation.LayerGame(short, ids, utility=utility), progress=False)
    independent = ml.evaluation.LayerGame(short, ids, utility=utility)(ml.games.all_coalitions(7))
    assert np.abs(table.values - independent).max() <= 1e-5
    assert table.metadata["layer_forwards"] == 2 ** 7 - 1


@pytest.mark.parametrize("bfs_levels", [0, 3, 7])
def test_walk_order_does_not_change_values(small_game, bfs_levels):
    short, ids = small_game
    reference = ml.evaluation.exact_values(ml.evaluation.LayerGame(short, ids), progress=False)
    table = ml.evaluation.exact_values(ml.evaluation.LayerGame(short, ids), bfs_levels=bfs_levels,
                                       row_chunk=4, progress=False)
    assert np.abs(table.values - reference.values).max() <= 1e-6
    assert table.metadata["layer_forwards"] == 2 ** 7 - 1


def test_exact_values_fills_the_game_cache(small_game):
    short, ids = small_game
    game = ml.evaluation.LayerGame(short, ids, utility="neg_loss")
    table = ml.evaluation.exact_values(game, progress=False)
    before = game.n_evals
    masks = ml.games.all_coalitions(7)[::9]
    assert np.array_equal(game(masks), table(masks))
    assert game.n_evals == before  # answered from the cache


def zeroed_losses(model, ids, masks) -> np.ndarray:
    """The paper's reference, independent of skipping and of the prefix walk: one full forward per
    mask with the dropped layers' weights zeroed."""
    out = []
    for keep in masks:
        with ml.layers.zero_layers(model, ~keep):
            out.append(float(ml.evaluation.token_nll(model, ids).double().mean()))
    return np.array(out)


def test_prefix_shared_on_other_architectures(tiny, tiny_ids):
    """Gemma, Gemma 3, Phi-3, OLMo, Mixtral, ... (conftest.TINY_KINDS), 3 layers: all 8 masks."""
    kind, model = tiny
    masks = ml.games.all_coalitions(3)
    table = ml.evaluation.exact_values(ml.evaluation.LayerGame(model, tiny_ids, utility="neg_loss"), progress=False)
    reference = -zeroed_losses(model, tiny_ids, masks)
    assert np.abs(table(masks) - reference).max() <= 1e-5, kind
    assert np.ptp(reference) > 1e-2, kind                  # the masks matter, so the match means something


WINDOWED = {  # kind -> config making some of 4 layers attend to the last 4 tokens only
    "mistral": {"sliding_window": 4},                                  # every layer
    "gemma2": {"sliding_window": 4},                                   # layers 0 and 2
    "gemma3": {"sliding_window": 4, "sliding_window_pattern": 2},      # layers 0 and 2
    "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2},   # layers 2 and 3
}


@pytest.mark.parametrize("kind", sorted(WINDOWED))
def test_prefix_shared_with_an_active_sliding_window(kind):
    """16 tokens against a window of 4: the window changes the model, and the prefix walk (which replays
    each layer's recorded attention mask) still equals the zero-weights reference on all 16 masks."""
    settings = WINDOWED[kind]
    model = tiny_model(kind, 4, **settings)
    full = tiny_model(kind, 4, **{**settings, "sliding_window": 64})    # the same weights, no window in reach
    full.load_state_dict(model.state_dict())
    ids = torch.randint(0, TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    assert max_abs_diff(logits_of(model, ids), logits_of(full, ids)) > 1e-2, "the window does not act"
    masks = ml.games.all_coalitions(4)
    table = ml.evaluation.exact_values(ml.evaluation.LayerGame(model, ids, utility="neg_loss"), progress=False)
    assert np.abs(table(masks) + zeroed_losses(model, ids, masks)).max() <= 1e-5
    assert table.metadata["layer_forwards"] == 2 ** 4 - 1
    without_window = ml.evaluation.exact_values(ml.evaluation.LayerGame(full, ids, utility="neg_loss"),
                                                progress=False)
    assert np.abs(table.values - without_window.values).max() > 1e-3


def test_bfs_levels_out_of_range(small_game):
    short, ids = small_game
    with pytest.raises(ValueError, match="bfs_levels"):
        ml.evaluation.exact_values(ml.evaluation.LayerGame(short, ids), bfs_levels=8, progress=False)


# --- the shipped tables ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    return {u: ml.teaching.exact_table(u) for u in ml.evaluation.UTILITIES}


def test_shipped_tables_belong_to_the_shipped_model(shipped, tokenizer):
    model_hash = ml.teaching.manifest()["model_sha256"]
    ids = ml.teaching.exact_calibration_ids(tokenizer)
    for table in shipped.values():
        assert table.n_players == 12
        assert table.metadata["model_sha256"] == model_hash
        assert table.metadata["calibration_ids_sha256"] == hashlib.sha256(ids.numpy().tobytes()).hexdigest()


def test_shipped_tables_are_consistent(shipped):
    neg_loss, ratio = shipped["neg_loss"].values, shipped["ppl_ratio"].values
    base = shipped["neg_loss"].metadata["base_loss"]
    assert np.allclose(ratio, np.exp(base + neg_loss), rtol=1e-12)
    assert ratio[-1] == pytest.approx(1.0, abs=1e-9)  # the full model is its own baseline


def test_shipped_table_matches_a_fresh_sample(shipped, model, tokenizer):
    """Recompute 32 random entries (plus the empty and full masks) by independent evaluation."""
    rng = np.random.default_rng(20261128)
    index = np.concatenate([[0, 2 ** 12 - 1], rng.choice(2 ** 12, size=32, replace=False)])
    masks = ((index[:, None] >> np.arange(12)) & 1).astype(bool)
    ids = ml.teaching.exact_calibration_ids(tokenizer)
    for utility, table in shipped.items():
        game = ml.evaluation.LayerGame(model, ids, utility=utility, mask_batch_size=12)
        assert np.abs(game(masks) - table.values[index]).max() <= 1e-5, utility


def test_exact_table_rejects_unknown_utility():
    with pytest.raises(ValueError, match="utility"):
        ml.teaching.exact_table("accuracy")
