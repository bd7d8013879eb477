"""Exact 2**L value table of the teaching model: prefix-shared walk vs independent evaluation.

Measures, side by side in one run on the same calibration batch, the wall time and the
number of decoder-layer forwards (one layer applied to one calibration batch) needed to
evaluate all 2**12 keep-masks:

- independent: ``LayerGame`` evaluates every mask on its own (batched over masks, but each
  mask runs its own kept layers): Σ_S |S| = L·2**(L−1) layer forwards;
- prefix-shared: ``exact_values`` walks the layer tree so each kept prefix runs once:
  2**L − 1 layer forwards.

Both run the same final norm + LM head once per mask (2**L times), which bounds the speed-up
on a model whose head is as large as the teaching model's (vocabulary 4096, width 128).
The two tables must agree to 1e-5. Usage: ``python benchmarks/exact_table.py --n-seqs 2``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import minilib as ml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-seqs", type=int, default=2, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--skip-independent", action="store_true", help="time only the prefix-shared walk")
    args = parser.parse_args()

    model, tok = ml.teaching.load_teaching_model()
    ids = ml.teaching.calibration_ids(tok, args.n_seqs, args.seq_len)
    L = len(ml.layers.decoder_layers(model))
    print(f"teaching model: L = {L} layers; calibration {args.n_seqs} x {args.seq_len} tokens; "
          f"torch threads {torch.get_num_threads()}")

    game = ml.evaluation.LayerGame(model, ids, utility="neg_loss")
    start = time.perf_counter()
    shared = ml.evaluation.exact_values(game)
    t_shared = time.perf_counter() - start
    print(f"prefix-shared : {t_shared:7.1f} s, {game.last_layer_forwards:6d} layer forwards (2^L - 1 = {2 ** L - 1})")
    if args.skip_independent:
        return

    fresh = ml.evaluation.LayerGame(model, ids, utility="neg_loss", mask_batch_size=8, progress=True)
    masks = ml.games.all_coalitions(L)
    start = time.perf_counter()
    independent = fresh(masks)
    t_indep = time.perf_counter() - start
    forwards = int(masks.sum())
    print(f"independent   : {t_indep:7.1f} s, {forwards:6d} layer forwards (L * 2^(L-1) = {L * 2 ** (L - 1)})")
    diff = float(np.abs(shared.values - independent).max())
    print(f"max |difference| between the two tables: {diff:.2e}")
    assert diff <= 1e-5, "prefix-shared and independent tables disagree"
    print(f"speed-up (independent / prefix-shared): {t_indep / t_shared:.2f}x wall time, "
          f"{forwards / game.last_layer_forwards:.2f}x fewer layer forwards")


if __name__ == "__main__":
    main()
