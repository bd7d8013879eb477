"""The resumable evaluation store (chapter 07): identity, durability, concurrency, fingerprints.

The kill tests run a child process (this file, run as a script) that evaluates many masks into a
store, SIGKILL it at a random point, rerun it to completion and check that no committed row was
lost or changed and that the rerun evaluated exactly the missing masks.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minilib.store import (EvaluationStore, calibration_hash, evaluate_missing, load_table, mask_keys,
                           model_fingerprint, open_for_game, read_meta)

L = 12
IDENTITY = {"fingerprint": "f" * 64, "calibration": "c" * 64, "utility": "ppl_ratio", "n_layers": L}


def masks_for(n: int, seed: int, n_layers: int = L) -> np.ndarray:
    """``n`` distinct random keep-masks (deterministic in ``seed``)."""
    ints = np.random.default_rng(seed).choice(2 ** n_layers, size=n, replace=False)
    return ((ints[:, None] >> np.arange(n_layers)) & 1).astype(bool)


def fake_loss(masks: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for a masked evaluation's loss, row by row in plain Python floats
    (so a mask gets bit-identical values whatever batch it is evaluated in)."""
    return np.array([3.0 + math.sin(0.37 * sum(1 << int(i) for i in np.flatnonzero(m))) for m in masks])


def rows_of(path: Path) -> dict[bytes, float]:
    """Every committed row of a store, read with a plain connection (empty if not created yet)."""
    if not path.exists():
        return {}
    conn = sqlite3.connect(path, timeout=30)
    try:
        return dict(conn.execute("SELECT mask, value FROM evals"))
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


def count_of(path: Path) -> int:
    """Committed rows of a store (0 if not created yet), cheaply."""
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.OperationalError:
        return 0
    try:
        return int(conn.execute("SELECT COUNT(*) FROM evals").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def child(*args: object) -> list[str]:
    return [sys.executable, __file__, *map(str, args)]


def kill_at_random_point(cmd: list[str], path: Path, rng: np.random.Generator, lo: int, hi: int,
                         jitter: float) -> dict[bytes, float]:
    """Start ``cmd``, SIGKILL it once the store holds a random number of rows in [lo, hi) plus a
    random fraction of a chunk, and return the rows committed at that moment."""
    target = int(rng.integers(lo, hi))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while count_of(path) < target:
            assert proc.poll() is None, f"child ended before the kill: {proc.communicate()}"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, jitter))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the child finished before it was killed"
    return rows_of(path)


def run_to_completion(cmd: list[str]) -> dict:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def store(tmp_path):
    with EvaluationStore.open(tmp_path / "evals.sqlite", **IDENTITY) as s:
        yield s


# ---- the store on its own ----

@pytest.mark.parametrize("n_layers", [1, 12, 30])
def test_round_trip_survives_reopening(tmp_path, n_layers):
    masks = masks_for(50, 0, n_layers) if n_layers > 5 else np.array([[True], [False]])
    values = fake_loss(masks)
    identity = {**IDENTITY, "n_layers": n_layers}
    with EvaluationStore.open(tmp_path / "s.sqlite", **identity) as s:
        assert s.record(masks, values) == len(masks) and len(s) == len(masks)
    with EvaluationStore(tmp_path / "s.sqlite", **identity) as s:
        assert np.array_equal(s.lookup(masks), values)
        got_masks, got_values = s.masks_and_values()
        assert got_masks.dtype == bool and np.array_equal(got_masks, masks)  # recording order
        assert got_values.dtype == np.float64 and np.array_equal(got_values, values)
        meta = s.meta
    assert meta["n_layers"] == str(n_layers) and {"created_at", "torch_version", "transformers_version",
                                                  "minilib_version"} <= meta.keys()


def test_lookup_marks_missing_masks_with_nan(store):
    masks = masks_for(6, 1)
    store.record(masks[:3], [1.0, 2.0, 3.0])
    got = store.lookup(np.concatenate([masks, masks[:1]]))
    assert np.array_equal(got[:3], [1, 2, 3]) and np.isnan(got[3:6]).all() and got[6] == 1.0
    assert store.lookup(masks[0]).shape == (1,)  # a single mask is a batch of one


def test_store_is_in_wal_mode_with_a_busy_timeout(store):
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert store._conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000


