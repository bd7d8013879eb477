"""minilib.efficiency: sizes are exact, memory sees PyTorch's allocations, timings are well-formed."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import minilib as ml
from minilib import efficiency as ef

DROP = [3, 5, 7]
PROMPT, NEW, REPEATS = 64, 8, 3


@pytest.fixture(scope="module")
def pruned(model):
    return ml.layers.prune_layers(copy.deepcopy(model), DROP)


@pytest.fixture(scope="module")
def frame(model, pruned):
    return ef.compare({"dense": model, "pruned": pruned}, progress=False, prompt_tokens=PROMPT, new_tokens=NEW,
                      repeats=REPEATS)


def _layer_bytes(model, i: int) -> tuple[int, int]:
    params = list(ml.layers.decoder_layers(model)[i].parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _kv_bytes(model, n_layers: int, batch: int, tokens: int) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * n_layers * batch * c.num_key_value_heads * tokens * head_dim * 4  # keys and values, float32


def test_sizes_shrink_by_exactly_the_removed_layers(model, frame):
    dense, pruned = frame.loc["dense"], frame.loc["pruned"]
    per_layer = [_layer_bytes(model, i) for i in DROP]
    assert dense.n_layers - pruned.n_layers == len(DROP)
    assert dense.n_params - pruned.n_params == sum(n for n, _ in per_layer)
    assert dense.param_bytes - pruned.param_bytes == sum(b for _, b in per_layer)
    # safetensors stores each distinct tensor once (the tied head is not duplicated), nothing else
    assert dense.checkpoint_tensor_bytes == dense.param_bytes
    assert pruned.checkpoint_tensor_bytes == pruned.param_bytes
    removed = dense.checkpoint_tensor_bytes - pruned.checkpoint_tensor_bytes
    assert removed == sum(b for _, b in per_layer)
    header_saved = (dense.checkpoint_bytes - pruned.checkpoint_bytes) - removed  # the removed tensors' JSON entries
    assert 0 < header_saved < 4096 * len(DROP)
    assert frame.loc["pruned", "params_ratio"] == pytest.approx(pruned.n_params / dense.n_params)
    assert frame.loc["pruned", "checkpoint_ratio"] == pytest.approx(pruned.checkpoint_bytes / dense.checkpoint_bytes)
    assert (frame.loc["dense", ["params_ratio", "checkpoint_ratio", "peak_memory_ratio", "prefill_speedup",
                                "decode_speedup"]] == 1).all()


def test_peak_memory_counts_weights_and_sees_the_kv_cache(model, frame):
    for name in ("dense", "pruned"):
        row = frame.loc[name]
        assert row.memory_method == "torch.profiler CPU allocator total"
        assert row.weights_bytes >= row.param_bytes
        assert row.peak_memory_bytes == row.weights_bytes + row.activation_bytes
        # the prefill returns the KV cache, so the allocator must have seen at least that much
        assert row.activation_bytes >= _kv_bytes(model, row.n_layers, 1, PROMPT)
    assert frame.loc["pruned", "activation_bytes"] <= frame.loc["dense", "activation_bytes"]
    assert frame.loc["pruned", "peak_memory_ratio"] < 1


def test_peak_memory_grows_with_the_batch(model):
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    one, four = ef.peak_forward_memory(model, ids[:1]), ef.peak_forward_memory(model, ids)
    assert one.weights_bytes == four.weights_bytes
    assert four.activation_bytes >= _kv_bytes(model, 12, 4, 32) > one.activation_bytes


def test_timings_are_well_formed_and_pruning_is_not_much_slower(frame, pruned):
    for name in ("dense", "pruned"):
        row = frame.loc[name]
        assert row.prefill_ms > 0 and row.decode_tokens_per_s > 0
        assert row.prefill_ms_iqr >= 0 and row.decode_tokens_per_s_iqr >= 0
        assert (row.repeats, row.prompt_tokens, row.new_tokens, row.batch_size) == (REPEATS, PROMPT, NEW, 1)
    # loose on purpose (a shared 2-core machine): the fastest of a few runs, with 9 of 12 layers
    e = ef.measure(pruned, "pruned", prompt_tokens=PROMPT, new_tokens=NEW, repeats=REPEATS, checkpoint=False)
    assert len(e.prefill_samples_ms) == len(e.decode_samples) == REPEATS
    assert e.prefill_ms == pytest.approx(sorted(e.prefill_samples_ms)[1])
    assert min(e.prefill_samples_ms) < 3 * float(frame.loc["dense", "prefill_ms"])
    assert (e.checkpoint_bytes, e.checkpoint_tensor_bytes) == (-1, -1)
    assert "prefill_samples_ms" not in e.as_dict() and "decode_samples" in e.as_dict(samples=True)


def test_compare_without_checkpoints_leaves_its_ratio_undefined(model, pruned):
    df = ef.compare({"a": model, "b": pruned}, reference="b", progress=False, prompt_tokens=8, new_tokens=2,
                    repeats=1, warmup=0, checkpoint=False)
    assert list(df.index) == ["a", "b"] and df.loc["b", "params_ratio"] == 1
    assert df["checkpoint_ratio"].isna().all()
    assert df.loc["a", "params_ratio"] > 1 and math.isfinite(df.loc["a", "prefill_speedup"])


@pytest.mark.parametrize("kwargs, name", [
    (dict(prompt_tokens=0), "prompt_tokens"), (dict(new_tokens=-1), "new_tokens"), (dict(repeats=0), "repeats"),
    (dict(warmup=-1), "warmup"), (dict(batch_size=True), "batch_size"), (dict(prompt_tokens=2.5), "prompt_tokens"),
    (dict(prompt_tokens=250, new_tokens=32), "prompt_tokens"),  # beyond max_position_embeddings (256)
])
def test_measure_rejects_bad_arguments(model, kwargs, name):
    with pytest.raises(ValueError, match=name):
        ef.measure(model, checkpoint=False, **kwargs)


def test_bad_models_and_inputs_are_refused(model):
    with pytest.raises(ValueError, match="model"):
        ef.measure("teaching")
    with pytest.raises(ValueError, match="models"):
        ef.compare({})
    with pytest.raises(ValueError, match="models"):
        ef.compare({"x": object()})
    with pytest.raises(ValueError, match="reference"):
        ef.compare({"dense": model}, reference="pruned")
    with pytest.raises(TypeError, match="repeat"):
        ef.compare({"dense": model}, repeat=3)
    with pytest.raises(ValueError, match="input_ids"):
        ef.peak_forward_memory(model, torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        ef.peak_forward_memory(model, torch.ones(1, 5))
    with pytest.raises(ValueError, match="model"):
        ef.checkpoint_size(torch.nn.Linear(2, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_memory_and_timing(model):
    gpu = copy.deepcopy(model).to("cuda")
    e = ef.measure(gpu, prompt_tokens=PROMPT, new_tokens=NEW, repeats=REPEATS, checkpoint=False)
    assert e.device.startswith("cuda") and e.memory_method == "torch.cuda.max_memory_allocated"
    assert e.activation_bytes >= _kv_bytes(model, 12, 1, PROMPT)
    assert e.prefill_ms > 0 and e.decode_tokens_per_s > 0
