"""The shipped SmolLM2-135M stage-1 table (chapter 07): its manifest is consistent, its design is
the one the script describes, and a random sample of entries recomputed on the model matches (≤ 1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest

import minilib as ml
from conftest import needs_real

pytestmark = needs_real


@pytest.fixture(scope="module")
def table():
    return ml.store.load_shipped_table("smollm2")


def test_manifest_and_design(table):
    m = table.manifest
    n = table.masks.shape[1]
    assert n == 30 and m["calibration_shape"] == list(table.calibration_ids.shape)
    assert m["calibration_sha256"] == ml.store.calibration_hash(table.calibration_ids) == table.meta["calibration"]
    assert m["n_masks"] == len(table.masks) == len(np.unique(table.masks, axis=0))
    kept = table.masks.sum(axis=1)
    assert (kept == n).sum() == 1 and (kept == n - 1).sum() == n          # full model, leave-one-out
    assert (kept == n - 2).sum() == n * (n - 1) // 2                        # all pairs of removals
    for k in ml.pruning.paper_keep_sizes(n)[1:]:
        assert (kept == k).sum() == m["design"]["per_stratum"]             # the paper's strata, scaled
    assert np.isfinite(table.losses).all() and table.values("ppl_ratio").max() <= 1.5
    assert m["model_file_sha256"] == ml.models.file_sha256(ml.models.smollm2_gguf_path())


def test_random_entries_recompute(table, smollm2):
    model, _ = smollm2
    rng = np.random.default_rng()
    rows = np.concatenate([[int(np.flatnonzero(table.masks.all(axis=1))[0])], rng.choice(len(table.masks), 3, replace=False)])
    game = ml.evaluation.LayerGame(model, table.calibration_ids, "neg_loss", engine="forward")
    fresh = game.losses(table.masks[rows])
    assert np.abs(fresh - table.losses[rows]).max() <= 1e-4, rows


def test_lookup_and_pair_interactions_match_the_definition(table):
    n = table.masks.shape[1]
    v = table.values("ppl_ratio")
    rows = np.random.default_rng(0).choice(len(table.masks), 20, replace=False)
    assert np.array_equal(table.lookup(table.masks[rows]), v[rows])
    missing = np.zeros((1, n), dtype=bool)                                  # the empty model: not in the table
    assert np.isnan(table.lookup(missing)).all()
    inter = table.pair_interactions()
    assert inter.shape == (n, n) and np.allclose(inter, inter.T) and np.all(np.diag(inter) == 0)
    i, j = 3, 17
    def val(*removed):
        m = np.ones(n, dtype=bool)
        m[list(removed)] = False
        return v[np.flatnonzero((table.masks == m).all(axis=1))[0]]
    assert inter[i, j] == pytest.approx(val(i, j) - val(i) - val(j) + val())
    with pytest.raises(ValueError, match="masks must have 30 columns"):
        table.lookup(np.ones((1, 12), dtype=bool))
