"""Surrogate networks: learn mask → quality from a few thousand real evaluations (chapter 05).

The paper's idea (Ding et al. 2026): evaluate the model on masks stratified by Hamming
weight, fit a small network f(mask) ≈ v(mask), then estimate layer contributions through the
network, where evaluations cost microseconds. This module adds what the public code lacks: a
three-way split by distinct mask (training, validation for early stopping, a test set for the
reported accuracy), a per-Hamming-weight accuracy report, vectorised estimation, and a
residual correction that keeps surrogate error from biasing the estimate.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .estimators import Estimate, _check_budget, _check_keep_sizes, _rng, _uniform_masks
from .games import CountingGame
from .shapley import exact_shapley, marginal_table

MAX_EXACT_SURROGATE_PLAYERS = 20
SURROGATE_SAMPLES_PER_PLAYER = 1000
"""Permutation samples through the net per player when none are given (L > 20): :func:`default_surrogate_samples`."""
_PREDICT_CHUNK = 1 << 18


OUTPUTS = ("sigmoid", "linear", "exp")
"""Output heads of :class:`SurrogateMLP`."""


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


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
    full model its exact value 1 while the masks one layer away score well below it (0.42–0.92 on
    the teaching model without its layer 0); exp(z) can, at z = 0.
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
        arr = np.asarray(masks)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[-1] != self.n_players:
            raise ValueError(f"masks must be an array (m, {self.n_players}) with {self.n_players} columns, "
                             f"got shape {arr.shape}")
        x = torch.from_numpy(arr.astype(np.float32))
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
    ``batch_size`` applies to Adam and SGD). Measured on chapter 05's 1,500 stratified masks of
    the teaching model (718 distinct; sigmoid head, ``rng=0``), test RMSE / R²:

    - ``"adam"`` (the default; lr 1e-2, batches of 256, at most 500 epochs, patience 100 epochs
      without a better validation MSE): 0.017 / 0.996. It works for every head and value scale
      without tuning, and chapters 05–07 are written with it. Its validation curve has plateaus
      of 50–100 epochs: a patience of 40 stopped inside them (mean test RMSE 0.031 against
      0.018 with 100, over 6 seeds).
    - ``"sgd"``: the paper's recipe: SGD with momentum 0.9, lr 0.008, ``StepLR(step_size=100,
      gamma=0.1)`` stepped every epoch, 300 epochs, batches of 300, no early stopping (patience
      defaults to ``max_epochs``), though the best validation epoch's weights are kept (the
      last one, as in the paper, with ``val_fraction=0``): 0.198 / 0.42. Its schedule was set for
      8,000 masks (27 steps an epoch); here about 1,050 training rows make 4 steps an epoch,
      400 before the rate first decays, and it underfits (R² 0.91 from 8,000 masks, where Adam
      and L-BFGS reach 0.998). Use it to reproduce the paper, not for accuracy.
    - ``"lbfgs"`` (lr 1): full-batch L-BFGS with a strong-Wolfe line search, in float64; an
      "epoch" is 10 L-BFGS iterations, patience 5: 0.015 / 0.997 in 0.1 s (0.0125 with the
      ``exp`` head). The network is tiny and the data a few thousand masks at most, so it stops
      within a second or two and has no mini-batch noise. The budgeted estimators use it; it is
      not the default only because the chapters were written with Adam: compare the reports.
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


# --- estimation through the surrogate --------------------------------------------------------

def _first_layer(surrogate: Surrogate):
    """(W1ᵀ (L, h), b1 (h,), rest of the network) when the net starts with a Linear layer."""
    net = surrogate.model.net
    return net[0].weight.detach().T, net[0].bias.detach(), net[1:]


_ROW_BUDGET = 1 << 22  # floats per chunk of pre-activations (16 MiB): large ops that stay near the cache


@torch.no_grad()
def _permutation_marginals(surrogate: Surrogate, n_samples: int, gen: np.random.Generator) -> np.ndarray:
    """Antithetic permutation marginals through the net, (n_samples // 2, L).

    Adding one player to a coalition adds one column of the first weight matrix to the
    pre-activation, so a whole chain's pre-activations are a cumulative sum: L·h additions per
    ordering instead of (L + 1) full first-layer products.
    """
    w1t, b1, rest = _first_layer(surrogate)
    n, h = w1t.shape
    pairs = max(1, n_samples // 2)
    step = max(1, _ROW_BUDGET // (2 * (n + 1) * h))
    out = []
    for start in range(0, pairs, step):
        k = min(step, pairs - start)
        orders = np.argsort(gen.random((k, n)), axis=1)
        orders = torch.from_numpy(np.concatenate([orders, orders[:, ::-1]]).copy())
        z = torch.cat([b1.expand(2 * k, 1, h), b1 + torch.cumsum(w1t[orders], dim=1)], dim=1)
        vals = _rest_inplace(rest, z)                                        # (2k, n+1)
        marg = torch.empty(2 * k, n)
        marg.scatter_(1, orders, torch.diff(vals, dim=1))
        out.append(((marg[:k] + marg[k:]) / 2).double().numpy())
    return np.concatenate(out)


@torch.no_grad()
def _rest_inplace(rest: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The network after its first Linear layer, with CELU applied in place on the temporary ``z``.

    A Linear layer with one output runs as a matrix-vector product, several times faster on
    CPU than ``Linear``'s matrix-matrix product with a single column.
    """
    for module in rest:
        if isinstance(module, torch.nn.CELU):
            z = torch.nn.functional.celu(z, module.alpha, inplace=True)
        elif isinstance(module, torch.nn.Linear) and module.out_features == 1:
            z = torch.matmul(z, module.weight[0]).unsqueeze(-1)
            if module.bias is not None:
                z += module.bias
        else:
            z = module(z)
    return z.squeeze(-1)


@torch.no_grad()
def _hamming_marginals(surrogate: Surrogate, n_samples: int, keep_sizes, gen: np.random.Generator) -> np.ndarray:
    """The paper's marginals f(b ∪ i) − f(b ∖ i) for base masks stratified by Hamming weight, (m, L).

    Flipping player i moves the first-layer pre-activation by ±W1[:, i], so all L flips of a
    base mask cost L·h multiply-adds plus the small rest of the network, not L full forwards.
    Repeated base masks (a stratum keeping L − 1 of L layers has only L of them) are computed
    once and copied.
    """
    n = surrogate.n_players
    sizes = _check_keep_sizes(keep_sizes, n)
    per = max(1, n_samples // len(sizes))
    masks = np.concatenate([_uniform_masks(gen, n, np.arange(n), k, per) for k in sizes])
    keys = np.packbits(masks, axis=1)
    keys = np.ascontiguousarray(keys).view(f"V{keys.shape[1]}").ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    bases = torch.from_numpy(masks[first])
    w1t, b1, rest = _first_layer(surrogate)
    h = w1t.shape[1]
    step = max(1, _ROW_BUDGET // (n * h))
    out = []
    for start in range(0, len(bases), step):
        b = bases[start: start + step].float()
        sign = 1.0 - 2.0 * b                                                 # −1: flip clears i, +1: sets i
        z = torch.addmm(b1, b, w1t)                                          # (m, h)
        z_flip = torch.addcmul(z[:, None, :], sign[..., None], w1t)          # (m, L, h)
        f_b, f_flip = _rest_inplace(rest, z), _rest_inplace(rest, z_flip)
        out.append(((f_b[:, None] - f_flip) * -sign).double().numpy())       # f(b ∪ i) − f(b ∖ i)
    return np.concatenate(out)[inverse.reshape(-1)]


def default_surrogate_samples(n: int) -> int:
    """Permutation samples through the net when none are given: 1000·L (chapter 05).

    Surrogate Shapley values shrink like 1/L (they sum to f(N) − f(∅)), and so does a
    marginal's spread for a smooth network, so a count proportional to L keeps the relative
    Monte Carlo error about constant: with 1000·L antithetic samples the largest standard error
    was 0.2 % of the mean |φ| on strongly non-additive random networks (L = 21 … 48) and under
    0.1 % on fitted ones, far below any surrogate's own error, for 0.2–0.4 s at L = 24–32 on one
    CPU core (a sample costs O(L²): the cost grows like L³).
    """
    return SURROGATE_SAMPLES_PER_PLAYER * int(n)


def surrogate_shapley(surrogate: Surrogate, n_samples: int | None = None, rng=None,
                      method: str = "auto", keep_sizes=None) -> Estimate:
    """Contributions of the surrogate f as a game, in one vectorised pass (chapter 05).

    ``method="auto"``: exact Shapley of the surrogate as a game when L <= 20 and ``n_samples``
    is None (all 2**L masks in one batch), else antithetic permutations (``"permutation"``).
    ``"hamming"`` is the paper's stage 3: base masks from ``keep_sizes`` strata, marginals
    f(b ∪ i) − f(b ∖ i) averaged — a semivalue, not Shapley. Sampling methods default to
    :func:`default_surrogate_samples` (1000·L).

    The target is the value of the *surrogate*, φ(f), not of the real game, so ``stderr`` has
    :class:`~minilib.estimators.Estimate`'s meaning for that target: the Monte Carlo standard
    error through the network, 0 for ``"exact"`` (the values are φ(f) exactly). It does not
    include the surrogate's own error φ(f) − φ(v), a bias that only real evaluations can reveal
    (:func:`corrected_shapley` removes it). ``n_evals`` reports the *real* game evaluations
    behind the surrogate; network queries are free by comparison.
    """
    n = surrogate.n_players
    gen = _rng(rng)
    if method not in ("auto", "exact", "permutation", "hamming"):
        raise ValueError(f"method must be 'auto', 'exact', 'permutation' or 'hamming', got {method!r}")
    if method == "auto":
        method = "exact" if (n_samples is None and n <= MAX_EXACT_SURROGATE_PLAYERS) else "permutation"
    if method == "exact":
        if n > MAX_EXACT_SURROGATE_PLAYERS:
            raise ValueError(f"method='exact' enumerates 2**L masks; L must be <= "
                             f"{MAX_EXACT_SURROGATE_PLAYERS}, got {n}")
        values = exact_shapley(_AsGame(surrogate))
        return Estimate(values, np.zeros(n), surrogate.n_game_evals, "surrogate (exact through the net)")
    if n_samples is None:
        n_samples = default_surrogate_samples(n)
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 2:
        raise ValueError(f"n_samples must be an int >= 2 for method={method!r}, got {n_samples!r}")
    if method == "permutation":
        marg = _permutation_marginals(surrogate, n_samples, gen)
    else:
        if keep_sizes is None:
            raise ValueError("method='hamming' needs keep_sizes (the strata, numbers of kept layers)")
        marg = _hamming_marginals(surrogate, n_samples, keep_sizes, gen)
    return Estimate(marg.mean(axis=0), marg.std(axis=0, ddof=1) / np.sqrt(len(marg)),
                    surrogate.n_game_evals, f"surrogate ({method})")


class _AsGame:
    """A surrogate seen as a game (for the exact Shapley routines)."""

    def __init__(self, surrogate: Surrogate):
        self.n_players = surrogate.n_players
        self._s = surrogate

    def __call__(self, coalitions) -> np.ndarray:
        return self._s.predict(coalitions)


def surrogate_semivalue_exact(surrogate: Surrogate, size_weights) -> np.ndarray:
    """Any semivalue of the surrogate, exactly, from its full table (L <= 20) (chapter 05)."""
    from math import comb

    w = np.asarray(size_weights, dtype=float)
    return marginal_table(_AsGame(surrogate), lambda n: w / np.array([comb(n - 1, s) for s in range(n)]))


# --- the paper's pipeline and the corrected estimator ----------------------------------------

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
    the held-out (:func:`fit_surrogate`'s test set, distinct masks) ``r2``, ``spearman`` and
    ``rmse``. With ``test=(masks, values)``, e.g. every
    mask of an exact table, also ``test_r2``, ``test_spearman`` and ``test_rmse`` on those.
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
    batched call; the surrogate is fitted by :func:`fit_surrogate` (``fit_kwargs``: Adam by
    default; ``optimizer="sgd"`` is the paper's own recipe) on a training / validation / test
    split by distinct mask, its test accuracy in ``surrogate.report["held_out"]``; contributions
    are the paper's Hamming semivalue through the surrogate with ``mc_samples`` base masks;
    ``ranking`` lists layers least important first. With ``out_dir``, every artefact is saved there: masks and
    values (``evaluations.npz``), the surrogate, and the estimate (``estimate.json``).
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


def _improved_fit(values, fit_kwargs: dict) -> dict:
    """Fit settings of the budgeted estimators: L-BFGS, exp head for positive utilities, no test set
    (their surrogates' reports are never read), unless overridden."""
    v = np.asarray(values, dtype=float)
    defaults = {"optimizer": "lbfgs", "output": "exp" if len(v) and v.min() > 0 else "linear", "test_fraction": 0.0}
    return {**defaults, **fit_kwargs}


def _fill_stratified(counting: CountingGame, budget: int, sizes, gen: np.random.Generator) -> np.ndarray:
    """Spend what is left of ``budget`` on stratified masks; return the distinct masks drawn.

    Repeats are free (the counting game caches them), so masks are drawn in rounds, each
    asking for as many as the budget has left, until a round adds nothing new.
    """
    n = counting.n_players
    blocks, spent = [np.zeros((0, n), bool)], -1
    while (rest := budget - counting.n_evals) >= len(sizes) and counting.n_evals > spent:
        spent = counting.n_evals
        new = np.unique(sample_stratified_masks(n, rest, sizes, gen), axis=0)
        new = new[gen.permutation(len(new))[:rest]]  # at most `rest` new evaluations: never over budget
        counting(new)
        blocks.append(new)
    return np.unique(np.concatenate(blocks), axis=0)


def surrogate_estimate(game, budget: int, rng=None, keep_sizes=None, n_samples: int | None = None,
                       **fit_kwargs) -> Estimate:
    """Shapley values through a surrogate fitted on ``budget`` real evaluations, uncorrected (chapter 05).

    Spends the budget on ∅, the full coalition and distinct masks stratified by Hamming weight
    (``keep_sizes``, default every size 1..n−1, equally many per size), fits a surrogate on
    them, and returns the exact Shapley values of the surrogate (L <= 20; otherwise antithetic
    permutations through the net, ``n_samples`` defaulting to 1000·L, see
    :func:`default_surrogate_samples`). Its error is mostly the surrogate's bias, which does not
    shrink to zero with more network queries; :func:`corrected_shapley` removes it. Fit
    settings default to full-batch L-BFGS, no test set (``test_fraction=0``: nothing here
    reads the surrogate's report, so every evaluation trains or validates) and, for positive
    values, the ``exp`` head (see :class:`SurrogateMLP`); ``fit_kwargs`` override them.

    ``stderr`` is NaN (unknown, in :class:`~minilib.estimators.Estimate`'s sense): the target
    is the real game's Shapley value, the values vary with ``rng`` through which masks are
    evaluated and how the network is initialised, and one run cannot estimate that spread.
    Like every ``stderr``, it would not include the surrogate's bias anyway. (Contrast
    :func:`surrogate_shapley`, whose target is the surrogate's own value: its ``stderr`` is 0
    when exact.)
    """
    counting = CountingGame(game)
    gen = _rng(rng)
    n = game.n_players
    sizes = _check_keep_sizes(keep_sizes if keep_sizes is not None else list(range(1, n)), n)
    budget = _check_budget(budget, 2 + 2 * len(sizes), f"surrogate_estimate with {len(sizes)} strata "
                           "(the empty and full coalitions plus two masks per stratum)")
    ends = np.array([np.zeros(n, bool), np.ones(n, bool)])
    counting(ends)
    masks = np.unique(np.concatenate([ends, _fill_stratified(counting, budget, sizes, gen)]), axis=0)
    values = counting(masks)
    surrogate = fit_surrogate(masks, values, rng=gen, **_improved_fit(values, fit_kwargs))
    est = surrogate_shapley(surrogate, n_samples=n_samples, rng=gen)
    return Estimate(est.values, np.full(n, np.nan), counting.n_evals, "surrogate (uncorrected)")


def _chain_pairs(n: int, budget: int, chain_fraction: float) -> int:
    """Antithetic chain pairs of :func:`corrected_shapley` that fit ``chain_fraction`` of ``budget``.

    A pair costs at most 2·(n − 1) new masks, plus ∅ and the full coalition once for all
    chains; capping the chains' share at budget − 2 keeps those two inside the budget when
    ``chain_fraction`` is close to 1 (0.999 of 57 rounded down to 56 = 4·14 went one over).
    """
    return min(int(chain_fraction * budget), budget - 2) // (2 * (n - 1))


def corrected_min_budget(n: int, chain_fraction: float = 0.5) -> int:
    """The fewest real evaluations :func:`corrected_shapley` accepts: 4 antithetic chains (chapter 05)."""
    budget = int(np.ceil(8 * (n - 1) / chain_fraction))
    while _chain_pairs(n, budget, chain_fraction) < 4:
        budget += 1
    return budget


def _fill_from_pool(counting: CountingGame, budget: int, sizes, pool, gen: np.random.Generator) -> np.ndarray:
    """What is left of ``budget`` as distinct ``pool`` masks of the ``sizes`` strata, drawn uniformly (chapter 07)."""
    n = counting.n_players
    pool = np.unique(np.asarray(pool, dtype=bool).reshape(-1, n), axis=0)
    pool = pool[np.isin(pool.sum(axis=1), sizes)]
    rest = max(0, budget - counting.n_evals)
    chosen = pool[gen.permutation(len(pool))[:rest]]
    if len(chosen):
        counting(chosen)
    return chosen


def corrected_shapley(game, budget: int, rng=None, keep_sizes=None, chain_fraction: float = 0.5,
                      n_samples: int | None = None, pool=None, **fit_kwargs) -> Estimate:
    """Surrogate Shapley plus an unbiased Monte Carlo correction of its error (chapter 05).

    Shapley values are linear in the game, so φ(v) = φ(f) + φ(v − f) for any surrogate f.
    φ(f) is computed through the network (exactly for L <= 20); φ(v − f) is estimated from
    antithetic permutation chains evaluated on the real game, where the residual v − f is known.
    The chains (``chain_fraction`` of the budget; the rest are distinct masks stratified by
    Hamming weight, ``keep_sizes`` defaulting to every size 1..n−1) also train the surrogate,
    but with two-fold cross-fitting: the surrogate that corrects a chain never saw it, so
    surrogate error cannot bias the estimate, whatever its size; a good surrogate only makes
    the correction's variance small. Fit settings default to full-batch L-BFGS, no test set
    and, for positive values, the ``exp`` head (see :class:`SurrogateMLP`); ``fit_kwargs``
    override them. The target is the real game's Shapley value and the estimate is unbiased for
    it, so ``stderr`` is an honest standard error in :class:`~minilib.estimators.Estimate`'s
    sense, surrogate error included: the correction's standard error combined with the
    surrogate part's Monte Carlo error (zero for L <= 20; for L > 20 ``n_samples`` defaults to
    1000·L permutations through the net, see :func:`default_surrogate_samples`). A budget too small for 4
    antithetic chains (:func:`corrected_min_budget`) raises
    :class:`~minilib.estimators.BudgetTooSmallError`.

    ``pool`` (chapter 07): masks evaluated before, e.g. a shipped stage-1 table behind a
    store-backed game. The stratified part is then drawn uniformly from the pool's masks of the
    ``keep_sizes`` strata instead of sampled afresh; each still counts as a real evaluation. The
    estimate stays unbiased, since the surrogate's training masks never enter the correction.
    """
    counting = CountingGame(game)
    gen = _rng(rng)
    n = game.n_players
    if not 0 < chain_fraction < 1:
        raise ValueError(f"chain_fraction must be in (0, 1), got {chain_fraction}")
    budget = _check_budget(budget, corrected_min_budget(n, chain_fraction),
                           f"corrected_shapley(chain_fraction={chain_fraction}) with n={n} (4 antithetic chains)")
    pairs = _chain_pairs(n, budget, chain_fraction)
    orders = np.argsort(gen.random((pairs, n)), axis=1)
    orders = np.concatenate([orders, orders[:, ::-1]])
    ranks = np.argsort(orders, axis=1)
    prefixes = ranks[:, None, :] < np.arange(n + 1)[None, :, None]           # (2p, n+1, n)
    chain_values = counting(prefixes.reshape(-1, n)).reshape(2 * pairs, n + 1)
    sizes = _check_keep_sizes(keep_sizes if keep_sizes is not None else list(range(1, n)), n)
    if pool is not None:
        if np.asarray(pool).ndim != 2 or np.asarray(pool).shape[1] != n or np.asarray(pool).dtype != bool:
            raise ValueError(f"pool must be a bool array of keep-masks with shape (m, {n}), got "
                             f"{np.asarray(pool).dtype} array of shape {np.asarray(pool).shape}")
        strata = _fill_from_pool(counting, budget, sizes, pool, gen)
    else:
        strata = _fill_stratified(counting, budget, sizes, gen)
    strata_values = counting(strata) if len(strata) else np.zeros(0)
    fit_kwargs = _improved_fit(chain_values, fit_kwargs)
    fold = np.arange(pairs) % 2
    corrections, phis, phi_se = [], [], []
    for k in (0, 1):
        train_chains = np.concatenate([fold != k, fold != k])
        train_masks = np.concatenate([prefixes[train_chains].reshape(-1, n), strata])
        train_vals = np.concatenate([chain_values[train_chains].reshape(-1), strata_values])
        surrogate = fit_surrogate(train_masks, train_vals, rng=gen, **fit_kwargs)
        phi = surrogate_shapley(surrogate, n_samples=n_samples, rng=gen)
        phis.append(phi.values)
        phi_se.append(phi.stderr)
        test_chains = np.concatenate([fold == k, fold == k])
        pre = prefixes[test_chains]
        resid = chain_values[test_chains] - surrogate.predict(pre.reshape(-1, n)).reshape(len(pre), n + 1)
        steps = np.diff(resid, axis=1)
        orders_k = orders[test_chains]
        marg = np.empty_like(steps)
        marg[np.arange(len(steps))[:, None], orders_k] = steps
        half = len(marg) // 2
        corrections.append((marg[:half] + marg[half:]) / 2)
    samples = np.concatenate([phis[k] + corrections[k] for k in (0, 1)])
    values = samples.mean(axis=0)
    share = np.array([len(c) for c in corrections]) / len(samples)          # each fold's weight in the mean
    mc_var = sum((w * se) ** 2 for w, se in zip(share, phi_se))             # φ(f) through the net (0 if exact)
    stderr = np.sqrt(samples.var(axis=0, ddof=1) / len(samples) + mc_var)
    return Estimate(values, stderr, counting.n_evals, "surrogate + correction")
