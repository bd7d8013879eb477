"""Masked evaluations per second: layer skipping vs the paper's zero-and-restore, side by side.

What is measured. Every Shapley estimator in the book spends its time evaluating the model under
keep-masks (which decoder layers run) on a calibration set. This script times three ways of doing
one such evaluation, on the shipped 12-layer teaching LLaMA, over the *same* set of masks:

(a) zero-and-restore, the paper's reference: for each mask, zero every parameter of the dropped
    layers (``ml.layers.zero_layers``, which clones them first), run one forward pass over the
    calibration set with all L layers, restore the weights;
(b) skip, one mask per forward: ``ml.layers.keep_only`` bypasses the dropped layers' forward, so a
    mask that keeps k layers costs k layers, and nothing is copied;
(c) skip, batched: a fresh ``ml.evaluation.LayerGame`` (so its cache holds nothing but the full
    model) evaluates ``--mask-batch-size`` masks per forward pass, each layer running only on the
    rows of the masks that keep it.

Why. (a) is what the paper's code does; (b) and (c) are what ``minilib`` does. The three must
give the same losses (a pre-norm block with zero weights adds nothing to the residual stream),
and the script asserts that they do to within 1e-5 before reporting speed.

Masks. Drawn like the paper's strata: the paper keeps 30/27/24/21/18 of LLaMA's 32 layers; scaled
to L layers that is round(k * L / 32) kept layers (11/10/9/8/7 for L = 12; the mapping is
printed). Within a stratum masks are distinct and uniform among the subsets of that size, so a
cache can never help (c); a stratum with fewer possible subsets than requested (keep 11 of 12:
12 subsets) contributes all of them. Calibration: ``--n-seqs`` windows of ``--seq-len`` tokens
(the paper uses 10 x 128). One timed run per method after one untimed warm-up forward; the
thread count is left as torch sets it (set OMP_NUM_THREADS to change it). Wall-clock rates and
ratios are printed, and CPU-time ratios next to them: on a machine shared with other jobs, wall
time is noisy and CPU-time ratios with OMP_NUM_THREADS=1 are the steadier comparison.

Usage: python benchmarks/masked_eval.py [--masks-per-stratum 40] [--n-seqs 10] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import math
import time
from itertools import combinations

import numpy as np
import torch
from tqdm.auto import tqdm

import minilib as ml
from minilib.evaluation import token_nll

PAPER_LAYERS = 32
PAPER_KEEP = (30, 27, 24, 21, 18)


def stratum_masks(n_layers: int, keep: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct keep-masks with exactly ``keep`` layers (all of them if fewer exist)."""
    if math.comb(n_layers, keep) <= count:
        subsets = list(combinations(range(n_layers), keep))
    else:
        found: set[tuple[int, ...]] = set()
        while len(found) < count:
            found.add(tuple(sorted(rng.choice(n_layers, keep, replace=False).tolist())))
        subsets = sorted(found)
    masks = np.zeros((len(subsets), n_layers), dtype=bool)
    for row, subset in enumerate(subsets):
        masks[row, list(subset)] = True
    return masks


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def mean_loss(model, ids) -> float:
    return float(token_nll(model, ids).double().mean())


def run_zero_restore(model, ids, masks) -> np.ndarray:
    out = []
    for mask in tqdm(masks, desc="(a) zero-and-restore"):
        with ml.layers.zero_layers(model, ~mask):
            out.append(mean_loss(model, ids))
    return np.array(out)


def run_skip(model, ids, masks) -> np.ndarray:
    out = []
    for mask in tqdm(masks, desc="(b) skip, one mask/forward"):
        with ml.layers.keep_only(model, mask):
            out.append(mean_loss(model, ids))
    return np.array(out)


def timed(fn, device):
    """Run ``fn``; return its result, wall seconds and this process's CPU seconds."""
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start, time.process_time() - cpu_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--masks-per-stratum", type=int, default=40)
    parser.add_argument("--n-seqs", type=int, default=10, help="calibration windows (paper: 10)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per window (paper: 128)")
    parser.add_argument("--mask-batch-size", type=int, default=8, help="masks per forward pass in (c)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    ml.set_seed(args.seed)
    model, tok = ml.teaching.load_teaching_model(device=args.device)
    device = next(model.parameters()).device
    ids = ml.teaching.calibration_ids(tok, args.n_seqs, args.seq_len).to(device)
    n_layers = len(ml.layers.decoder_layers(model))

    rng = np.random.default_rng(args.seed)
    keeps = [round(k * n_layers / PAPER_LAYERS) for k in PAPER_KEEP]
    strata = [stratum_masks(n_layers, k, args.masks_per_stratum, rng) for k in keeps]
    masks = np.concatenate(strata)
    print(f"model: teaching LLaMA, {n_layers} layers, device {device}, torch threads {torch.get_num_threads()}")
    print(f"calibration: {args.n_seqs} x {args.seq_len} tokens")
    print("strata (paper keep of 32 -> keep of %d: masks):" % n_layers)
    for k32, k, s in zip(PAPER_KEEP, keeps, strata):
        print(f"  keep {k32:2d}/32 -> keep {k:2d}/{n_layers}: {len(s)} distinct masks")
    print(f"total: {len(masks)} masks, mean layers kept {masks.sum(1).mean():.2f} of {n_layers}")

    mean_loss(model, ids)  # untimed warm-up forward
    loss_a, t_a, cpu_a = timed(lambda: run_zero_restore(model, ids, masks), device)
    loss_b, t_b, cpu_b = timed(lambda: run_skip(model, ids, masks), device)
    game = ml.evaluation.LayerGame(model, ids, utility="neg_loss", mask_batch_size=args.mask_batch_size)
    loss_c, t_c, cpu_c = timed(lambda: game.losses(masks), device)
    assert game.n_evals == 1 + len(masks), "the batched game must evaluate every mask (no cache hits)"

    diff_b, diff_c = np.abs(loss_b - loss_a).max(), np.abs(loss_c - loss_a).max()
    print(f"max |loss difference| vs (a): (b) {diff_b:.2e}, (c) {diff_c:.2e}")
    assert diff_b <= 1e-5 and diff_c <= 1e-5, "the three methods disagree"

    rate_a, rate_b, rate_c = (len(masks) / t for t in (t_a, t_b, t_c))
    print(f"(a) zero-and-restore, one mask per forward : {rate_a:7.2f} masks/s ({t_a:.1f} s wall, {cpu_a:.1f} s CPU)")
    print(f"(b) skip, one mask per forward              : {rate_b:7.2f} masks/s ({t_b:.1f} s wall, {cpu_b:.1f} s CPU)")
    print(f"(c) skip, batched ({args.mask_batch_size} masks per forward)     : {rate_c:7.2f} masks/s ({t_c:.1f} s wall, {cpu_c:.1f} s CPU)")
    print(f"speed-up (b)/(a): {rate_b / rate_a:.2f}x   (c)/(a): {rate_c / rate_a:.2f}x   "
          f"(in CPU time: {cpu_a / cpu_b:.2f}x, {cpu_a / cpu_c:.2f}x)")


if __name__ == "__main__":
    main()
