"""Turning a model and calibration data into numbers: perplexity and the layer game.

Introduced in chapter 00 (quick start). :func:`perplexity` is the quality measure;
:class:`LayerGame` makes "the model with only these layers" a cooperative game whose
players are the decoder layers, evaluated many masks per forward pass.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .games import Game, as_coalitions
from .layers import as_keep_mask, decoder_layers, keep_only, map_per_row, patched_forwards

UTILITIES = ("ppl_ratio", "neg_loss")
Utility = Literal["ppl_ratio", "neg_loss"]


def input_device(model: torch.nn.Module) -> torch.device:
    """The device a model's input ids belong on, also for accelerate-dispatched models (chapter 07).

    ``device_map="auto"`` or CPU offload leave parameters on several devices (or on ``meta``):
    the inputs go where the embedding runs, i.e. the execution device of accelerate's hook.
    """
    hook = getattr(model, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for p in ([embeddings.weight] if embeddings is not None else []) + list(model.parameters()):
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


MAX_LOGITS = 2 ** 26
"""Largest number of logits (tokens x vocabulary) held at once: 256 MB in float32."""


def _vocab_size(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.ndim == 2 and weight.shape[0] > 0:
        return int(weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


class _StopAfterLayers(Exception):
    """Raised by a hook on the last decoder layer to stop a forward before the LM head."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def final_hidden(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Hidden states after the last decoder layer (before the final norm), without computing logits (chapter 07)."""
    layers = decoder_layers(model)

    def stop(module, args, output):
        raise _StopAfterLayers(output[0] if isinstance(output, tuple) else output)

    if len(layers) == 0:
        raise ValueError("model has no decoder layers")
    handle = layers[-1].register_forward_hook(stop)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopAfterLayers as done:
        return done.hidden
    finally:
        handle.remove()
    raise RuntimeError("the last decoder layer never ran")


@contextlib.contextmanager
def _inject(model: torch.nn.Module, hidden: torch.Tensor):
    """Make the next forward's decoder stack output ``hidden`` (layer 0 returns it, the rest pass it on)."""
    layers = decoder_layers(model)
    inject = lambda original: (lambda hs, *a, **k: hidden.to(hs.device))  # noqa: E731
    skip = lambda original: (lambda hs, *a, **k: hs)                       # noqa: E731
    with patched_forwards(layers, {i: inject if i == 0 else skip for i in range(len(layers))}):
        yield model


