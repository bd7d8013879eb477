"""What pruning buys: parameters, checkpoint bytes, peak memory, prefill latency, decode throughput.

Introduced in chapter 07. Removing k of L decoder layers removes their weights exactly, but what
that is worth in memory and time depends on the model and the device (the embedding and the head
do not shrink; small models on a CPU are bound by overheads). So this module *measures*, on
the device the model is on: :func:`measure` gives one model's :class:`Efficiency`, and
:func:`compare` puts a dense model and its pruned variants side by side with ratios, timing
them round-robin so that drift in the machine's load affects all of them alike.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple

import numpy as np
import torch

from .evaluation import input_device
from .layers import decoder_layers


def parameter_count(model: torch.nn.Module) -> int:
    """Number of distinct parameters; tied weights (embedding = head) count once (chapter 07)."""
    return sum(p.numel() for p in model.parameters())


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct parameters as stored (chapter 07), quantized tensors included (chapter 08)."""
    from .quantization import stored_bytes

    return stored_bytes(model)


def _buffer_bytes(model: torch.nn.Module) -> int:
    from .quantization import stored_bytes

    return stored_bytes(model, buffers=True) - stored_bytes(model)


class CheckpointSize(NamedTuple):
    """Size of a ``save_pretrained`` checkpoint's safetensors files (chapter 07).

    ``file_bytes`` is what the files take on disk; ``tensor_bytes`` is their tensor data alone,
    i.e. without each file's 8-byte length prefix and JSON header.
    """

    file_bytes: int
    tensor_bytes: int


def checkpoint_size(model: torch.nn.Module) -> CheckpointSize:
    """Save the model with ``save_pretrained`` to a temporary folder and size its safetensors files (chapter 07).

    This is the checkpoint a reader would ship; for a 7B model it writes ~13 GB (bf16) to the
    temporary folder, which is deleted afterwards. A model quantized after loading with
    :func:`minilib.quantization.quantize` cannot be written as safetensors; its size is that of
    ``torch.save(state_dict)`` (:func:`minilib.quantization.serialized_bytes`), with
    ``tensor_bytes`` the stored bytes of its parameters and buffers (chapter 08).
    """
    from .quantization import quantized_modules, serialized_bytes, stored_bytes

    if quantized_modules(model) and getattr(model, "hf_quantizer", None) is None:
        return CheckpointSize(serialized_bytes(model), stored_bytes(model, buffers=True))
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"model must be a Hugging Face PreTrainedModel with save_pretrained, "
                         f"got {type(model).__name__}")
    with tempfile.TemporaryDirectory(prefix="minilib-ckpt-") as tmp:
        model.save_pretrained(tmp)
        files = sorted(Path(tmp).glob("*.safetensors"))
        if not files:
            raise RuntimeError("save_pretrained wrote no .safetensors file")
        file_bytes = tensor_bytes = 0
        for path in files:
            with open(path, "rb") as f:
                (header,) = struct.unpack("<Q", f.read(8))
            size = path.stat().st_size
            file_bytes += size
            tensor_bytes += size - 8 - header
    return CheckpointSize(file_bytes, tensor_bytes)


class MemoryPeak(NamedTuple):
    """Peak memory of one forward, split into resident weights and the call's own peak (chapter 07).

    ``weights_bytes`` are the parameters and buffers; ``activation_bytes`` is the highest amount
    of memory the call allocated beyond what was allocated when it started (activations, the KV
    cache it returns, the logits, workspace); ``peak_bytes`` is their sum. ``method`` names the
    counter that was read.
    """

    weights_bytes: int
    activation_bytes: int
    method: str

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines), nothing else."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_allocation_peak(fn) -> int:
    """Peak of PyTorch's CPU allocator total during ``fn()``, above its value at the start.

    With ``profile_memory=True`` the profiler records every CPU allocation and free together with
    the allocator's running total (``total_allocated``); the peak is the largest total minus the
    total before the first event.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocations.append(node)
    if not allocations:
        return 0
    allocations.sort(key=lambda n: n.start_time_ns)
    first = allocations[0].extra_fields
    start = first.total_allocated - first.alloc_size
    return max(0, max(n.extra_fields.total_allocated for n in allocations) - start)


def peak_forward_memory(model: torch.nn.Module, input_ids: torch.Tensor) -> MemoryPeak:
    """Peak memory of the prefill forward ``model(input_ids, use_cache=True)`` (chapter 07).

    What is measured, exactly: bytes requested from PyTorch's allocator for tensors, not the
    process's resident memory. ``weights_bytes`` counts parameters and buffers. On CUDA,
    ``activation_bytes`` is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
    minus ``memory_allocated`` before the call. On CPU, where ``tracemalloc`` does not see
    PyTorch's allocations and resident-set size includes the allocator's cached pages, it is the
    peak of the CPU allocator's running total that ``torch.profiler`` (``profile_memory=True``)
    records for every allocation during the call, minus the total at the start. Both include the
    KV cache and last-position logits the call returns; neither counts allocator caching or
    fragmentation, the Python heap, or library code.
    """
    weights = parameter_bytes(model) + _buffer_bytes(model)
    ids = _check_ids(input_ids).to(input_device(model))
    kwargs = _prefill_kwargs(model)

    def forward() -> None:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=True, **kwargs)

    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)
        torch.cuda.reset_peak_memory_stats(ids.device)
        before = torch.cuda.memory_allocated(ids.device)
        forward()
        torch.cuda.synchronize(ids.device)
        return MemoryPeak(weights, torch.cuda.max_memory_allocated(ids.device) - before,
                          "torch.cuda.max_memory_allocated")
    if ids.device.type != "cpu":
        raise ValueError(f"model: peak memory is measured on cpu and cuda only, not {ids.device.type!r}")
    return MemoryPeak(weights, _cpu_allocation_peak(forward), "torch.profiler CPU allocator total")


def _check_ids(input_ids) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.numel() == 0 \
            or input_ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"input_ids must be a non-empty 2-D integer tensor (batch, tokens), got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    return input_ids.long()


def _prefill_kwargs(model) -> dict:
    """Only the last position's logits are needed to pick the first token (as ``generate`` does)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _cache_kwarg(model) -> str:
    """transformers 5 renamed the forward's ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate_once(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds for the prefill (prompt -> first token) and for ``new_tokens`` greedy decode steps."""
    device, cache_kw = ids.device, _cache_kwarg(model)
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **_prefill_kwargs(model))
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **{cache_kw: _returned_cache(out)})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


