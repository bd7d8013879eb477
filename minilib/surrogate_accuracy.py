"""How well a surrogate predicts real values: R², RMSE and Spearman per Hamming weight (chapter 05).

Used by :func:`~minilib.surrogate.fit_surrogate` for its held-out report and by every surrogate
family of :mod:`minilib.surrogate_models` for choosing one by held-out error.
"""

from __future__ import annotations

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..m−1, ties sharing their average rank (as Spearman's ρ needs)."""
    order = np.argsort(x, kind="stable")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(first + (counts - 1) / 2, counts)
    return ranks


def accuracy_report(predicted, actual, masks, hamming_weights=None) -> dict:
    """R², RMSE and Spearman overall and per Hamming weight, one row per distinct mask (chapter 05).

    Repeated masks (draws with replacement) are merged first: each distinct mask counts once,
    with the mean of its values and of its predictions, so a mask drawn 30 times does not
    count 30 times and ``n`` is the number of *distinct* masks. ``hamming_weights`` lists weights
    to report even when no mask has them (``n`` 0, metrics NaN), e.g. every weight trained on.
    Metrics that a set cannot support are NaN: all of them for an empty set, R² and Spearman for
    values without spread, Spearman for fewer than 3 masks.
    """

    def spearmanr(p, a) -> float:  # Pearson correlation of the ranks; scipy's is 10x slower on small arrays
        return float(np.corrcoef(_ranks(p), _ranks(a))[0, 1])

    def flat(x) -> bool:  # constant up to rounding: no spread to explain or to rank
        return len(x) == 0 or np.ptp(x) <= 1e-9 * max(1.0, float(np.abs(x).max()))

    def metrics(p, a) -> dict:
        out = {"n": int(len(a)), "rmse": float(np.sqrt(np.mean((p - a) ** 2))) if len(a) else float("nan")}
        out["r2"] = float(1 - np.mean((p - a) ** 2) / np.var(a)) if not flat(a) else float("nan")
        constant = flat(a) or flat(p)
        out["spearman"] = spearmanr(p, a) if len(a) > 2 and not constant else float("nan")
        return out

    predicted, actual = np.asarray(predicted, float).reshape(-1), np.asarray(actual, float).reshape(-1)
    m = np.asarray(masks)
    if m.ndim != 2 or not len(predicted) == len(actual) == len(m):
        raise ValueError(f"predicted, actual and masks must have one row per mask: got {len(predicted)}, "
                         f"{len(actual)} and masks of shape {m.shape}")
    unique, inverse, copies = np.unique(m.astype(bool), axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    p = np.bincount(inverse, weights=predicted, minlength=len(unique)) / np.maximum(copies, 1)
    a = np.bincount(inverse, weights=actual, minlength=len(unique)) / np.maximum(copies, 1)
    weights = unique.sum(axis=1)
    report_weights = np.union1d(weights, np.asarray([] if hamming_weights is None else hamming_weights, int))
    return {"overall": metrics(p, a),
            "by_weight": {int(w): metrics(p[weights == w], a[weights == w]) for w in report_weights}}
