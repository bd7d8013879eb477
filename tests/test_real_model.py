"""SmolLM2-135M (30 real pretrained layers) through the engine (chapter 07): prefix-tree
evaluation equals independent evaluation, the store resumes across games, and a 2-process
accelerate run fills the same store as a single process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import minilib as ml
from conftest import needs_real
from test_prefix_tree import independent_losses, paper_design

pytestmark = needs_real


@pytest.fixture(scope="module")
def real_ids(smollm2):
    return ml.data.calibration_ids(smollm2[1], "teaching", n_seqs=2, seq_len=32, seed=0)


def test_prefix_tree_on_the_real_model(smollm2, real_ids):
    model, _ = smollm2
    masks = paper_design(30, 2, seed=1)[:12]
    walked = ml.evaluation.mask_losses(model, real_ids, masks, mask_batch_size=4)
    assert np.abs(walked - independent_losses(model, real_ids, masks)).max() <= 1e-5
    forwards = ml.evaluation.evaluate_masks(model, real_ids[:1, :8], masks)
    assert forwards < masks.sum()


def test_store_resumes_on_the_real_model(smollm2, real_ids, tmp_path):
    model, _ = smollm2
    masks = paper_design(30, 1, seed=2)[:6]
    first = ml.evaluation.LayerGame(model, real_ids, store=tmp_path / "s.sqlite")
    values = first(masks)
    second = ml.evaluation.LayerGame(model, real_ids, store=tmp_path / "s.sqlite")
    assert np.array_equal(second(masks), values) and second.n_evals == 0
    with pytest.raises(ValueError, match="calibration"):
        ml.evaluation.LayerGame(model, real_ids[:1], store=tmp_path / "s.sqlite")


def test_two_process_run_on_the_real_model(model_cache, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINILIB_CACHE": str(model_cache), "TOKENIZERS_PARALLELISM": "false"}
    common = ["evaluate", "--model", "smollm2-135m", "--design", "paper", "--n-masks", "6", "--n-seqs", "1",
              "--seq-len", "32", "--device", "cpu", "--quiet"]
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29519", "-m", "minilib"]
    runs = {}
    for name, prefix in (("single", ["-m", "minilib"]), ("double", launch)):
        proc = subprocess.run([sys.executable, *prefix, *common, "--store", str(tmp_path / f"{name}.sqlite")],
                              capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        with ml.store.EvaluationStore.open_existing(tmp_path / f"{name}.sqlite") as store:
            masks, values = store.masks_and_values()
        order = np.lexsort(masks.T)
        runs[name] = masks[order], values[order]
    assert np.array_equal(runs["single"][0], runs["double"][0]) and len(runs["single"][0]) >= 6
    assert np.abs(runs["single"][1] - runs["double"][1]).max() <= 1e-6


def test_cli_prunes_the_real_model_and_it_reloads(smollm2, model_cache, tmp_path):
    import copy
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINILIB_CACHE": str(model_cache), "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "pruned"
    proc = subprocess.run([sys.executable, "-m", "minilib", "prune", "--model", "smollm2-135m", "--method", "loo_ppl",
                           "--remove", "3", "--n-seqs", "2", "--seq-len", "32", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "prune_result.json").read_text())
    assert report["layers_after"] == 27 and len(report["removed"]) == 3
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = ml.layers.prune_layers(copy.deepcopy(smollm2[0]), report["removed"])
    ids = AutoTokenizer.from_pretrained(out)("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (reloaded(input_ids=ids).logits - expected(input_ids=ids).logits).abs().max()
    assert len(ml.layers.decoder_layers(reloaded)) == 27 and float(diff) == 0.0
