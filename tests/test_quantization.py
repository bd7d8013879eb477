"""Quantization (minilib.quantization, chapter 08): torchao weight-only int8/int4 on the CPU keeps the
model usable (close logits, a working LayerGame, pruning commutes with it), shrinks what is stored,
and bad input or a missing backend gives a clear error."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch

import minilib as ml
from conftest import assert_no_forward_overrides, assert_same_state, logits_of, max_abs_diff, snapshot

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def int8(model):
    before = snapshot(model)
    q = ml.quantization.quantize(model, "int8")
    assert_same_state(model, before)
    return q


def test_int8_quantizes_every_decoder_linear_and_keeps_the_head_tied(int8, model, n_layers):
    names = ml.quantization.quantized_modules(int8)
    assert len(names) == 7 * n_layers and all(".layers." in n for n in names)
    assert int8.lm_head.weight is int8.model.embed_tokens.weight           # still tied, still float
    assert ml.quantization.quantized_modules(model) == []


def test_int8_stores_a_quarter_of_the_linear_bytes(int8, model):
    linear = sum(m.weight.numel() for m in ml.layers.decoder_layers(model).modules() if isinstance(m, torch.nn.Linear))
    saved = ml.quantization.stored_bytes(model) - ml.quantization.stored_bytes(int8)
    rows = sum(m.out_features for m in ml.layers.decoder_layers(model).modules() if isinstance(m, torch.nn.Linear))
    assert 3 * linear - 8 * rows <= saved <= 3 * linear                     # 4 -> 1 byte, plus one scale per row
    assert ml.efficiency.parameter_bytes(int8) == ml.quantization.stored_bytes(int8)
    size = ml.efficiency.checkpoint_size(int8)
    assert size.file_bytes == ml.quantization.serialized_bytes(int8)
    assert size.file_bytes < 0.5 * ml.efficiency.checkpoint_size(model).file_bytes


def test_quantized_logits_stay_close_and_int4_costs_more(int8, model, small_ids):
    dense = logits_of(model, small_ids)
    int4 = ml.quantization.quantize(model, "int4", group_size=32)
    err8, err4 = max_abs_diff(logits_of(int8, small_ids), dense), max_abs_diff(logits_of(int4, small_ids), dense)
    assert 0 < err8 < err4 < 3.0
    ppl = ml.evaluation.perplexity(model, small_ids, window=32)
    assert ml.evaluation.perplexity(int8, small_ids, window=32) == pytest.approx(ppl, rel=0.01)
    assert ml.evaluation.perplexity(int4, small_ids, window=32) == pytest.approx(ppl, rel=0.1)


def test_quantized_model_plays_the_layer_game(int8, model, small_ids, n_layers):
    masks = np.vstack([np.ones(n_layers, bool), ~np.eye(n_layers, dtype=bool)])
    quantized = ml.evaluation.LayerGame(int8, small_ids, "ppl_ratio", progress=False)(masks)
    dense = ml.evaluation.LayerGame(model, small_ids, "ppl_ratio", progress=False)(masks)
    assert quantized[0] == pytest.approx(1.0)
    assert np.abs(quantized - dense).max() < 0.03
    assert_no_forward_overrides(int8)


def test_pruning_commutes_with_int8_quantization(int8, model, small_ids):
    drop = [2, 5, 9]
    prune_then_quantize = ml.quantization.quantize(ml.layers.prune_layers(copy.deepcopy(model), drop), "int8")
    quantize_then_prune = ml.layers.prune_layers(copy.deepcopy(int8), drop)
    assert max_abs_diff(logits_of(prune_then_quantize, small_ids), logits_of(quantize_then_prune, small_ids)) == 0.0


def test_serialized_state_reloads_into_a_quantized_model(int8, model, small_ids):
    import io

    buffer = io.BytesIO()
    torch.save(int8.state_dict(), buffer)
    buffer.seek(0)
    fresh = ml.quantization.quantize(copy.deepcopy(model), "int8")
    for p in fresh.parameters():
        p.data.zero_() if not hasattr(p, "__tensor_flatten__") or type(p) is torch.nn.Parameter else None
    fresh.load_state_dict(torch.load(buffer, weights_only=False), assign=True)
    assert max_abs_diff(logits_of(fresh, small_ids), logits_of(int8, small_ids)) == 0.0


@pytest.mark.parametrize("kwargs, match", [({"method": "int3"}, "method must be one of"),
                                           ({"method": "nf4"}, "method must be one of"),
                                           ({"group_size": 0}, "group_size"),
                                           ({"skip": "lm_head"}, "skip"),
                                           ({"skip": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj", "lm_head"]}, "no linear layer left")])
def test_bad_quantization_arguments_are_named(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ml.quantization.quantize(model, **kwargs)


def test_unavailable_backends_raise_clear_errors(monkeypatch, model):
    with pytest.raises(ValueError, match="method must be one of"):
        ml.quantization.bitsandbytes_config("int4")
    if not torch.cuda.is_available():
        with pytest.raises(ml.quantization.BackendUnavailableError, match="bitsandbytes"):
            ml.quantization.bitsandbytes_config("nf4")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ml.quantization.BackendUnavailableError, match="pip install"):
        ml.quantization.quantize(model, "int8")


def test_the_teaching_model_refuses_a_load_time_quantization_config():
    with pytest.raises(ValueError, match="quantization_config"):
        ml.models.load_model("teaching", quantization_config=object())
