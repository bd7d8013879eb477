"""Decoder layers of Hugging Face causal LMs: find them, skip them, remove them.

Introduced in chapter 00 (quick start). A *keep-mask* is a boolean vector with one entry
per decoder layer, ``True`` meaning the layer runs. :func:`keep_only` evaluates a model
under a mask by bypassing the dropped layers' forward (weights untouched);
:func:`prune_layers` deletes them for good, in a form that survives
``save_pretrained`` / ``from_pretrained``; :func:`zero_layers` is the paper's
zero-and-restore method, kept only as the reference that tests and benchmarks compare to.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator, Sequence

import numpy as np
import torch

# config.model_type -> attribute path of the decoder-layer ModuleList
_LAYER_PATHS: dict[str, str] = {
    **{t: "model.layers" for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe",
                                   "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2", "granite",
                                   "smollm3")},
    "gpt2": "transformer.h",
    "opt": "model.decoder.layers",
}
# the same families loaded as base models (``AutoModel``), without the LM head
_BASE_LAYER_PATHS: dict[str, str] = {"gpt2": "h", "opt": "decoder.layers"}


def supported_model_types() -> tuple[str, ...]:
    """The ``config.model_type`` values whose decoder layers minilib can find (chapter 00)."""
    return tuple(sorted(_LAYER_PATHS))


def _resolve(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ``ModuleList`` of decoder layers of a supported model (chapter 00).

    LLaMA-family models (LLaMA, Mistral, Qwen2, Gemma, ...) keep them in ``model.model.layers``,
    GPT-2 in ``model.transformer.h``, OPT in ``model.model.decoder.layers``. Anything else is
    refused with a ``ValueError`` rather than guessed at.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _LAYER_PATHS:
        raise ValueError(f"model: unsupported architecture {model_type!r} "
                         f"({type(model).__name__}); supported model_type values: "
                         f"{', '.join(supported_model_types())}")
    for path in (_LAYER_PATHS[model_type], _BASE_LAYER_PATHS.get(model_type, "layers")):
        layers = _resolve(model, path)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ValueError(f"model: a {model_type!r} model without its decoder-layer list at "
                     f"{_LAYER_PATHS[model_type]!r} ({type(model).__name__})")


def as_keep_mask(keep, n_layers: int, name: str = "keep", allow_empty: bool = True,
                 batched: bool = False) -> np.ndarray:
    """Validate a keep-mask and return it as a bool array (chapter 00).

    Accepts bool values, or integers/floats that are exactly 0 or 1. The last axis must have
    ``n_layers`` entries; with ``batched=True`` a 2-D ``(rows, n_layers)`` array is also accepted.
    """
    if isinstance(keep, torch.Tensor):
        keep = keep.detach().cpu().numpy()
    arr = np.asarray(keep)
    if arr.dtype != bool:
        if arr.dtype.kind not in "iuf":
            raise TypeError(f"{name} must hold booleans (or 0/1 numbers), got dtype {arr.dtype}")
        if arr.size and not np.isin(arr, (0, 1)).all():
            bad = arr[~np.isin(arr, (0, 1))].ravel()[:5].tolist()
            raise ValueError(f"{name} must hold only 0/1 (or booleans), found values {bad}")
        arr = arr.astype(bool)
    allowed = (1, 2) if batched else (1,)
    if arr.ndim not in allowed:
        raise ValueError(f"{name} must be a {' or '.join(f'{d}-D' for d in allowed)} mask, "
                         f"got shape {arr.shape}")
    if arr.shape[-1] != n_layers:
        raise ValueError(f"{name} must have one entry per decoder layer ({n_layers}), "
                         f"got {arr.shape[-1]}")
    if not allow_empty and not arr.any(axis=-1).all():
        raise ValueError(f"{name} drops every layer, which is not allowed here")
    return arr


PER_ROW_ARGUMENTS = ("attention_mask", "position_ids", "position_embeddings", "encoder_hidden_states",
                     "encoder_attention_mask")
"""Decoder-layer arguments (besides ``hidden_states``) that hold one slice per batch row (chapter 00).

