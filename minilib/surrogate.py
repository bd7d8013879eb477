"""Surrogate networks: learn mask → quality from a few thousand real evaluations (chapter 05).

The paper's idea (Ding et al. 2026): evaluate the model on masks stratified by Hamming
weight, fit a small network f(mask) ≈ v(mask), then estimate layer contributions through the
network, where evaluations cost microseconds. This module holds the network
(:class:`SurrogateMLP`), its fitting with what the public code lacks (a three-way split by
distinct mask: training, validation for early stopping, a test set for the reported accuracy,
:func:`fit_surrogate`) and the fitted :class:`Surrogate`. The rest lives in modules by concept
and is re-exported here, so ``ml.surrogate.<name>`` keeps working for all of it:

- :mod:`minilib.surrogate_accuracy`: :func:`accuracy_report` (per-Hamming-weight accuracy);
- :mod:`minilib.surrogate_values`: :func:`surrogate_shapley`, :func:`surrogate_semivalue_exact`,
  :func:`default_surrogate_samples` (values of a fitted surrogate, vectorised);
- :mod:`minilib.paper_pipeline`: :func:`sample_stratified_masks`, :func:`stage3_query_weights`,
  :func:`paper_pipeline`, :func:`learning_curve` (the paper's stages 1-3);
- :mod:`minilib.surrogate_models`: k-additive regression surrogates and choosing a family by
  held-out error;
- :mod:`minilib.surrogate_estimators`: :func:`surrogate_estimate`, :func:`corrected_shapley`,
  :func:`corrected_min_budget` (budgeted estimators, the corrected one unbiased).
"""

from __future__ import annotations

import importlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .estimators import _rng
from .surrogate_accuracy import accuracy_report

_PREDICT_CHUNK = 1 << 18


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


OUTPUTS = ("sigmoid", "linear", "exp")
"""Output heads of :class:`SurrogateMLP`."""


