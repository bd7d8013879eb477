"""One-shot layer-importance heuristics that game-theoretic pruning is compared with.

Introduced in chapter 02 (layers as players): leave-one-out and Block Influence score each
layer on its own, in the full model, with no regard for which other layers are present.
"""

from __future__ import annotations

import numpy as np
import torch

from .estimators import _rng  # the one rng normaliser: Generator, int seed or None
from .evaluation import LayerGame, final_hidden, input_device
from .layers import decoder_layers


def leave_one_out(game: LayerGame) -> np.ndarray:
    """Loss increase when each layer alone is removed: v(N) − v(N ∖ {i}) in loss units (chapter 02).

    The "PPL" criterion of Shortened LLaMA (Kim et al. 2024), on the log scale: one batched call
    of L masks. Larger means more important.
    """
    n = game.n_players
    masks = ~np.eye(n, dtype=bool)
    return game.losses(masks) - game.base_loss


@torch.no_grad()
def block_influence(model: torch.nn.Module, input_ids: torch.Tensor, angular: bool = False) -> np.ndarray:
    """Block Influence of each decoder layer: 1 − mean cosine(input, output) over tokens (chapter 02).

    ShortGPT's score (Men et al. 2024): a layer that barely rotates the residual stream is
    judged unimportant. With ``angular=True``, the angular distance arccos(cos)/π of Gromov et al.
    (2024) instead. One forward pass of the full model; larger means more important.
    """
    layers = decoder_layers(model)
    scores: list = [None] * len(layers)
    current: dict = {}
    handles = []
    for i, layer in enumerate(layers):
        def pre(module, args, kwargs):
            current["input"] = args[0] if args else kwargs["hidden_states"]

        def post(module, args, kwargs, out, i=i):
            # scored as each layer finishes: one layer's input is alive at a time, and under a
            # device_map the input may sit on the previous layer's device
            y = (out[0] if isinstance(out, tuple) else out).float()
            cos = torch.nn.functional.cosine_similarity(current.pop("input").to(y.device).float(), y, dim=-1)
            cos = cos.clamp(-1.0, 1.0)
            score = torch.arccos(cos) / torch.pi if angular else 1.0 - cos
            scores[i] = float(score.double().mean())

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            final_hidden(model, input_ids.to(input_device(model)))
    finally:
        for h in handles:
            h.remove()
    return np.array(scores)


# --- one interface for every baseline (chapter 06) -------------------------------------------

METHODS = ("loo_ppl", "taylor_plus", "block_influence", "block_influence_angular", "sleb", "tail", "random")
"""Baseline names accepted by :func:`rank_layers` and :func:`select_layers`."""


def taylor_importance(model: torch.nn.Module, input_ids: torch.Tensor) -> np.ndarray:
    """First-order Taylor importance of each block: Σ |W ⊙ ∂L/∂W| over its weights (chapter 06).

    One forward and backward pass of the calibration loss; the block score estimates how much
    the loss would change if the block's weights were set to zero.
    """
    layers = decoder_layers(model)
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()
    try:
        ids = input_ids.to(input_device(model))
        with torch.enable_grad():
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        scores = [float(sum((p.detach() * p.grad).abs().double().sum() for p in layer.parameters()
                            if p.grad is not None)) for layer in layers]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return np.array(scores)


def protected_layers(n_layers: int) -> set[int]:
    """Taylor+'s protected blocks: the first n/8 and the last n/16 (4 and 2 of 32) (chapter 06).

    Kim et al. (2024) keep LLaMA-7B's first four and last two blocks out of Taylor pruning
    ("Taylor+"); we scale that rule to other depths, keeping at least the first and last block.
    """
    first, last = max(1, round(n_layers / 8)), max(1, round(n_layers / 16))
    return set(range(first)) | set(range(n_layers - last, n_layers))


def sleb_order(game: LayerGame, n_remove: int) -> list[int]:
    """SLEB (Song et al. 2024): greedily remove the layer whose removal hurts least, re-scoring each round (chapter 06).

    Round r evaluates every remaining layer's removal on top of the r layers already removed
    (one batched call of at most L masks) and removes the best.
    """
    n = game.n_players
    keep = np.ones(n, dtype=bool)
    order: list[int] = []
    for _ in range(n_remove):
        candidates = np.flatnonzero(keep)
        masks = np.repeat(keep[None], len(candidates), axis=0)
        masks[np.arange(len(candidates)), candidates] = False
        best = int(candidates[int(np.argmin(game.losses(masks)))])
        keep[best] = False
        order.append(best)
    return order


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def layer_scores(model: torch.nn.Module, input_ids: torch.Tensor, method: str, rng=None) -> np.ndarray:
    """Importance per layer (larger = more important) for the one-shot baselines (chapter 06).

    For the iterative ``"sleb"``, the score is the round in which a layer is removed (0 first);
    for ``"tail"`` it is n − index; for ``"random"`` a seeded permutation.
    """
    _check_method(method)
    n = len(decoder_layers(model))
    if method == "loo_ppl":
        return leave_one_out(LayerGame(model, input_ids, utility="neg_loss"))
    if method == "taylor_plus":
        scores = taylor_importance(model, input_ids)
        protected = sorted(protected_layers(n))
        scores[protected] = np.inf
        return scores
    if method in ("block_influence", "block_influence_angular"):
        return block_influence(model, input_ids, angular=method.endswith("angular"))
    if method == "sleb":
        order = sleb_order(LayerGame(model, input_ids, utility="neg_loss"), n - 1)
        scores = np.full(n, float(n))  # the one layer never removed ranks last
        scores[order] = np.arange(n - 1)
        return scores
    if method == "tail":
        return (n - np.arange(n)).astype(float)  # later layers score lower
    gen = _rng(rng)
    return gen.permutation(n).astype(float)


def rank_layers(model: torch.nn.Module, input_ids: torch.Tensor, method: str, rng=None) -> list[int]:
    """Layers ordered least important first, by a baseline ``method`` (chapter 06).

    ``method`` is one of :data:`METHODS`. Ties keep layer order (a stable sort).
    """
    scores = layer_scores(model, input_ids, method, rng=rng)
    return np.argsort(scores, kind="stable").tolist()


def select_layers(model: torch.nn.Module, input_ids: torch.Tensor, method: str, n_remove: int,
                  rng=None) -> list[int]:
    """The ``n_remove`` layers a baseline would remove (chapter 06).

    One-shot methods take the first ``n_remove`` of :func:`rank_layers`; SLEB runs exactly
    ``n_remove`` greedy rounds, each re-scored on the model without the layers removed so far.
    """
    _check_method(method)
    n = len(decoder_layers(model))
    if isinstance(n_remove, bool) or not isinstance(n_remove, (int, np.integer)) or not 1 <= n_remove < n:
        raise ValueError(f"n_remove must be an int in 1..{n - 1} (at least one layer must remain), got {n_remove!r}")
    if method == "sleb":
        return sleb_order(LayerGame(model, input_ids, utility="neg_loss"), int(n_remove))
    return rank_layers(model, input_ids, method, rng=rng)[: int(n_remove)]
