"""Prefix-tree evaluation of sampled masks, the model's own head in bounded memory, and
accelerate-dispatched models (chapter 07).

The properties that matter: any set of masks evaluated through the trie of its layer prefixes
gives the same losses as one full forward per mask (<= 1e-5), with fewer layer forwards; the
head is the model's own (Granite's logits scaling, Gemma 2's soft-capping); the loss computed
in blocks equals the loss from full logits; models whose weights accelerate streams in through
hooks evaluate exactly like plain ones.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import minilib as ml
from conftest import tiny_model

TOL = 1e-5


def paper_design(n: int, per_stratum: int, seed: int = 0) -> np.ndarray:
    """The paper's strata scaled to n layers, plus leave-one-out: the masks stage 1 evaluates."""
    sizes = ml.pruning.paper_keep_sizes(n)
    masks = ml.surrogate.sample_stratified_masks(n, per_stratum * len(sizes), sizes, rng=seed)
    return np.concatenate([masks, ~np.eye(n, dtype=bool)])


def independent_losses(model, ids, masks) -> np.ndarray:
    """One plain forward per mask through keep_only, loss from the full logits."""
    out = []
    for mask in masks:
        with ml.layers.keep_only(model, mask):
            out.append(float(ml.evaluation.token_nll(model, ids).double().mean()))
    return np.array(out)


HEADS = {  # kind -> a head that is more than lm_head(norm(h))
    "granite": {"logits_scaling": 4.0, "residual_multiplier": 0.5, "embedding_multiplier": 3.0},
    "gemma2": {"final_logit_softcapping": 5.0},
}


def _tiny(kind: str) -> torch.nn.Module:
    return tiny_model(kind, 5, **HEADS[kind])


@pytest.mark.parametrize("mask_batch_size", [1, 5, 64])
def test_prefix_tree_equals_independent_on_the_paper_design(model, calib_ids, n_layers, mask_batch_size):
    ids = calib_ids[:2, :48]
    masks = paper_design(n_layers, 6)
    walked = ml.evaluation.mask_losses(model, ids, masks, mask_batch_size=mask_batch_size, row_chunk=8)
    assert np.abs(walked - independent_losses(model, ids, masks)).max() <= TOL


def test_prefix_tree_saves_layer_forwards_and_counts_them(model, calib_ids, n_layers):
    masks = np.unique(paper_design(n_layers, 20), axis=0)
    forwards = ml.evaluation.evaluate_masks(model, calib_ids[:1, :16], masks)
    plain = int(masks.sum())
    # distinct prefixes that end in a kept layer: the exact number of layer forwards a trie needs
    distinct = len({masks[i, : k + 1].tobytes() for i in range(len(masks)) for k in range(n_layers) if masks[i, k]})
    assert forwards == distinct
    assert plain / forwards > 1.7


def test_a_mask_and_its_flips_share_the_prefix(model, calib_ids, n_layers):
    base = np.ones(n_layers, dtype=bool)
    flips = np.repeat(base[None], n_layers, axis=0) ^ np.eye(n_layers, dtype=bool)
    forwards = ml.evaluation.evaluate_masks(model, calib_ids[:1, :16], np.concatenate([base[None], flips]))
    # flip j shares layers < j with the base mask: only its suffix after j runs again
    assert forwards == n_layers + sum(n_layers - j - 1 for j in range(n_layers))


def test_duplicates_order_and_empty_input(model, calib_ids, n_layers):
    ids = calib_ids[:1, :16]
    rng = np.random.default_rng(3)
    masks = rng.random((6, n_layers)) < 0.5
    masks = np.concatenate([masks, masks[::-1], np.zeros((1, n_layers), bool)])
    losses = ml.evaluation.mask_losses(model, ids, masks)
    assert np.array_equal(losses[:6], losses[6:12][::-1])
    assert np.abs(losses - independent_losses(model, ids, masks)).max() <= TOL
    assert ml.evaluation.evaluate_masks(model, ids, np.zeros((0, n_layers), bool)) == 0
    with pytest.raises(ValueError, match="masks must have shape"):
        ml.evaluation.evaluate_masks(model, ids, masks[:, :3])
    with pytest.raises(ValueError, match="mask_batch_size"):
        ml.evaluation.evaluate_masks(model, ids, masks, mask_batch_size=0)