class _Exp(torch.nn.Module):
    """exp(z), with z capped at 30 so that a bad step cannot overflow to inf."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.exp(z.clamp(max=30.0))


class SurrogateMLP(torch.nn.Module):
    """The paper's surrogate by default: Linear(L, 2L) → CELU → Linear(2L, 1) → Sigmoid (chapter 05).

    ``hidden`` (default 2L) and ``depth`` (hidden layers) widen or deepen it. ``output`` is the
    head: ``"sigmoid"`` (the paper's, for utilities in (0, 1)), ``"linear"``, or ``"exp"`` for
    positive utilities that are products of per-layer factors, such as ``ppl_ratio`` =
    exp(−Δloss): a sigmoid reaches 1 only as its input goes to infinity, so it cannot give the
    full model its exact value 1 while the masks one layer away score well below it (0.58–0.95 on
    the teaching model, one of them, without layer 7, at 1.01); exp(z) can, at z = 0.
    """

    def __init__(self, n_layers: int, hidden: int | None = None, depth: int = 1, output: str = "sigmoid"):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        n_layers = _positive_int(n_layers, "n_layers")
        depth = _positive_int(depth, "depth")
        hidden = 2 * n_layers if hidden is None else _positive_int(hidden, "hidden (None: 2·n_layers)")
        self.config = {"n_layers": n_layers, "hidden": hidden, "depth": depth, "output": output}
        blocks: list[torch.nn.Module] = []
        width = n_layers
        for _ in range(depth):
            blocks += [torch.nn.Linear(width, hidden), torch.nn.CELU()]
            width = hidden
        blocks.append(torch.nn.Linear(width, 1))
        if output == "sigmoid":
            blocks.append(torch.nn.Sigmoid())
        elif output == "exp":
            blocks.append(_Exp())
        self.net = torch.nn.Sequential(*blocks)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        return self.net(masks).squeeze(-1)


def mask_batch(masks, n_players: int) -> np.ndarray:
    """``masks`` as a 2-D ``(m, n_players)`` array (one mask becomes one row), or a clear error (chapter 05).

    The input check every surrogate's ``predict`` shares, whatever model family it is.
    """
    arr = np.asarray(masks)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[-1] != n_players:
        raise ValueError(f"masks must be an array (m, {n_players}) with {n_players} columns, got shape {arr.shape}")
    return arr


def check_training_data(masks, values) -> tuple[np.ndarray, np.ndarray]:
    """Validate masks (m, L) of 0/1 and m finite values; errors name the offending indices (chapter 05).

    Non-finite values are reported, never dropped: dropping them while keeping the masks is
    how the public code silently shifted labels onto the wrong masks.
    """
    m = np.asarray(masks)
    v = np.asarray(values, dtype=float)
    if m.ndim != 2:
        raise ValueError(f"masks must be a 2-D array (n_masks, n_layers), got shape {m.shape}")
    if m.dtype != bool:
        if m.dtype.kind not in "iuf":
            raise ValueError(f"masks must be bool or 0/1 numbers, got dtype {m.dtype}")
        bad = np.argwhere(~np.isin(m, (0, 1)))
        if len(bad):
            raise ValueError(f"masks must be binary; non-0/1 entries at (row, layer) {bad[:5].tolist()}")
        m = m.astype(bool)
    if v.ndim != 1 or len(v) != len(m):
        raise ValueError(f"values must be 1-D with one value per mask: {len(m)} masks but values shape {v.shape}")
    bad = np.flatnonzero(~np.isfinite(v))
    if len(bad):
        raise ValueError(f"values must be finite; NaN or inf at indices {bad[:10].tolist()}"
                         f"{' …' if len(bad) > 10 else ''} ({len(bad)} in all)")
    return m, v


def _check_fractions(fractions, name: str = "fractions") -> list[float]:
    fracs = [fractions] if np.ndim(fractions) == 0 else list(fractions)
    ok = all(isinstance(f, (int, float, np.integer, np.floating)) and not isinstance(f, bool) and 0 <= f < 1
             for f in fracs)
    if not fracs or not ok or sum(fracs) >= 1:
        raise ValueError(f"{name} must be numbers in [0, 1) summing to less than 1 (the rest is trained on), "
                         f"got {fractions!r}")
    return [float(f) for f in fracs]


def _stratum_counts(quota: np.ndarray, room: np.ndarray, total: int, gen: np.random.Generator) -> np.ndarray:
    """Integer counts close to ``quota`` (floors, then the largest remainders, ties at random),
    each at most ``room``, summing to ``total`` where the room allows."""
    counts = np.minimum(np.floor(quota + 1e-9).astype(int), room)
    remainder = quota - counts
    while (left := total - counts.sum()) > 0 and (open_ := np.flatnonzero(counts < room)).size:
        order = open_[np.lexsort((gen.random(open_.size), -np.round(remainder[open_], 12)))]
        counts[order[:left]] += 1
        remainder[order[:left]] -= 1
    return counts


def stratified_split(masks: np.ndarray, fractions, rng) -> tuple[np.ndarray, ...]:
    """Row indices split by distinct mask with the same share of every Hamming weight in each part (chapter 05).

    ``fractions`` is one fraction (returns ``(train, held_out)``) or several, e.g. ``(0.15, 0.15)``
    (returns ``(train, validation, test)``): each part gets that fraction of the distinct masks.
    The split is by *distinct mask*: all copies of a mask go to the same part, so no held-out
    mask was ever trained on, even when masks were drawn with replacement (the paper's strata
    keeping 11 of 12 layers hold only 12 distinct masks).

    How few masks are handled: a part's total is round(fraction · D), D the distinct masks of
    the weights that have two or more, and it is spread over the weights in proportion to their
    counts (floors, then the largest remainders, ties at random), so every weight gets its
    share to within one mask and the totals stay right even when no weight has enough masks to
    round up on its own. Every weight keeps at least one mask for training, so a weight with a
    single distinct mask (∅, the full model) is always trained on, and the parts listed first
    are served first when a weight has too few masks for all. A part can therefore be empty
    (e.g. 0.15 of fewer than 4 masks): callers must report NaN for it, never training error.
    """
    fracs = _check_fractions(fractions)
    gen = _rng(rng)
    unique, inverse = np.unique(np.asarray(masks, dtype=bool), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    weights = unique.sum(axis=1)
    strata, sizes = np.unique(weights, return_counts=True)
    room = sizes - 1                                                    # the last mask of a weight always trains
    eligible = int(sizes[room > 0].sum())
    part_of = np.zeros(len(unique), dtype=int)                          # 0: train, k: the k-th fraction
    taken = []
    for f in fracs:
        counts = _stratum_counts(f * sizes * (room > 0), room, int(round(f * eligible)), gen)
        taken.append(counts)
        room = room - counts
    for s, w in enumerate(strata):
        ids = gen.permutation(np.flatnonzero(weights == w))
        start = 0
        for k, counts in enumerate(taken, start=1):
            part_of[ids[start: start + counts[s]]] = k
            start += counts[s]
    rows = part_of[inverse]
    return tuple(np.flatnonzero(rows == k) for k in range(len(fracs) + 1))


@dataclass
class Surrogate:
    """A fitted surrogate: ``predict`` masks in batches, with its accuracy ``report`` (chapter 05).

    ``train_index``, ``validation_index`` and ``held_out_index`` are the rows of the fitting data
    trained on, used for early stopping, and held out for the reported (test) accuracy;
    ``history`` is the validation MSE after every epoch (NaN without a validation set).
    """

    model: SurrogateMLP
    report: dict
    train_index: np.ndarray
    held_out_index: np.ndarray
    history: list = field(default_factory=list)
    n_game_evals: int = 0
    validation_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))

    @property
    def n_players(self) -> int:
        return self.model.config["n_layers"]

    @torch.no_grad()
    def predict(self, masks) -> np.ndarray:
        """f(mask) for a (m, L) batch; one vectorised pass, no gradients."""
        x = torch.from_numpy(mask_batch(masks, self.n_players).astype(np.float32))
        out = [self.model(x[s: s + _PREDICT_CHUNK]) for s in range(0, len(x), _PREDICT_CHUNK)]
        return torch.cat(out).double().numpy() if out else np.zeros(0)

    def __call__(self, coalitions) -> np.ndarray:
        """A surrogate is itself a game over the same players."""
        return self.predict(coalitions)

    def evaluate(self, masks, values) -> dict:
        """Accuracy on any labelled masks, e.g. Hamming weights outside the training strata."""
        m, v = check_training_data(masks, values)
        return accuracy_report(self.predict(m), v, m)

    def save(self, folder) -> None:
        """Weights (``surrogate.pt``) and config/report (``surrogate.json``) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), folder / "surrogate.pt")
        (folder / "surrogate.json").write_text(json.dumps(
            {"config": self.model.config, "report": self.report, "n_game_evals": self.n_game_evals,
             "train_index": self.train_index.tolist(), "validation_index": self.validation_index.tolist(),
             "held_out_index": self.held_out_index.tolist()}, indent=1))

    @classmethod
    def load(cls, folder) -> "Surrogate":
        folder = Path(folder)
        meta = json.loads((folder / "surrogate.json").read_text())
        model = SurrogateMLP(**meta["config"])
        model.load_state_dict(torch.load(folder / "surrogate.pt", weights_only=True))
        return cls(model.eval(), meta["report"], np.array(meta["train_index"], dtype=int),
                   np.array(meta["held_out_index"], dtype=int), n_game_evals=meta["n_game_evals"],
                   validation_index=np.array(meta.get("validation_index", []), dtype=int))