def test_duplicates_keep_the_first_value_and_are_counted(store):
    a, b, c, d = masks_for(4, 2)
    assert store.record([a, b], [1.0, 2.0]) == 2
    assert store.record([a, c], [9.0, 3.0]) == 1
    assert store.record([d, d], [4.0, 5.0]) == 1
    assert np.array_equal(store.lookup([a, b, c, d]), [1, 2, 3, 4])
    assert (store.n_recorded, store.n_duplicates, len(store)) == (4, 2, 4)


def test_record_rejects_bad_input(store):
    masks = masks_for(2, 3)
    with pytest.raises(ValueError, match="NaN"):
        store.record(masks, [1.0, np.nan])
    with pytest.raises(ValueError, match="2 masks but 3 values"):
        store.record(masks, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="12 columns"):
        store.record(masks[:, :5], [1.0, 2.0])
    assert len(store) == 0 and store.record(np.zeros((0, L), bool), []) == 0


def test_a_file_that_is_not_a_store_is_refused(tmp_path):
    path = tmp_path / "table.npz"
    path.write_bytes(b"PK\x03\x04 not a database" * 100)
    with pytest.raises(ValueError, match="not an evaluation store"):
        EvaluationStore.open(path, **IDENTITY)
    with pytest.raises(ValueError, match="not an evaluation store"):
        read_meta(path)


@pytest.mark.parametrize("field, other, label", [("fingerprint", "e" * 64, "model fingerprint"),
                                                 ("calibration", "d" * 64, "calibration hash"),
                                                 ("utility", "neg_loss", "utility"),
                                                 ("n_layers", 30, "n_layers")])
def test_opening_for_another_identity_is_refused(tmp_path, field, other, label):
    path = tmp_path / "s.sqlite"
    EvaluationStore.open(path, **IDENTITY).close()
    with pytest.raises(ValueError) as err:
        EvaluationStore.open(path, **{**IDENTITY, field: other})
    message = str(err.value)
    assert f"{label} differs: stored {str(IDENTITY[field])!r}, requested {str(other)!r}" in message
    assert "new path" in message and message.count("differs") == 1


def test_export_and_import_round_trip(store, tmp_path):
    masks = masks_for(40, 4)
    store.record(masks, fake_loss(masks))
    path = store.export(tmp_path / "table")
    assert path.suffix == ".npz" and path.stat().st_size < 4000
    got_masks, got_values, meta = load_table(path)
    assert np.array_equal(got_masks, masks) and np.array_equal(got_values, fake_loss(masks))
    assert {k: meta[k] for k in IDENTITY} == {k: str(v) for k, v in IDENTITY.items()}
    with EvaluationStore.open(tmp_path / "copy.sqlite", **IDENTITY) as fresh:
        assert fresh.import_(path) == 40 and fresh.import_(path) == 0
        assert np.array_equal(fresh.lookup(masks), fake_loss(masks))
    with EvaluationStore.open(tmp_path / "other.sqlite", **{**IDENTITY, "utility": "neg_loss"}) as other:
        with pytest.raises(ValueError, match="utility differs"):
            other.import_(path)


def test_merge_per_rank_stores(tmp_path):
    masks = masks_for(30, 5)
    with EvaluationStore.open(tmp_path / "rank0.sqlite", **IDENTITY) as r0, \
            EvaluationStore.open(tmp_path / "rank1.sqlite", **IDENTITY) as r1:
        r0.record(masks[:20], fake_loss(masks[:20]))
        r1.record(masks[10:], fake_loss(masks[10:]))
    with EvaluationStore.open(tmp_path / "main.sqlite", **IDENTITY) as main:
        main.record(masks[:1], [-1.0])
        assert main.merge_from(tmp_path / "rank0.sqlite") == 19
        assert main.merge_from(tmp_path / "rank1.sqlite") == 10
        expected = fake_loss(masks)
        expected[0] = -1.0  # first value kept
        assert len(main) == 30 and np.array_equal(main.lookup(masks), expected)
        EvaluationStore.open(tmp_path / "alien.sqlite", **{**IDENTITY, "calibration": "0" * 64}).close()
        with pytest.raises(ValueError, match="calibration hash differs"):
            main.merge_from(tmp_path / "alien.sqlite")
    assert read_meta(tmp_path / "main.sqlite")["utility"] == "ppl_ratio"