@dataclass(frozen=True)
class Efficiency:
    """One model's size, memory and speed as measured by :func:`measure` (chapter 07).

    Sizes: ``n_params`` and ``param_bytes`` (distinct parameters), ``checkpoint_bytes`` and
    ``checkpoint_tensor_bytes`` (:func:`checkpoint_size`; ``-1`` if not measured). Memory:
    ``peak_memory_bytes`` = ``weights_bytes`` + ``activation_bytes`` of the prefill forward
    (:func:`peak_forward_memory`, ``memory_method`` says which counter). Speed: ``prefill_ms`` is
    the median time to first token for ``batch_size`` prompts of ``prompt_tokens`` tokens;
    ``decode_tokens_per_s`` the median throughput of ``new_tokens`` greedy steps with the KV cache
    (``batch_size * new_tokens / seconds``); ``*_iqr`` are the interquartile ranges over
    ``repeats`` runs, whose raw values are kept in ``prefill_samples_ms`` and ``decode_samples``.
    """

    name: str
    device: str
    dtype: str
    n_layers: int
    n_params: int
    param_bytes: int
    checkpoint_bytes: int
    checkpoint_tensor_bytes: int
    weights_bytes: int
    activation_bytes: int
    peak_memory_bytes: int
    memory_method: str
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    repeats: int
    prefill_ms: float
    prefill_ms_iqr: float
    decode_tokens_per_s: float
    decode_tokens_per_s_iqr: float
    prefill_samples_ms: tuple[float, ...] = field(repr=False, default=())
    decode_samples: tuple[float, ...] = field(repr=False, default=())

    def as_dict(self, samples: bool = False) -> dict:
        """The fields as a dict, without the raw timing samples unless ``samples=True`` (chapter 07)."""
        d = asdict(self)
        if not samples:
            d.pop("prefill_samples_ms")
            d.pop("decode_samples")
        return d


def _iqr(x: np.ndarray) -> float:
    q75, q25 = np.percentile(x, [75, 25])
    return float(q75 - q25)