OPTIMIZERS = ("adam", "sgd", "lbfgs")
"""Optimizers of :func:`fit_surrogate`."""
_LBFGS_ITERS, _LBFGS_HISTORY = 10, 20
_FIT_DEFAULTS = {  # optimizer: lr, batch_size, max_epochs, patience
    "adam": (1e-2, 256, 500, 100),
    "sgd": (8e-3, 300, 300, None),     # the paper's: SGD(momentum 0.9), StepLR(100, 0.1), 300 epochs; no early stop
    "lbfgs": (1.0, None, 500, 5),
}
_SGD_MOMENTUM, _SGD_STEP, _SGD_GAMMA = 0.9, 100, 0.1


def fit_surrogate(masks, values, rng=None, hidden: int | None = None, depth: int = 1,
                  output: str | None = None, val_fraction: float = 0.15, test_fraction: float = 0.15,
                  optimizer: str = "adam", lr: float | None = None, batch_size: int | None = None,
                  max_epochs: int | None = None, patience: int | None = None, progress: bool = False) -> Surrogate:
    """Fit a :class:`SurrogateMLP` on a three-way split by distinct mask, with early stopping (chapter 05).

    The distinct masks of every Hamming weight are split (:func:`stratified_split`) into
    training, validation (``val_fraction``, default 0.15) and test (``test_fraction``, default
    0.15) sets. The network is trained on the first; the validation MSE after every epoch picks
    the weights kept and when to stop; the test set is touched once, at the end, for the
    reported accuracy. ``.report`` holds:

    - ``"held_out"``: R², RMSE and Spearman on the *test* masks, ``"overall"`` and ``"by_weight"``
      (:func:`accuracy_report`: one row per distinct mask; every weight in the data is listed,
      with ``n`` 0 and NaN metrics where it has no test masks);
    - ``"validation"``: the same on the validation masks (optimistic: they chose the epoch);
    - ``"train"``: overall metrics on the training masks; ``"epochs"`` run, ``"best_epoch"``
      (1-based; the last epoch when there is no validation set), ``"optimizer"``.

    Few masks: the split keeps at least one mask of every weight for training (see
    :func:`stratified_split`). When the validation set comes out empty (``val_fraction=0``, or
    too few masks), the network trains for ``max_epochs`` and keeps its last weights; when the
    test set is empty, ``"held_out"`` reports ``n`` 0 and NaN metrics, never training error. A
    fraction above 0 whose set comes out empty warns.

    ``output`` defaults to ``"sigmoid"`` when every value lies in [0, 1], else ``"linear"``.
    Seeded by ``rng``: the same seed gives the same split and network.

    Optimizers (``lr``, ``batch_size``, ``max_epochs``, ``patience`` default per optimizer;
    ``batch_size`` applies to Adam and SGD). Chapter 05 prints each one's test RMSE / R² on its
    stratified masks of the teaching model:

    - ``"adam"`` (the default; lr 1e-2, batches of 256, at most 500 epochs, patience 100 epochs
      without a better validation MSE). It works for every head and value scale without tuning,
      and chapters 05–07 are written with it. Its validation curve has plateaus of 50–100
      epochs, so a short patience stops inside them.
    - ``"sgd"``: the paper's recipe: SGD with momentum 0.9, lr 0.008, ``StepLR(step_size=100,
      gamma=0.1)`` stepped every epoch, 300 epochs, batches of 300, no early stopping (patience
      defaults to ``max_epochs``), though the best validation epoch's weights are kept (the
      last one, as in the paper, with ``val_fraction=0``). Its schedule was set for 8,000 masks
      (27 steps an epoch); on about 1,000 training rows it takes 4 steps an epoch, 400 before
      the rate first decays, and underfits. Use it to reproduce the paper, not for accuracy.
    - ``"lbfgs"`` (lr 1): full-batch L-BFGS with a strong-Wolfe line search, in float64; an
      "epoch" is 10 L-BFGS iterations, patience 5. The network is tiny and the data a few
      thousand masks at most, so it stops within a second or two and has no mini-batch noise.
    """
    m, v = check_training_data(masks, values)
    if len(m) == 0:
        raise ValueError("masks must hold at least one mask, got none")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    _check_fractions((val_fraction, test_fraction), "val_fraction and test_fraction")
    if output is None:
        output = "sigmoid" if (v.min() >= 0 and v.max() <= 1) else "linear"
    if output == "exp" and v.min() <= 0:
        raise ValueError(f"output='exp' predicts positive values only; got values down to {v.min():.4g}")
    default_lr, default_batch, default_epochs, default_patience = _FIT_DEFAULTS[optimizer]
    lr = default_lr if lr is None else lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float, np.integer, np.floating)) or not lr > 0:
        raise ValueError(f"lr must be a number > 0 (None: {default_lr} for optimizer={optimizer!r}), got {lr!r}")
    max_epochs = _positive_int(default_epochs if max_epochs is None else max_epochs, "max_epochs")
    patience = max_epochs if patience is None and default_patience is None else patience
    patience = _positive_int(default_patience if patience is None else patience, "patience")
    batch_size = _positive_int(batch_size if batch_size is not None else (default_batch or 1), "batch_size")
    gen = _rng(rng)
    train, val, test = stratified_split(m, (val_fraction, test_fraction), gen)
    for name, fraction, rows in (("validation", val_fraction, val), ("test", test_fraction, test)):
        if fraction > 0 and len(rows) == 0:
            warnings.warn(f"fit_surrogate: too few distinct masks per Hamming weight for a {name} set "
                          f"({len(np.unique(m, axis=0))} distinct masks); "
                          + ("training runs max_epochs without early stopping" if name == "validation"
                             else "the held-out report is NaN"), stacklevel=2)
    torch_gen = torch.Generator().manual_seed(int(gen.integers(2 ** 31)))
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: seeding every device type costs ms
        torch.default_generator.manual_seed(int(gen.integers(2 ** 31)))
        model = SurrogateMLP(m.shape[1], hidden, depth, output)
    if optimizer == "lbfgs":  # line searches probe large steps: float64 keeps them finite
        model.double()
    dtype = np.float64 if optimizer == "lbfgs" else np.float32
    x = torch.from_numpy(m.astype(dtype))
    y = torch.from_numpy(v.astype(dtype))
    xt, yt, xv, yv = x[train], y[train], x[val], y[val]
    mse = torch.nn.functional.mse_loss
    scheduler = None
    if optimizer in ("adam", "sgd"):
        if optimizer == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=lr)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=_SGD_MOMENTUM)
            scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=_SGD_STEP, gamma=_SGD_GAMMA)

        def epoch_step() -> None:
            for idx in torch.randperm(len(xt), generator=torch_gen).split(batch_size):
                loss = mse(model(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            if scheduler is not None:
                scheduler.step()
    else:
        opt = torch.optim.LBFGS(model.parameters(), lr=lr, max_iter=_LBFGS_ITERS, history_size=_LBFGS_HISTORY,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-10, tolerance_change=1e-14)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = mse(model(xt), yt)
            loss.backward()
            return loss

        def epoch_step() -> None:
            opt.step(closure)

    best, best_state, best_epoch, waited, history = float("inf"), None, 0, 0, []
    for epoch in tqdm(range(max_epochs), desc="fitting surrogate", disable=not progress):
        model.train()
        epoch_step()
        if not len(val):                                 # no validation set: the last weights are kept
            history.append(float("nan"))
            continue
        model.eval()
        with torch.no_grad():
            val_mse = float(mse(model(xv), yv))
        history.append(val_mse)
        if val_mse < best - 1e-12:
            best, best_state, best_epoch, waited = val_mse, {k: t.clone() for k, t in model.state_dict().items()}, \
                epoch + 1, 0
        else:
            waited += 1
            if waited >= patience:
                break
    if len(val):
        if best_state is None:
            raise RuntimeError("the surrogate's validation error was never finite; try a smaller lr or another output")
        model.load_state_dict(best_state)
    else:
        best_epoch = len(history)
        with torch.no_grad():
            if not np.isfinite(float(mse(model(xt), yt))):
                raise RuntimeError("the surrogate's training error is not finite; try a smaller lr or another output")
    model.float().eval()
    surrogate = Surrogate(model, {}, train, test, history, n_game_evals=len(np.unique(m, axis=0)),
                          validation_index=val)
    weights = np.unique(m.sum(axis=1))

    def scores(rows: np.ndarray) -> dict:
        return accuracy_report(surrogate.predict(m[rows]), v[rows], m[rows], hamming_weights=weights)

    surrogate.report = {"held_out": scores(test), "validation": scores(val), "train": scores(train)["overall"],
                        "epochs": len(history), "best_epoch": best_epoch, "optimizer": optimizer}
    return surrogate


# --- names that moved to modules by concept: ml.surrogate.<name> still finds them -------------

_MOVED = {
    "surrogate_values": ("MAX_EXACT_SURROGATE_PLAYERS", "SURROGATE_SAMPLES_PER_PLAYER", "default_surrogate_samples",
                         "surrogate_shapley", "surrogate_semivalue_exact", "_permutation_marginals",
                         "_hamming_marginals"),
    "paper_pipeline": ("sample_stratified_masks", "stage3_query_weights", "learning_curve", "PipelineResult",
                       "paper_pipeline", "paper_and_exp_surrogates"),
    "surrogate_estimators": ("surrogate_estimate", "corrected_shapley", "corrected_min_budget", "_chain_pairs"),
    "surrogate_models": ("KAdditiveSurrogate", "fit_kadditive", "fit_model", "SURROGATE_MODELS", "AUTO_MODELS"),
}
_HOME = {name: module for module, names in _MOVED.items() for name in names}


def __getattr__(name: str):
    # Loaded on first use: those modules import this one, so importing them here would be circular.
    if name in _HOME:
        return getattr(importlib.import_module(f"{__package__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
