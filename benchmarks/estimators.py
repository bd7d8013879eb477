"""Monte Carlo Shapley estimators on the teaching model: evaluations needed, side by side.

Measures, in one run on the shipped exact table of the teaching model (12 layers, the paper's
utility PPL(N)/PPL(S)), how many *distinct game evaluations* each estimator of
``minilib.estimators`` needs, over ``--seeds`` seeds at every budget of ``--budgets``:

1. to prune right: the smallest budget of the grid from which on at least ``--share`` of the
   seeds find exactly the exact bottom-3 layers (bottom-3 precision 1.0 at that budget and every
   larger one), with the median number of evaluations actually spent there;
2. at equal error: the evaluations each estimator needs for a median relative squared error
   ‖φ̂ − φ‖²/‖φ‖² of each ``--targets`` value, interpolated linearly in log-log between grid
   points, and the ratio stratified (Neyman) / permutation, plain and antithetic. A ratio
   below 1 means Neyman needs fewer evaluations.

Every estimator is scored against the exact Shapley values, including the paper's Hamming
semivalue (strata 11, 10, 9, 8, 7 of 12 layers), whose target is a different value: it can rank
right while its error never falls. Looking a coalition up in the table is instant, so this
times the estimators' own overhead, not a model. Usage: ``python benchmarks/estimators.py``
(about a minute on 2 CPU cores) or ``--seeds 5`` for a quick look.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
import pandas as pd

import minilib as ml
from minilib import estimators as E

KEEP = [11, 10, 9, 8, 7]  # the paper's strata (30, 27, 24, 21, 18 of 32 layers) scaled to 12

ESTIMATORS = {
    "permutation": partial(E.permutation_shapley, antithetic=False),
    "permutation, antithetic": E.permutation_shapley,
    "stratified, proportional": partial(E.stratified_shapley, allocation="proportional"),
    "stratified, Neyman": partial(E.stratified_shapley, allocation="neyman"),
    "KernelSHAP (shap)": E.kernel_shap,
    "shap PermutationExplainer": E.shap_permutation,
    "paper (Hamming semivalue)": lambda game, budget, rng: E.hamming_semivalue(game, budget, KEEP, rng),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20, help="seeds per (estimator, budget)")
    parser.add_argument("--budgets", type=int, nargs="+",
                        default=np.round(2 ** np.arange(6, 11.6, 0.5)).astype(int).tolist(),
                        help="budgets in game evaluations (default: 64 ... 2896, a factor sqrt(2) apart)")
    parser.add_argument("--targets", type=float, nargs="+", default=[5e-3, 3e-3, 2e-3],
                        help="median relative squared errors to reach")
    parser.add_argument("--share", type=float, default=0.9, help="share of seeds that must find the bottom-3")
    parser.add_argument("--utility", default="ppl_ratio", choices=["ppl_ratio", "neg_loss"])
    parser.add_argument("--csv", help="also save every run (one row per estimator, budget, seed) here")
    args = parser.parse_args()

    game = ml.teaching.exact_table(args.utility)
    phi = ml.shapley.exact_shapley(game)
    budgets = sorted(set(args.budgets))
    print(f"teaching model, utility {args.utility}: {game.n_players} layers, exact bottom-3 "
          f"{sorted(E.bottom_k(phi, 3))}; {args.seeds} seeds x budgets {budgets}")

    timings, parts = {}, []
    for name, estimator in ESTIMATORS.items():
        start = time.perf_counter()
        parts.append(E.budget_sweep(game, {name: estimator}, budgets, range(args.seeds), phi))
        timings[name] = time.perf_counter() - start
    sweep = pd.concat(parts, ignore_index=True)
    if args.csv:
        sweep.to_csv(args.csv, index=False)

    needed = E.budget_needed(sweep, "precision", 1.0, share=args.share)
    needed["seconds (whole sweep)"] = pd.Series(timings).round(1)
    print(f"\n1. Budget from which on >= {args.share:.0%} of seeds find the exact bottom-3 "
          f"(NaN: not on this grid)")
    print(needed.rename(columns={"budget": "budget", "n_evals": "evaluations spent (median)"})
          .to_string(float_format=lambda x: f"{x:.0f}"))

    curves = sweep.groupby(["estimator", "budget"], sort=False)[["n_evals", "rse"]].median()
    reach = pd.DataFrame({f"rse {t:g}": {name: E.budget_for_error(c["n_evals"], c["rse"], t)
                                         for name, c in curves.groupby(level=0, sort=False)}
                          for t in args.targets})
    print("\n2. Evaluations needed for a median relative squared error of (log-log interpolation; NaN: not reached)")
    print(reach.to_string(float_format=lambda x: f"{x:.0f}"))
    ratio = pd.DataFrame({"Neyman / permutation": reach.loc["stratified, Neyman"] / reach.loc["permutation"],
                          "Neyman / antithetic": reach.loc["stratified, Neyman"] / reach.loc["permutation, antithetic"],
                          "proportional / permutation": reach.loc["stratified, proportional"] / reach.loc["permutation"]})
    print("\nRatio of evaluations needed at equal error (below 1: the stratified estimator needs fewer)")
    print(ratio.to_string(float_format=lambda x: f"{x:.2f}"))


if __name__ == "__main__":
    main()