Each tensor inside them (also inside tuples, lists and dicts, e.g. the ``(cos, sin)`` pair of
``position_embeddings``) has the batch on its first axis, or size 1 there when every row shares
it (``position_ids`` of shape ``(1, T)``). Every other argument (the cache, flags, anything a
model passes through ``**kwargs``) is the same for all rows and is never split or repeated.
"""


def _positional_names(forward, n_args: int) -> list[str | None]:
    """Names of a layer forward's positional arguments after ``hidden_states`` (``None`` where unknown)."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):   # a builtin or C-level callable: no names to go by
        params = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names: list[str | None] = []
    for p in params[1:]:
        if p.kind not in positional:
            break
        names.append(p.name)
    return (names + [None] * n_args)[:n_args]


def _map_rows(name: str, value, fn, batch: int):
    """Apply ``fn`` to every batch-major tensor of the per-row argument ``name`` (tuples, lists, dicts too)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 or value.shape[0] not in (1, batch):
            raise ValueError(f"{name}: a per-row argument needs the batch ({batch}) or 1 on its first axis, "
                             f"got shape {tuple(value.shape)}")
        return fn(value) if value.shape[0] == batch else value   # size 1: shared by every row
    if isinstance(value, (tuple, list)):
        return type(value)(_map_rows(name, v, fn, batch) for v in value)
    if isinstance(value, dict):
        return {k: _map_rows(name, v, fn, batch) for k, v in value.items()}
    raise TypeError(f"{name}: cannot split a {type(value).__name__} by batch rows; per-row masks need "
                    f"tensors here (e.g. attn_implementation='sdpa' or 'eager', not 'flex_attention')")


def map_per_row(forward, args: tuple, kwargs: dict, fn, batch: int) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a decoder-layer call with ``fn`` applied to its per-row tensors (chapter 00).

    ``args`` are the positional arguments after ``hidden_states``, named through ``forward``'s
    signature; only :data:`PER_ROW_ARGUMENTS` are touched, and in them only tensors whose first
    axis is ``batch`` (size-1 ones broadcast over the rows and stay as they are). How
    :func:`keep_only` gives a layer a subset of the rows and how
    :func:`~minilib.evaluation.evaluate_masks` stacks several copies of one calibration batch.
    """
    names = _positional_names(forward, len(args))
    new_args = tuple(_map_rows(n, a, fn, batch) if n in PER_ROW_ARGUMENTS else a for n, a in zip(names, args))
    new_kwargs = {k: _map_rows(k, v, fn, batch) if k in PER_ROW_ARGUMENTS else v for k, v in kwargs.items()}
    return new_args, new_kwargs


def _masked_forward(original, row_keep: torch.Tensor | None):
    """A forward that runs ``original`` only on the rows whose keep flag is set.

    ``row_keep=None`` means the layer is dropped for every row: the input passes through.
    """

    def forward(hidden_states, *args, **kwargs):
        if row_keep is None:
            return hidden_states
        batch = hidden_states.shape[0]
        if row_keep.numel() != batch:
            raise ValueError(f"keep has {row_keep.numel()} rows but the batch has {batch}")
        if bool(row_keep.all()):
            return original(hidden_states, *args, **kwargs)
        rows = row_keep.nonzero().flatten().to(hidden_states.device)
        sub_args, sub_kwargs = map_per_row(original, args, kwargs,
                                           lambda t: t.index_select(0, rows.to(t.device)), batch)
        out = original(hidden_states.index_select(0, rows), *sub_args, **sub_kwargs)
        first = out[0] if isinstance(out, tuple) else out
        # under accelerate's device_map the layer may have run on another device than its input
        merged = hidden_states.to(first.device).index_copy(0, rows.to(first.device), first.to(hidden_states.dtype))
        return (merged, *out[1:]) if isinstance(out, tuple) else merged

    forward.__wrapped__ = original   # inspect.signature (and map_per_row) see the layer's own argument names
    return forward


@contextlib.contextmanager
def keep_only(model: torch.nn.Module, keep) -> Iterator[torch.nn.Module]:
    """Run ``model`` with only the layers where ``keep`` is true (chapter 00).

    ``keep`` is a bool sequence of length L, or a ``(batch, L)`` array giving each row of the
    next forward its own mask (how :class:`~minilib.evaluation.LayerGame` evaluates many
    masks in one pass). Dropped layers are bypassed: their input is passed on unchanged, which
    is exactly what a pre-norm residual block computes with all its weights zeroed, at none of
    the cost. No weight is copied or modified, and the model is restored on exit, also when
    the body raises. An all-``False`` mask is allowed: embeddings go straight to the head.
    """
    layers = decoder_layers(model)
    mask = as_keep_mask(keep, len(layers), batched=True)
    replace = {}
    for i in range(len(layers)):
        column = mask[..., i]
        if not column.all():
            row_keep = torch.from_numpy(np.atleast_1d(column).copy()) if mask.ndim == 2 and column.any() else None
            replace[i] = lambda original, row_keep=row_keep: _masked_forward(original, row_keep)
    with patched_forwards(layers, replace):
        yield model


