"""minilib.layers: finding decoder layers, skipping them (keep_only), removing them (prune_layers).

The properties that matter:
- skipping a layer is the same function as zeroing its weights (the paper's method), and the
  model is restored exactly afterwards, also when the body raises;
- a (batch, L) mask gives each row its own model;
- a pruned model survives save_pretrained / from_pretrained unchanged, and equals the
  unpruned model with the same layers skipped;
- bad inputs are refused with errors that name the argument.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers as tf

import minilib as ml
from conftest import (TINY_VOCAB, assert_no_forward_overrides, assert_same_state, logits_of, max_abs_diff, snapshot,
                      tiny_model)

TOL = 1e-5


def random_keep_masks(rng: np.random.Generator, n_masks: int, n_layers: int) -> list[np.ndarray]:
    """Random keep-masks with a varied number of dropped layers, never all-True."""
    masks = []
    while len(masks) < n_masks:
        keep = rng.random(n_layers) < rng.uniform(0.2, 0.9)
        if not keep.all():
            masks.append(keep)
    return masks


# ---------------------------------------------------------------- decoder_layers

def test_decoder_layers_of_teaching_model(model, n_layers):
    layers = ml.layers.decoder_layers(model)
    assert isinstance(layers, torch.nn.ModuleList)
    assert layers is model.model.layers
    assert n_layers == model.config.num_hidden_layers == 12


LAYER_PATHS = {"gpt2": "transformer.h", "opt": "model.decoder.layers"}   # the rest: model.layers


def test_decoder_layers_of_other_architectures(tiny):
    kind, model = tiny
    expected = model
    for part in LAYER_PATHS.get(kind, "model.layers").split("."):
        expected = getattr(expected, part)
    assert ml.layers.decoder_layers(model) is expected
    assert len(expected) == 3


def test_decoder_layers_of_base_models():
    """Models loaded without an LM head (AutoModel) keep their layers one level up."""
    torch.manual_seed(0)
    gpt2 = tf.GPT2Model(tf.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    opt = tf.OPTModel(tf.OPTConfig(num_hidden_layers=2, hidden_size=16, ffn_dim=32, num_attention_heads=2,
                                   vocab_size=50, word_embed_proj_dim=16))
    llama = tf.LlamaModel(tf.LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=50))
    assert ml.layers.decoder_layers(gpt2) is gpt2.h
    assert ml.layers.decoder_layers(opt) is opt.decoder.layers
    assert ml.layers.decoder_layers(llama) is llama.layers


def _tiny_bert():
    cfg = tf.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                        vocab_size=50, max_position_embeddings=16)
    return tf.BertModel(cfg)


@pytest.mark.parametrize("make,type_name", [(_tiny_bert, "bert"), (lambda: torch.nn.Linear(3, 3), "Linear")])
def test_decoder_layers_refuses_unknown_architectures(make, type_name):
    with pytest.raises(ValueError) as err:
        ml.layers.decoder_layers(make())
    msg = str(err.value)
    assert type_name in msg                           # names what it got
    for supported in ("llama", "gpt2", "opt", "mistral", "qwen2"):
        assert supported in msg                       # and lists what it supports
    assert set(ml.layers.supported_model_types()) >= {"llama", "gpt2", "opt", "mistral", "qwen2"}


# ---------------------------------------------------------------- keep_only == zero-and-restore

def test_keep_only_equals_zero_layers_and_restores(model, calib_ids, base_logits, n_layers, rng):
    before = snapshot(model)
    masks = random_keep_masks(rng, 5, n_layers)
    masks.append(np.eye(n_layers, dtype=bool)[0])           # only layer 0
    for keep in masks:
        with ml.layers.keep_only(model, keep) as same:
            assert same is model
            skipped = logits_of(model, calib_ids)
        with ml.layers.zero_layers(model, ~keep):
            zeroed = logits_of(model, calib_ids)
        assert max_abs_diff(skipped, zeroed) <= TOL, keep
        # the mask matters: otherwise the comparison above would prove nothing
        assert max_abs_diff(skipped, base_logits) > 1e-2, keep
        assert_no_forward_overrides(model)
        assert_same_state(model, before)
    assert max_abs_diff(logits_of(model, calib_ids), base_logits) <= 1e-6


def test_zero_layers_accepts_indices_and_restores(model, calib_ids, base_logits, n_layers):
    before = snapshot(model)
    keep = np.ones(n_layers, dtype=bool)
    keep[[2, 5]] = False
    with ml.layers.zero_layers(model, [5, 2]):
        by_index = logits_of(model, calib_ids)
        assert all(not p.detach().any() for p in ml.layers.decoder_layers(model)[2].parameters())
    with ml.layers.keep_only(model, keep):
        skipped = logits_of(model, calib_ids)
    assert max_abs_diff(by_index, skipped) <= TOL
    assert_same_state(model, before)
    assert max_abs_diff(logits_of(model, calib_ids), base_logits) <= 1e-6


def test_zero_layers_restores_after_exception(model, n_layers):
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ml.layers.zero_layers(model, np.arange(n_layers) % 2 == 0):
            raise RuntimeError("boom")
    assert_same_state(model, before)


def test_keep_only_restores_after_exception(model, calib_ids, base_logits, n_layers):
    keep = np.zeros(n_layers, dtype=bool)
    keep[:3] = True
    with pytest.raises(RuntimeError, match="inside keep_only"):
        with ml.layers.keep_only(model, keep):
            assert "forward" in ml.layers.decoder_layers(model)[5].__dict__  # the patch was live
            raise RuntimeError("inside keep_only")
    assert_no_forward_overrides(model)
    assert max_abs_diff(logits_of(model, calib_ids), base_logits) <= 1e-6


def test_keep_only_nested_restores_in_order(model, calib_ids, base_logits, n_layers):
    outer = np.ones(n_layers, dtype=bool)
    outer[4] = False
    inner = np.ones(n_layers, dtype=bool)
    inner[[4, 7]] = False
    with ml.layers.keep_only(model, outer):
        outer_logits = logits_of(model, calib_ids)
        with ml.layers.keep_only(model, inner):
            both = logits_of(model, calib_ids)
        assert max_abs_diff(logits_of(model, calib_ids), outer_logits) <= 1e-6
    with ml.layers.keep_only(model, inner):
        assert max_abs_diff(logits_of(model, calib_ids), both) <= TOL
    assert_no_forward_overrides(model)
    assert max_abs_diff(logits_of(model, calib_ids), base_logits) <= 1e-6


def test_keep_only_accepts_lists_numbers_and_tensors(model, calib_ids, n_layers):
    keep = np.ones(n_layers, dtype=bool)
    keep[[1, 3]] = False
    with ml.layers.keep_only(model, keep):
        ref = logits_of(model, calib_ids)
    for variant in (keep.tolist(), keep.astype(int).tolist(), keep.astype(float), torch.from_numpy(keep)):
        with ml.layers.keep_only(model, variant):
            assert max_abs_diff(logits_of(model, calib_ids), ref) <= 1e-6


def test_empty_mask_is_embeddings_straight_into_the_head(model, calib_ids, n_layers):
    """All layers skipped: logits = lm_head(final_norm(embed(ids))), a finite bigram-like model."""
    with ml.layers.keep_only(model, np.zeros(n_layers, dtype=bool)):
        empty = logits_of(model, calib_ids)
    with torch.no_grad():
        by_hand = model.lm_head(model.model.norm(model.model.embed_tokens(calib_ids))).float()
    assert torch.isfinite(empty).all()
    assert max_abs_diff(empty, by_hand) <= TOL


# ---------------------------------------------------------------- batched (per-row) masks

def test_batched_masks_equal_per_row_masks(model, calib_ids, base_logits, n_layers, rng):
    masks = np.array(random_keep_masks(rng, len(calib_ids), n_layers))
    masks[0] = True                     # one row keeps everything
    masks[1, :] = False                 # one row keeps nothing
    with ml.layers.keep_only(model, masks):
        batched = logits_of(model, calib_ids)
    for row, keep in enumerate(masks):
        with ml.layers.keep_only(model, keep):
            alone = logits_of(model, calib_ids[row: row + 1])
        assert max_abs_diff(batched[row], alone[0]) <= TOL, row
    assert max_abs_diff(batched[0], base_logits[0]) <= TOL
    assert_no_forward_overrides(model)


def test_batched_masks_with_padding_attention_mask(model, calib_ids, n_layers, rng):
    """Per-row tensors such as a padding mask are split along with the rows."""
    attention = torch.ones_like(calib_ids)
    attention[1, :10] = 0
    attention[3, :25] = 0
    masks = np.array(random_keep_masks(rng, len(calib_ids), n_layers))
    masks[:, 0] = True
    with ml.layers.keep_only(model, masks):
        batched = logits_of(model, calib_ids, attention_mask=attention)
    for row, keep in enumerate(masks):
        with ml.layers.keep_only(model, keep):
            alone = logits_of(model, calib_ids[row: row + 1], attention_mask=attention[row: row + 1])
        real = attention[row].bool()
        assert max_abs_diff(batched[row][real], alone[0][real]) <= TOL, row


def test_batched_mask_rows_must_match_batch(model, calib_ids, n_layers):
    masks = np.ones((len(calib_ids) + 1, n_layers), dtype=bool)
    masks[0, 3] = False
    with ml.layers.keep_only(model, masks):
        with pytest.raises(ValueError, match="rows"):
            logits_of(model, calib_ids)
    assert_no_forward_overrides(model)


def test_batched_masks_split_only_per_row_arguments(tiny_ids):
    """Per-row position ids are split with the rows; a tensor the model merely passes through to its
    layers is not, even when its first dimension happens to equal the batch (3)."""
    model = tiny_model("llama", 3)
    extra = torch.arange(15.0).view(3, 5)                      # unrelated: 3 rows only by coincidence
    position_ids = torch.arange(12)[None] + torch.tensor([[0], [5], [9]])
    seen = {}
    attention = ml.layers.decoder_layers(model)[1].self_attn
    handle = attention.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    masks = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 0]], dtype=bool)   # layer 1 runs on rows 0 and 2
    try:
        with ml.layers.keep_only(model, masks):
            batched = logits_of(model, tiny_ids, position_ids=position_ids, extra=extra)
    finally:
        handle.remove()
    assert torch.equal(seen["extra"], extra)
    assert seen["hidden_states"].shape[0] == 2 and seen["position_embeddings"][0].shape[0] == 2
    for row, keep in enumerate(masks):
        with ml.layers.keep_only(model, keep):
            alone = logits_of(model, tiny_ids[row: row + 1], position_ids=position_ids[row: row + 1])
        assert max_abs_diff(batched[row], alone[0]) <= TOL, row


def test_map_per_row_recurses_and_refuses_what_it_cannot_split():
    def layer(hidden_states, attention_mask=None, cache=None, position_embeddings=None, **kwargs):
        pass

    rows = torch.tensor([0, 2])
    take = lambda t: t.index_select(0, rows)  # noqa: E731
    mask, table = torch.rand(3, 1, 4, 4), torch.rand(3, 3)
    cos, shared = torch.rand(3, 4, 2), torch.rand(1, 4, 2)
    args, kwargs = ml.layers.map_per_row(layer, (mask, table), {"position_embeddings": {"local": (cos, shared)},
                                                                "position_ids": [torch.arange(4)[None]],
                                                                "lookup": table}, take, batch=3)
    assert torch.equal(args[0], mask[[0, 2]]) and args[1] is table           # the cache slot is not per-row
    local = kwargs["position_embeddings"]["local"]
    assert isinstance(local, tuple) and torch.equal(local[0], cos[[0, 2]]) and local[1] is shared
    assert kwargs["position_ids"][0].shape == (1, 4) and kwargs["lookup"] is table
    with pytest.raises(ValueError, match="attention_mask.*batch \\(3\\) or 1.*\\(4, 4\\)"):
        ml.layers.map_per_row(layer, (), {"attention_mask": torch.rand(4, 4)}, take, batch=3)
    with pytest.raises(TypeError, match="attention_mask.*object"):
        ml.layers.map_per_row(layer, (), {"attention_mask": object()}, take, batch=3)


# ---------------------------------------------------------------- prune_layers

def test_prune_save_reload_is_identical(model, calib_ids, n_layers, tmp_path):
    drop = [3, 7, 8]
    keep = np.ones(n_layers, dtype=bool)
    keep[drop] = False
    with ml.layers.keep_only(model, keep):
        skipped = logits_of(model, calib_ids)

    pruned = ml.layers.prune_layers(copy.deepcopy(model), drop)
    k = n_layers - len(drop)
    layers = ml.layers.decoder_layers(pruned)
    assert len(layers) == k == pruned.config.num_hidden_layers
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(k))
    assert len(ml.layers.decoder_layers(model)) == n_layers  # the original is untouched

    in_memory = logits_of(pruned, calib_ids)
    assert max_abs_diff(in_memory, skipped) <= 1e-6

    pruned.save_pretrained(tmp_path)
    reloaded, info = tf.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    reloaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert reloaded.config.num_hidden_layers == k == len(ml.layers.decoder_layers(reloaded))
    assert max_abs_diff(logits_of(reloaded, calib_ids), in_memory) <= 1e-6

    # Generation with a KV cache relies on the renumbered layer_idx: same greedy tokens.
    prompt = calib_ids[:1, :8]
    kwargs = dict(max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    from_memory = pruned.generate(prompt, **kwargs)
    from_disk = reloaded.generate(prompt, **kwargs)
    no_cache = pruned.generate(prompt, **{**kwargs, "use_cache": False})
    assert from_memory.shape == (1, 13)
    assert torch.equal(from_memory, from_disk)
    assert torch.equal(from_memory, no_cache)


def test_pruning_without_config_update_would_corrupt_reload(model, calib_ids, n_layers, tmp_path):
    """Deleting layers by hand (no config update) saves fine but reloads the old depth with
    random layers appended: the logits change. prune_layers is what prevents this."""
    drop = [3, 7, 8]
    naive = copy.deepcopy(model)
    layers = ml.layers.decoder_layers(naive)
    for i in sorted(drop, reverse=True):
        del layers[i]
    assert naive.config.num_hidden_layers == n_layers       # stale: the bug being simulated
    naive.save_pretrained(tmp_path / "naive")
    naive_reloaded, info = tf.LlamaForCausalLM.from_pretrained(tmp_path / "naive", output_loading_info=True)
    assert info["missing_keys"]                              # the extra layers were random-initialised
    assert len(ml.layers.decoder_layers(naive_reloaded)) == n_layers
    assert max_abs_diff(logits_of(naive_reloaded.eval(), calib_ids), logits_of(naive, calib_ids)) > 1e-2

    pruned = ml.layers.prune_layers(copy.deepcopy(model), drop)
    pruned.save_pretrained(tmp_path / "pruned")
    reloaded, info = tf.LlamaForCausalLM.from_pretrained(tmp_path / "pruned", output_loading_info=True)
    assert not info["missing_keys"]
    assert max_abs_diff(logits_of(reloaded.eval(), calib_ids), logits_of(naive, calib_ids)) <= 1e-6


def test_prune_accepts_bool_mask(model, calib_ids, n_layers):
    drop_mask = np.zeros(n_layers, dtype=bool)
    drop_mask[[0, 11]] = True
    by_mask = ml.layers.prune_layers(copy.deepcopy(model), drop_mask)
    by_index = ml.layers.prune_layers(copy.deepcopy(model), [11, 0, 0])  # unordered, duplicated
    assert len(ml.layers.decoder_layers(by_mask)) == len(ml.layers.decoder_layers(by_index)) == n_layers - 2
    assert max_abs_diff(logits_of(by_mask, calib_ids), logits_of(by_index, calib_ids)) == 0.0


def test_prune_shortens_per_layer_config_lists(model, n_layers, tmp_path):
    pruned = copy.deepcopy(model)
    pruned.config.layer_types = ["full_attention"] * (n_layers - 1) + ["sliding_attention"]
    pruned.config.per_layer_marker = list(range(n_layers))     # an unknown list: not ours to guess at
    ml.layers.prune_layers(pruned, [1, 4])
    assert pruned.config.layer_types == ["full_attention"] * (n_layers - 3) + ["sliding_attention"]
    assert pruned.config.per_layer_marker == list(range(n_layers))
    pruned.save_pretrained(tmp_path)
    reloaded = tf.LlamaForCausalLM.from_pretrained(tmp_path)
    assert len(reloaded.config.layer_types) == reloaded.config.num_hidden_layers == n_layers - 2
    assert not hasattr(model.config, "per_layer_marker")      # the shared model's config is untouched


def test_prune_leaves_lists_that_only_happen_to_have_length_L(tiny_ids, tmp_path):
    """A 3-layer model whose eos_token_id is a 3-list: a length-based rule used to turn [1, 2, 7] into [1, 7]."""
    model = tiny_model("llama", 3, eos_token_id=[1, 2, 7])
    with ml.layers.keep_only(model, [True, False, True]):
        skipped = logits_of(model, tiny_ids)
    pruned = ml.layers.prune_layers(copy.deepcopy(model), [1])
    assert pruned.config.eos_token_id == [1, 2, 7]
    assert pruned.generation_config.eos_token_id == [1, 2, 7]
    pruned.save_pretrained(tmp_path)
    reloaded = tf.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.eos_token_id == [1, 2, 7] and reloaded.config.num_hidden_layers == 2
    assert torch.equal(logits_of(reloaded, tiny_ids), logits_of(pruned, tiny_ids))
    assert max_abs_diff(logits_of(pruned, tiny_ids), skipped) <= 1e-6


def _prune_save_reload(model, drop, ids, tmp_path):
    """Prune a copy, check it equals the original with ``drop`` skipped, save, reload; returns both."""
    n = len(ml.layers.decoder_layers(model))
    keep = np.ones(n, dtype=bool)
    keep[drop] = False
    with ml.layers.keep_only(model, keep):
        skipped = logits_of(model, ids)
    pruned = ml.layers.prune_layers(copy.deepcopy(model), drop)
    assert max_abs_diff(logits_of(pruned, ids), skipped) <= 1e-6
    pruned.save_pretrained(tmp_path)
    reloaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info                       # no missing, unexpected or mismatched weight
    assert torch.equal(logits_of(reloaded.eval(), ids), logits_of(pruned, ids))
    return pruned, reloaded


@pytest.mark.parametrize("drop", [[0], [2], [1, 2]])
@pytest.mark.parametrize("kind", ["qwen2_moe", "qwen3_moe"])
def test_prune_renumbers_layer_index_lists(kind, drop, tmp_path):
    """Qwen-MoE builds layer i as dense when i is in mlp_only_layers or (i + 1) % decoder_sparse_step != 0:
    both name layers by index, so both must follow the renumbering or reload builds the wrong blocks."""
    model = tiny_model(kind, 4, decoder_sparse_step=2, mlp_only_layers=[3])
    ids = torch.randint(0, TINY_VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    sparse = [hasattr(layer.mlp, "gate") for layer in ml.layers.decoder_layers(model)]   # the router
    assert sparse == [False, True, False, False]              # the pattern being renumbered
    pruned, reloaded = _prune_save_reload(model, drop, ids, tmp_path)
    kept = [s for i, s in enumerate(sparse) if i not in drop]
    assert pruned.config.decoder_sparse_step == 1
    assert pruned.config.mlp_only_layers == [j for j, s in enumerate(kept) if not s]
    for m in (pruned, reloaded):
        assert [hasattr(layer.mlp, "gate") for layer in ml.layers.decoder_layers(m)] == kept


@pytest.mark.parametrize("drop,window_layers", [([0], 1), ([2], 2), ([0, 3], 1), ([2, 3], 2)])
def test_prune_lowers_max_window_layers(drop, window_layers, tmp_path):
    """Qwen2's layers i >= max_window_layers use the sliding window: the threshold counts kept layers,
    so a config rebuilt from it alone gives the pruned layer_types, and the windows still act after reload."""
    model = tiny_model("qwen2", 4, use_sliding_window=True, sliding_window=3, max_window_layers=2)
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    ids = torch.randint(0, TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    pruned, reloaded = _prune_save_reload(model, drop, ids, tmp_path)
    expected = [t for i, t in enumerate(model.config.layer_types) if i not in drop]
    assert pruned.config.max_window_layers == reloaded.config.max_window_layers == window_layers
    assert pruned.config.layer_types == reloaded.config.layer_types == expected
    settings = {k: v for k, v in pruned.config.to_dict().items() if k != "layer_types"}
    assert tf.Qwen2Config(**settings).layer_types == expected


def test_prune_drops_entries_of_no_rope_layers(tiny_ids, tmp_path):
    """SmolLM3 reads no_rope_layers[layer_idx] (1 = RoPE, 0 = NoPE) when it builds each layer."""
    model = tiny_model("smollm3", 4, no_rope_layers=[1, 0, 1, 0])
    pruned, reloaded = _prune_save_reload(model, [1], tiny_ids, tmp_path)
    assert pruned.config.no_rope_layers == reloaded.config.no_rope_layers == [1, 1, 0]
    assert [layer.self_attn.use_rope for layer in ml.layers.decoder_layers(reloaded)] == [1, 1, 0]


# ---------------------------------------------------------------- other architectures

def test_other_architectures_skip_equals_zero(tiny, tiny_ids):
    kind, model = tiny
    before = snapshot(model)
    base = logits_of(model, tiny_ids)
    for keep in ([True, False, True], [False, True, True], [True, True, False], [False, False, False]):
        keep = np.array(keep)
        with ml.layers.keep_only(model, keep):
            skipped = logits_of(model, tiny_ids)
        with ml.layers.zero_layers(model, ~keep):
            zeroed = logits_of(model, tiny_ids)
        assert max_abs_diff(skipped, zeroed) <= TOL, (kind, keep)
        assert max_abs_diff(skipped, base) > 1e-3, (kind, keep)
    assert_same_state(model, before)
    assert_no_forward_overrides(model)
    assert max_abs_diff(logits_of(model, tiny_ids), base) <= 1e-6


@pytest.mark.parametrize("padded", [False, True])
def test_other_architectures_batched_masks(tiny, tiny_ids, padded):
    """Per-row masks equal one mask per row, also with a padding mask (GPT-2 passes it positionally)."""
    kind, model = tiny
    attention = torch.ones_like(tiny_ids)
    if padded:
        attention[1, :4] = 0
    masks = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=bool)
    with ml.layers.keep_only(model, masks):
        batched = logits_of(model, tiny_ids, attention_mask=attention)
    for row, keep in enumerate(masks):
        with ml.layers.keep_only(model, keep):
            alone = logits_of(model, tiny_ids[row: row + 1], attention_mask=attention[row: row + 1])[0]
        real = attention[row].bool()
        assert max_abs_diff(batched[row][real], alone[real]) <= TOL, (kind, row)


def test_other_architectures_prune_save_reload(tiny, tiny_ids, tmp_path):
    kind, model = tiny
    with ml.layers.keep_only(model, [True, False, True]):
        skipped = logits_of(model, tiny_ids)
    pruned = ml.layers.prune_layers(copy.deepcopy(model), [1])
    assert pruned.config.num_hidden_layers == 2
    if kind == "gpt2":
        assert pruned.config.n_layer == 2                     # GPT-2 spells it n_layer
    if kind == "qwen2":
        assert len(pruned.config.layer_types) == 2
    attn_idx = [m.layer_idx for layer in ml.layers.decoder_layers(pruned) for m in layer.modules()
                if hasattr(m, "layer_idx")]
    assert attn_idx and sorted(set(attn_idx)) == [0, 1]
    in_memory = logits_of(pruned, tiny_ids)
    assert max_abs_diff(in_memory, skipped) <= 1e-6

    pruned.save_pretrained(tmp_path)
    reloaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert len(ml.layers.decoder_layers(reloaded)) == 2 == reloaded.config.num_hidden_layers
    assert max_abs_diff(logits_of(reloaded.eval(), tiny_ids), in_memory) <= 1e-6

    prompt = tiny_ids[:1, :5]
    kwargs = dict(max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(pruned.generate(prompt, **kwargs), reloaded.generate(prompt, **kwargs))


# ---------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("bad,exc,words", [
    ("short", ValueError, ["keep", "12"]),
    ("long", ValueError, ["keep", "12"]),
    ("two", ValueError, ["keep", "0/1"]),
    ("half", ValueError, ["keep", "0/1"]),
    ("strings", TypeError, ["keep", "boolean"]),
    ("3d", ValueError, ["keep", "shape"]),
])
def test_keep_only_rejects_bad_masks(model, n_layers, bad, exc, words):
    masks = {
        "short": np.ones(n_layers - 1, dtype=bool),
        "long": np.ones(n_layers + 1, dtype=bool),
        "two": [2] + [1] * (n_layers - 1),
        "half": [0.5] + [1.0] * (n_layers - 1),
        "strings": ["yes"] * n_layers,
        "3d": np.ones((2, 2, n_layers), dtype=bool),
    }
    with pytest.raises(exc) as err:
        with ml.layers.keep_only(model, masks[bad]):
            pass
    for word in words:
        assert word in str(err.value)
    assert_no_forward_overrides(model)


@pytest.mark.parametrize("drop,exc,words", [
    ("all_indices", ValueError, ["drop", "all"]),
    ("all_mask", ValueError, ["drop", "all"]),
    ([12], ValueError, ["drop", "12"]),
    ([-1], ValueError, ["drop", "-1"]),
    ([1.5], TypeError, ["drop"]),
    (["a"], TypeError, ["drop"]),
    ("short_mask", ValueError, ["drop", "12"]),
])
def test_prune_layers_rejects_bad_drops(model, n_layers, drop, exc, words):
    drop = {"all_indices": list(range(n_layers)), "all_mask": np.ones(n_layers, dtype=bool),
            "short_mask": np.ones(n_layers - 2, dtype=bool)}.get(drop, drop) if isinstance(drop, str) else drop
    target = copy.deepcopy(model)
    with pytest.raises(exc) as err:
        ml.layers.prune_layers(target, drop)
    for word in words:
        assert word in str(err.value)
    assert len(ml.layers.decoder_layers(target)) == n_layers        # nothing was removed
    assert target.config.num_hidden_layers == n_layers


def test_prune_layers_with_nothing_to_drop_is_a_no_op(model, n_layers):
    target = copy.deepcopy(model)
    assert ml.layers.prune_layers(target, []) is target
    assert len(ml.layers.decoder_layers(target)) == n_layers == target.config.num_hidden_layers


def test_prune_refuses_gpt2_inverse_layer_idx_scaling_unless_trailing(tiny_ids, tmp_path):
    """GPT-2 with scale_attn_by_inverse_layer_idx fixes 1/(layer_idx+1) at construction, so a
    renumbered layer would compute something else after reload: refused, except for trailing drops."""
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0,
                        eos_token_id=0, scale_attn_by_inverse_layer_idx=True)
    model = tf.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3)
    with pytest.raises(ValueError, match="drop.*scale_attn_by_inverse_layer_idx"):
        ml.layers.prune_layers(copy.deepcopy(model), [0])
    with ml.layers.keep_only(model, [True, True, False]):
        skipped = logits_of(model, tiny_ids)
    pruned = ml.layers.prune_layers(copy.deepcopy(model), [2])      # nothing is renumbered
    pruned.save_pretrained(tmp_path)
    reloaded = tf.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert max_abs_diff(logits_of(reloaded, tiny_ids), skipped) <= 1e-6
