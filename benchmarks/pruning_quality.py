"""Pruning quality of every method on the teaching model at 25 % and 50 % of its layers removed (chapter 06).

Every method of ``ml.pruning.prune`` chooses layers on the book's calibration set (8x128 tokens, the set the
shipped exact table was computed on); each choice is judged by perplexity on the corpus's held-out test split,
as a ratio to the exhaustive optimum (``ml.pruning.best_keep_sets`` of the exact table). Cost is what ``prune``
reports: real masked evaluations and seconds. ``shapley_exact`` is read from the shipped table (its cost is the
table's recorded build time) unless ``--recompute-exact`` (2**12 evaluations, minutes).

    python benchmarks/pruning_quality.py [--budget 500] [--test-windows 64] [--recompute-exact]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import minilib as ml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=500, help="real evaluations for the surrogate methods")
    parser.add_argument("--test-windows", type=int, default=0, help="128-token test windows (0 = whole split)")
    parser.add_argument("--recompute-exact", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = ml.teaching.load_teaching_model()
    n = len(ml.layers.decoder_layers(model))
    calib = ml.teaching.exact_calibration_ids(tok)
    test = ml.teaching.token_stream(tok, "test")
    if args.test_windows:
        test = test[: args.test_windows * 128]
    table = ml.teaching.exact_table("ppl_ratio")
    best = ml.pruning.best_keep_sets(table)
    sizes = {"25%": n // 4, "50%": n // 2}
    cache: dict[tuple, float] = {}

    def held_out(removed) -> float:
        key = tuple(sorted(removed))
        if key not in cache:
            keep = np.ones(n, dtype=bool)
            keep[list(key)] = False
            with ml.layers.keep_only(model, keep):
                cache[key] = ml.evaluation.perplexity(model, test)
        return cache[key]

    rows = []
    opt = {k: held_out(sorted(set(range(n)) - set(best[n - r]))) for k, r in sizes.items()}
    rows.append(("optimum (exhaustive)", opt["25%"], 1.0, opt["50%"], 1.0, 2 ** n, table.metadata["seconds"]))
    for method in ml.pruning.METHODS:
        if method == "shapley_exact" and not args.recompute_exact:
            phi = ml.shapley.exact_shapley(table)
            chosen = {k: np.argsort(phi, kind="stable")[:r].tolist() for k, r in sizes.items()}
            n_evals, seconds = 2 ** n, table.metadata["seconds"]
        else:
            chosen, n_evals, seconds = {}, 0, 0.0
            for k, r in sizes.items():
                result = ml.pruning.prune(model, calib, method, r, rng=0, budget=args.budget)
                chosen[k], n_evals, seconds = result.removed, max(n_evals, result.n_evals), max(seconds, result.seconds)
        p25, p50 = held_out(chosen["25%"]), held_out(chosen["50%"])
        rows.append((method, p25, p25 / opt["25%"], p50, p50 / opt["50%"], n_evals, seconds))
    print(f"teaching model, {n} layers; calibration {tuple(calib.shape)}; held-out test tokens {test.numel():,}; "
          f"full-model test PPL {held_out([]):.2f}")
    print(f"{'method':28s} {'PPL 25%':>8s} {'/opt':>6s} {'PPL 50%':>9s} {'/opt':>6s} {'n_evals':>8s} {'seconds':>8s}")
    for name, p25, r25, p50, r50, n_evals, seconds in rows:
        print(f"{name:28s} {p25:8.2f} {r25:6.3f} {p50:9.2f} {r50:6.3f} {n_evals:8d} {seconds:8.1f}")
    print("cost: for SLEB and the surrogate methods, the larger of the two runs (25 % and 50 %); "
          "optimum and shapley_exact: the shipped table's 4,096 evaluations and recorded build time")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f} s")