@contextlib.contextmanager
def patched_forwards(layers: torch.nn.ModuleList, replace: dict) -> Iterator[None]:
    """Temporarily replace ``layers[i].forward`` by ``replace[i](original_forward)`` (chapter 00).

    The one mechanism behind :func:`keep_only` and the head evaluation of
    :mod:`minilib.evaluation`: an instance-level ``forward`` (accelerate's hooks install one) is
    wrapped and put back on exit, also when the body raises; a class-level one is uncovered again.
    """
    saved = []
    try:
        for i, make in replace.items():
            layer = layers[i]
            saved.append((layer, layer.__dict__.get("forward")))
            layer.forward = make(layer.forward)
        yield
    finally:
        for layer, previous in reversed(saved):
            if previous is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = previous


@contextlib.contextmanager
def zero_layers(model: torch.nn.Module, drop) -> Iterator[torch.nn.Module]:
    """The paper's reference method: zero every parameter of the dropped layers, then restore.

    Kept only to check :func:`keep_only` against and to benchmark it (chapter 00). For
    pre-norm blocks (LLaMA, GPT-2, OPT with ``do_layer_norm_before``) a zeroed block adds
    nothing to the residual stream, so the function equals skipping, but every forward still
    runs all L layers and each call clones and restores the dropped layers' weights.
    ``drop`` is a bool mask of length L (``True`` = zero this layer) or a list of indices.
    """
    layers = decoder_layers(model)
    indices = _drop_indices(drop, len(layers), allow_all=True)
    backups = []
    try:
        with torch.no_grad():
            for i in indices:
                for p in layers[i].parameters():
                    backups.append((p, p.detach().clone()))
                    p.zero_()
        yield model
    finally:
        with torch.no_grad():
            for p, saved in backups:
                p.copy_(saved)


def _drop_indices(drop, n_layers: int, allow_all: bool) -> list[int]:
    """Normalise ``drop`` (bool mask of length L, or layer indices) to sorted unique indices."""
    arr = np.asarray(drop.detach().cpu() if isinstance(drop, torch.Tensor) else drop)
    if arr.dtype == bool:
        indices = np.flatnonzero(as_keep_mask(arr, n_layers, name="drop")).tolist()
    else:
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"drop must be a bool mask or integer layer indices, got dtype {arr.dtype}")
        indices = sorted({int(i) for i in arr.ravel()})
        bad = [i for i in indices if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"drop holds layer indices outside 0..{n_layers - 1}: {bad}")
    if not allow_all and len(indices) >= n_layers:
        raise ValueError(f"drop removes all {n_layers} layers; at least one must remain")
    return indices


def prune_layers(model: torch.nn.Module, drop) -> torch.nn.Module:
    """Delete the ``drop`` layers for good, in place, and return the model (chapter 00).

    Besides removing the modules, it renumbers each remaining layer's ``layer_idx`` (used by the
    KV cache), sets ``config.num_hidden_layers`` and updates the config's known per-layer keys
    (``layer_types``, ``no_rope_layers``, the indices in ``mlp_only_layers``, the
    ``max_window_layers`` threshold, ...; see :func:`_shorten_config`), so that
    ``save_pretrained`` then ``from_pretrained`` rebuilds exactly this model: without the config
    update, reloading would create the old number of layers and fill the missing ones with random
    weights. Other lists in the config (e.g. ``eos_token_id``) are never touched.
    """
    layers = decoder_layers(model)
    n_before = len(layers)
    indices = set(_drop_indices(drop, n_before, allow_all=False))
    if not indices:
        return model
    _check_renumbering_is_faithful(model.config, n_before, indices)
    kept = [layer for i, layer in enumerate(layers) if i not in indices]
    for i in sorted(indices, reverse=True):
        del layers[i]
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    _shorten_config(model.config, n_before, indices)
    return model


