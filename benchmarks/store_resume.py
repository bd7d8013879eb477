"""Kill/resume cycles of the evaluation store, and what recording to it costs, side by side.

What is measured. (1) Durability. A child process evaluates ``--masks`` distinct keep-masks of a
12-layer model into a fresh store, is SIGKILLed at a uniformly random moment of its run, and is
rerun to completion; ``--trials`` times. Per trial: rows committed at the kill; *lost* = those
rows missing or changed after the rerun; *repeated* = masks the rerun evaluated beyond the ones
missing at the kill (negative would mean skipped); *wrong* = final rows that differ from a clean,
never-killed run. The evaluation is ``--evaluator fake`` (a deterministic function of the mask that
sleeps ``--delay`` s per mask, ``--chunk`` masks per transaction, through
``ml.store.evaluate_missing``) or ``--evaluator game`` (``ml.evaluation.LayerGame(model, ids,
store=path)`` on the teaching model, 4x64 calibration tokens; it also evaluates the full model).
Kill points: the parent waits until the store holds a uniformly random number of rows in
[0, total), then a further uniform fraction of one chunk's evaluation time (from the clean run),
so kills land anywhere in a chunk, during a commit, or (target 0) before the store exists. (2) Overhead. The teaching model evaluates
``--overhead-masks`` masks one mask per forward (``keep_only`` + ``token_nll``, 4x64 tokens) with
and without ``evaluate_missing`` recording each chunk of ``--chunk`` masks to a store, alternated
over ``--repeats`` rounds (fresh store each round); the median times and their ratio are printed,
with the store's own cost per transaction (record + lookup, zero-cost evaluation).

Why. A stage-1 run on a real model is hours of evaluations; chapter 07 claims a killed run loses
at most the chunk in flight and redoes nothing, at a negligible cost per evaluation.

Usage: python benchmarks/store_resume.py [--trials 10] [--masks 200] [--seed 0] [--evaluator fake]
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from minilib.store import EvaluationStore, evaluate_missing

L = 12
IDENTITY = {"fingerprint": "benchmark", "calibration": "benchmark", "utility": "ppl_ratio", "n_layers": L}


def masks_for(n: int, seed: int) -> np.ndarray:
    """``n`` distinct random keep-masks of ``L`` layers."""
    ints = np.random.default_rng(seed).choice(2 ** L, size=n, replace=False)
    return ((ints[:, None] >> np.arange(L)) & 1).astype(bool)


def fake_loss(masks: np.ndarray) -> np.ndarray:
    """Deterministic stand-in loss, row by row (batch-independent, bit-exact)."""
    return np.array([3.0 + math.sin(0.37 * sum(1 << int(i) for i in np.flatnonzero(m))) for m in masks])


def rows_of(path: Path) -> dict[bytes, float]:
    if not path.exists():
        return {}
    conn = sqlite3.connect(path, timeout=30)
    try:
        return dict(conn.execute("SELECT mask, value FROM evals"))
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


def child(args: argparse.Namespace, path: Path) -> None:
    """One (possibly killed) run: evaluate ``masks_for(args.masks, args.seed)`` into ``path``."""
    masks = masks_for(args.masks, args.seed)
    if args.evaluator == "fake":
        def evaluate(chunk: np.ndarray) -> np.ndarray:
            time.sleep(args.delay * len(chunk))
            return fake_loss(chunk)

        with EvaluationStore.open(path, **IDENTITY) as store:
            evaluated = evaluate_missing(store, masks, evaluate, args.chunk)[1]
    else:
        import torch

        import minilib as ml

        torch.set_num_threads(1)
        model, tok = ml.teaching.load_teaching_model()
        game = ml.evaluation.LayerGame(model, ml.teaching.calibration_ids(tok, 4, 64), store=path)
        game.losses(masks)
        evaluated = game.n_evals
    print(json.dumps({"evaluated": evaluated}), flush=True)


def command(args: argparse.Namespace, path: Path) -> list[str]:
    return [sys.executable, __file__, "--child", str(path), "--masks", str(args.masks), "--seed", str(args.seed),
            "--delay", str(args.delay), "--chunk", str(args.chunk), "--evaluator", args.evaluator]


def run(cmd: list[str]) -> tuple[int, float]:
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["evaluated"], time.perf_counter() - start


def durability(args: argparse.Namespace, folder: Path, rng: np.random.Generator) -> None:
    clean_path = folder / "clean.sqlite"
    total, clean_s = run(command(args, clean_path))
    clean = rows_of(clean_path)
    print(f"clean run: {total} evaluations in {clean_s:.2f} s ({args.evaluator} evaluator)")
    print(f"{'trial':>5} {'kill at s':>9} {'committed':>9} {'rerun evals':>11} {'lost':>4} {'repeated':>8} "
          f"{'wrong':>5}")
    lost_all = repeated_all = wrong_all = 0
    for trial in range(args.trials):
        path = folder / f"trial{trial}.sqlite"
        target, jitter = int(rng.integers(0, total)), rng.uniform(0, args.chunk * clean_s / total)
        start = time.perf_counter()
        proc = subprocess.Popen(command(args, path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and len(rows_of(path)) < target:
            time.sleep(0.005)
        time.sleep(jitter)
        note = " (finished before the kill)" if proc.poll() is not None else ""
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kill_at = time.perf_counter() - start
        before = rows_of(path)
        evaluated, _ = run(command(args, path))
        after = rows_of(path)
        lost = sum(after.get(k) != v for k, v in before.items())
        repeated = evaluated - (total - len(before))
        if args.evaluator == "fake":
            wrong = sum(after.get(k) != v for k, v in clean.items()) + len(after.keys() - clean.keys())
        else:
            keys = list(clean)
            ok = np.isclose([after.get(k, np.nan) for k in keys], [clean[k] for k in keys], rtol=0, atol=1e-5)
            wrong = int((~ok).sum()) + len(after.keys() - clean.keys())
        lost_all, repeated_all, wrong_all = lost_all + lost, repeated_all + abs(repeated), wrong_all + wrong
        print(f"{trial:>5} {kill_at:>9.2f} {len(before):>9} {evaluated:>11} {lost:>4} {repeated:>8} {wrong:>5}{note}")
    print(f"total over {args.trials} trials: lost {lost_all}, repeated {repeated_all}, wrong {wrong_all}")


def overhead(args: argparse.Namespace, folder: Path) -> None:
    import torch

    import minilib as ml
    from minilib.evaluation import token_nll

    model, tok = ml.teaching.load_teaching_model()
    ids = ml.teaching.calibration_ids(tok, 4, 64)
    masks = masks_for(args.overhead_masks, args.seed + 1)

    def evaluate(chunk: np.ndarray) -> np.ndarray:
        out = []
        for mask in chunk:
            with torch.no_grad(), ml.layers.keep_only(model, mask):
                out.append(float(token_nll(model, ids).double().mean()))
        return np.array(out)

    evaluate(masks[:2])  # warm-up
    plain, stored = [], []
    for r in range(args.repeats):
        start = time.perf_counter()
        reference = np.concatenate([evaluate(masks[i: i + args.chunk]) for i in range(0, len(masks), args.chunk)])
        plain.append(time.perf_counter() - start)
        with EvaluationStore.open(folder / f"overhead{r}.sqlite", **IDENTITY) as store:
            start = time.perf_counter()
            values, _ = evaluate_missing(store, masks, evaluate, args.chunk)
            stored.append(time.perf_counter() - start)
        assert np.allclose(values, reference, rtol=0, atol=1e-6)
    with EvaluationStore.open(folder / "bare.sqlite", **IDENTITY) as store:
        many = masks_for(2048, args.seed + 2)
        start = time.perf_counter()
        evaluate_missing(store, many, fake_loss, args.chunk)
        per_txn = (time.perf_counter() - start) / math.ceil(len(many) / args.chunk)
    p, s = statistics.median(plain), statistics.median(stored)
    print(f"overhead on the teaching model, {len(masks)} masks, {args.chunk} per transaction, "
          f"median of {args.repeats}: plain {p:.3f} s, with store {s:.3f} s, ratio {s / p:.3f}")
    print(f"store alone (zero-cost evaluation, 2048 masks): {per_txn * 1e3:.2f} ms per transaction of "
          f"{args.chunk} masks (lookup + record, synchronous=FULL)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--masks", type=int, default=200, help="masks per run (at most 4096)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluator", choices=("fake", "game"), default="fake")
    parser.add_argument("--delay", type=float, default=0.01, help="fake evaluation seconds per mask")
    parser.add_argument("--chunk", type=int, default=8, help="masks per transaction")
    parser.add_argument("--overhead-masks", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args, args.child)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        durability(args, Path(folder), rng)
        overhead(args, Path(folder))


if __name__ == "__main__":
    main()
