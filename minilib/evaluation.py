"""Turning a model and calibration data into numbers: perplexity and the layer game.

Introduced in chapter 00 (quick start). :func:`perplexity` is the quality measure;
:class:`LayerGame` makes "the model with only these layers" a cooperative game whose
players are the decoder layers, evaluated many masks per forward pass.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .games import Game, as_coalitions
from .layers import as_keep_mask, decoder_layers, keep_only

UTILITIES = ("ppl_ratio", "neg_loss")
Utility = Literal["ppl_ratio", "neg_loss"]


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def token_nll(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood, shape ``(rows, T-1)``, in float32 (chapter 00).

    Token t is predicted from tokens < t; the first token of each row is context only.
    Logits are upcast to float32 before the softmax, so fp16/bf16 models lose no accuracy here.
    """
    logits = model(input_ids=input_ids, use_cache=False).logits
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            reduction="none")
    return nll.view(targets.shape)


def windows(input_ids: torch.Tensor, window: int) -> torch.Tensor:
    """Cut token ids into non-overlapping windows of ``window`` tokens (chapter 00).

    A 1-D stream is cut into rows of ``window`` tokens, dropping the incomplete tail (the
    protocol of the Shortened-LLaMA harness the paper uses). A 2-D ``(n, T)`` batch keeps its
    rows when ``T <= window`` and cuts each row otherwise.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window <= 1:
        raise ValueError(f"window must be an int > 1 (a window needs a token to predict), got {window!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise TypeError("input_ids must be an integer torch.Tensor of token ids")
    if input_ids.ndim == 1:
        input_ids = input_ids[None, :]
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be 1-D or 2-D, got shape {tuple(input_ids.shape)}")
    n, length = input_ids.shape
    if length <= window:
        if length < 2:
            raise ValueError(f"input_ids rows need at least 2 tokens, got {length}")
        return input_ids
    per_row = length // window
    return input_ids[:, : per_row * window].reshape(n * per_row, window)


@torch.no_grad()
def perplexity(model: torch.nn.Module, input_ids: torch.Tensor, window: int = 128,
               batch_size: int = 16, progress: bool = False) -> float:
    """Perplexity ``exp(mean token NLL)`` over non-overlapping windows (chapter 00).

    ``input_ids`` is a 1-D token stream or a ``(n, T)`` batch; see :func:`windows`. The mean is
    over every predicted token, so the result does not depend on ``batch_size``.
    """
    rows = windows(input_ids, window)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    total, count = 0.0, 0
    for start in tqdm(range(0, len(rows), batch_size), desc="perplexity", disable=not progress):
        nll = token_nll(model, rows[start: start + batch_size].to(device))
        total += float(nll.double().sum())
        count += nll.numel()
    return math.exp(total / count)


class LayerGame(Game):
    """A model and calibration data as a cooperative game over its decoder layers (chapter 00).

    Players are the L decoder layers; a coalition is a keep-mask. The value of a mask is the
    model's quality with exactly those layers, from one forward pass over ``input_ids``
    (shape ``(n_seqs, T)``):

    - ``utility="ppl_ratio"`` (the paper's): ``baseline_ppl / ppl(mask)``, 1 for the full model,
      falling towards 0 as quality collapses;
    - ``utility="neg_loss"``: ``-mean token NLL``, i.e. ``-log ppl(mask)``; additive in log space.

    The empty coalition v(∅) is the model with every decoder layer skipped: token embeddings
    go straight through the final norm into the LM head (a bigram-like predictor), which is a
    well-defined, finite value for both utilities.

    Masks are evaluated ``mask_batch_size`` at a time in a single forward pass (each layer runs
    only on the rows of masks that keep it), each distinct mask once: values are cached by mask,
    ``n_evals`` counts masks actually sent through the model and ``n_queries`` counts masks asked
    for. Works for any model :func:`~minilib.layers.decoder_layers` supports, on any device and
    dtype (inputs follow the model's device; losses are computed in float32).
    """

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, utility: Utility = "ppl_ratio",
                 mask_batch_size: int = 8, progress: bool | None = None):
        if utility not in UTILITIES:
            raise ValueError(f"utility must be one of {UTILITIES}, got {utility!r}")
        if isinstance(mask_batch_size, bool) or not isinstance(mask_batch_size, int) or mask_batch_size < 1:
            raise ValueError(f"mask_batch_size must be a positive int, got {mask_batch_size!r}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] < 2:
            raise ValueError("input_ids must be a (n_seqs, T) tensor of token ids with T >= 2, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
        self.model = model.eval()
        self.n_players = len(decoder_layers(model))
        self.input_ids = input_ids.to(_model_device(model))
        self.utility = utility
        self.mask_batch_size = mask_batch_size
        self.progress = progress
        self._loss_cache: dict[bytes, float] = {}
        self.n_evals = 0
        self.n_queries = 0
        self.base_loss = float(self.losses(np.ones(self.n_players, dtype=bool))[0])

    @property
    def base_ppl(self) -> float:
        """Perplexity of the full model on the calibration data."""
        return math.exp(self.base_loss)

    def losses(self, coalitions) -> np.ndarray:
        """Mean token NLL of the model under each mask, shape ``(m,)``."""
        masks = as_coalitions(coalitions, self.n_players)
        self.n_queries += len(masks)
        keys = [np.packbits(m).tobytes() for m in masks]
        todo: dict[bytes, np.ndarray] = {}
        for key, mask in zip(keys, masks):
            if key not in self._loss_cache and key not in todo:
                todo[key] = mask
        pending = list(todo.items())
        chunks = range(0, len(pending), self.mask_batch_size)
        show = self.progress if self.progress is not None else len(chunks) > 4
        for start in tqdm(chunks, desc="masked evaluations", disable=not show):
            chunk = pending[start: start + self.mask_batch_size]
            for (key, _), loss in zip(chunk, self._evaluate(np.stack([m for _, m in chunk]))):
                self._loss_cache[key] = loss
        return np.array([self._loss_cache[k] for k in keys])

    def _evaluate(self, masks: np.ndarray) -> list[float]:
        """One forward pass for a chunk of masks: rows are mask-major copies of the data."""
        n_seqs = self.input_ids.shape[0]
        ids = self.input_ids.repeat(len(masks), 1)
        with keep_only(self.model, np.repeat(masks, n_seqs, axis=0)):
            nll = token_nll(self.model, ids)
        self.n_evals += len(masks)
        return nll.double().view(len(masks), -1).mean(dim=1).tolist()

    def value(self, coalitions: np.ndarray) -> np.ndarray:
        loss = self.losses(coalitions)
        if self.utility == "neg_loss":
            return -loss
        return np.exp(self.base_loss - loss)

    def perplexity(self, keep) -> float:
        """Calibration perplexity of the model with only the ``keep`` layers."""
        mask = as_keep_mask(keep, self.n_players)
        return math.exp(float(self.losses(mask[None, :])[0]))

    def __repr__(self) -> str:
        return (f"LayerGame(n_players={self.n_players}, utility={self.utility!r}, "
                f"calibration={tuple(self.input_ids.shape)}, base_ppl={self.base_ppl:.3f}, "
                f"n_evals={self.n_evals})")


# --- prefix-shared exact evaluation (chapter 03) ---------------------------------------------

_FINAL_NORM_PATHS = {"gpt2": "transformer.ln_f", "opt": "model.decoder.final_layer_norm"}


def _resolve(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _head(model: torch.nn.Module):
    """hidden states after the last decoder layer -> logits (final norm, projection, LM head)."""
    model_type = model.config.model_type
    if getattr(model.config, "final_logit_softcapping", None):
        raise NotImplementedError("exact_values does not implement final-logit soft-capping (Gemma 2)")
    norm = _resolve(model, _FINAL_NORM_PATHS.get(model_type, "model.norm"))
    project_out = getattr(getattr(model, "model", None), "decoder", None)
    project_out = getattr(project_out, "project_out", None) if model_type == "opt" else None

    def head(hidden: torch.Tensor) -> torch.Tensor:
        if norm is not None:
            hidden = norm(hidden)
        if project_out is not None:
            hidden = project_out(hidden)
        return model.lm_head(hidden)

    return head


def _capture_layer_calls(model: torch.nn.Module, input_ids: torch.Tensor):
    """Run the full model once and record each decoder layer's call: (layer-0 input, per-layer args/kwargs)."""
    layers = decoder_layers(model)
    calls: list = [None] * len(layers)
    handles = []
    for i, layer in enumerate(layers):
        def hook(module, args, kwargs, i=i):
            calls[i] = (args[0] if args else kwargs["hidden_states"], args[1:],
                        {k: v for k, v in kwargs.items() if k != "hidden_states"})
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return calls[0][0], [(args, kwargs) for _, args, kwargs in calls]


def _tile(value, copies: int, batch: int):
    """Repeat the batch axis of captured layer inputs for ``copies`` stacked states."""
    if copies == 1:
        return value
    if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[0] == batch and batch > 1:
        return value.repeat(copies, *([1] * (value.ndim - 1)))
    if isinstance(value, tuple):
        return tuple(_tile(v, copies, batch) for v in value)
    return value


class _PrefixWalker:
    """Depth-first over the first L−c layers, breadth-first (batched) over the last c."""

    def __init__(self, game: "LayerGame", bfs_levels: int, row_chunk: int, progress: bool):
        self.model, self.ids = game.model, game.input_ids
        self.layers = decoder_layers(self.model)
        self.n = len(self.layers)
        self.batch = self.ids.shape[0]
        self.c = bfs_levels
        self.row_chunk = row_chunk
        self.head = _head(self.model)
        self.h0, self.calls = _capture_layer_calls(self.model, self.ids)
        self.losses = np.full(2 ** self.n, np.nan)
        self.layer_forwards = 0
        self.bar = tqdm(total=2 ** (self.n - self.c), desc="prefix-shared exact values", disable=not progress)

    def run_layer(self, k: int, states: torch.Tensor) -> torch.Tensor:
        copies = states.shape[0] // self.batch
        args, kwargs = self.calls[k]
        step = max(1, self.row_chunk // self.batch) * self.batch
        outs = []
        for start in range(0, states.shape[0], step):
            part = states[start: start + step]
            m = part.shape[0] // self.batch
            out = self.layers[k](part, *_tile(args, m, self.batch), **{key: _tile(v, m, self.batch)
                                                                       for key, v in kwargs.items()})
            outs.append(out[0] if isinstance(out, tuple) else out)
        self.layer_forwards += copies
        return torch.cat(outs)

    def leaf_losses(self, states: torch.Tensor) -> np.ndarray:
        targets = self.ids[:, 1:]
        per_row = []
        for start in range(0, states.shape[0], self.batch * max(1, self.row_chunk // (4 * self.batch))):
            part = states[start: start + self.batch * max(1, self.row_chunk // (4 * self.batch))]
            logits = self.head(part)[:, :-1].float()
            tgt = targets.repeat(part.shape[0] // self.batch, 1)
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                    reduction="none")
            per_row.append(nll.view(part.shape[0], -1).double().mean(dim=1))
        return torch.cat(per_row).view(-1, self.batch).mean(dim=1).cpu().numpy()

    def walk(self, level: int, hidden: torch.Tensor, mask: int) -> None:
        top = self.n - self.c
        if level == top:
            states = hidden
            for k in range(top, self.n):
                states = torch.cat([states, self.run_layer(k, states)])
            self.losses[mask + (np.arange(2 ** self.c, dtype=np.int64) << top)] = self.leaf_losses(states)
            self.bar.update(1)
            return
        self.walk(level + 1, hidden, mask)
        self.walk(level + 1, self.run_layer(level, hidden), mask | (1 << level))


@torch.no_grad()
def exact_values(game: LayerGame, bfs_levels: int | None = None, row_chunk: int = 512,
                 progress: bool = True) -> "TabularGame":
    """All 2**L mask values of a :class:`LayerGame`, sharing every kept prefix (chapter 03).

    The masks form a binary tree over layers 0, 1, …, L−1: masks that agree on layers < k
    share the hidden state after layer k−1, so layer k runs once per distinct prefix that
    keeps it: 1 + 2 + … + 2**(L−1) = 2**L − 1 layer forwards in total, against
    L·2**(L−1) when each mask is evaluated on its own (6.5× fewer for L = 12). The walk is
    depth-first over the first L − ``bfs_levels`` layers and breadth-first over the rest, whose
    2**bfs_levels states go through each layer together in batches of ``row_chunk`` rows.
    Each layer is called with exactly the arguments the model's own forward passes it
    (recorded once by a hook), so masks, rotary embeddings and attention implementation match.
    The results also fill the game's cache. Returns a :class:`~minilib.games.TabularGame` of the
    game's utility, indexed by bitmask (bit i = layer i).
    """
    from .games import TabularGame

    n = game.n_players
    if bfs_levels is None:
        bfs_levels = max(0, min(n, int(math.log2(max(1, row_chunk // game.input_ids.shape[0])))))
    if not 0 <= bfs_levels <= n:
        raise ValueError(f"bfs_levels must be in 0..{n}, got {bfs_levels}")
    walker = _PrefixWalker(game, bfs_levels, row_chunk, progress)
    walker.walk(0, walker.h0, 0)
    walker.bar.close()
    losses = walker.losses
    masks_fresh = [k for k in range(2 ** n)]
    for k in masks_fresh:
        key = np.packbits(((k >> np.arange(n)) & 1).astype(bool)).tobytes()
        if key not in game._loss_cache:
            game._loss_cache[key] = float(losses[k])
            game.n_evals += 1
    values = -losses if game.utility == "neg_loss" else np.exp(game.base_loss - losses)
    game.last_layer_forwards = walker.layer_forwards
    return TabularGame(values, {"utility": game.utility, "calibration_shape": list(game.input_ids.shape),
                                "base_loss": game.base_loss, "layer_forwards": walker.layer_forwards})