def test_evaluate_missing_evaluates_each_missing_mask_once(store):
    masks = masks_for(20, 6)
    store.record(masks[:5], fake_loss(masks[:5]))
    chunks: list[int] = []

    def evaluate(chunk):
        chunks.append(len(chunk))
        return fake_loss(chunk)

    values, n = evaluate_missing(store, np.concatenate([masks, masks[7:9]]), evaluate, chunk_size=4)
    assert n == 15 and chunks == [4, 4, 4, 3] and np.array_equal(values[:20], fake_loss(masks))
    assert evaluate_missing(store, masks, evaluate)[1] == 0


def test_concurrent_writers_lose_nothing(tmp_path):
    """Three processes create one store at the same moment and write overlapping masks into it."""
    path, n = tmp_path / "shared.sqlite", 120
    start = time.time() + 1.0  # all three open (and create) the store at once, then write flat out
    spans = [(0, 60), (30, 90), (60, 120)]
    procs = [subprocess.Popen(child("write", path, n, lo, hi, start), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for lo, hi in spans]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    masks = masks_for(n, 7)
    rows = rows_of(path)
    assert len(rows) == n and [rows[k] for k in mask_keys(masks)] == fake_loss(masks).tolist()
    assert sum(r["recorded"] for r in reports) == n
    assert sum(r["recorded"] + r["duplicates"] for r in reports) == sum(hi - lo for lo, hi in spans)


# ---- the kill test ----

def test_killed_run_resumes_without_losing_or_repeating_an_evaluation(tmp_path):
    """SIGKILL twice at random points, then finish: nothing committed is lost, nothing is redone."""
    path, n, chunk, delay = tmp_path / "run.sqlite", 120, 4, 0.004
    cmd = child("fake", path, n, chunk, delay)
    rng = np.random.default_rng()
    first = kill_at_random_point(cmd, path, rng, 1, n // 3, chunk * delay)
    second = kill_at_random_point(cmd, path, rng, len(first) + 1, 2 * n // 3, chunk * delay)
    assert 0 < len(first) < len(second) < n
    assert all(second.get(k) == v for k, v in first.items()), "a committed row was lost or changed"
    report = run_to_completion(cmd)
    final = rows_of(path)
    assert all(final.get(k) == v for k, v in second.items()), "a committed row was lost or changed"
    assert report["evaluated"] == n - len(second), "the rerun repeated or skipped evaluations"
    masks = masks_for(n, 0)
    assert len(final) == n and [final[k] for k in mask_keys(masks)] == fake_loss(masks).tolist()


def test_a_kill_during_a_large_transaction_keeps_whole_batches_only(tmp_path):
    """Batches of 4096 masks (most of the child's time is spent inside a transaction): after a kill
    the store holds a whole number of batches, each with its exact values."""
    batch, total = 4096, 2 ** 16
    masks = ((np.arange(total)[:, None] >> np.arange(16)) & 1).astype(bool)
    rng = np.random.default_rng()
    for cycle in range(3):
        path = tmp_path / f"bulk{cycle}.sqlite"
        target = int(rng.integers(1, 9)) * batch
        proc = subprocess.Popen(child("bulk", path, batch), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        while count_of(path) < target and proc.poll() is None:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, "the child finished before it was killed"
        rows = rows_of(path)
        assert len(rows) % batch == 0 and target <= len(rows) < total, len(rows)
        assert rows == dict(zip(mask_keys(masks[: len(rows)]), np.arange(len(rows), dtype=float).tolist()))


def _layer_game_class():
    from minilib.evaluation import LayerGame

    return LayerGame




def test_killed_layer_game_resumes_without_losing_or_repeating_an_evaluation(tmp_path, teaching):
    """The same kill test through ``LayerGame(model, ids, store=path)`` on the teaching model."""
    import torch

    import minilib as ml

    path, n = tmp_path / "game.sqlite", 64
    cmd = child("game", path, n)
    first = kill_at_random_point(cmd, path, np.random.default_rng(), 2, n // 2, 0.05)
    report = run_to_completion(cmd)
    final = rows_of(path)
    masks = masks_for(n, 0)
    total = len(set(mask_keys(masks)) | set(mask_keys(np.ones((1, L), bool))))  # the game also evaluates the full model
    assert 0 < len(first) < total
    assert all(final.get(k) == v for k, v in first.items()), "a committed row was lost or changed"
    assert report["evaluated"] == total - len(first), "the rerun repeated or skipped evaluations"
    assert len(final) == total
    model, tokenizer = teaching
    torch.manual_seed(0)
    clean = _layer_game_class()(model, ml.teaching.calibration_ids(tokenizer, 4, 64), utility="ppl_ratio")
    np.testing.assert_allclose([final[k] for k in mask_keys(masks)], clean.losses(masks), rtol=0, atol=1e-5)


# ---- fingerprints ----

def test_model_fingerprint_is_stable_and_survives_save_and_load(teaching, tmp_path):
    from transformers import LlamaForCausalLM

    model = teaching[0]
    fp = model_fingerprint(model)
    assert len(fp) == 64 and fp == model_fingerprint(model) == model_fingerprint(copy.deepcopy(model))
    model.save_pretrained(tmp_path / "saved")
    assert model_fingerprint(LlamaForCausalLM.from_pretrained(tmp_path / "saved")) == fp


def test_model_fingerprint_changes_with_pruning_weights_and_dtype(teaching):
    import torch

    import minilib as ml

    model = teaching[0]
    fp = model_fingerprint(model)
    assert model_fingerprint(ml.layers.prune_layers(copy.deepcopy(model), [5])) != fp
    edited = copy.deepcopy(model)
    with torch.no_grad():
        ml.layers.decoder_layers(edited)[7].mlp.down_proj.weight.mul_(1.001)
    assert model_fingerprint(edited) != fp
    assert model_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) != fp


def test_calibration_hash_depends_on_ids_and_shape_only():
    import torch

    ids = torch.arange(64).reshape(4, 16)
    h = calibration_hash(ids)
    assert h == calibration_hash(ids.numpy().astype(np.int32)) == calibration_hash(ids.clone())
    assert calibration_hash(ids.reshape(8, 8)) != h
    changed = ids.clone()
    changed[3, 15] += 1
    assert calibration_hash(changed) != h
    with pytest.raises(TypeError):
        calibration_hash(ids.float())


def test_open_for_game_derives_the_identity(teaching, calib_ids, tmp_path):
    model = teaching[0]
    with open_for_game(tmp_path / "g.sqlite", model, calib_ids, "neg_loss") as s:
        assert s.identity == {"fingerprint": model_fingerprint(model), "calibration": calibration_hash(calib_ids),
                              "utility": "neg_loss", "n_layers": "12"}


# ---- child processes ----

def _child_main(argv: list[str]) -> None:
    mode, path = argv[0], Path(argv[1])
    if mode == "write":  # write [lo, hi) of masks_for(n, 7) one mask per transaction, from time `start`
        n, lo, hi, start = int(argv[2]), int(argv[3]), int(argv[4]), float(argv[5])
        masks = masks_for(n, 7)[lo:hi]
        time.sleep(max(0.0, start - time.time()))
        with EvaluationStore.open(path, **IDENTITY) as s:
            for i in range(len(masks)):
                s.record(masks[i: i + 1], fake_loss(masks[i: i + 1]))
            report = {"recorded": s.n_recorded, "duplicates": s.n_duplicates}
    elif mode == "bulk":  # every 16-layer mask, value = its index, `batch` masks per transaction
        batch, total = int(argv[2]), 2 ** 16
        masks = ((np.arange(total)[:, None] >> np.arange(16)) & 1).astype(bool)
        with EvaluationStore.open(path, **{**IDENTITY, "n_layers": 16}) as s:
            for start in range(0, total, batch):
                s.record(masks[start: start + batch], np.arange(start, start + batch, dtype=float))
            report = {"recorded": s.n_recorded}
    elif mode == "fake":  # a slow deterministic evaluation of masks_for(n, 0), `chunk` masks per transaction
        n, chunk, delay = int(argv[2]), int(argv[3]), float(argv[4])

        def evaluate(masks: np.ndarray) -> np.ndarray:
            time.sleep(delay * len(masks))
            return fake_loss(masks)

        with EvaluationStore.open(path, **IDENTITY) as s:
            report = {"evaluated": evaluate_missing(s, masks_for(n, 0), evaluate, chunk)[1]}
    elif mode == "game":  # LayerGame on the teaching model with a store
        import torch

        import minilib as ml

        torch.set_num_threads(1)
        torch.manual_seed(0)
        model, tokenizer = ml.teaching.load_teaching_model()
        game = _layer_game_class()(model, ml.teaching.calibration_ids(tokenizer, 4, 64), utility="ppl_ratio",
                                   store=path)
        game.losses(masks_for(int(argv[2]), 0))
        report = {"evaluated": game.n_evals}
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
