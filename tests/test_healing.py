"""LoRA healing (minilib.healing, chapter 08): it lowers held-out loss, merges exactly, round-trips,
is reproducible, refuses bad input, and the shipped SmolLM2 adapters reproduce their manifest."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import minilib as ml
from conftest import assert_same_state, logits_of, max_abs_diff, needs_real, snapshot

SPEC = ml.healing.HealingSpec(steps=30, batch_size=4, lr=3e-3, warmup=3)
DROP = [3, 4, 5, 7, 8, 10]          # half the teaching model's layers


@pytest.fixture(scope="module")
def train_ids(tokenizer) -> torch.Tensor:
    return ml.data.evaluation_ids(tokenizer, "teaching", 64, split="train")[:400]


@pytest.fixture(scope="module")
def val_ids(tokenizer) -> torch.Tensor:
    return ml.data.evaluation_ids(tokenizer, "teaching", 64, split="validation")[:24]


@pytest.fixture(scope="module")
def pruned(model) -> torch.nn.Module:
    return ml.layers.prune_layers(copy.deepcopy(model), DROP).eval()


@pytest.fixture(scope="module")
def healed(pruned, train_ids, val_ids):
    before = snapshot(pruned)
    result = ml.healing.heal(pruned, train_ids, SPEC, eval_ids=val_ids, eval_every=10, progress=False)
    assert_same_state(pruned, before)             # the input model is left as it was
    return result


def test_healing_lowers_heldout_loss_within_a_fixed_step_count(healed, pruned, val_ids):
    before, after = healed.eval_history[0][1], healed.eval_history[-1][1]
    assert [s for s, _ in healed.eval_history] == [0, 10, 20, 30]
    assert before == pytest.approx(ml.healing.mean_loss(pruned, val_ids))
    assert after < before - 0.05, (before, after)
    assert after == pytest.approx(ml.healing.mean_loss(healed.model, val_ids))
    assert len(healed.history) == SPEC.steps


def test_lora_trains_only_the_adapters(healed, pruned):
    linears = [m for m in ml.layers.decoder_layers(pruned).modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7 * 6
    assert healed.trainable_params == sum(SPEC.rank * (m.in_features + m.out_features) for m in linears)
    assert sum(p.numel() for p in healed.model.parameters()) == sum(p.numel() for p in pruned.parameters())


def test_merged_model_round_trips_with_from_pretrained(healed, tmp_path, small_ids):
    healed.model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(healed.model)
    assert max_abs_diff(logits_of(reloaded, small_ids), logits_of(healed.model, small_ids)) == 0.0
    game = ml.evaluation.LayerGame(reloaded, small_ids, "ppl_ratio", progress=False)
    assert game.n_players == 6 and game([[True] * 6])[0] == pytest.approx(1.0)


def test_the_merge_is_the_adapters_forward(pruned, train_ids, small_ids):
    peft_model, _ = ml.healing.train_adapter(copy.deepcopy(pruned), train_ids,
                                             ml.healing.HealingSpec(steps=5, batch_size=2, lr=3e-3), progress=False)
    unmerged = logits_of(peft_model, small_ids)
    merged = ml.healing._merge(peft_model)
    assert max_abs_diff(logits_of(merged, small_ids), unmerged) < 1e-4
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_saved_adapter_reloads_onto_the_pruned_model(pruned, train_ids, small_ids, tmp_path):
    peft_model, _ = ml.healing.train_adapter(copy.deepcopy(pruned), train_ids,
                                             ml.healing.HealingSpec(steps=5, batch_size=2, lr=3e-3), progress=False)
    expected = logits_of(ml.healing._merge(copy.deepcopy(peft_model)), small_ids)
    exact = ml.healing.save_adapter(peft_model, tmp_path / "fp32", dtype=None)
    half = ml.healing.save_adapter(peft_model, tmp_path / "fp16")
    assert not (exact / "README.md").exists()
    assert (half / "adapter_model.safetensors").stat().st_size < 0.6 * (exact / "adapter_model.safetensors").stat().st_size
    before = snapshot(pruned)
    assert max_abs_diff(logits_of(ml.healing.load_adapter(pruned, exact), small_ids), expected) < 1e-4
    assert max_abs_diff(logits_of(ml.healing.load_adapter(pruned, half), small_ids), expected) < 5e-2
    assert_same_state(pruned, before)


def test_same_seed_same_healing(pruned, train_ids):
    spec = ml.healing.HealingSpec(steps=4, batch_size=2, lr=3e-3, seed=7)
    runs = [ml.healing.heal(pruned, train_ids, spec, progress=False).history for _ in range(2)]
    assert runs[0] == runs[1]
    other = ml.healing.heal(pruned, train_ids, ml.healing.HealingSpec(steps=4, batch_size=2, lr=3e-3, seed=8),
                            progress=False).history
    assert other != runs[0]


@pytest.mark.parametrize("kwargs, name", [({"rank": 0}, "rank"), ({"rank": -2}, "rank"), ({"rank": 2.5}, "rank"),
                                          ({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"),
                                          ({"warmup": 10, "steps": 10}, "warmup"), ({"lr": 0.0}, "lr"),
                                          ({"dropout": 1.0}, "dropout"), ({"target_modules": "q_proj"}, "target_modules"),
                                          ({"target_modules": ()}, "target_modules")])
def test_bad_specs_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ml.healing.HealingSpec(**kwargs)


def test_unknown_target_modules_list_the_accepted_names(pruned, train_ids):
    spec = ml.healing.HealingSpec(target_modules=("q_proj", "query_key_value"), steps=2)
    with pytest.raises(ValueError, match=r"target_modules: \['query_key_value'\].*'down_proj'"):
        ml.healing.heal(pruned, train_ids, spec, progress=False)


def test_bad_data_and_paths_are_refused(pruned, train_ids, tmp_path):
    with pytest.raises(ValueError, match="train_ids"):
        ml.healing.heal(pruned, train_ids[0], SPEC, progress=False)
    with pytest.raises(ValueError, match="eval_ids"):
        ml.healing.heal(pruned, train_ids, SPEC, eval_ids=train_ids.float(), progress=False)
    with pytest.raises(ValueError, match="eval_every"):
        ml.healing.heal(pruned, train_ids, SPEC, eval_every=-1, progress=False)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        ml.healing.load_adapter(pruned, tmp_path)
    with pytest.raises(ValueError, match="peft_model"):
        ml.healing.save_adapter(pruned, tmp_path / "x")


def test_a_quantized_model_is_healed_with_a_separate_adapter(pruned, train_ids, small_ids):
    quantized = ml.quantization.quantize(pruned, "int8")
    with pytest.raises(ValueError, match="quantized linear layers.*train_adapter"):
        ml.healing.heal(quantized, train_ids, SPEC, progress=False)
    peft_model, result = ml.healing.train_adapter(quantized, train_ids,
                                                  ml.healing.HealingSpec(steps=3, batch_size=2, lr=3e-3),
                                                  progress=False)
    assert result.trainable_params > 0 and torch.isfinite(logits_of(peft_model, small_ids)).all()


def test_missing_peft_says_how_to_install(monkeypatch, pruned, train_ids):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ml.healing.MissingPeftError, match="pip install"):
        ml.healing.heal(pruned, train_ids, SPEC, progress=False)


@needs_real
def test_shipped_smollm2_adapter_reproduces_its_manifest(smollm2):
    model, _ = smollm2
    shipped = ml.healing.load_shipped_healing("smollm2")
    entry = shipped.entries["minus15"]
    weights = shipped.adapter_path("minus15") / "adapter_model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == entry["adapter_sha256"]
    pruned = ml.layers.prune_layers(copy.deepcopy(model), entry["removed"])
    test_ids = ml.pruning.load_shipped_pruning("smollm2").heldout_ids["test"]
    assert ml.healing.mean_loss(pruned, test_ids) == pytest.approx(entry["loss_before"]["test"], abs=1e-4)
    merged = ml.healing.load_adapter(pruned, shipped.adapter_path("minus15"), inplace=True)
    assert ml.healing.mean_loss(merged, test_ids) == pytest.approx(entry["loss_after"]["test"], abs=1e-4)
    assert entry["loss_after"]["test"] < entry["loss_before"]["test"] - 0.1
    assert json.loads((shipped.adapter_path("minus15") / "adapter_config.json").read_text())["r"] == shipped.spec["rank"]
