"""minilib.pruning and the command line: choose → remove → a model that saves, reloads and equals
the original with the same layers skipped; the exhaustive optimum; bad input refused clearly."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers as tf

import minilib as ml
from conftest import logits_of, max_abs_diff

TOL = 1e-5


# ---------------------------------------------------------------- argument checks

@pytest.mark.parametrize("n_remove", [0, -2, 12, 20, True, 1.5])
def test_prune_rejects_bad_n_remove(model, small_ids, n_remove):
    with pytest.raises(ValueError, match=r"n_remove must be an int in 1\.\.11"):
        ml.pruning.prune(model, small_ids, "tail", n_remove)


def test_prune_rejects_unknown_method(model, small_ids):
    with pytest.raises(ValueError, match="method must be one of .*shapley_surrogate"):
        ml.pruning.prune(model, small_ids, "magnitude", 2)


def test_cli_offers_exactly_the_methods_prune_accepts(model, small_ids):
    """The CLI's --method takes every name in METHODS and nothing else; prune refuses names outside it."""
    from minilib.__main__ import build_parser

    parser = build_parser()
    for method in ml.pruning.METHODS:
        assert parser.parse_args(["prune", "--model", "teaching", "--method", method, "--remove", "1",
                                  "--out", "x"]).method == method
    for unknown in ("magnitude", "shapley"):
        with pytest.raises(SystemExit):
            parser.parse_args(["prune", "--model", "teaching", "--method", unknown, "--remove", "1", "--out", "x"])
        with pytest.raises(ValueError, match=re.escape(f"method must be one of {ml.pruning.METHODS}")):
            ml.pruning.prune(model, small_ids, unknown, 1)


@pytest.mark.parametrize("method", ml.pruning.METHODS)
def test_every_method_removes_the_layers_its_scores_say(six_layer, small_ids, method):
    """Each accepted method runs, removes its two lowest-scored layers (SLEB: its first two rounds), and
    returns the model without them: the same function as the original with those layers skipped."""
    budget = {"shapley_surrogate": 60, "shapley_surrogate_corrected": ml.surrogate.corrected_min_budget(6)}.get(method)
    result = ml.pruning.prune(six_layer, small_ids, method, 2, rng=0, budget=budget)
    scores = np.asarray(result.scores, dtype=float)
    if method == "sleb":                               # scores are the rounds of removal, NaN for the rest
        assert scores[result.removed].tolist() == [0.0, 1.0] and np.isnan(np.delete(scores, result.removed)).all()
    else:
        assert len(scores) == 6 and not np.isnan(scores).any()
        assert result.removed == np.argsort(scores, kind="stable")[:2].tolist()
        assert max(scores[result.removed]) <= min(np.delete(scores, result.removed))
    assert len(set(result.removed)) == 2
    keep = np.ones(6, dtype=bool)
    keep[result.removed] = False
    with ml.layers.keep_only(six_layer, keep):
        skipped = logits_of(six_layer, small_ids)
    assert len(ml.layers.decoder_layers(result.model)) == result.model.config.num_hidden_layers == 4
    assert max_abs_diff(logits_of(result.model, small_ids), skipped) < TOL


def test_paper_keep_sizes():
    assert ml.pruning.paper_keep_sizes(32) == [30, 27, 24, 21, 18]
    assert ml.pruning.paper_keep_sizes(12) == [11, 10, 9, 8, 7]


# ---------------------------------------------------------------- baselines through prune

@pytest.mark.parametrize("method", ml.baselines.METHODS)
def test_prune_matches_select_layers_and_keep_only(model, small_ids, method):
    result = ml.pruning.prune(model, small_ids, method, 3, rng=0)
    assert result.removed == ml.baselines.select_layers(model, small_ids, method, 3, rng=0)
    assert result.method == method and len(result.scores) == 12 and result.seconds >= 0
    assert len(ml.layers.decoder_layers(result.model)) == result.model.config.num_hidden_layers == 9
    assert len(ml.layers.decoder_layers(model)) == 12  # the original is untouched
    keep = np.ones(12, dtype=bool)
    keep[result.removed] = False
    with ml.layers.keep_only(model, keep):
        skipped = logits_of(model, small_ids)
    assert max_abs_diff(logits_of(result.model, small_ids), skipped) < TOL
    json.dumps(result.summary())  # serialisable


