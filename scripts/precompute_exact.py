"""Precompute the teaching model's exact value tables over all 2**12 keep-masks (chapter 03).

Writes ``minilib/assets/teaching/exact_{ppl_ratio,neg_loss}.npz`` with a manifest in each
file's metadata (model hash, calibration spec, versions, wall time). Both utilities come
from the same losses, computed once by the prefix-shared walk of ``exact_values``.
CI re-checks a random sample of entries against independent evaluation.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np

import minilib as ml


def main() -> None:
    model, tok = ml.teaching.load_teaching_model()
    ids = ml.teaching.exact_calibration_ids(tok)
    game = ml.evaluation.LayerGame(model, ids, utility="neg_loss")
    start = time.time()
    table = ml.evaluation.exact_values(game)
    seconds = time.time() - start
    losses = -table.values
    common = {
        "model_sha256": hashlib.sha256((ml.teaching.teaching_model_path() / "model.safetensors").read_bytes()).hexdigest(),
        "calibration": ml.teaching.EXACT_CALIBRATION,
        "calibration_ids_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
        "base_loss": game.base_loss,
        "layer_forwards": table.metadata["layer_forwards"],
        "seconds": round(seconds, 1),
        "versions": ml.teaching.environment_versions(),
    }
    for utility, values in (("neg_loss", -losses), ("ppl_ratio", np.exp(game.base_loss - losses))):
        ml.games.TabularGame(values, {**common, "utility": utility}).save(ml.teaching.exact_table_path(utility))
    print(f"2**{game.n_players} masks in {seconds:.1f} s, {common['layer_forwards']} layer forwards")


if __name__ == "__main__":
    main()
