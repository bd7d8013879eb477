"""Surrogate networks: learn mask → quality from a few thousand real evaluations (chapter 05).

The paper's idea (Ding et al. 2026): evaluate the model on masks stratified by Hamming
weight, fit a small network f(mask) ≈ v(mask), then estimate layer contributions through the
network, where evaluations cost microseconds. This module adds what the public code lacks: a
held-out split and per-Hamming-weight accuracy report, vectorised estimation, and a
residual correction that keeps surrogate error from biasing the estimate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .estimators import Estimate, _check_budget, _check_keep_sizes, _uniform_masks
from .games import CountingGame, all_coalitions
from .shapley import exact_shapley, marginal_table

MAX_EXACT_SURROGATE_PLAYERS = 20
SURROGATE_SAMPLES_PER_PLAYER = 1000
"""Permutation samples through the net per player when none are given (L > 20): :func:`default_surrogate_samples`."""
_PREDICT_CHUNK = 1 << 18


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
    full model its exact value 1 while masks one layer away score 0.75; exp(z) can, at z = 0.
    """

    def __init__(self, n_layers: int, hidden: int | None = None, depth: int = 1, output: str = "sigmoid"):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        hidden = hidden or 2 * n_layers
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
            raise TypeError(f"masks must be bool or 0/1 numbers, got dtype {m.dtype}")
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


def stratified_split(masks: np.ndarray, val_fraction: float, rng: np.random.Generator):
    """Train/held-out indices with the same share of every Hamming weight in both (chapter 05).

    The split is by *distinct mask*: all copies of a mask go to the same side, so no held-out
    mask was ever trained on, even when masks were drawn with replacement (the paper's strata
    keeping 11 of 12 layers hold only 12 distinct masks). ``val_fraction`` of the distinct masks
    of every weight are held out; a weight with a single distinct mask (∅, the full model) is
    always trained on.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    unique, inverse = np.unique(np.asarray(masks, dtype=bool), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    weights = unique.sum(axis=1)
    held_out = np.zeros(len(unique), dtype=bool)
    for w in np.unique(weights):
        ids = rng.permutation(np.flatnonzero(weights == w))
        k = int(round(val_fraction * len(ids))) if len(ids) > 1 else 0
        held_out[ids[:k]] = True
    rows = held_out[inverse]
    return np.flatnonzero(~rows), np.flatnonzero(rows)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..m−1, ties sharing their average rank (as Spearman's ρ needs)."""
    order = np.argsort(x, kind="stable")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(first + (counts - 1) / 2, counts)
    return ranks


def accuracy_report(predicted, actual, masks) -> dict:
    """R², RMSE and Spearman overall and per Hamming weight (chapter 05)."""

    def spearmanr(p, a) -> float:  # Pearson correlation of the ranks; scipy's is 10x slower on small arrays
        return float(np.corrcoef(_ranks(p), _ranks(a))[0, 1])

    def flat(x) -> bool:  # constant up to rounding: no spread to explain or to rank
        return len(x) == 0 or np.ptp(x) <= 1e-9 * max(1.0, float(np.abs(x).max()))

    def metrics(p, a) -> dict:
        out = {"n": int(len(a)), "rmse": float(np.sqrt(np.mean((p - a) ** 2)))}
        out["r2"] = float(1 - np.mean((p - a) ** 2) / np.var(a)) if not flat(a) else float("nan")
        constant = flat(a) or flat(p)
        out["spearman"] = spearmanr(p, a) if len(a) > 2 and not constant else float("nan")
        return out

    predicted, actual = np.asarray(predicted, float), np.asarray(actual, float)
    weights = np.asarray(masks).sum(axis=1)
    return {"overall": metrics(predicted, actual),
            "by_weight": {int(w): metrics(predicted[weights == w], actual[weights == w])
                          for w in np.unique(weights)}}


@dataclass
class Surrogate:
    """A fitted surrogate: ``predict`` masks in batches, with the held-out ``report`` (chapter 05)."""

    model: SurrogateMLP
    report: dict
    train_index: np.ndarray
    held_out_index: np.ndarray
    history: list = field(default_factory=list)
    n_game_evals: int = 0

    @property
    def n_players(self) -> int:
        return self.model.config["n_layers"]

    @torch.no_grad()
    def predict(self, masks) -> np.ndarray:
        """f(mask) for a (m, L) batch; one vectorised pass, no gradients."""
        arr = np.asarray(masks)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.shape[-1] != self.n_players:
            raise ValueError(f"masks must have {self.n_players} columns, got {arr.shape[-1]}")
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
             "train_index": self.train_index.tolist(), "held_out_index": self.held_out_index.tolist()}, indent=1))

    @classmethod
    def load(cls, folder) -> "Surrogate":
        folder = Path(folder)
        meta = json.loads((folder / "surrogate.json").read_text())
        model = SurrogateMLP(**meta["config"])
        model.load_state_dict(torch.load(folder / "surrogate.pt", weights_only=True))
        return cls(model.eval(), meta["report"], np.array(meta["train_index"], dtype=int),
                   np.array(meta["held_out_index"], dtype=int), n_game_evals=meta["n_game_evals"])