def test_prune_counts_evaluations(model, small_ids):
    assert ml.pruning.prune(model, small_ids, "loo_ppl", 2).n_evals == 13
    assert ml.pruning.prune(model, small_ids, "tail", 2).n_evals == 0
    assert ml.pruning.prune(model, small_ids, "sleb", 2).n_evals == 1 + 12 + 11


def test_pruned_model_survives_save_and_reload(model, small_ids, tmp_path):
    result = ml.pruning.prune(model, small_ids, "block_influence", 4)
    result.model.save_pretrained(tmp_path)
    reloaded, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.num_hidden_layers == 8
    assert torch.equal(logits_of(reloaded.eval(), small_ids), logits_of(result.model, small_ids))


def test_prune_inplace_modifies_the_model(model, small_ids):
    m = copy.deepcopy(model)
    result = ml.pruning.prune(m, small_ids, "tail", 2, inplace=True)
    assert result.model is m and len(ml.layers.decoder_layers(m)) == 10


# ---------------------------------------------------------------- Shapley methods

def test_shapley_exact_removes_the_bottom_of_exact_shapley(six_layer, small_ids):
    result = ml.pruning.prune(six_layer, small_ids, "shapley_exact", 2)
    phi = ml.shapley.exact_shapley(ml.evaluation.exact_values(ml.evaluation.LayerGame(six_layer, small_ids)))
    np.testing.assert_allclose(result.scores, phi, atol=1e-9)
    assert result.removed == np.argsort(phi, kind="stable")[:2].tolist()
    assert result.n_evals == 2 ** 6
    assert len(ml.layers.decoder_layers(result.model)) == 4


@pytest.mark.parametrize("method", ["shapley_surrogate", "shapley_surrogate_corrected"])
def test_shapley_estimates_respect_the_budget(six_layer, small_ids, method):
    result = ml.pruning.prune(six_layer, small_ids, method, 2, rng=0, budget=100)
    assert 0 < result.n_evals <= 100
    assert 0 not in result.removed  # layer 0 is essential on any calibration set
    assert len(ml.layers.decoder_layers(result.model)) == 4


def test_shapley_exact_refuses_deep_models(small_ids):
    """17 layers would mean 2**17 masks: refused up front, before any evaluation."""
    cfg = tf.LlamaConfig(num_hidden_layers=17, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=4096, max_position_embeddings=64)
    deep = tf.LlamaForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="L must be <= 16"):
        ml.pruning.prune(deep, small_ids, "shapley_exact", 2)


# ---------------------------------------------------------------- exhaustive optimum

def test_best_keep_sets_matches_brute_force():
    rng = np.random.default_rng(3)
    n = 5
    table = ml.games.TabularGame(rng.random(2 ** n))
    best = ml.pruning.best_keep_sets(table)
    assert sorted(best) == list(range(n + 1))
    coalitions = ml.games.all_coalitions(n)
    values = table(coalitions)
    for k in range(n + 1):
        rows = np.flatnonzero(coalitions.sum(axis=1) == k)
        winner = coalitions[rows[np.argmax(values[rows])]]
        assert best[k] == tuple(np.flatnonzero(winner).tolist())
    assert best[0] == () and best[n] == tuple(range(n))


def test_best_keep_sets_of_shipped_table():
    table = ml.teaching.exact_table("ppl_ratio")
    best = ml.pruning.best_keep_sets(table)
    for k, keep in best.items():
        assert len(keep) == k
        if 0 < k:
            assert 0 in keep  # layer 0 is in every optimal keep-set
    mask = np.zeros(12, dtype=bool)
    mask[list(best[9])] = True
    assert table(mask[None])[0] == max(table(m[None])[0] for m in ml.games.all_coalitions(12) if m.sum() == 9)


