"""Stage 1 of the paper on SmolLM2-135M: evaluate the design's keep-masks into a resumable store (chapter 07).

The design, in the order it is evaluated (so that a partial run is already useful): the full
model, leave-one-out (L masks), all pairs of removals (L·(L−1)/2, for the interaction section),
then the paper's strata (keep 30/27/24/21/18 of 32, scaled to L: 28/25/22/20/17 of 30),
``--per-stratum`` distinct masks each. Calibration: ``--n-seqs`` windows of ``--seq-len`` tokens
from the teaching corpus's calibration split (seed 0); the token ids themselves are shipped
with the table, so the table stays valid whatever later happens to the corpus split.

Resumable: every evaluated batch is committed to the SQLite store (``--store``); kill the job
and run it again to continue. ``--export`` writes the shipped files: ``stage1.npz`` (masks,
losses, store identity), ``calibration_ids.npy`` and ``stage1_manifest.json`` (model file
hash, calibration source and hash, tokens, utility, versions, seed, wall time, machine).
Run data-parallel with ``accelerate launch --multi_gpu --num_processes 2 scripts/precompute_stage1.py``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import minilib as ml

OUT = Path(__file__).resolve().parents[1] / "minilib" / "assets" / "smollm2"


def design(n: int, per_stratum: int, seed: int) -> np.ndarray:
    """Full model, leave-one-out, all pairs, then the stratified masks; distinct, in that order."""
    full = np.ones((1, n), dtype=bool)
    loo = ~np.eye(n, dtype=bool)
    pairs = np.ones((n * (n - 1) // 2, n), dtype=bool)
    for row, (i, j) in enumerate(itertools.combinations(range(n), 2)):
        pairs[row, [i, j]] = False
    rng = np.random.default_rng(seed)
    strata = [np.stack([np.isin(np.arange(n), rng.choice(n, k, replace=False)) for _ in range(4 * per_stratum)])
              for k in ml.pruning.paper_keep_sizes(n)]
    strata = [np.unique(s, axis=0)[:per_stratum] for s in strata]      # distinct within a stratum
    ordered = np.concatenate([full, loo, pairs, *[rng.permutation(s) for s in strata]])
    _, first = np.unique(ordered, axis=0, return_index=True)
    return ordered[np.sort(first)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-seqs", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--per-stratum", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", type=Path, default=Path(__file__).resolve().parent / "stage1" / "smollm2.sqlite")
    parser.add_argument("--export", action="store_true", help="write the shipped files from the store and stop")
    parser.add_argument("--reverse", action="store_true",
                        help="walk the design from its end: a second process on the same store meets the first")
    args = parser.parse_args()

    model, tok = ml.models.load_model(args.model)
    ids = ml.data.calibration_ids(tok, "teaching", n_seqs=args.n_seqs, seq_len=args.seq_len, seed=args.seed)
    n = len(ml.layers.decoder_layers(model))
    masks = design(n, args.per_stratum, args.seed)
    args.store.parent.mkdir(parents=True, exist_ok=True)
    if args.export:
        export(args, model, ids, masks)
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    game = ml.evaluation.LayerGame(model, ids, "ppl_ratio", store=args.store, progress=rank == 0)
    clock = args.store.parent / f"wall_seconds.rank{rank}.json"     # summed over resumed runs
    before = json.loads(clock.read_text())["seconds"] if clock.exists() else 0.0
    start = time.time()
    mine = masks[rank::world][::-1] if args.reverse else masks[rank::world]
    if args.reverse:
        clock = clock.with_name(f"wall_seconds.rank{rank}r.json")
        before = json.loads(clock.read_text())["seconds"] if clock.exists() else 0.0
    for begin in range(0, len(mine), 100):     # in slices, so the trie's depth-first order follows the design's
        game.losses(mine[begin: begin + 100])
        clock.write_text(json.dumps({"seconds": round(before + time.time() - start, 1), "evaluated": len(game.store)}))
        print(f"rank {rank}: {min(begin + 100, len(mine))}/{len(mine)} masks, {game.n_evals} evaluated now, "
              f"{time.time() - start:.0f} s", flush=True)


def export(args, model, ids, masks) -> None:
    from minilib.models import file_sha256, smollm2_gguf_path

    with ml.store.open_for_game(args.store, model, ids, "ppl_ratio") as store:
        stored, losses = store.masks_and_values()
        OUT.mkdir(parents=True, exist_ok=True)
        store.export(OUT / "stage1.npz")
        meta = store.meta
    np.save(OUT / "calibration_ids.npy", ids.numpy().astype(np.int32))
    wall = {f.name: json.loads(f.read_text())["seconds"] for f in sorted(args.store.parent.glob("wall_seconds.*.json"))}
    manifest = {
        "model": args.model, "model_file": smollm2_gguf_path().name, "model_file_sha256": file_sha256(smollm2_gguf_path()),
        "model_fingerprint": meta["fingerprint"], "calibration_source": "teaching (split 'calibration')",
        "calibration_seed": args.seed, "calibration_shape": list(ids.shape),
        "calibration_sha256": ml.store.calibration_hash(ids), "tokens": int(ids.numel()),
        "utility": "ppl_ratio (values stored are mean token NLL losses; ppl_ratio = exp(base_loss - loss))",
        "design": {"full": 1, "leave_one_out": int(len(model.model.layers)), "pairs": "all",
                   "strata_keep": ml.pruning.paper_keep_sizes(len(model.model.layers)),
                   "per_stratum": args.per_stratum, "design_masks": int(len(masks))},
        "n_masks": int(len(stored)), "seed": args.seed, "wall_seconds": wall,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "versions": ml.teaching.environment_versions(),
    }
    (OUT / "stage1_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"exported {len(stored)} masks ({len(losses)} losses) to {OUT}")


if __name__ == "__main__":
    main()
