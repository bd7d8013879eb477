"""The end-to-end pipeline: score layers → choose → remove → a model that saves and reloads.

Introduced in chapter 06. :func:`prune` accepts every baseline of
:mod:`minilib.baselines` and the three game-theoretic methods, and reports what the choice
cost in real model evaluations and seconds. ``python -m minilib prune`` is its command line.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import baselines
from .estimators import _rng  # the one rng normaliser: Generator, int seed or None
from .evaluation import LayerGame, exact_values
from .layers import decoder_layers, prune_layers
from .shapley import exact_shapley

SHAPLEY_METHODS = ("shapley_exact", "shapley_surrogate", "shapley_surrogate_corrected")
METHODS = baselines.METHODS + SHAPLEY_METHODS
"""Every method :func:`prune` accepts."""

PAPER_STRATA_32 = (30, 27, 24, 21, 18)
"""The paper's strata for 32-layer LLaMA-2-7B: numbers of kept layers."""

MAX_EXACT_LAYERS = 16


def paper_keep_sizes(n_layers: int) -> list[int]:
    """The paper's strata (keep 30/27/24/21/18 of 32) scaled to ``n_layers`` (chapter 06)."""
    return sorted({min(n_layers - 1, max(1, round(k * n_layers / 32))) for k in PAPER_STRATA_32}, reverse=True)


@dataclass
class PruneResult:
    """What :func:`prune` did (chapter 06).

    ``removed``: layer indices removed (in the original numbering, least important first);
    ``scores``: importance per original layer (larger = more important; NaN where a method has
    none); ``model``: the pruned model; ``n_evals``: real masked evaluations of the model spent on
    the choice (0 for methods that need none); ``seconds``: wall time of the choice.
    """

    method: str
    removed: list[int]
    scores: np.ndarray
    model: torch.nn.Module
    n_evals: int
    seconds: float
    details: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """A JSON-serialisable record of the choice (without the model)."""
        return {"method": self.method, "removed": self.removed, "scores": [float(s) for s in self.scores],
                "n_evals": self.n_evals, "seconds": round(self.seconds, 3), **self.details}


def _surrogate_budget(budget, method: str, n: int, keep_sizes) -> int:
    """``budget`` of a surrogate method checked before any evaluation; ``None`` → 8·L·(L+1) (chapter 06).

    The minimum is what the method can run with: the full model's reference evaluation plus 3
    masks per stratum for ``"shapley_surrogate"`` (the fewest that can leave one held out for the
    fit), ``corrected_min_budget(L)`` (= 4L − 2: two folds of masks at every size) for
    ``"shapley_surrogate_corrected"``. 0, negatives and non-ints
    raise instead of meaning "default".
    """
    from .surrogate import corrected_min_budget

    if budget is None:
        return 8 * n * (n + 1)
    if method == "shapley_surrogate":
        strata = len(keep_sizes) if keep_sizes is not None else len(paper_keep_sizes(n))
        minimum, why = 1 + 3 * strata, f"the full model and 3 masks in each of {strata} strata"
    else:
        minimum, why = corrected_min_budget(n), "4 antithetic permutation chains"
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < minimum:
        raise ValueError(f"budget must be None (default 8·L·(L+1)) or an int >= {minimum} for method={method!r} "
                         f"with L={n} ({why}), got {budget!r}")
    return int(budget)


def _shapley_scores(model, input_ids, method: str, rng, budget: int, keep_sizes, utility: str,
                    mask_batch_size: int | None, store) -> tuple[np.ndarray, int, dict]:
    from .surrogate import corrected_shapley, paper_pipeline

    game = LayerGame(model, input_ids, utility=utility, mask_batch_size=mask_batch_size, store=store)
    n = game.n_players
    if method == "shapley_exact":
        if n > MAX_EXACT_LAYERS:
            raise ValueError(f"method='shapley_exact' evaluates 2**L masks; L must be <= {MAX_EXACT_LAYERS}, "
                             f"got {n} (use 'shapley_surrogate' or 'shapley_surrogate_corrected')")
        table = exact_values(game)
        return exact_shapley(table), game.n_evals, {}
    if method == "shapley_surrogate":
        sizes = list(keep_sizes) if keep_sizes is not None else paper_keep_sizes(n)
        result = paper_pipeline(game, budget - game.n_evals, sizes, rng=rng)  # the full model's run counts too
        details = {"keep_sizes": sizes, "surrogate_held_out": result.surrogate.report["held_out"]["overall"]}
        return result.estimate.values, game.n_evals, details
    estimate = corrected_shapley(game, budget, rng=rng, keep_sizes=keep_sizes)
    return estimate.values, game.n_evals, {"stderr": estimate.stderr.tolist()}


