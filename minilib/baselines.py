"""One-shot layer-importance heuristics that game-theoretic pruning is compared with.

Introduced in chapter 02 (layers as players): leave-one-out and Block Influence score each
layer on its own, in the full model, with no regard for which other layers are present.
"""

from __future__ import annotations

import numpy as np
import torch

from .evaluation import LayerGame
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
    inputs: list = [None] * len(layers)
    outputs: list = [None] * len(layers)
    handles = []
    for i, layer in enumerate(layers):
        def pre(module, args, kwargs, i=i):
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).float()

        def post(module, args, kwargs, out, i=i):
            outputs[i] = (out[0] if isinstance(out, tuple) else out).float()

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    scores = []
    for x, y in zip(inputs, outputs):
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1).clamp(-1.0, 1.0)
        score = torch.arccos(cos) / torch.pi if angular else 1.0 - cos
        scores.append(float(score.double().mean()))
    return np.array(scores)
