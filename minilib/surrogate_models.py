"""Surrogate families for the budgeted estimators, and choosing one by held-out error (chapter 05).

The corrected estimator (:func:`~minilib.surrogate_estimators.corrected_shapley`) is unbiased
whatever surrogate f it uses; a surrogate that predicts the real game better only makes the
correction's variance smaller. So the family is pluggable:

- ``"mlp"``: the paper's network (:func:`~minilib.surrogate.fit_surrogate`; full-batch L-BFGS,
  ``exp`` head for positive values, no test set): flexible, smooth, a second or two to fit;
- ``"kadd2"``, ``"kadd3"``, ``"kadd4"``: a k-additive game, least squares on the Möbius basis (every
  coalition of at most k players) with a ridge penalty chosen by leave-one-out error
  (:func:`fit_kadditive`): exact for games with interactions of at most k players, fitted in
  milliseconds, with closed-form Shapley values;
- any callable ``factory(masks, values, rng) -> surrogate`` returning an object with
  ``n_players``, ``predict(masks)``, ``n_game_evals`` and a ``report`` dict;
- ``"auto"`` (:data:`AUTO_MODELS`), or a list of the above: each candidate is fitted on part
  of the training masks and scored on the rest (:func:`fit_model`), and the one with the
  lowest held-out error is refitted on all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from math import comb
from typing import Callable

import numpy as np

from .estimators import _rng
from .surrogate import check_training_data, fit_surrogate, mask_batch, stratified_split
from .surrogate_accuracy import accuracy_report

SURROGATE_MODELS = ("mlp", "kadd2", "kadd3", "kadd4")
"""Named surrogate families of :func:`fit_model`."""
AUTO_MODELS = ("mlp", "kadd2", "kadd3", "kadd4")
"""The candidates of ``model="auto"``, chosen among by held-out error; a k-additive one with more than
:data:`AUTO_TERMS_PER_MASK` terms per distinct training mask is left out (slow to fit, mostly shrinkage)."""
AUTO_TERMS_PER_MASK = 4
SELECTION_FRACTION = 0.2
"""Share of the distinct training masks held out to choose among candidates (stratified by Hamming weight)."""
MAX_KADDITIVE_TERMS = 20_000
_RIDGE_GRID = np.logspace(-8, 3, 23)   # ridge penalties tried by leave-one-out error
_PREDICT_ROWS = 1 << 14


def kadditive_terms(n: int, order: int) -> np.ndarray:
    """Every coalition of 1..``order`` of ``n`` players, as masks (p, n), by size then lexicographically (chapter 05)."""
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or not 1 <= order <= n:
        raise ValueError(f"order must be an int in 1..n_players={n}, got {order!r}")
    p = sum(comb(n, s) for s in range(1, order + 1))
    if p > MAX_KADDITIVE_TERMS:
        raise ValueError(f"a {order}-additive model of {n} players has {p} terms, above "
                         f"MAX_KADDITIVE_TERMS={MAX_KADDITIVE_TERMS}; use a lower order")
    terms = np.zeros((p, n), dtype=bool)
    row = 0
    for s in range(1, order + 1):
        for members in combinations(range(n), s):
            terms[row, list(members)] = True
            row += 1
    return terms


def _design(masks: np.ndarray, terms: np.ndarray) -> np.ndarray:
    """1 where a mask holds every member of a term: the Möbius basis, (m, p) float."""
    sizes = terms.sum(axis=1)
    return (masks.astype(np.float32) @ terms.T.astype(np.float32) == sizes).astype(float)


@dataclass
class KAdditiveSurrogate:
    """A k-additive game f(m) = a_∅ + Σ_T a_T Π_{i∈T} m_i over coalitions T of 1..k players (chapter 05).

    ``terms`` (p, n) are the coalitions T, ``coef`` (p,) their Möbius coefficients a_T and
    ``intercept`` a_∅. Fitted by :func:`fit_kadditive`; like a network surrogate it is a game
    over the same players (``predict``, calling it), and its Shapley values have a closed form
    (:meth:`shapley_values`).
    """

    terms: np.ndarray
    coef: np.ndarray
    intercept: float
    ridge: float = 0.0
    report: dict = field(default_factory=dict)
    n_game_evals: int = 0

    @property
    def n_players(self) -> int:
        return int(self.terms.shape[1])

    @property
    def order(self) -> int:
        return int(self.terms.sum(axis=1).max())

    def predict(self, masks) -> np.ndarray:
        """f(mask) for a (m, L) batch."""
        arr = mask_batch(masks, self.n_players).astype(bool)
        return np.concatenate([self.intercept + _design(arr[s: s + _PREDICT_ROWS], self.terms) @ self.coef
                               for s in range(0, len(arr), _PREDICT_ROWS)]) if len(arr) else np.zeros(0)

    def __call__(self, coalitions) -> np.ndarray:
        return self.predict(coalitions)

    def shapley_values(self) -> np.ndarray:
        """φ_i = Σ_{T ∋ i} a_T / |T|: each coefficient split equally among its members (chapter 05)."""
        share = self.coef / self.terms.sum(axis=1)
        return share @ self.terms.astype(float)


def fit_kadditive(masks, values, order: int = 2, ridge: float | None = None) -> KAdditiveSurrogate:
    """Least-squares k-additive surrogate on the Möbius basis, ridge chosen by leave-one-out (chapter 05).

    Minimises Σ (f(m) − v(m))² + ``ridge`` · Σ_T a_T² over the masks (the intercept is not
    penalised; both terms scale with the values², so ``ridge`` does not depend on their unit).
    ``ridge=None`` picks it from 23 values 1e-8 … 1e3 by the exact leave-one-out error of the
    fit (one SVD for all), so the model can have more terms than there are masks (a 3-additive
    model of 12 players has 298). ``report`` holds ``"train"`` metrics, ``"order"``,
    ``"ridge"`` and ``"loo_rmse"``.
    """
    m, v = check_training_data(masks, values)
    if len(m) == 0:
        raise ValueError("masks must hold at least one mask, got none")
    terms = kadditive_terms(m.shape[1], order)
    x = _design(m, terms)
    x_mean, y_mean = x.mean(axis=0), v.mean()
    u, s, vt = np.linalg.svd(x - x_mean, full_matrices=False)
    uy = u.T @ (v - y_mean)
    if ridge is None:
        grid = _RIDGE_GRID
    elif isinstance(ridge, bool) or not isinstance(ridge, (int, float, np.integer, np.floating)) or not ridge >= 0:
        raise ValueError(f"ridge must be a number >= 0 or None (chosen by leave-one-out error), got {ridge!r}")
    else:
        grid = [float(ridge)]
    best = (np.inf, grid[0])
    for lam in grid:
        d = s ** 2 / (s ** 2 + lam)
        resid = (v - y_mean) - u @ (d * uy)
        leverage = (u ** 2) @ d + 1.0 / len(v)
        loo = float(np.mean((resid / np.maximum(1.0 - leverage, 1e-12)) ** 2))
        if loo < best[0] - 1e-15:
            best = (loo, lam)
    lam = best[1]
    coef = vt.T @ (s / (s ** 2 + lam) * uy)
    surrogate = KAdditiveSurrogate(terms, coef, float(y_mean - x_mean @ coef), ridge=float(lam),
                                   n_game_evals=len(np.unique(m, axis=0)))
    surrogate.report = {"train": accuracy_report(surrogate.predict(m), v, m)["overall"], "order": int(order),
                        "ridge": float(lam), "loo_rmse": float(np.sqrt(best[0]))}
    return surrogate


def _budgeted_mlp(masks, values, rng, **fit_kwargs):
    """The network as the budgeted estimators fit it: L-BFGS, exp head for positive values, no test set."""
    v = np.asarray(values, dtype=float)
    defaults = {"optimizer": "lbfgs", "output": "exp" if len(v) and v.min() > 0 else "linear", "test_fraction": 0.0}
    return fit_surrogate(masks, values, rng=rng, **{**defaults, **fit_kwargs})


def _factory(model, fit_kwargs: dict) -> tuple[str, Callable]:
    """(name, factory(masks, values, rng)) of one candidate; network options go to ``"mlp"`` only."""
    if callable(model):
        return getattr(model, "__name__", repr(model)), model
    if model == "mlp":
        return model, lambda m, v, gen: _budgeted_mlp(m, v, gen, **fit_kwargs)
    if model in ("kadd2", "kadd3", "kadd4"):
        return model, lambda m, v, gen: fit_kadditive(m, v, order=int(model[-1]))
    raise ValueError(f"model must be 'auto', one of {SURROGATE_MODELS}, a callable "
                     f"factory(masks, values, rng) or a list of those, got {model!r}")


def _n_terms(n: int, order: int) -> int:
    return sum(comb(n, s) for s in range(1, order + 1))


def candidate_models(model, fit_kwargs: dict | None = None, masks=None) -> list[tuple[str, Callable]]:
    """The (name, factory) candidates that ``model`` stands for; checks ``fit_kwargs`` apply (chapter 05).

    ``fit_kwargs`` are options of :func:`~minilib.surrogate.fit_surrogate` (``optimizer``,
    ``max_epochs``, ``output``, ...): they configure the ``"mlp"`` candidate, so passing them
    without one is an error rather than silently ignored. With the training ``masks``, ``"auto"``
    leaves out k-additive candidates with more than :data:`AUTO_TERMS_PER_MASK` terms per
    distinct mask.
    """
    fit_kwargs = dict(fit_kwargs or {})
    if isinstance(model, str):
        if model == "auto" and masks is not None:
            room = AUTO_TERMS_PER_MASK * len(np.unique(masks, axis=0))
            names = [name for name in AUTO_MODELS
                     if not name.startswith("kadd") or _n_terms(masks.shape[1], int(name[-1])) <= room]
        else:
            names = list(AUTO_MODELS) if model == "auto" else [model]
    elif callable(model):
        names = [model]
    else:
        names = list(model)
        if not names:
            raise ValueError("model must name at least one candidate, got an empty list")
    candidates = [_factory(name, fit_kwargs) for name in names]
    if fit_kwargs and "mlp" not in [name for name, _ in candidates]:
        raise ValueError(f"fit options {sorted(fit_kwargs)} configure the 'mlp' surrogate, which model={model!r} "
                         f"does not include")
    return candidates


def _held_out_rmse(surrogate, masks: np.ndarray, values: np.ndarray) -> float:
    return accuracy_report(surrogate.predict(masks), values, masks)["overall"]["rmse"]


def fit_model(model, masks, values, rng=None, selection_fraction: float = SELECTION_FRACTION, **fit_kwargs):
    """Fit a surrogate of the family ``model``, choosing among candidates by held-out error (chapter 05).

    ``model`` is a name of :data:`SURROGATE_MODELS`, ``"auto"`` (:data:`AUTO_MODELS`), a
    callable ``factory(masks, values, rng)`` or a list of these. One candidate is fitted on all
    the masks. Several are each fitted on the masks left after holding out
    ``selection_fraction`` of the distinct masks of every Hamming weight
    (:func:`~minilib.surrogate.stratified_split`), scored by RMSE on the held-out ones (one row
    per distinct mask), and the best is refitted on all the masks; ties and too few masks to
    hold any out go to the first candidate. The returned surrogate's ``report["model"]`` names
    the family and ``report["selection"]`` maps every candidate to its held-out RMSE.
    ``fit_kwargs`` configure the ``"mlp"`` candidate (see :func:`candidate_models`).
    """
    m, v = check_training_data(masks, values)
    candidates = candidate_models(model, fit_kwargs, m)
    gen = _rng(rng)
    scores: dict[str, float] = {}
    chosen = candidates[0]
    if len(candidates) > 1:
        train, held = stratified_split(m, selection_fraction, gen)
        if len(held):
            for name, factory in candidates:
                scores[name] = _held_out_rmse(factory(m[train], v[train], gen), m[held], v[held])
            chosen = min(candidates, key=lambda c: (np.nan_to_num(scores[c[0]], nan=np.inf)))
    name, factory = chosen
    surrogate = factory(m, v, gen)
    surrogate.report = {**getattr(surrogate, "report", {}), "model": name, "selection": scores}
    return surrogate
