"""The shipped SmolLM2-135M pruning table (chapter 07): every method's choice is well formed, its cost is
counted consistently, the cheap choices are reproduced from the stage-1 table, and a random sample of the
held-out losses recomputed on the model matches (≤ 1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest

import minilib as ml
from conftest import needs_real

pytestmark = needs_real


@pytest.fixture(scope="module")
def shipped():
    return ml.pruning.load_shipped_pruning("smollm2")


@pytest.fixture(scope="module")
def table():
    return ml.store.load_shipped_table("smollm2")


def test_every_choice_is_well_formed_and_evaluated(shipped, table):
    n = table.masks.shape[1]
    assert shipped.levels == [3, 6, 9, 12]
    assert shipped.results["manifest"]["calibration_sha256"] == table.manifest["calibration_sha256"]
    methods = [m for m in ml.pruning.SHIPPED_METHOD_LABELS if m in shipped.results]
    assert set(methods) == set(ml.pruning.SHIPPED_METHOD_LABELS), "every method of the chapter is in the table"
    assert len(shipped.choices("random")) == 10
    for method in methods:
        for choice in shipped.choices(method):
            for r, removed in choice.items():
                assert len(set(removed)) == r and all(0 <= i < n for i in removed), (method, r)
                for split in ("calibration", "validation", "test"):
                    assert np.isfinite(shipped.loss(removed, split))


def test_costs_are_counted_as_the_chapter_states(shipped, table):
    assert shipped.n_evals("paper", 6) == len(table.masks) == 2066
    assert shipped.n_evals("loo", 12) == 31
    assert shipped.n_evals("corrected", 3) <= len(table.masks)
    budget = shipped.results["evopress"]["budget_per_level"]
    assert all(shipped.n_evals("evopress", r) <= budget for r in shipped.levels)
    sleb = [shipped.n_evals("sleb", r) for r in shipped.levels]
    assert sleb == [sum(30 - j for j in range(r)) for r in shipped.levels]       # L − j candidates in round j
    assert all(2066 < shipped.n_evals("surrogate_search", r) <= 2066 + 5 for r in shipped.levels)


def test_leave_one_out_and_sleb_agree_with_the_stage1_table(shipped, table):
    n = table.masks.shape[1]
    loo = table.lookup(~np.eye(n, dtype=bool))
    order = np.argsort(np.asarray(shipped.results["loo"]["scores"]), kind="stable")
    assert np.array_equal(order, np.argsort(-loo, kind="stable"))
    assert shipped.results["sleb"]["order"][0] == int(np.argmax(loo))             # round 1 is leave-one-out


def test_losses_lookup_and_errors(shipped):
    with pytest.raises(ValueError, match="split must be one of"):
        shipped.loss((), "train")
    with pytest.raises(ValueError, match="was not evaluated"):
        shipped.loss((0, 1, 2, 3, 4, 5, 6), "test")
    with pytest.raises(ValueError, match="method must be one of"):
        shipped.choices("magic")
    frame = shipped.perplexity_frame("test")
    assert len(frame) == len(ml.pruning.SHIPPED_METHOD_LABELS) * 4 and frame.sd.notna().sum() == 4


def test_random_heldout_losses_recompute(shipped, smollm2):
    model, _ = smollm2
    removed = shipped.results["heldout"]["removed"]
    pick = removed[int(np.random.default_rng().integers(len(removed)))]
    keep = np.ones((1, 30), dtype=bool)
    keep[0, pick] = False
    split = "validation"
    fresh = ml.evaluation.mask_losses(model, shipped.heldout_ids[split], keep)[0]
    assert abs(fresh - shipped.loss(pick, split)) <= 1e-4, pick


def test_zero_shot_items_are_the_frozen_set_the_table_was_scored_on(shipped):
    import hashlib

    path = ml.store.SHIPPED / "smollm2" / "zero_shot_items.jsonl"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == shipped.results["zeroshot"]["items_sha256"]
    items = shipped.zero_shot_items
    assert len(items) == 200 and {len(i["choices"]) for i in items} == {4}
    assert len({i["context"] for i in items}) == 200
