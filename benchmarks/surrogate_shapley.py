"""Stage 3 of the paper: contributions through the surrogate, vectorised vs the public code's loop.

What is measured. The paper's stage 3 estimates each layer's contribution as the mean, over
``mc`` base masks drawn from the Hamming-weight strata, of f(b with layer i) − f(b without
layer i), where f is the surrogate network. For LLaMA-2-7B: L = 32 layers, strata keeping
30/27/24/21/18 layers, mc = 80,000 base masks, so 2·L·mc = 5.12 M network queries.

(a) the public code's way, re-created faithfully: for each layer i and each base mask, build a
    CPU tensor of one mask with bit i set, call the network on it (autograd on: no
    ``torch.no_grad``, as in the public code), ``.item()``; the same with bit i cleared; the
    difference is one marginal. 2·L·mc single-row calls from Python.
(b) ``ml.surrogate.surrogate_shapley(surrogate, n_samples=mc, method="hamming", keep_sizes=...)``:
    draws the same kind of base masks and computes all marginals in a few tensor operations
    (flipping bit i moves the first layer's pre-activation by ±W1[:, i], so the L flips of a base
    mask cost L·h multiply-adds plus the small rest of the network).

The network is an untrained ``SurrogateMLP(32)`` (the paper's Linear(32, 64) → CELU → Linear(64,
1) → Sigmoid): timing does not depend on the weights. (b) runs once at full size, timed end to
end, mask sampling included. (a) at full size would take many minutes, so it is timed on a
subsample of the base masks (``--loop-bases``, spread equally over the strata) and extrapolated
linearly to 5.12 M calls; the script says so when it prints. The subsample's marginals from (a)
must equal (b)'s marginals for the same base masks to 1e-5 (float32), which the script checks
before reporting speed. One run each: on a busy machine, repeat before trusting a ratio.

Usage: python benchmarks/surrogate_shapley.py [--mc 80000] [--loop-bases 500] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import minilib as ml
from minilib.estimators import _uniform_masks
from minilib.surrogate_values import _hamming_marginals

L = 32
KEEP = (30, 27, 24, 21, 18)


def public_code_loop(model: torch.nn.Module, bases: np.ndarray) -> np.ndarray:
    """Marginals the way the public code computes them: one single-row forward per query."""
    n = bases.shape[1]
    marg = np.empty(bases.shape)
    for i in range(n):
        for row, base in enumerate(bases):
            with_i = base.copy()
            with_i[i] = 1
            without_i = base.copy()
            without_i[i] = 0
            f_with = model(torch.tensor(with_i, dtype=torch.float32)).item()
            f_without = model(torch.tensor(without_i, dtype=torch.float32)).item()
            marg[row, i] = f_with - f_without
    return marg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mc", type=int, default=80_000, help="base masks (the paper: 80,000)")
    parser.add_argument("--loop-bases", type=int, default=500, help="base masks timed in the loop")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    surrogate = ml.surrogate.Surrogate(ml.surrogate.SurrogateMLP(L).eval(), {}, np.zeros(0, int), np.zeros(0, int))
    n_calls = 2 * L * args.mc
    print(f"L = {L}, strata keep {KEEP}, mc = {args.mc:,} base masks: {n_calls:,} surrogate queries; "
          f"torch threads {torch.get_num_threads()}")

    # (b) vectorised, full size, one timed run (a first tiny call warms up the kernels)
    ml.surrogate.surrogate_shapley(surrogate, n_samples=100, rng=1, method="hamming", keep_sizes=KEEP)
    start = time.perf_counter()
    est = ml.surrogate.surrogate_shapley(surrogate, n_samples=args.mc, rng=args.seed, method="hamming",
                                         keep_sizes=KEEP)
    t_vec = time.perf_counter() - start
    print(f"(b) vectorised surrogate_shapley(method='hamming'): {t_vec:.3f} s for all {n_calls:,} queries")

    # the same base masks, rebuilt from the same seed, and the vectorised marginals for each of them
    gen = np.random.default_rng(args.seed)
    per = args.mc // len(KEEP)
    bases = np.concatenate([_uniform_masks(gen, L, np.arange(L), k, per) for k in KEEP])
    marg_vec = _hamming_marginals(surrogate, args.mc, KEEP, np.random.default_rng(args.seed))
    assert np.allclose(marg_vec.mean(axis=0), est.values), "rebuilt base masks differ from the timed run's"
    pick = np.concatenate([np.arange(j * per, j * per + args.loop_bases // len(KEEP)) for j in range(len(KEEP))])

    # (a) the public code's loop on the subsample
    model = surrogate.model
    start = time.perf_counter()
    marg_loop = public_code_loop(model, bases[pick].astype(np.float32))
    t_loop_sub = time.perf_counter() - start
    sub_calls = 2 * L * len(pick)
    diff = float(np.abs(marg_loop - marg_vec[pick]).max())
    print(f"(a) public-code loop, timed on {len(pick)} base masks ({sub_calls:,} single-row calls): "
          f"{t_loop_sub:.2f} s, {1e6 * t_loop_sub / sub_calls:.1f} us per call")
    print(f"    marginals of (a) and (b) on those {len(pick)} base masks: max |difference| = {diff:.2e}")
    assert diff < 1e-5, f"the loop and the vectorised pass disagree by {diff}"
    t_loop = t_loop_sub * n_calls / sub_calls
    print(f"    EXTRAPOLATED linearly from those {sub_calls:,} calls to all {n_calls:,}: "
          f"{t_loop:.0f} s ({t_loop / 60:.1f} min)")

    print(f"speed-up (extrapolated loop / vectorised): {t_loop / t_vec:,.0f}x (goal >= 1000x: "
          f"{'met' if t_loop / t_vec >= 1000 else 'NOT met'})")
    print(f"vectorised pass under 1 s: {'yes' if t_vec < 1 else 'no'} ({t_vec:.3f} s)")


if __name__ == "__main__":
    main()