def test_stacked_states_repeat_only_per_row_arguments(tiny_ids):
    """States of several masks go through a layer stacked, so the recorded per-row arguments are
    repeated; a tensor the model merely passes to its layers, with 3 rows like the batch, is not."""
    model = tiny_model("llama", 3)
    extra = torch.arange(15.0).view(3, 5)
    seen = []
    add_extra = model.model.register_forward_pre_hook(lambda m, a, k: (a, {**k, "extra": extra}), with_kwargs=True)
    spy = ml.layers.decoder_layers(model)[2].self_attn.register_forward_pre_hook(
        lambda m, a, k: seen.append((k["hidden_states"].shape[0], k["extra"])), with_kwargs=True)
    masks = ml.games.all_coalitions(3)
    try:
        losses = ml.evaluation.mask_losses(model, tiny_ids, masks, mask_batch_size=8)
    finally:
        add_extra.remove()
        spy.remove()
    assert max(rows for rows, _ in seen) == 4 * 3              # four prefixes reach layer 2 together
    assert all(torch.equal(e, extra) for _, e in seen)
    assert np.abs(losses - independent_losses(model, tiny_ids, masks)).max() <= TOL


@pytest.mark.parametrize("kind", ["granite", "gemma2"])
def test_the_head_is_the_models_own(kind):
    model = _tiny(kind)
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    masks = ml.games.all_coalitions(5)
    table = ml.evaluation.exact_values(ml.evaluation.LayerGame(model, ids, "neg_loss"), progress=False)
    assert np.abs(-table.values - independent_losses(model, ids, masks)).max() <= TOL
    # rebuilding the head as lm_head(norm(h)) would miss the scaling / capping: it does differ
    hidden = ml.evaluation.final_hidden(model, ids)
    plain = model.lm_head(model.model.norm(hidden)).float()
    own = model(input_ids=ids, use_cache=False).logits.float()
    assert (plain - own).abs().max() > 0.1


@pytest.mark.parametrize("max_logits", [1, 100 * 5, 100 * 40])
def test_loss_in_bounded_blocks_equals_full_logits(max_logits):
    model = _tiny("gemma2")
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(1))
    full = ml.evaluation.token_nll(model, ids)
    blocked = ml.evaluation.token_nll(model, ids, max_logits=max_logits)
    torch.testing.assert_close(blocked, full, rtol=1e-5, atol=1e-5)


def test_bounded_loss_in_the_layer_game(model, calib_ids, n_layers):
    masks = paper_design(n_layers, 2)
    small = ml.evaluation.LayerGame(model, calib_ids, "neg_loss", max_logits=4096 * 50, engine="forward")
    full = ml.evaluation.LayerGame(model, calib_ids, "neg_loss", engine="forward")
    assert np.abs(small(masks) - full(masks)).max() <= TOL


@pytest.mark.parametrize("engine", ["prefix", "forward"])
def test_engines_agree_and_count(model, calib_ids, n_layers, engine):
    masks = paper_design(n_layers, 3, seed=5)
    game = ml.evaluation.LayerGame(model, calib_ids[:2], "ppl_ratio", engine=engine, mask_batch_size=4)
    values = game(masks)
    reference = np.exp(game.base_loss - independent_losses(model, calib_ids[:2], masks))
    assert np.abs(values - reference).max() <= TOL
    assert game.n_evals == len(np.unique(masks, axis=0)) + 1      # + the full model
    assert game.layer_forwards > 0
    with pytest.raises(ValueError, match="engine"):
        ml.evaluation.LayerGame(model, calib_ids, engine="magic")