def _check_copy_fits(model: torch.nn.Module) -> None:
    """Refuse a deep copy that would not fit next to the model, or of a dispatched model (chapter 07)."""
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1 or any(
            p.device.type == "meta" for p in model.parameters()):
        raise ValueError("inplace=False would deep-copy a model that accelerate dispatched over several devices "
                         "or offloaded; pass inplace=True to remove the layers from this model itself")
    sizes: dict[torch.device, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        sizes[t.device] = sizes.get(t.device, 0) + t.numel() * t.element_size()
    for device, size in sizes.items():
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if size > 0.9 * free:
                raise ValueError(f"inplace=False would deep-copy {size / 2**30:.1f} GiB of weights on {device}, "
                                 f"which has {free / 2**30:.1f} GiB free; pass inplace=True to prune this model "
                                 "in place (or move it to the CPU first)")


def prune(model: torch.nn.Module, input_ids: torch.Tensor, method: str, n_remove: int, rng=None,
          budget: int | None = None, keep_sizes=None, utility: str = "ppl_ratio",
          mask_batch_size: int | None = None, inplace: bool = False, store=None) -> PruneResult:
    """Choose ``n_remove`` layers by ``method`` on calibration ``input_ids`` and remove them (chapter 06).

    ``method`` is a baseline (:data:`minilib.baselines.METHODS`) or ``"shapley_exact"`` (all 2**L
    masks, L <= 16), ``"shapley_surrogate"`` (the paper: ``budget`` stratified masks, surrogate,
    Hamming semivalue) or ``"shapley_surrogate_corrected"`` (surrogate Shapley + residual
    correction); ``budget`` counts real masked evaluations (``None``: 8·L·(L+1); one below what the
    method needs, 0 included, raises ``ValueError``). ``store`` (a path or
    :class:`~minilib.store.EvaluationStore`) makes the masked evaluations resumable (chapter 07).

    ``inplace=False`` (default) deep-copies the model on its own device before removing layers,
    so the original stays intact but its memory is needed twice: refused with a ``ValueError``
    when the copy would not fit in the free memory of its GPU, or when accelerate has dispatched
    or offloaded the model; ``inplace=True`` removes the layers from ``model`` itself and costs
    nothing. The result's model survives ``save_pretrained`` / ``from_pretrained``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n = len(decoder_layers(model))
    if isinstance(n_remove, bool) or not isinstance(n_remove, (int, np.integer)) or not 1 <= n_remove < n:
        raise ValueError(f"n_remove must be an int in 1..{n - 1} (at least one layer must remain), got {n_remove!r}")
    if method == "shapley_exact" and n > MAX_EXACT_LAYERS:  # refuse before any evaluation
        raise ValueError(f"method='shapley_exact' evaluates 2**L masks; L must be <= {MAX_EXACT_LAYERS}, "
                         f"got {n} (use 'shapley_surrogate' or 'shapley_surrogate_corrected')")
    if method in SHAPLEY_METHODS[1:]:  # refuse a bad budget before any evaluation
        budget = _surrogate_budget(budget, method, n, keep_sizes)
    if not inplace:
        _check_copy_fits(model)
    gen = _rng(rng)
    start = time.perf_counter()
    details: dict = {}
    if method in SHAPLEY_METHODS:
        scores, n_evals, details = _shapley_scores(model, input_ids, method, gen, budget, keep_sizes,
                                                   utility, mask_batch_size, store)
        removed = np.argsort(scores, kind="stable")[: int(n_remove)].tolist()
    elif method == "sleb":
        game = LayerGame(model, input_ids, utility=utility, mask_batch_size=mask_batch_size, store=store)
        removed = baselines.sleb_order(game, int(n_remove))
        scores = np.full(n, np.nan)
        scores[removed] = np.arange(len(removed))
        n_evals = game.n_evals
    else:
        scores = baselines.layer_scores(model, input_ids, method, rng=gen)
        removed = np.argsort(scores, kind="stable")[: int(n_remove)].tolist()
        n_evals = n + 1 if method == "loo_ppl" else 0
    seconds = time.perf_counter() - start
    pruned = prune_layers(model if inplace else copy.deepcopy(model), removed)
    return PruneResult(method, [int(i) for i in removed], np.asarray(scores, dtype=float), pruned,
                       int(n_evals), seconds, details)


def best_keep_sets(table) -> dict[int, tuple[int, ...]]:
    """The exhaustive optimum: the best keep-set of every size in an exact value table (chapter 06).

    ``table`` is a :class:`~minilib.games.TabularGame` (``values[k]`` = v(bitmask ``k``), bit
    ``i`` = layer ``i``), e.g. ``ml.teaching.exact_table("ppl_ratio")``. Returns
    ``{k: kept layers}`` for ``k = 0 .. L``: the coalition of ``k`` layers with the highest value
    (the lowest calibration perplexity for ``ppl_ratio`` or ``neg_loss``). Vectorised over all
    ``2**L`` bitmasks grouped by popcount; ties go to the smallest bitmask. No pruning rule that
    keeps ``k`` layers can beat it on the table's calibration data.
    """
    values = np.asarray(table.values, dtype=float)
    n = int(table.n_players)
    index = np.arange(values.size, dtype=np.int64)
    popcount = ((index[:, None] >> np.arange(n)) & 1).sum(axis=1)
    best: dict[int, tuple[int, ...]] = {}
    for k in range(n + 1):
        candidates = np.flatnonzero(popcount == k)
        mask = int(candidates[int(np.argmax(values[candidates]))])
        best[k] = tuple(i for i in range(n) if mask >> i & 1)
    return best


SHIPPED_METHOD_LABELS = {
    "paper": "Shapley via surrogate (paper)", "corrected": "Shapley, surrogate + correction",
    "loo": "Leave-one-out", "block_influence": "Block Influence (ShortGPT)",
    "block_influence_angular": "Angular Block Influence", "taylor_plus": "Taylor+", "sleb": "SLEB",
    "evopress": "Evolutionary search (EvoPress-style)", "surrogate_search": "Surrogate-guided search",
    "tail": "Drop the last layers", "random": "Random layers"}
"""Readable names of the methods in a shipped pruning table, in the order tables list them."""


@dataclass
class ShippedPruning:
    """Every method's choice on a real model, and the choices' losses on calibration and held-out text (chapter 07).

    Built by ``scripts/precompute_pruning_table.py``. ``results`` is its JSON (per method:
    ``choices`` = {n_remove: removed layers}, a list of such dicts for ``random``, ``n_evals``,
    scores where the method has them); ``heldout_ids`` the held-out token windows, per split.
    """

    results: dict
    heldout_ids: dict
    zero_shot_items: list | None = None
    """The frozen items of the local zero-shot task the table's accuracies were measured on."""

    @property
    def levels(self) -> list[int]:
        """The numbers of removed layers the table covers."""
        return [int(r) for r in self.results["manifest"]["remove"]]

    def choices(self, method: str) -> list[dict[int, tuple[int, ...]]]:
        """``method``'s removed layers per level, one dict per seed (one seed unless the method is random)."""
        if method not in SHIPPED_METHOD_LABELS or method not in self.results:
            raise ValueError(f"method must be one of {[m for m in SHIPPED_METHOD_LABELS if m in self.results]}, "
                             f"got {method!r}")
        raw = self.results[method]["choices"]
        return [{int(r): tuple(c) for r, c in d.items()} for d in (raw if isinstance(raw, list) else [raw])]

    def loss(self, removed, split: str = "test") -> float:
        """Mean token NLL of the model without ``removed`` on ``split`` (``calibration``, ``validation``, ``test``)."""
        held = self.results["heldout"]
        if split not in held["losses"]:
            raise ValueError(f"split must be one of {sorted(held['losses'])}, got {split!r}")
        index = {tuple(r): i for i, r in enumerate(held["removed"])}
        key = tuple(sorted(int(i) for i in removed))
        if key not in index:
            raise ValueError(f"removed={list(key)} was not evaluated in the shipped table")
        return float(held["losses"][split][index[key]])

    def n_evals(self, method: str, n_remove: int) -> int:
        """Real masked evaluations ``method`` spent to choose ``n_remove`` layers (its setup included)."""
        entry = self.results[method]
        per_level = entry.get("n_evals_per_level")
        if per_level is not None:
            return int(per_level[str(n_remove)])
        if method == "surrogate_search":
            return int(entry["n_evals"] - sum(entry["verify_evals"].values()) + entry["verify_evals"][str(n_remove)])
        return int(entry["n_evals"])

    def perplexity_frame(self, split: str = "test"):
        """One row per (method, level): perplexity (mean over seeds), its sd over seeds, real evaluations."""
        import pandas as pd

        rows = []
        for method in (m for m in SHIPPED_METHOD_LABELS if m in self.results):
            for r in self.levels:
                ppl = np.exp([self.loss(c[r], split) for c in self.choices(method)])
                rows.append({"method": SHIPPED_METHOD_LABELS[method], "key": method, "removed": r,
                             "ppl": float(ppl.mean()), "sd": float(ppl.std(ddof=1)) if len(ppl) > 1 else np.nan,
                             "n_evals": self.n_evals(method, r)})
        return pd.DataFrame(rows)


def load_shipped_pruning(name: str = "smollm2") -> ShippedPruning:
    """Load a shipped pruning table, e.g. SmolLM2-135M's (``scripts/precompute_pruning_table.py``) (chapter 07)."""
    from .store import SHIPPED

    folder = SHIPPED / name
    if not (folder / "pruning.json").is_file():
        available = sorted(p.parent.name for p in SHIPPED.glob("*/pruning.json"))
        raise ValueError(f"name: no shipped pruning table {name!r}; available: {available}")
    results = json.loads((folder / "pruning.json").read_text())
    with np.load(folder / "heldout_ids.npz") as data:
        ids = {k: torch.from_numpy(data[k].astype(np.int64)) for k in data.files}
    items_file = folder / "zero_shot_items.jsonl"
    items = None
    if items_file.is_file():
        from .zero_shot import load_items

        items = load_items(items_file)
    return ShippedPruning(results, ids, items)