def _validate(prompt_tokens, new_tokens, batch_size, repeats, warmup) -> None:
    for name, value, low in (("prompt_tokens", prompt_tokens, 1), ("new_tokens", new_tokens, 1),
                             ("batch_size", batch_size, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _prompt(model, prompt_tokens: int, new_tokens: int, batch_size: int, seed: int) -> torch.Tensor:
    """Random token ids (the content does not change the cost of a dense forward)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and prompt_tokens + new_tokens > limit:
        raise ValueError(f"prompt_tokens + new_tokens ({prompt_tokens} + {new_tokens}) exceeds the model's "
                         f"max_position_embeddings ({limit})")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(config.vocab_size), (batch_size, prompt_tokens), generator=generator)
    return ids.to(input_device(model))


def _measure_all(models: Mapping[str, torch.nn.Module], prompt_tokens: int, new_tokens: int, batch_size: int,
                 repeats: int, warmup: int, checkpoint: bool, seed: int, progress: bool) -> dict[str, Efficiency]:
    from tqdm.auto import tqdm

    _validate(prompt_tokens, new_tokens, batch_size, repeats, warmup)
    ids = {name: _prompt(m, prompt_tokens, new_tokens, batch_size, seed) for name, m in models.items()}
    for name, m in models.items():
        for _ in range(warmup):
            _generate_once(m, ids[name], new_tokens)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    steps = tqdm(total=repeats * len(models), desc="timing", disable=not progress, leave=False)
    for _ in range(repeats):  # round-robin: a change in the machine's load hits every model alike
        for name, m in models.items():
            times[name].append(_generate_once(m, ids[name], new_tokens))
            steps.update()
    steps.close()
    results = {}
    for name, m in models.items():
        prefill = np.array([t[0] for t in times[name]]) * 1e3
        decode = batch_size * new_tokens / np.array([t[1] for t in times[name]])
        memory = peak_forward_memory(m, ids[name])
        ckpt = checkpoint_size(m) if checkpoint else CheckpointSize(-1, -1)
        results[name] = Efficiency(
            name=name, device=str(ids[name].device), dtype=str(next(m.parameters()).dtype).removeprefix("torch."),
            n_layers=len(decoder_layers(m)), n_params=parameter_count(m), param_bytes=parameter_bytes(m),
            checkpoint_bytes=ckpt.file_bytes, checkpoint_tensor_bytes=ckpt.tensor_bytes,
            weights_bytes=memory.weights_bytes, activation_bytes=memory.activation_bytes,
            peak_memory_bytes=memory.peak_bytes, memory_method=memory.method, batch_size=batch_size,
            prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats,
            prefill_ms=float(np.median(prefill)), prefill_ms_iqr=_iqr(prefill),
            decode_tokens_per_s=float(np.median(decode)), decode_tokens_per_s_iqr=_iqr(decode),
            prefill_samples_ms=tuple(prefill.tolist()), decode_samples=tuple(decode.tolist()))
    return results


def measure(model: torch.nn.Module, name: str = "model", prompt_tokens: int = 128, new_tokens: int = 32,
            batch_size: int = 1, repeats: int = 5, warmup: int = 1, checkpoint: bool = True,
            seed: int = 0) -> Efficiency:
    """Measure one model on the device it is on and return its :class:`Efficiency` (chapter 07).

    ``warmup`` untimed runs, then ``repeats`` timed runs of: prefill of ``batch_size`` random
    prompts of ``prompt_tokens`` tokens (``seed``), then ``new_tokens`` greedy decode steps with
    the KV cache, under ``torch.inference_mode`` and with ``torch.cuda.synchronize`` around each
    timed span on a GPU. Medians and IQRs are reported; ``checkpoint=False`` skips writing the
    checkpoint (sizes then read ``-1``).
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return _measure_all({name: model}, prompt_tokens, new_tokens, batch_size, repeats, warmup, checkpoint,
                        seed, progress=False)[name]


def compare(models: Mapping[str, torch.nn.Module], reference: str | None = None, progress: bool = True,
            **kwargs):
    """Measure several models (e.g. dense and pruned) and tabulate them with ratios (chapter 07).

    ``models`` maps a row name to a model; ``reference`` (default: the first) is the row the
    ratios divide by. Returns a ``pandas.DataFrame`` indexed by name with the columns of
    :meth:`Efficiency.as_dict` plus ``params_ratio``, ``checkpoint_ratio``, ``peak_memory_ratio``
    (each this model / reference: below 1 is smaller), ``prefill_speedup`` (reference's latency /
    this one's) and ``decode_speedup`` (this model's tokens/s / reference's): above 1 is faster.
    Timing is round-robin over the models, one run each per repeat. Other keyword arguments are
    those of :func:`measure`.
    """
    import pandas as pd

    if not isinstance(models, Mapping) or not models:
        raise ValueError(f"models must be a non-empty mapping of name -> model, got {type(models).__name__}")
    bad = [name for name, m in models.items() if not isinstance(m, torch.nn.Module)]
    if bad:
        raise ValueError(f"models: {bad} are not torch.nn.Module instances")
    reference = next(iter(models)) if reference is None else reference
    if reference not in models:
        raise ValueError(f"reference must be one of {list(models)}, got {reference!r}")
    defaults = dict(prompt_tokens=128, new_tokens=32, batch_size=1, repeats=5, warmup=1, checkpoint=True, seed=0)
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"compare() got unexpected keyword arguments {sorted(unknown)}")
    results = _measure_all(dict(models), **{**defaults, **kwargs}, progress=progress)
    frame = pd.DataFrame([r.as_dict() for r in results.values()]).set_index("name")
    ref = frame.loc[reference]
    frame["params_ratio"] = frame["n_params"] / ref["n_params"]
    checkpoint = frame["checkpoint_bytes"].where(frame["checkpoint_bytes"] >= 0)  # -1: not measured
    frame["checkpoint_ratio"] = checkpoint / checkpoint.loc[reference]
    frame["peak_memory_ratio"] = frame["peak_memory_bytes"] / ref["peak_memory_bytes"]
    frame["prefill_speedup"] = ref["prefill_ms"] / frame["prefill_ms"]
    frame["decode_speedup"] = frame["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
    return frame
