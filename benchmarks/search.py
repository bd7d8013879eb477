"""Keep-mask search vs layer rankings at equal real-evaluation budgets on the teaching table (chapter 07).

What is measured. On the teaching model's exact game (``ml.teaching.exact_table("ppl_ratio")``, all 2**12
keep-masks of the shipped 12-layer LLaMA; every evaluation is a table look-up, the optimum of every size is
known from ``ml.pruning.best_keep_sets``), each method chooses the layers to keep for each keep size k, and the
choice is scored by its gap to the optimum: v* / v − 1, the excess calibration perplexity (``ppl_ratio`` is
base_ppl / ppl, so this is ppl(choice) / ppl(optimum) − 1). Per keep size and budget B (distinct masks sent to
the table, counted by ``ml.games.CountingGame``):

- ``evolution``: ``ml.search.evolutionary_search`` with budget B (one level: the table);
- ``surrogate search``: B − 5 distinct stratified masks (keep 11..4 layers, equally many per stratum), a
  surrogate fitted to them (L-BFGS, exp head), ``ml.search.surrogate_search`` verifying 5 candidates per size;
  the fit is shared by all sizes, so each size costs B;
- ``paper (surrogate Shapley)``: the same surrogate's exact Shapley values (``ml.surrogate.surrogate_shapley``),
  keep the k largest; B − 5 evaluations;
- ``random search``: the best of B distinct random masks keeping k (a control);
- fixed-cost references, deterministic: ``Shapley (exact)`` (exact Shapley of the full table, 4096
  evaluations), ``leave-one-out`` (13), ``SLEB greedy`` (``ml.search.greedy_search``, (12−k)(13+k)/2).

Each stochastic method runs for every seed; the table gives the mean gap in % and, in brackets, on how many
seeds the exact optimum was found. One thread (the surrogate fits are tiny).

Usage: python benchmarks/search.py [--seeds 10] [--budgets 60 120 240] [--sizes 10 9 8 6 4]
"""

from __future__ import annotations

import argparse
import time
from math import comb

import numpy as np
import torch

import minilib as ml
from minilib.search import evolutionary_search, greedy_search, surrogate_search

N_VERIFY = 5
STRATA = [11, 10, 9, 8, 7, 6, 5, 4]


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Keep the k layers with the largest scores."""
    keep = np.zeros(len(scores), dtype=bool)
    keep[np.argsort(-scores, kind="stable")[:k]] = True
    return keep


def distinct_stratified(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct masks drawn stratum by stratum (round robin), so the budget buys distinct evaluations."""
    pool = ml.surrogate.sample_stratified_masks(n, 200 * len(STRATA), STRATA, rng=rng).reshape(len(STRATA), 200, n)
    seen: dict[bytes, np.ndarray] = {}
    for row in range(200):
        for stratum in pool[:, row]:
            if len(seen) < count:
                seen.setdefault(np.packbits(stratum).tobytes(), stratum)
    return np.stack(list(seen.values()))


def random_masks(n: int, k: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct uniform masks keeping k of n (all of them if there are fewer)."""
    found: dict[bytes, np.ndarray] = {}
    while len(found) < min(count, comb(n, k)):
        mask = np.zeros(n, dtype=bool)
        mask[rng.choice(n, k, replace=False)] = True
        found.setdefault(np.packbits(mask).tobytes(), mask)
    return np.stack(list(found.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budgets", type=int, nargs="+", default=[60, 120, 240])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 9, 8, 6, 4])
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = ml.teaching.exact_table("ppl_ratio")
    n, sizes = table.n_players, args.sizes
    best = ml.pruning.best_keep_sets(table)
    optimum = {k: float(table(np.isin(np.arange(n), best[k]))[0]) for k in sizes}

    def gap(keep: np.ndarray) -> float:
        return optimum[int(keep.sum())] / float(table(keep)[0]) - 1

    def row(name: str, gaps: dict[int, list[float]], cost: str) -> None:
        cells = [f"{100 * np.mean(gaps[k]):6.2f} ({int(np.sum(np.array(gaps[k]) < 1e-12)):>2})" for k in sizes]
        print(f"{name:<28}{cost:>15}  " + "  ".join(cells))

    header = f"{'method':<28}{'evals':>15}  " + "  ".join(f"{'keep ' + str(k):>11}" for k in sizes)
    print(f"gap to the optimum, % excess calibration PPL (mean over {args.seeds} seeds; optimum hits in brackets)")
    print(header)
    phi = ml.shapley.exact_shapley(table)
    loo = table(~np.eye(n, dtype=bool))                  # value without each layer: high = unimportant
    row("Shapley (exact)", {k: [gap(top_k(phi, k))] for k in sizes}, str(2 ** n))
    row("leave-one-out", {k: [gap(top_k(-loo, k))] for k in sizes}, str(n + 1))
    sleb = {k: greedy_search(table, k) for k in sizes}
    row("SLEB greedy", {k: [gap(sleb[k].keep)] for k in sizes}, "/".join(str(sleb[k].n_evals) for k in sizes))
    seconds: dict[str, float] = {}
    for budget in args.budgets:
        gaps: dict[str, dict[int, list[float]]] = {m: {k: [] for k in sizes} for m in
                                                   ("evolution", "surrogate search", "paper (surrogate Shapley)",
                                                    "random search")}
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            t0 = time.perf_counter()
            for k in sizes:
                game = ml.games.CountingGame(table)
                result = evolutionary_search(game, k, budget, rng=rng, progress=False)
                assert result.n_evals == game.n_evals <= budget
                gaps["evolution"][k].append(gap(result.keep))
            t1 = time.perf_counter()
            game = ml.games.CountingGame(table)
            masks = distinct_stratified(n, budget - N_VERIFY, rng)
            surrogate = ml.surrogate.fit_surrogate(masks, game(masks), rng=rng, optimizer="lbfgs", output="exp")
            fit_cost = game.n_evals
            found = surrogate_search(surrogate, game, sizes, n_verify=N_VERIFY, rng=rng, progress=False)
            for k in sizes:
                assert fit_cost + found[k].n_evals <= budget
                gaps["surrogate search"][k].append(gap(found[k].keep))
            t2 = time.perf_counter()
            phi_s = ml.surrogate.surrogate_shapley(surrogate).values
            for k in sizes:
                gaps["paper (surrogate Shapley)"][k].append(gap(top_k(phi_s, k)))
                candidates = random_masks(n, k, budget, rng)
                gaps["random search"][k].append(gap(candidates[int(np.argmax(table(candidates)))]))
            seconds["evolution"] = seconds.get("evolution", 0.0) + t1 - t0
            seconds["surrogate fit + search"] = seconds.get("surrogate fit + search", 0.0) + t2 - t1
        print(f"-- budget {budget} real evaluations per keep size")
        for name, per in gaps.items():
            row(name, per, str(budget - N_VERIFY if name.startswith("paper") else budget))
    print("wall time: " + ", ".join(f"{name} {s:.1f} s" for name, s in seconds.items()))


if __name__ == "__main__":
    main()