OPTIMIZERS = ("adam", "lbfgs")
_LBFGS_ITERS, _LBFGS_HISTORY = 10, 20
"""Optimizers of :func:`fit_surrogate`."""


def fit_surrogate(masks, values, rng=None, hidden: int | None = None, depth: int = 1,
                  output: str | None = None, val_fraction: float = 0.2, optimizer: str = "adam",
                  lr: float | None = None, batch_size: int = 256, max_epochs: int = 500,
                  patience: int | None = None, progress: bool = False) -> Surrogate:
    """Fit a :class:`SurrogateMLP` with a stratified held-out split and early stopping (chapter 05).

    The held-out masks (``val_fraction`` of the distinct masks of every Hamming weight, see
    :func:`stratified_split`) are never trained on; the weights with the lowest held-out MSE
    are kept, and ``.report`` gives held-out R², RMSE and Spearman overall and per Hamming
    weight. ``output`` defaults to ``"sigmoid"`` when every value lies in [0, 1], else
    ``"linear"``. Seeded by ``rng``: the same seed gives the same network.

    ``optimizer="adam"`` (default; ``lr`` 1e-2): mini-batches of ``batch_size``, one epoch per
    pass over the training masks, stop after ``patience`` (default 40) epochs without a better
    held-out MSE. ``optimizer="lbfgs"`` (``lr`` 1): full-batch L-BFGS with a strong-Wolfe line
    search; an "epoch" is 10 L-BFGS iterations, ``patience`` defaults to 5. The network is tiny
    and the data a few thousand masks at most, so L-BFGS usually stops within a second or two
    and has no mini-batch noise; it reached a lower held-out error than Adam with the ``exp``
    head in chapter 05, but not always with the sigmoid: compare the held-out reports.
    """
    m, v = check_training_data(masks, values)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if output is None:
        output = "sigmoid" if (v.min() >= 0 and v.max() <= 1) else "linear"
    if output == "exp" and v.min() <= 0:
        raise ValueError(f"output='exp' predicts positive values only; got values down to {v.min():.4g}")
    lr = lr if lr is not None else (1e-2 if optimizer == "adam" else 1.0)
    patience = patience if patience is not None else (40 if optimizer == "adam" else 5)
    train, held = stratified_split(m, val_fraction, gen)
    if len(held) == 0 or len(train) == 0:
        raise ValueError(f"need masks in both the training and held-out split; got {len(m)} masks")
    torch_gen = torch.Generator().manual_seed(int(gen.integers(2 ** 31)))
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: seeding every device type costs ms
        torch.default_generator.manual_seed(int(gen.integers(2 ** 31)))
        model = SurrogateMLP(m.shape[1], hidden, depth, output)
    if optimizer == "lbfgs":  # line searches probe large steps: float64 keeps them finite
        model.double()
    dtype = np.float64 if optimizer == "lbfgs" else np.float32
    x = torch.from_numpy(m.astype(dtype))
    y = torch.from_numpy(v.astype(dtype))
    xt, yt, xh, yh = x[train], y[train], x[held], y[held]
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)

        def epoch_step() -> None:
            for idx in torch.randperm(len(xt), generator=torch_gen).split(batch_size):
                loss = torch.nn.functional.mse_loss(model(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    else:
        opt = torch.optim.LBFGS(model.parameters(), lr=lr, max_iter=_LBFGS_ITERS, history_size=_LBFGS_HISTORY,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-10, tolerance_change=1e-14)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xt), yt)
            loss.backward()
            return loss

        def epoch_step() -> None:
            opt.step(closure)

    best, best_state, waited, history = float("inf"), None, 0, []
    for epoch in tqdm(range(max_epochs), desc="fitting surrogate", disable=not progress):
        model.train()
        epoch_step()
        model.eval()
        with torch.no_grad():
            held_mse = float(torch.nn.functional.mse_loss(model(xh), yh))
        history.append(held_mse)
        if held_mse < best - 1e-12:
            best, best_state, waited = held_mse, {k: t.clone() for k, t in model.state_dict().items()}, 0
        else:
            waited += 1
            if waited >= patience:
                break
    if best_state is None:
        raise RuntimeError("the surrogate's held-out error was never finite; try a smaller lr or another output")
    model.load_state_dict(best_state)
    model.float().eval()
    n_distinct = len(np.unique(m, axis=0))
    surrogate = Surrogate(model, {}, train, held, history, n_game_evals=n_distinct)
    surrogate.report = {"held_out": accuracy_report(surrogate.predict(m[held]), v[held], m[held]),
                        "train": accuracy_report(surrogate.predict(m[train]), v[train], m[train])["overall"],
                        "epochs": len(history), "optimizer": optimizer}
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
    """Contributions estimated through the surrogate, in one vectorised pass (chapter 05).

    ``method="auto"``: exact Shapley of the surrogate as a game when L <= 20 and ``n_samples``
    is None (all 2**L masks in one batch), else antithetic permutations (``"permutation"``).
    ``"hamming"`` is the paper's stage 3: base masks from ``keep_sizes`` strata, marginals
    f(b ∪ i) − f(b ∖ i) averaged — a semivalue, not Shapley. Sampling methods default to
    :func:`default_surrogate_samples` (1000·L) and report their Monte Carlo ``stderr``.
    ``n_evals`` reports the *real* game evaluations behind the surrogate; network queries are
    free by comparison.
    """
    n = surrogate.n_players
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
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
    elif method == "hamming":
        if keep_sizes is None:
            raise ValueError("method='hamming' needs keep_sizes (the strata, numbers of kept layers)")
        marg = _hamming_marginals(surrogate, n_samples, keep_sizes, gen)
    else:
        raise ValueError(f"method must be 'auto', 'exact', 'permutation' or 'hamming', got {method!r}")
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
    """The paper's stage 1 masks: equally many uniform masks keeping k layers, k in ``keep_sizes`` (chapter 05)."""
    sizes = _check_keep_sizes(keep_sizes, n)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    per = n_masks // len(sizes)
    if per < 1:
        raise ValueError(f"n_masks must be at least len(keep_sizes) = {len(sizes)}, got {n_masks}")
    return np.concatenate([_uniform_masks(gen, n, np.arange(n), k, per) for k in sizes])


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
    the held-out ``r2``, ``spearman`` and ``rmse``. With ``test=(masks, values)``, e.g. every
    mask of an exact table, also ``test_r2``, ``test_spearman`` and ``test_rmse`` on those.
    """
    import pandas as pd

    rows = []
    for size in n_masks:
        for seed in seeds:
            gen = np.random.default_rng(seed)
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
    batched call; the surrogate is fitted with a held-out split; contributions are the paper's
    Hamming semivalue through the surrogate with ``mc_samples`` base masks; ``ranking`` lists
    layers least important first. With ``out_dir``, every artefact is saved there: masks and
    values (``evaluations.npz``), the surrogate, and the estimate (``estimate.json``).
    """
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
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
    """Fit settings of the budgeted estimators: L-BFGS, exp head for positive utilities, unless overridden."""
    v = np.asarray(values, dtype=float)
    defaults = {"optimizer": "lbfgs", "output": "exp" if len(v) and v.min() > 0 else "linear"}
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
    :func:`default_surrogate_samples`). Its error is the surrogate's
    bias and does not shrink to zero with more network queries; :func:`corrected_shapley`
    removes it. Fit settings default to full-batch L-BFGS and, for positive values, the ``exp``
    head (see :class:`SurrogateMLP`); ``fit_kwargs`` override them. ``stderr`` is NaN: the
    error is a bias, which the method cannot estimate.
    """
    counting = CountingGame(game)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
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
    the correction's variance small. Fit settings default to full-batch L-BFGS and, for
    positive values, the ``exp`` head (see :class:`SurrogateMLP`); ``fit_kwargs`` override them.
    ``stderr`` is the correction's standard error combined with the surrogate part's Monte
    Carlo error (zero for L <= 20; for L > 20 ``n_samples`` defaults to 1000·L permutations
    through the net, see :func:`default_surrogate_samples`). A budget too small for 4
    antithetic chains (:func:`corrected_min_budget`) raises
    :class:`~minilib.estimators.BudgetTooSmallError`.

    ``pool`` (chapter 07): masks evaluated before, e.g. a shipped stage-1 table behind a
    store-backed game. The stratified part is then drawn uniformly from the pool's masks of the
    ``keep_sizes`` strata instead of sampled afresh; each still counts as a real evaluation. The
    estimate stays unbiased, since the surrogate's training masks never enter the correction.
    """
    counting = CountingGame(game)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
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