@torch.no_grad()
def head_nll(model: torch.nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
             max_logits: int = MAX_LOGITS) -> torch.Tensor:
    """Per-token NLL ``(rows, T-1)`` from the hidden states after the last decoder layer (chapter 07).

    The head is the model's own: its forward runs with the decoder stack replaced by ``hidden``,
    so the final norm, any output projection, Granite's ``logits_scaling`` or Gemma's soft-capping
    apply exactly as in ``model(...)``. With no decoder layer running, tokens are independent, so
    the work is cut into blocks of rows and tokens holding at most ``max_logits`` float32 logits
    at a time (2048 tokens x 128k vocabulary never materialise at once).
    """
    rows, length = input_ids.shape
    per_call = max(1, int(max_logits) // _vocab_size(model))
    token_block = min(length, per_call)
    row_block = max(1, per_call // token_block)
    out = torch.empty(rows, length - 1, dtype=torch.float32)
    for r in range(0, rows, row_block):
        for t in range(0, length - 1, token_block):
            t_end = min(t + token_block, length - 1)
            ids = input_ids[r: r + row_block, t: t_end]
            with _inject(model, hidden[r: r + row_block, t: t_end]):
                logits = model(input_ids=ids, use_cache=False).logits.float()
            targets = input_ids[r: r + row_block, t + 1: t_end + 1].to(logits.device)
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                    reduction="none")
            out[r: r + row_block, t: t_end] = nll.view(targets.shape).cpu()
    return out


@torch.no_grad()
def token_nll(model: torch.nn.Module, input_ids: torch.Tensor, max_logits: int = MAX_LOGITS) -> torch.Tensor:
    """Per-token negative log-likelihood, shape ``(rows, T-1)``, in float32 (chapter 00).

    Token t is predicted from tokens < t; the first token of each row is context only.
    Logits are upcast to float32 before the softmax, so fp16/bf16 models lose no accuracy here.
    When the logits of all tokens would exceed ``max_logits`` numbers, the decoder stack runs
    once and the head runs in blocks (:func:`head_nll`), so memory stays bounded.
    """
    if input_ids.numel() * _vocab_size(model) > max_logits:
        return head_nll(model, final_hidden(model, input_ids), input_ids, max_logits)
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
    device = input_device(model)
    total, count = 0.0, 0
    for start in tqdm(range(0, len(rows), batch_size), desc="perplexity", disable=not progress):
        nll = token_nll(model, rows[start: start + batch_size].to(device))
        total += float(nll.double().sum())
        count += nll.numel()
    return math.exp(total / count)


ENGINES = ("prefix", "forward")


class LayerGame(Game):
    """A model and calibration data as a cooperative game over its decoder layers (chapter 00).

    Players are the L decoder layers; a coalition is a keep-mask. The value of a mask is the
    model's quality with exactly those layers on ``input_ids`` (shape ``(n_seqs, T)``):

    - ``utility="ppl_ratio"`` (the paper's): ``baseline_ppl / ppl(mask)``, 1 for the full model,
      falling towards 0 as quality collapses;
    - ``utility="neg_loss"``: ``-mean token NLL``, i.e. ``-log ppl(mask)``; additive in log space.

    The empty coalition v(∅) is the model with every decoder layer skipped: token embeddings
    go straight through the final norm into the LM head (a bigram-like predictor), which is a
    well-defined, finite value for both utilities.

    Each distinct mask is evaluated once: values are cached by mask, ``n_evals`` counts masks
    actually sent through the model, ``n_queries`` masks asked for and ``layer_forwards`` the
    decoder-layer calls (one per layer per calibration batch). Two engines (chapter 07):

    - ``engine="prefix"`` (default) walks the trie of the masks' layer prefixes
      (:func:`evaluate_masks`): masks that agree on layers < k share the hidden state after
      layer k−1, so each shared prefix runs once; ``mask_batch_size`` masks at a time go
      through a layer together (breadth-first), the rest depth-first, so memory stays bounded;
    - ``engine="forward"`` runs the whole model per chunk of ``mask_batch_size`` masks, each
      layer only on the rows of masks that keep it (:func:`~minilib.layers.keep_only`).

    ``mask_batch_size=None`` picks 1 on CPU (one mask per forward was fastest there) and 32 on
    GPU. ``store`` (a path or an open :class:`~minilib.store.EvaluationStore`) makes the game
    resumable: cached losses are read from it before any evaluation and every evaluated batch is
    written to it in one transaction, so a killed run loses nothing it had finished. Works for
    any model :func:`~minilib.layers.decoder_layers` supports, on any device and dtype, also
    dispatched over several devices by accelerate (losses are computed in float32).
    """

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, utility: Utility = "ppl_ratio",
                 mask_batch_size: int | None = None, progress: bool | None = None, store=None,
                 engine: str = "prefix", max_logits: int = MAX_LOGITS):
        if utility not in UTILITIES:
            raise ValueError(f"utility must be one of {UTILITIES}, got {utility!r}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if mask_batch_size is not None and (isinstance(mask_batch_size, bool) or not isinstance(mask_batch_size, int)
                                            or mask_batch_size < 1):
            raise ValueError(f"mask_batch_size must be a positive int or None, got {mask_batch_size!r}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] < 2:
            raise ValueError("input_ids must be a (n_seqs, T) tensor of token ids with T >= 2, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
        self.model = model.eval()
        self.n_players = len(decoder_layers(model))
        self.input_ids = input_ids.to(input_device(model))
        self.utility = utility
        self.engine = engine
        if mask_batch_size is None:
            mask_batch_size = 32 if self.input_ids.device.type == "cuda" else 1
        self.mask_batch_size = mask_batch_size
        self.max_logits = max_logits
        self.progress = progress
        self._loss_cache: dict[bytes, float] = {}
        self.n_evals = 0
        self.n_queries = 0
        self.layer_forwards = 0
        self.store = self._open_store(store)
        self.base_loss = float(self.losses(np.ones(self.n_players, dtype=bool))[0])

    def _open_store(self, store):
        if store is None:
            return None
        from .store import EvaluationStore, open_for_game

        if isinstance(store, EvaluationStore):
            return store
        return open_for_game(store, self.model, self.input_ids, self.utility)

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
        if todo and self.store is not None:
            stored = self.store.lookup(np.stack(list(todo.values())))
            for key, loss in zip(list(todo), stored):
                if not np.isnan(loss):
                    self._loss_cache[key] = float(loss)
                    del todo[key]
        if todo:
            self._evaluate_new(np.stack(list(todo.values())))
        return np.array([self._loss_cache[k] for k in keys])

    def _record(self, masks: np.ndarray, losses: np.ndarray) -> None:
        for mask, loss in zip(masks, losses):
            self._loss_cache[np.packbits(mask).tobytes()] = float(loss)
        self.n_evals += len(masks)
        if self.store is not None:
            losses = np.asarray(losses, dtype=float)
            broken = np.isnan(losses)   # e.g. fp16 overflow: kept in memory, not stored, retried on a rerun
            if broken.any():
                warnings.warn(f"{int(broken.sum())} mask(s) gave a NaN loss (numerical overflow?); "
                              "they are not written to the store", RuntimeWarning, stacklevel=3)
            self.store.record(masks[~broken], losses[~broken])

    def _evaluate_new(self, masks: np.ndarray) -> None:
        show = self.progress if self.progress is not None else len(masks) > 4 * self.mask_batch_size
        bar = tqdm(total=len(masks), desc="masked evaluations", disable=not show)
        try:
            if self.engine == "prefix":
                def done(batch: np.ndarray, losses: np.ndarray) -> None:
                    self._record(batch, losses)
                    bar.update(len(batch))
                self.layer_forwards += evaluate_masks(self.model, self.input_ids, masks, on_batch=done,
                                                      mask_batch_size=self.mask_batch_size,
                                                      max_logits=self.max_logits)
            else:
                for start in range(0, len(masks), self.mask_batch_size):
                    chunk = masks[start: start + self.mask_batch_size]
                    self._record(chunk, self._forward_losses(chunk))
                    bar.update(len(chunk))
        finally:
            bar.close()

    def _forward_losses(self, masks: np.ndarray) -> np.ndarray:
        """One forward pass for a chunk of masks: rows are mask-major copies of the data."""
        n_seqs = self.input_ids.shape[0]
        ids = self.input_ids.repeat(len(masks), 1)
        with keep_only(self.model, np.repeat(masks, n_seqs, axis=0)):
            nll = token_nll(self.model, ids, self.max_logits)
        self.layer_forwards += int(masks.sum())
        return nll.double().view(len(masks), -1).mean(dim=1).numpy()

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


# --- prefix-tree evaluation of any set of masks (chapters 03 and 07) -------------------------

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
        final_hidden(model, input_ids)
    finally:
        for h in handles:
            h.remove()
    return calls[0][0], [(args, kwargs) for _, args, kwargs in calls]


def _tile(forward, args: tuple, kwargs: dict, copies: int, batch: int) -> tuple[tuple, dict]:
    """A captured layer call's arguments for ``copies`` stacked copies of its calibration batch.

    Only the per-row arguments (:data:`~minilib.layers.PER_ROW_ARGUMENTS`: attention mask, position
    ids and embeddings, ...) are repeated along their batch axis, inside tuples and dicts too;
    size-1 ones broadcast and everything else (flags, the cache, other tensors) is passed as is.
    """
    if copies == 1:
        return args, kwargs
    return map_per_row(forward, args, kwargs, lambda t: t.repeat(copies, *([1] * (t.ndim - 1))), batch)


class _TrieWalker:
    """Depth-first over the trie of mask prefixes until a subtree holds ``chunk`` masks, then breadth-first."""

    def __init__(self, model, input_ids, chunk: int, row_chunk: int, max_logits: int, on_batch):
        self.model, self.ids = model, input_ids
        self.layers = decoder_layers(model)
        self.n = len(self.layers)
        self.batch = input_ids.shape[0]
        self.chunk, self.row_chunk, self.max_logits = chunk, row_chunk, max_logits
        self.on_batch = on_batch
        self.layer_forwards = 0
        self.h0, self.calls = _capture_layer_calls(model, input_ids)

    def run_layer(self, k: int, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """Layer k on several hidden states of one calibration batch each, ``row_chunk`` rows per call."""
        args, kwargs = self.calls[k]
        per_call = max(1, self.row_chunk // self.batch)
        outs: list[torch.Tensor] = []
        for start in range(0, len(states), per_call):
            part = states[start: start + per_call]
            x = part[0] if len(part) == 1 else torch.cat([s.to(part[0].device) for s in part])
            m = len(part)
            call_args, call_kwargs = _tile(self.layers[k].forward, args, kwargs, m, self.batch)
            out = self.layers[k](x, *call_args, **call_kwargs)
            out = out[0] if isinstance(out, tuple) else out
            outs.extend(out.split(self.batch) if m > 1 else [out])
        self.layer_forwards += len(states)
        return outs

    def dfs(self, k: int, state: torch.Tensor, masks: np.ndarray) -> None:
        if len(masks) <= self.chunk or k == self.n:
            self.bfs(k, state, masks)
            return
        keep = masks[:, k]
        if not keep.all():                       # skipping layer k: the state passes on unchanged
            self.dfs(k + 1, state, masks[~keep])
        if keep.any():                           # layer k runs once for every mask that keeps it
            self.dfs(k + 1, self.run_layer(k, [state])[0], masks[keep])

    def bfs(self, k: int, state: torch.Tensor, masks: np.ndarray) -> None:
        states = [state]
        group = np.zeros(len(masks), dtype=np.int64)   # mask -> index of its current state
        for j in range(k, self.n):
            runs = masks[:, j]
            if not runs.any():
                continue
            todo = np.unique(group[runs])
            outs = self.run_layer(j, [states[g] for g in todo])
            for g, out in zip(todo, outs):
                members = group == g
                if (members & ~runs).any():            # the prefix splits: a new state for the keepers
                    group[members & runs] = len(states)
                    states.append(out)
                else:
                    states[g] = out
        used = np.unique(group)
        hidden = torch.cat([states[g].to(states[used[0]].device) for g in used])
        nll = head_nll(self.model, hidden, self.ids.repeat(len(used), 1), self.max_logits)
        per_state = nll.double().view(len(used), -1).mean(dim=1).numpy()
        where = {g: i for i, g in enumerate(used)}
        self.on_batch(masks, per_state[[where[g] for g in group]])


@torch.no_grad()
def evaluate_masks(model: torch.nn.Module, input_ids: torch.Tensor, masks, on_batch=None,
                   mask_batch_size: int = 1, row_chunk: int = 512, max_logits: int = MAX_LOGITS) -> int:
    """Mean token NLL of ``model`` under each keep-mask, sharing every common layer prefix (chapter 07).

    The masks are walked as a trie over layers 0, 1, …, L−1: masks that agree on layers < k
    share the hidden state entering layer k, so each distinct prefix that keeps layer k runs it
    once (the paper's strata, keeping 30/27/24/21/18 of 32 layers, need about 2× fewer layer
    forwards than one forward per mask). The walk is depth-first (at most L hidden states
    alive) until a subtree holds ``mask_batch_size`` masks, then breadth-first inside it: its
    states go through each layer together, ``row_chunk`` rows per call (the GPU setting).
    Each layer is called with exactly the arguments the model's own forward gives it (recorded
    once by a hook), and the loss uses the model's own head in bounded memory
    (:func:`head_nll`), so the values equal independent evaluation. ``on_batch(masks, losses)``
    is called after each finished subtree (to store results as they come). Returns the number
    of layer forwards; with ``on_batch=None`` use :func:`mask_losses` for the values.
    """
    masks = np.asarray(masks, dtype=bool)
    n = len(decoder_layers(model))
    if masks.ndim != 2 or masks.shape[1] != n:
        raise ValueError(f"masks must have shape (m, {n}), got {masks.shape}")
    if isinstance(mask_batch_size, bool) or not isinstance(mask_batch_size, int) or mask_batch_size < 1:
        raise ValueError(f"mask_batch_size must be a positive int, got {mask_batch_size!r}")
    if len(masks) == 0:
        return 0
    order = np.lexsort(masks.T[::-1])                    # lexicographic in layer order: siblings adjacent
    walker = _TrieWalker(model, input_ids.to(input_device(model)), mask_batch_size, row_chunk, max_logits,
                         on_batch or (lambda m, v: None))
    walker.dfs(0, walker.h0, masks[order])
    return walker.layer_forwards


def mask_losses(model: torch.nn.Module, input_ids: torch.Tensor, masks, **kwargs) -> np.ndarray:
    """Mean token NLL under each of ``masks`` (rows in the given order) via :func:`evaluate_masks` (chapter 07)."""
    masks = np.asarray(masks, dtype=bool)
    found: dict[bytes, float] = {}

    def keep(batch: np.ndarray, losses: np.ndarray) -> None:
        found.update((np.packbits(m).tobytes(), float(v)) for m, v in zip(batch, losses))

    evaluate_masks(model, input_ids, masks, on_batch=keep, **kwargs)
    return np.array([found[np.packbits(m).tobytes()] for m in masks])


@torch.no_grad()
def exact_values(game: LayerGame, bfs_levels: int | None = None, row_chunk: int = 512,
                 progress: bool = True) -> "TabularGame":
    """All 2**L mask values of a :class:`LayerGame`, sharing every kept prefix (chapter 03).

    The masks form a binary tree over layers 0, 1, …, L−1: masks that agree on layers < k
    share the hidden state after layer k−1, so layer k runs once per distinct prefix that
    keeps it: 1 + 2 + … + 2**(L−1) = 2**L − 1 layer forwards in total, against
    L·2**(L−1) when each mask is evaluated on its own (6.0× fewer for L = 12). The walk
    (:func:`evaluate_masks`) is depth-first over the first L − ``bfs_levels`` layers and
    breadth-first over the rest, whose 2**bfs_levels states go through each layer together in
    batches of ``row_chunk`` rows. The results also fill the game's cache (and its store).
    Returns a :class:`~minilib.games.TabularGame` of the game's utility, indexed by bitmask
    (bit i = layer i).
    """
    from .games import TabularGame, all_coalitions

    n = game.n_players
    if bfs_levels is None:
        bfs_levels = max(0, min(n, int(math.log2(max(1, row_chunk // game.input_ids.shape[0])))))
    if isinstance(bfs_levels, bool) or not isinstance(bfs_levels, int) or not 0 <= bfs_levels <= n:
        raise ValueError(f"bfs_levels must be an int in 0..{n}, got {bfs_levels!r}")
    masks = all_coalitions(n)
    bar = tqdm(total=len(masks), desc="prefix-shared exact values", disable=not progress)

    def done(batch: np.ndarray, losses: np.ndarray) -> None:
        new = np.array([np.packbits(m).tobytes() not in game._loss_cache for m in batch])
        if new.any():
            game._record(batch[new], losses[new])
        bar.update(len(batch))

    forwards = evaluate_masks(game.model, game.input_ids, masks, on_batch=done, mask_batch_size=2 ** bfs_levels,
                              row_chunk=row_chunk, max_logits=game.max_logits)
    bar.close()
    game.layer_forwards += forwards
    game.last_layer_forwards = forwards
    losses = np.array([game._loss_cache[np.packbits(m).tobytes()] for m in masks])
    values = -losses if game.utility == "neg_loss" else np.exp(game.base_loss - losses)
    return TabularGame(values, {"utility": game.utility, "calibration_shape": list(game.input_ids.shape),
                                "base_loss": game.base_loss, "layer_forwards": forwards})
