"""The paper's pipeline (Ding et al. 2026), stage 1 to 3, and how its surrogate learns (chapter 05).

Stage 1 evaluates masks stratified by Hamming weight (:func:`sample_stratified_masks`), stage 2
fits the surrogate network (:func:`~minilib.surrogate.fit_surrogate`), stage 3 averages the
paper's marginals through it (:func:`~minilib.surrogate_values.surrogate_shapley` with
``method="hamming"``). :func:`paper_pipeline` runs all three and saves every artefact;
:func:`learning_curve` measures the surrogate's accuracy against the number of stage-1 masks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .estimators import Estimate, _check_keep_sizes, _rng, _uniform_masks
from .games import CountingGame
from .surrogate import Surrogate, _positive_int, fit_surrogate
from .surrogate_values import surrogate_shapley


def sample_stratified_masks(n: int, n_masks: int, keep_sizes, rng=None) -> np.ndarray:
    """The paper's stage 1 masks: ``n_masks`` uniform masks, equally many per stratum in ``keep_sizes`` (chapter 05).

    Masks are drawn with replacement within each stratum, stratum by stratum in the order of
    ``keep_sizes``. When ``n_masks`` is not a multiple of the number of strata, the first
    ``n_masks % len(keep_sizes)`` strata in that order get one mask more, so the count is exact
    (it used to round down: 23 masks over 2 strata gave 22).
    """
    n = _positive_int(n, "n")
    sizes = _check_keep_sizes(keep_sizes, n)
    n_masks = _positive_int(n_masks, f"n_masks (at least len(keep_sizes) = {len(sizes)})", len(sizes))
    gen = _rng(rng)
    per, extra = divmod(n_masks, len(sizes))
    return np.concatenate([_uniform_masks(gen, n, np.arange(n), k, per + (j < extra)) for j, k in enumerate(sizes)])


def stage3_query_weights(n: int, keep_sizes) -> dict[int, float]:
    """Share of the paper's stage-3 surrogate queries at each Hamming weight, exactly (chapter 05).

    A base mask keeping k layers (k drawn equally from ``keep_sizes``) is queried with each
    layer set and cleared: half the queries are the base mask itself (weight k), the other
    half are k − 1 (k of the n flips) or k + 1 (n − k flips). So half of all queries lie at
    k ± 1, which are outside the training strata unless a neighbouring stratum covers them.
    """
    sizes = _check_keep_sizes(keep_sizes, n)
    share: dict[int, float] = {}
    for k in sizes:
        for w, p in ((k, 0.5), (k - 1, k / (2 * n)), (k + 1, (n - k) / (2 * n))):
            if p > 0:
                share[int(w)] = share.get(int(w), 0.0) + float(p) / len(sizes)
    return dict(sorted(share.items()))


def learning_curve(game, n_masks, keep_sizes, seeds, test=None, **fit_kwargs):
    """Surrogate accuracy against the number of evaluated masks, over seeds (chapter 05).

    For every ``n`` in ``n_masks`` and every seed, draws ``n`` masks from the ``keep_sizes``
    strata (:func:`sample_stratified_masks` with ``rng=seed``), evaluates them on ``game`` and
    fits a surrogate (``fit_kwargs``, ``rng=seed``). Returns a ``pandas.DataFrame`` with one row
    per fit: ``n_masks``, ``seed``, ``n_evals`` (distinct masks: the real cost), ``epochs``, and
    the held-out (:func:`~minilib.surrogate.fit_surrogate`'s test set, distinct masks) ``r2``,
    ``spearman`` and ``rmse``. With ``test=(masks, values)``, e.g. every mask of an exact table,
    also ``test_r2``, ``test_spearman`` and ``test_rmse`` on those.
    """
    import pandas as pd

    rows = []
    for size in n_masks:
        for seed in seeds:
            gen = _rng(seed)
            counting = CountingGame(game)
            masks = sample_stratified_masks(game.n_players, int(size), keep_sizes, gen)
            surrogate = fit_surrogate(masks, counting(masks), rng=gen, **fit_kwargs)
            held = surrogate.report["held_out"]["overall"]
            row = {"n_masks": int(size), "seed": seed, "n_evals": counting.n_evals,
                   "epochs": surrogate.report["epochs"], **{k: held[k] for k in ("r2", "spearman", "rmse")}}
            if test is not None:
                scores = surrogate.evaluate(*test)["overall"]
                row.update({f"test_{k}": scores[k] for k in ("r2", "spearman", "rmse")})
            rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class PipelineResult:
    """Everything the paper's pipeline produced (chapter 05)."""

    masks: np.ndarray
    values: np.ndarray
    surrogate: Surrogate
    estimate: Estimate
    ranking: list[int]
    n_game_evals: int


def paper_pipeline(game, n_masks: int, keep_sizes, rng=None, mc_samples: int = 80_000,
                   out_dir=None, **fit_kwargs) -> PipelineResult:
    """Stage 1 → 3 of the paper: stratified masks → real evaluations → surrogate → ranking (chapter 05).

    Masks are sampled equally from the ``keep_sizes`` strata and evaluated on ``game`` in one
    batched call; the surrogate is fitted by :func:`~minilib.surrogate.fit_surrogate`
    (``fit_kwargs``: Adam by default; ``optimizer="sgd"`` is the paper's own recipe) on a
    training / validation / test split by distinct mask, its test accuracy in
    ``surrogate.report["held_out"]``; contributions are the paper's Hamming semivalue through the
    surrogate with ``mc_samples`` base masks; ``ranking`` lists layers least important first.
    With ``out_dir``, every artefact is saved there: masks and values (``evaluations.npz``), the
    surrogate, and the estimate (``estimate.json``).
    """
    gen = _rng(rng)
    counting = CountingGame(game)
    masks = sample_stratified_masks(game.n_players, n_masks, keep_sizes, gen)
    values = counting(masks)
    surrogate = fit_surrogate(masks, values, rng=gen, **fit_kwargs)
    estimate = surrogate_shapley(surrogate, n_samples=mc_samples, rng=gen, method="hamming", keep_sizes=keep_sizes)
    estimate.n_evals = counting.n_evals
    ranking = np.argsort(estimate.values, kind="stable").tolist()
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out / "evaluations.npz", masks=masks, values=values)
        surrogate.save(out / "surrogate")
        (out / "estimate.json").write_text(json.dumps(
            {"method": estimate.method, "values": estimate.values.tolist(), "stderr": estimate.stderr.tolist(),
             "n_game_evals": counting.n_evals, "keep_sizes": list(map(int, keep_sizes)), "ranking": ranking}, indent=1))
    return PipelineResult(masks, values, surrogate, estimate, ranking, counting.n_evals)


def paper_and_exp_surrogates(game, keep_sizes, n_masks: int = 1500, seed: int = 0) -> tuple[PipelineResult, Surrogate]:
    """Chapter 05's two surrogates of one game, rebuilt in one call by the pages after the first (chapter 05).

    The first is the paper's pipeline, :func:`paper_pipeline` on ``n_masks`` masks of the ``keep_sizes`` strata with
    the paper's sigmoid head fitted by Adam (its ``.surrogate``); the second is a network with an exp head fitted by
    full-batch L-BFGS to the same masks and values. Both are seeded with ``seed`` as chapter 05's first page seeds
    them, so the results are the ones it derives step by step (and checks against this function). On the
    teaching model's exact table with 1,500 masks, seed 0, that is 718 real evaluations and about 3 s on one core.
    """
    result = paper_pipeline(game, n_masks, keep_sizes, rng=seed, output="sigmoid")
    exp_fit = fit_surrogate(result.masks, result.values, rng=seed, output="exp", optimizer="lbfgs")
    return result, exp_fit
