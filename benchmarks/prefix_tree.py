"""Prefix-tree evaluation of the paper's stage-1 masks vs a plain loop of one mask per forward.

What is measured. Stage 1 of the paper evaluates the model under thousands of keep-masks drawn
from strata of fixed Hamming weight (keep 30/27/24/21/18 of LLaMA-2's 32 layers; scaled here to
round(k * L / 32) of L). Two ways of evaluating the *same* distinct masks on the same calibration
tokens are compared in one run:

(a) plain loop: one forward of the whole model per mask, dropped layers skipped
    (``LayerGame(engine="forward", mask_batch_size=1)``: what a careful user writes by hand);
(b) prefix tree: ``ml.evaluation.evaluate_masks`` walks the trie of the masks' layer prefixes,
    so masks that agree on layers < k share the state entering layer k and each shared prefix
    runs once (``LayerGame``'s default engine).

Layer forwards are counted exactly (a: kept layers summed over masks; b: distinct prefixes that
end in a kept layer). Both must give the same losses (asserted, max |Δ| <= 1e-5). Wall and CPU
time of each are printed, and the ratios plain / tree. The head (final norm + LM head) runs once
per mask in both: on SmolLM2 (49,152-token vocabulary) it costs about as much as eight decoder
layers, which caps the wall-time gain below the layer-forward gain.

Usage: python benchmarks/prefix_tree.py --model teaching|smollm2-135m [--masks 1000]
       [--n-seqs 4] [--seq-len 64] [--seed 0]
Threads: left as torch sets them; use OMP_NUM_THREADS=1 for steadier CPU-time ratios.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

import minilib as ml


def stage1_masks(n_layers: int, n_masks: int, seed: int) -> np.ndarray:
    """``n_masks`` distinct stratified masks over the paper's strata (or all of them, if fewer exist).

    Drawn in rounds of equal allocation per stratum; duplicates are dropped and the draw goes on
    (at L = 12 the five strata hold only 1,585 masks in all, so repeats are frequent).
    """
    sizes = ml.pruning.paper_keep_sizes(n_layers)
    available = sum(math.comb(n_layers, k) for k in sizes)
    rng = np.random.default_rng(seed)
    masks = np.zeros((0, n_layers), dtype=bool)
    while len(masks) < min(n_masks, available):
        more = ml.surrogate.sample_stratified_masks(n_layers, n_masks, sizes, rng=rng)
        masks = np.unique(np.concatenate([masks, more]), axis=0)
    return masks[rng.permutation(len(masks))[:n_masks]]


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="teaching")
    parser.add_argument("--masks", type=int, default=1000)
    parser.add_argument("--n-seqs", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, tokenizer = ml.models.load_model(args.model)
    ids = ml.data.calibration_ids(tokenizer, "teaching", n_seqs=args.n_seqs, seq_len=args.seq_len, seed=args.seed)
    n = len(ml.layers.decoder_layers(model))
    masks = stage1_masks(n, args.masks, args.seed)
    print(f"model {args.model}: L = {n}, strata keep {ml.pruning.paper_keep_sizes(n)}, "
          f"{len(masks)} distinct masks, calibration {args.n_seqs} x {args.seq_len} tokens, "
          f"{torch.get_num_threads()} threads")
    with torch.no_grad():
        model(input_ids=ids[:1], use_cache=False)          # warm-up

    plain_game = ml.evaluation.LayerGame(model, ids, "neg_loss", engine="forward", mask_batch_size=1, progress=True)
    plain_game.layer_forwards = 0
    plain, wall_a, cpu_a = timed(lambda: plain_game.losses(masks))
    tree_game = ml.evaluation.LayerGame(model, ids, "neg_loss", engine="prefix", mask_batch_size=1, progress=True)
    tree_game.layer_forwards = 0
    tree, wall_b, cpu_b = timed(lambda: tree_game.losses(masks))

    diff = float(np.abs(plain - tree).max())
    assert diff <= 1e-5, f"prefix tree and plain loop disagree by {diff}"
    fa, fb = plain_game.layer_forwards, tree_game.layer_forwards
    print(f"(a) plain loop  : {fa:7d} layer forwards, {wall_a:7.1f} s wall, {cpu_a:7.1f} s CPU, "
          f"{len(masks) / wall_a:6.2f} masks/s")
    print(f"(b) prefix tree : {fb:7d} layer forwards, {wall_b:7.1f} s wall, {cpu_b:7.1f} s CPU, "
          f"{len(masks) / wall_b:6.2f} masks/s")
    print(f"ratios plain/tree: {fa / fb:.2f}x fewer layer forwards, {wall_a / wall_b:.2f}x wall, "
          f"{cpu_a / cpu_b:.2f}x CPU time; max |Δ loss| = {diff:.1e}")


if __name__ == "__main__":
    main()
