"""The command line (chapters 06 and 07): one-line errors with exit code 2, atomic output,
``evaluate`` into a resumable store, and a 2-process data-parallel run under accelerate.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import minilib as ml
from minilib.__main__ import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_cli(*args: str, launcher: tuple[str, ...] = ("-m", "minilib")) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, timeout=900, env=ENV)


PRUNE = ("prune", "--model", "teaching", "--method", "tail", "--remove", "2", "--n-seqs", "2", "--seq-len", "32")

BAD = [
    (["--model", "./no/such/model"], "--model"),
    (["--seq-len", "0"], "--seq-len"),
    (["--seq-len", "1"], "--seq-len"),
    (["--n-seqs", "0"], "--n-seqs"),
    (["--n-seqs", "100000"], "--calibration"),
    (["--calibration", "/no/such/calibration.txt"], "--calibration"),
    (["--method", "shapley_surrogate", "--budget", "3"], "--budget"),
    (["--method", "shapley_surrogate", "--budget", "0"], "--budget"),
]
if not torch.cuda.is_available():
    BAD.append((["--device", "cuda"], "--device"))


@pytest.mark.parametrize("extra,argument", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_naming_the_argument(tmp_path, extra, argument):
    out = tmp_path / "out"
    proc = run_cli(*PRUNE, "--out", str(out), *extra)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()      # (a progress bar of transformers' loader may precede it)
    assert "Traceback" not in proc.stderr and [l for l in lines if l.startswith("error:")] == lines[-1:], proc.stderr
    assert lines[-1].startswith(f"error: {argument}"), proc.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_existing_output_is_kept_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main([*PRUNE, "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err and (out / "precious.txt").exists()
    assert main([*PRUNE, "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert not (out / "precious.txt").exists() and (out / "prune_result.json").exists()


def test_a_failure_while_saving_leaves_nothing_half_written(tmp_path, monkeypatch):
    import transformers

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        main([*PRUNE, "--out", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []          # neither --out nor the temporary folder


def test_evaluate_fills_a_store_and_resumes(tmp_path, model, tokenizer):
    store = tmp_path / "stage1.sqlite"
    args = ["evaluate", "--model", "teaching", "--design", "paper", "--n-masks", "30", "--n-seqs", "2",
            "--seq-len", "32", "--store", str(store), "--quiet"]
    first = run_cli(*args, "--export", str(tmp_path / "stage1.npz"))
    assert first.returncode == 0, first.stderr
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("0 masks evaluated")
    masks, values, meta = ml.store.load_table(tmp_path / "stage1.npz")
    ids = ml.data.calibration_ids(tokenizer, "teaching", n_seqs=2, seq_len=32, seed=0)
    reference = ml.evaluation.LayerGame(model, ids, engine="forward").losses(masks)
    assert np.abs(values - reference).max() <= 1e-5


def test_two_process_accelerate_run_equals_a_single_process_run(tmp_path):
    pytest.importorskip("accelerate")
    common = ["evaluate", "--model", "teaching", "--design", "paper", "--n-masks", "40", "--n-seqs", "2",
              "--seq-len", "32", "--device", "cpu", "--quiet"]
    single = run_cli(*common, "--store", str(tmp_path / "single.sqlite"))
    assert single.returncode == 0, single.stderr
    launch = ("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517", "-m", "minilib")
    double = run_cli(*common, "--store", str(tmp_path / "double.sqlite"), launcher=launch)
    assert double.returncode == 0, double.stderr + double.stdout
    assert "rank 0 of 2" in double.stdout and "rank 1 of 2" in double.stdout
    with ml.store.EvaluationStore.open_existing(tmp_path / "single.sqlite") as a, \
            ml.store.EvaluationStore.open_existing(tmp_path / "double.sqlite") as b:
        masks_a, values_a = a.masks_and_values()
        masks_b, values_b = b.masks_and_values()
        assert a.identity == b.identity
    order_a, order_b = np.lexsort(masks_a.T), np.lexsort(masks_b.T)
    assert np.array_equal(masks_a[order_a], masks_b[order_b])
    assert np.abs(values_a[order_a] - values_b[order_b]).max() <= 1e-6


def test_heal_saves_a_merged_model_that_reloads(tmp_path):
    out = tmp_path / "healed"
    proc = run_cli("heal", "--model", "teaching", "--steps", "3", "--batch-size", "2", "--seq-len", "32",
                   "--rank", "2", "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = __import__("json").loads((out / "heal_result.json").read_text())
    assert report["spec"]["rank"] == 2 and report["spec"]["steps"] == 3 and len(report["train_windows"]) == 2
    assert report["eval_loss_before"] > 0 and report["eval_loss_after"] > 0
    from transformers import AutoModelForCausalLM

    healed = AutoModelForCausalLM.from_pretrained(out)
    assert len(ml.layers.decoder_layers(healed)) == 12 and not any("lora" in n for n, _ in healed.named_parameters())
    adapter = tmp_path / "adapter"
    proc = run_cli("heal", "--model", "teaching", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                   "--adapter-only", "--quiet", "--out", str(adapter))
    assert proc.returncode == 0, proc.stderr
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()


@pytest.mark.parametrize("extra, argument", [(["--rank", "0"], "--rank"), (["--steps", "0"], "--steps"),
                                             (["--target-modules", "query_key_value"], "--target-modules"),
                                             (["--train", "/no/such/text.txt"], "--train")])
def test_heal_rejects_bad_input_naming_the_argument(tmp_path, extra, argument, capsys):
    code = main(["heal", "--model", "teaching", "--steps", "2", "--seq-len", "32", "--quiet",
                 "--out", str(tmp_path / "h"), *extra])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {argument}:")