# ---------------------------------------------------------------- command line

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minilib", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("method,extra", [("loo_ppl", []), ("shapley_surrogate", ["--budget", "60"])])
def test_cli_prunes_teaching_model_end_to_end(tmp_path, method, extra):
    out = tmp_path / "pruned"
    proc = run_cli("prune", "--model", "teaching", "--method", method, "--remove", "3", "--out", str(out),
                   "--n-seqs", "2", "--seq-len", "64", *extra)
    assert proc.returncode == 0, proc.stderr
    assert "removed layers" in proc.stdout
    report = json.loads((out / "prune_result.json").read_text())
    assert report["method"] == method and len(report["removed"]) == 3 and report["layers_after"] == 9
    assert report["calibration"] == [2, 64]
    if extra:
        assert report["n_evals"] <= 60
    reloaded, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.num_hidden_layers == len(ml.layers.decoder_layers(reloaded)) == 9
    tf.AutoTokenizer.from_pretrained(out)


@pytest.mark.parametrize("args,message", [
    (["--method", "magnitude", "--remove", "3"], "invalid choice"),
    (["--method", "tail", "--remove", "12"], "n_remove must be an int in 1..11"),
    (["--method", "tail", "--remove", "0"], "--remove: must be >= 1"),
])
def test_cli_rejects_bad_input(tmp_path, args, message):
    proc = run_cli("prune", "--model", "teaching", "--out", str(tmp_path / "x"), "--n-seqs", "2",
                   "--seq-len", "32", *args)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- budgets; deep models (L > 20)

SURROGATE_METHODS = ("shapley_surrogate", "shapley_surrogate_corrected")


def minimum_budget(method: str, n: int) -> int:
    """The full model plus 3 masks per paper stratum; 4 antithetic chains for the corrected method."""
    if method == "shapley_surrogate":
        return 1 + 3 * len(ml.pruning.paper_keep_sizes(n))
    return ml.surrogate.corrected_min_budget(n)


@pytest.mark.parametrize("method", SURROGATE_METHODS)
@pytest.mark.parametrize("budget", [0, -1, 1.5, True, "100", None])
def test_prune_rejects_bad_budget_before_any_evaluation(six_layer, small_ids, monkeypatch, method, budget):
    """0 used to mean "default" (``budget or default``); ``None`` is the only default now."""
    minimum = minimum_budget(method, 6)
    budget = minimum - 1 if budget is None else budget
    monkeypatch.setattr(ml.pruning, "LayerGame", lambda *a, **k: pytest.fail("evaluated before checking"))
    with pytest.raises(ValueError, match=rf"budget must be None .* >= {minimum} .*got {re.escape(repr(budget))}$"):
        ml.pruning.prune(six_layer, small_ids, method, 2, budget=budget)


@pytest.mark.parametrize("method", SURROGATE_METHODS)
def test_prune_budget_default_and_minimum(six_layer, small_ids, method):
    assert ml.pruning._surrogate_budget(None, method, 6, None) == 8 * 6 * 7
    assert ml.pruning._surrogate_budget(np.int64(500), method, 6, None) == 500
    minimum = minimum_budget(method, 6)
    result = ml.pruning.prune(six_layer, small_ids, method, 2, rng=0, budget=minimum)
    assert 0 < result.n_evals <= minimum


def tiny_llama(n_layers: int) -> torch.nn.Module:
    """A random LLaMA with hidden size 16 and vocabulary 64: a deep model whose evaluations cost ~2 ms."""
    torch.manual_seed(n_layers)
    cfg = tf.LlamaConfig(num_hidden_layers=n_layers, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("n_layers", [24, 32])
@pytest.mark.parametrize("method", SURROGATE_METHODS)
def test_surrogate_methods_prune_deep_models_within_budget(method, n_layers):
    """L > 20: the corrected method used to raise (no n_samples for sampling through the net), and the
    paper's pipeline spent budget + 1 (the full model's reference run was not counted)."""
    model = tiny_llama(n_layers)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    budget = 60 if method == "shapley_surrogate" else minimum_budget(method, n_layers)
    result = ml.pruning.prune(model, ids, method, 4, rng=0, budget=budget)
    assert 0 < result.n_evals <= budget
    assert np.all(np.isfinite(result.scores)) and len(result.scores) == n_layers
    assert result.removed == np.argsort(result.scores, kind="stable")[:4].tolist()
    assert len(ml.layers.decoder_layers(result.model)) == result.model.config.num_hidden_layers == n_layers - 4