# ---------------------------------------------------------------- accelerate-dispatched models

@pytest.fixture(scope="module")
def offloaded(model):
    """The teaching model with its weights on ``meta``, streamed in by accelerate's hooks per forward."""
    accelerate = pytest.importorskip("accelerate")
    copy_ = accelerate.cpu_offload(copy.deepcopy(model), execution_device="cpu")
    assert any(p.device.type == "meta" for p in copy_.parameters())
    return copy_


def test_dispatched_model_evaluates_like_the_plain_one(model, offloaded, calib_ids, n_layers):
    ids = calib_ids[:2, :32]
    assert ml.evaluation.input_device(offloaded).type == "cpu"
    masks = paper_design(n_layers, 2, seed=7)
    reference = independent_losses(model, ids, masks)
    for engine in ("prefix", "forward"):
        game = ml.evaluation.LayerGame(offloaded, ids, "neg_loss", engine=engine, mask_batch_size=3)
        assert np.abs(-game(masks) - reference).max() <= TOL, engine


def test_dispatched_model_baselines(model, offloaded, calib_ids):
    for method in ("block_influence", "block_influence_angular"):
        ours = ml.baselines.layer_scores(offloaded, calib_ids, method)
        plain = ml.baselines.layer_scores(model, calib_ids, method)
        np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-6)


def test_dispatched_model_works_with_a_store(model, offloaded, calib_ids, tmp_path):
    """The fingerprint reads offloaded weights through accelerate's hooks: same identity as the plain model."""
    assert ml.store.model_fingerprint(offloaded) == ml.store.model_fingerprint(model)
    ids = calib_ids[:1, :16]
    plain = ml.evaluation.LayerGame(model, ids, store=tmp_path / "s.sqlite")
    masks = paper_design(len(ml.layers.decoder_layers(model)), 1)
    values = plain(masks)
    resumed = ml.evaluation.LayerGame(offloaded, ids, store=tmp_path / "s.sqlite")
    assert np.array_equal(resumed(masks), values) and resumed.n_evals == 0


def test_a_nan_loss_is_kept_in_memory_but_not_stored(model, calib_ids, tmp_path):
    ids = calib_ids[:1, :16]
    game = ml.evaluation.LayerGame(model, ids, store=tmp_path / "s.sqlite")
    masks = paper_design(len(ml.layers.decoder_layers(model)), 1)[:2]
    with pytest.warns(RuntimeWarning, match="NaN loss"):
        game._record(masks, np.array([np.nan, 2.5]))
    assert np.isnan(game.losses(masks[:1])[0])
    assert np.isnan(game.store.lookup(masks[:1])[0]) and game.store.lookup(masks[1:])[0] == 2.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_end_to_end(model, calib_ids, n_layers, dtype):
    """bf16/fp16 weights: both engines agree, losses are float32 and finite, close to the float32 model's."""
    half = copy.deepcopy(model).to(dtype)
    ids = calib_ids[:2, :32]
    masks = paper_design(n_layers, 2, seed=3)
    tree = ml.evaluation.LayerGame(half, ids, "neg_loss", mask_batch_size=4)(masks)
    forward = ml.evaluation.LayerGame(half, ids, "neg_loss", engine="forward")(masks)
    assert np.isfinite(tree).all()
    assert np.abs(tree - forward).max() <= 0.02                     # same maths, other kernels' rounding
    assert np.abs(tree - (-independent_losses(model, ids, masks))).max() <= 0.1
    assert ml.evaluation.token_nll(half, ids, max_logits=4096 * 8).dtype == torch.float32


def test_prune_refuses_to_deep_copy_a_dispatched_model(offloaded, calib_ids):
    with pytest.raises(ValueError, match="inplace=True"):
        ml.pruning.prune(offloaded, calib_ids[:1, :16], "tail", 2)