def _check_renumbering_is_faithful(config, n_before: int, dropped: set[int]) -> None:
    """Refuse a pruning that would change what a kept layer computes once it is renumbered.

    GPT-2 with ``scale_attn_by_inverse_layer_idx=True`` scales layer i's attention by
    1/(i+1), fixed from ``layer_idx`` when the layer is built: a kept layer that moves to a
    lower index would compute something else after ``from_pretrained``, and no config can say
    otherwise. Dropping only trailing layers moves nothing and stays allowed.
    """
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and dropped:
        moved = [i for i in range(min(dropped), n_before) if i not in dropped]
        if moved:
            raise ValueError(f"drop: this model scales attention by 1/(layer_idx+1) "
                             f"(config.scale_attn_by_inverse_layer_idx=True), so renumbering layers "
                             f"{moved} would change them after save_pretrained/from_pretrained; "
                             f"only trailing layers can be removed (use keep_only to skip others)")


PER_LAYER_KEYS = ("layer_types", "no_rope_layers", "mlp_layer_types", "sliding_window_pattern")
"""Config lists with one entry per layer (chapter 00): ``layer_types`` (Qwen2, Qwen3, Gemma2, Gemma3,
OLMo3, Ministral, SmolLM3, ...), ``no_rope_layers`` (SmolLM3, Llama 4: 1 = RoPE, 0 = NoPE),
``mlp_layer_types`` (dense/sparse per layer) and ``sliding_window_pattern`` when it is a list (as an
int or a string it is a period that only builds ``layer_types``, which the config then holds, and
is left alone). Entries past the last layer (Llama 4 allows a longer ``no_rope_layers``) stay."""

LAYER_INDEX_KEYS = ("mlp_only_layers", "moe_layers")
"""Config lists of layer *indices* (chapter 00): ``mlp_only_layers`` (Qwen2-MoE, Qwen3-MoE: dense
layers) and ``moe_layers`` (Llama 4). Removed layers leave them; the rest are renumbered."""

LAYER_COUNT_KEYS = ("max_window_layers",)
"""Config thresholds k meaning "layers with index < k" (chapter 00): ``max_window_layers`` (Qwen2,
Qwen3, Qwen2-MoE: which layers use sliding-window attention). Lowered by the removed layers below k."""


def _shorten_config(config, n_before: int, dropped: set[int]) -> None:
    """Update the layer count and the per-layer keys of ``config`` (and of its text config) after a pruning.

    Only the known keys change (:data:`PER_LAYER_KEYS`, :data:`LAYER_INDEX_KEYS`,
    :data:`LAYER_COUNT_KEYS`, and ``decoder_sparse_step``); any other list, e.g. a 3-layer model's
    ``eos_token_id=[1, 2, 7]``, is left exactly as it was.
    """
    kept = [i for i in range(n_before) if i not in dropped]
    new_index = {old: new for new, old in enumerate(kept)}
    _keep_sparse_layers(config, n_before)
    for key in PER_LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) >= n_before:
            setattr(config, key, type(value)(v for i, v in enumerate(value) if i not in dropped))
    for key in LAYER_INDEX_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)):
            setattr(config, key, type(value)(new_index[int(i)] for i in value if int(i) in new_index))
    for key in LAYER_COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(config, key, value - sum(1 for i in dropped if i < value))
    config.num_hidden_layers = n_before - len(dropped)
    sub = getattr(config, "get_text_config", None)
    text_config = sub() if callable(sub) else None
    if text_config is not None and text_config is not config:
        _shorten_config(text_config, n_before, dropped)


def _keep_sparse_layers(config, n_before: int) -> None:
    """Qwen-MoE's ``decoder_sparse_step`` s makes layer i sparse when (i + 1) % s == 0: a rule on the index
    that renumbering breaks. Replace it by s = 1 and list every kept dense layer in ``mlp_only_layers``."""
    step = getattr(config, "decoder_sparse_step", None)
    if not isinstance(step, int) or step <= 1 or not hasattr(config, "mlp_only_layers"):
        return
    dense = set(config.mlp_only_layers or ())
    config.mlp_only_layers = [i for i in range(n_before) if i in dense or (i + 1) % step != 0]
    config.decoder_sparse_step = 1
