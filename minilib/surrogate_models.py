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
- ``"kadd2h"``, ``"kadd3h"``, ``"kadd4h"``: the same with *hierarchical* shrinkage (``decay="loo"``
  of :func:`fit_kadditive`): a term of s players is penalised as if scaled by γ^(s−1), γ and the
  ridge chosen together by leave-one-out error, so high orders are used only as far as the data
  support them;
- ``"expkadd2"``: f = exp(g), g a 2-additive game fitted to log v (:func:`fit_exp_kadditive`;
  positive values only), for multiplicative games such as a perplexity ratio;
- ``"auto+"`` (:func:`fit_auto_plus`): the hierarchical k-additive model (the highest order up to 4
  that fits :data:`AUTO_TERMS_PER_MASK`), blended, for positive values, with ``"expkadd2"`` by a
  weight chosen on held-out masks; only used when asked for (``"auto"`` is unchanged);
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

SURROGATE_MODELS = ("mlp", "kadd2", "kadd3", "kadd4", "kadd2h", "kadd3h", "kadd4h", "expkadd2", "auto+")
"""Named surrogate families of :func:`fit_model` (``"auto+"``: :func:`fit_auto_plus`)."""
AUTO_MODELS = ("mlp", "kadd2", "kadd3", "kadd4")
"""The candidates of ``model="auto"``, chosen among by held-out error; a k-additive one with more than
:data:`AUTO_TERMS_PER_MASK` terms per distinct training mask is left out (slow to fit, mostly shrinkage)."""
AUTO_TERMS_PER_MASK = 4
SELECTION_FRACTION = 0.2
"""Share of the distinct training masks held out to choose among candidates (stratified by Hamming weight)."""
MAX_KADDITIVE_TERMS = 20_000
_RIDGE_GRID = np.logspace(-8, 3, 23)   # ridge penalties tried by leave-one-out error
DECAY_GRID = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
"""Order decays γ tried by ``fit_kadditive(decay="loo")``: a term of s players is scaled by γ^(s−1) before the
ridge. Measured (corrected estimator, 40·n evaluations, 20 seeds, 4-additive): the chosen γ was 0.1–0.5 in
95 % of fits; 1.0 (one ridge for all orders, the ``decay=None`` fit) stays a candidate."""
BLEND_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Weights of the k-additive part tried by :func:`fit_auto_plus` (the rest goes to the exp-link part)."""
AUTO_PLUS_MAX_ORDER = 4
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


def _check_decay(decay):
    if decay is None or (isinstance(decay, str) and decay == "loo"):
        return decay
    if isinstance(decay, bool) or not isinstance(decay, (int, float, np.integer, np.floating)) or not 0 < decay <= 1:
        raise ValueError(f"decay must be None, 'loo' or a number in (0, 1], got {decay!r}")
    return float(decay)


def _ridge_loo(x: np.ndarray, v: np.ndarray, grid, scales, weights=None) -> tuple:
    """(coef, intercept, ridge, scale index, leave-one-out MSE): ridge on the centred design, the penalty
    (and a column scaling from ``scales``) chosen by exact leave-one-out error; ``weights`` weight the rows."""
    if weights is None:
        x_mean, y_mean, lev0, sw = x.mean(axis=0), v.mean(), 1.0 / len(v), None
    else:
        ww = weights / weights.sum()
        x_mean, y_mean, lev0, sw = ww @ x, ww @ v, ww, np.sqrt(weights)
    best = (np.inf, grid[0], 0, None)
    for k, scale in enumerate(scales):
        xc = x - x_mean if scale is None else (x - x_mean) * scale
        yc = v - y_mean
        if sw is not None:
            xc, yc = xc * sw[:, None], yc * sw
        u, s, vt = np.linalg.svd(xc, full_matrices=False)
        uy = u.T @ yc
        for lam in grid:
            d = s ** 2 / (s ** 2 + lam)
            resid = yc - u @ (d * uy)
            leverage = (u ** 2) @ d + lev0
            loo = float(np.mean((resid / np.maximum(1.0 - leverage, 1e-12)) ** 2))
            if loo < best[0] - 1e-15:
                coef = vt.T @ (s / (s ** 2 + lam) * uy)
                best = (loo, lam, k, coef if scale is None else scale * coef)
    loo, lam, k, coef = best
    return coef, float(y_mean - x_mean @ coef), float(lam), k, loo


def fit_kadditive(masks, values, order: int = 2, ridge: float | None = None, decay=None) -> KAdditiveSurrogate:
    """Least-squares k-additive surrogate on the Möbius basis, ridge chosen by leave-one-out (chapter 05).

    Minimises Σ (f(m) − v(m))² + ``ridge`` · Σ_T a_T² over the masks (the intercept is not
    penalised; both terms scale with the values², so ``ridge`` does not depend on their unit).
    ``ridge=None`` picks it from 23 values 1e-8 … 1e3 by the exact leave-one-out error of the
    fit (one SVD for all), so the model can have more terms than there are masks (a 3-additive
    model of 12 players has 298). ``decay`` (default None: one penalty for every order) makes
    the shrinkage hierarchical: the penalty on a term of s players is divided by γ^(2(s−1)),
    γ = ``decay`` in (0, 1], or ``"loo"``: chosen with the ridge from :data:`DECAY_GRID` by
    leave-one-out error. ``report`` holds ``"train"`` metrics, ``"order"``, ``"ridge"``,
    ``"decay"`` (γ, 1.0 without decay) and ``"loo_rmse"``.
    """
    m, v = check_training_data(masks, values)
    if len(m) == 0:
        raise ValueError("masks must hold at least one mask, got none")
    decay = _check_decay(decay)
    terms = kadditive_terms(m.shape[1], order)
    x = _design(m, terms)
    if ridge is None:
        grid = _RIDGE_GRID
    elif isinstance(ridge, bool) or not isinstance(ridge, (int, float, np.integer, np.floating)) or not ridge >= 0:
        raise ValueError(f"ridge must be a number >= 0 or None (chosen by leave-one-out error), got {ridge!r}")
    else:
        grid = [float(ridge)]
    gammas = [1.0] if decay is None else list(DECAY_GRID) if decay == "loo" else [decay]
    sizes = terms.sum(axis=1) - 1.0
    scales = [None] if decay is None else [g ** sizes for g in gammas]
    coef, intercept, lam, k, loo = _ridge_loo(x, v, grid, scales)
    surrogate = KAdditiveSurrogate(terms, coef, intercept, ridge=lam, n_game_evals=len(np.unique(m, axis=0)))
    surrogate.report = {"train": accuracy_report(surrogate.predict(m), v, m)["overall"], "order": int(order),
                        "ridge": lam, "decay": float(gammas[k]), "loo_rmse": float(np.sqrt(loo))}
    return surrogate


@dataclass
class ExpKAdditiveSurrogate:
    """f(m) = exp(g(m)), g a k-additive game (chapter 05): a multiplicative surrogate for positive values.

    Fitted by :func:`fit_exp_kadditive`. It has no closed-form Shapley values:
    :func:`~minilib.surrogate_values.surrogate_shapley` enumerates all masks (L <= 20) or samples.
    """

    log_model: KAdditiveSurrogate
    report: dict = field(default_factory=dict)
    n_game_evals: int = 0

    @property
    def n_players(self) -> int:
        return self.log_model.n_players

    def predict(self, masks) -> np.ndarray:
        """f(mask) = exp(g(mask)) for a (m, L) batch."""
        return np.exp(self.log_model.predict(masks))

    def __call__(self, coalitions) -> np.ndarray:
        return self.predict(coalitions)


def fit_exp_kadditive(masks, values, order: int = 2) -> ExpKAdditiveSurrogate:
    """exp of a k-additive game fitted to log v, rows weighted by v² (chapter 05).

    The weights make the log-scale fit approximate least squares on the values themselves
    (an error ε in log v is an error of about v·ε in v), so tiny values (a model without its
    first layer) do not dominate it. The ridge is chosen by weighted leave-one-out error.
    ``values`` must be positive.
    """
    m, v = check_training_data(masks, values)
    if len(m) == 0:
        raise ValueError("masks must hold at least one mask, got none")
    if v.min() <= 0:
        raise ValueError(f"values must be positive for an exp-link surrogate, got minimum {v.min():.3g} "
                         f"at index {int(np.argmin(v))}")
    terms = kadditive_terms(m.shape[1], order)
    coef, intercept, lam, _, loo = _ridge_loo(_design(m, terms), np.log(v), _RIDGE_GRID, [None], weights=v ** 2)
    log_model = KAdditiveSurrogate(terms, coef, intercept, ridge=lam, n_game_evals=len(np.unique(m, axis=0)))
    surrogate = ExpKAdditiveSurrogate(log_model, n_game_evals=log_model.n_game_evals)
    surrogate.report = {"train": accuracy_report(surrogate.predict(m), v, m)["overall"], "order": int(order),
                        "ridge": lam}
    return surrogate


@dataclass
class BlendSurrogate:
    """Σ_k w_k f_k(m): a weighted blend of fitted surrogates of the same players (chapter 05)."""

    parts: list
    weights: np.ndarray
    report: dict = field(default_factory=dict)
    n_game_evals: int = 0

    @property
    def n_players(self) -> int:
        return self.parts[0].n_players

    def predict(self, masks) -> np.ndarray:
        return sum(w * part.predict(masks) for w, part in zip(self.weights, self.parts))

    def __call__(self, coalitions) -> np.ndarray:
        return self.predict(coalitions)


def auto_plus_order(n: int, n_masks: int) -> int:
    """The order of ``"auto+"``'s k-additive part: the highest up to 4 with at most
    :data:`AUTO_TERMS_PER_MASK` terms per distinct training mask (at least 1) (chapter 05)."""
    fits = [k for k in range(1, min(AUTO_PLUS_MAX_ORDER, n) + 1) if _n_terms(n, k) <= AUTO_TERMS_PER_MASK * n_masks]
    return max(fits or [1])


def fit_auto_plus(masks, values, rng=None, selection_fraction: float = SELECTION_FRACTION):
    """The ``"auto+"`` surrogate: hierarchical k-additive, blended with exp-link for positive values (chapter 05).

    The k-additive part is ``fit_kadditive(order=k, decay="loo")``, k from :func:`auto_plus_order`
    or one less, whichever has the lower leave-one-out error (so an exactly (k−1)-additive game is
    fitted exactly, not pulled by the ridge of k-th order terms it does not need). When every value is positive, a 2-additive exp-link model
    (:func:`fit_exp_kadditive`) is fitted too; both are fitted on the masks left after holding out
    ``selection_fraction`` of every Hamming weight, the weight w of the k-additive part is the one
    of :data:`BLEND_WEIGHTS` with the lowest held-out RMSE (ties to the k-additive side), and both
    are refitted on all the masks: f = w·additive + (1 − w)·exp-link. ``report["blend"]`` is w
    (1.0 when only the k-additive part is used), ``report["max_order"]`` is k.
    """
    m, v = check_training_data(masks, values)
    n_masks = len(np.unique(m, axis=0))
    order = auto_plus_order(m.shape[1], n_masks)

    def additive(mm, vv):
        fits = [fit_kadditive(mm, vv, order=k, decay="loo") for k in sorted({max(1, order - 1), order})]
        return min(fits, key=lambda f: f.report["loo_rmse"])            # ties: the lower order
    w = 1.0
    if len(v) and v.min() > 0:
        gen = _rng(rng)
        train, held = stratified_split(m, selection_fraction, gen)
        if len(held) and len(train):
            pa = additive(m[train], v[train]).predict(m[held])
            pe = fit_exp_kadditive(m[train], v[train], order=2).predict(m[held])
            rmse = [np.sqrt(np.mean((a * pa + (1 - a) * pe - v[held]) ** 2)) for a in BLEND_WEIGHTS]
            w = float(BLEND_WEIGHTS[max(range(len(rmse)), key=lambda i: (-rmse[i], BLEND_WEIGHTS[i]))])
    parts, weights = [], []
    if w > 0:
        parts.append(additive(m, v))
        weights.append(w)
    if w < 1:
        parts.append(fit_exp_kadditive(m, v, order=2))
        weights.append(1 - w)
    surrogate = parts[0] if len(parts) == 1 else BlendSurrogate(parts, np.array(weights), n_game_evals=n_masks)
    surrogate.report = {**getattr(surrogate, "report", {}), "max_order": order, "blend": w}
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
    if model in ("kadd2h", "kadd3h", "kadd4h"):
        return model, lambda m, v, gen: fit_kadditive(m, v, order=int(model[-2]), decay="loo")
    if model == "expkadd2":
        return model, lambda m, v, gen: fit_exp_kadditive(m, v, order=2)
    if model == "auto+":
        return model, lambda m, v, gen: fit_auto_plus(m, v, rng=gen)
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
