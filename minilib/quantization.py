"""Quantizing a (pruned, healed) model: torchao on any device, bitsandbytes 4-bit on a GPU.

Introduced in chapter 08. Layer removal and weight quantization shrink different things: the
first removes whole blocks, the second stores every remaining linear weight in fewer bits.
:func:`quantize` applies torchao's weight-only schemes in place of the ``nn.Linear`` weights of a
loaded model (``"int8"``: one scale per output row; ``"int4"``: 4-bit values with one scale per
group of ``group_size`` inputs), which runs on a CPU. On a GPU, :func:`bitsandbytes_config` gives
transformers' ``BitsAndBytesConfig`` (NF4, FP4 or 8-bit) for quantizing at load time through
:func:`minilib.models.load_model`. :func:`stored_bytes` counts what a model's weights really take,
looking inside quantized tensor types, and :func:`serialized_bytes` what its state dict takes on disk.
"""

from __future__ import annotations

import copy
import importlib.util
import io
from typing import Sequence

import torch

TORCHAO_PIP = 'pip install "torchao>=0.10"  # or: pip install "minilib[quant]"'
BITSANDBYTES_PIP = 'pip install "bitsandbytes>=0.43"  # or: pip install "minilib[gpu]"'
TORCHAO_METHODS = ("int8", "int4")
BITSANDBYTES_METHODS = ("nf4", "fp4", "int8")


class BackendUnavailableError(ImportError):
    """The quantization backend asked for cannot run here (chapter 08); the message says why and what to do."""


def _torchao():
    if importlib.util.find_spec("torchao") is None:
        raise BackendUnavailableError(f"backend 'torchao' is not installed: {TORCHAO_PIP}")
    import torchao.quantization as quantization

    return quantization


def torchao_config(method: str = "int8", group_size: int = 32):
    """The torchao ``quantize_`` config for ``method`` (chapter 08).

    ``"int8"``: ``Int8WeightOnlyConfig`` (symmetric int8, one scale per output row). ``"int4"``:
    ``IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))``, the int4
    scheme whose kernels run on a CPU; it keeps each 4-bit value in a byte, so it saves no memory
    over int8 on a CPU (it measures what 4-bit *precision* costs in quality).
    """
    if method not in TORCHAO_METHODS:
        raise ValueError(f"method must be one of {TORCHAO_METHODS} for torchao, got {method!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    q = _torchao()
    if method == "int8":
        return q.Int8WeightOnlyConfig()
    from torchao.quantization.granularity import PerGroup

    return q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))


def quantize(model: torch.nn.Module, method: str = "int8", *, group_size: int = 32,
             skip: Sequence[str] = ("lm_head",), inplace: bool = False) -> torch.nn.Module:
    """Quantize the weights of ``model``'s linear layers with torchao, weight-only (chapter 08).

    ``skip`` lists module names left in full precision: by default the output head, which most
    LLaMA-class models tie to the embedding (quantizing it would untie them and *add* a copy).
    Linear layers whose input width is not a multiple of ``group_size`` are skipped for
    ``"int4"``. Returns a quantized copy unless ``inplace=True``; it evaluates, prunes and scores
    like the original (e.g. in :class:`minilib.evaluation.LayerGame`).
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(skip, str):
        raise ValueError(f"skip must be a sequence of module names, got the str {skip!r}")
    config = torchao_config(method, group_size)
    target = model if inplace else copy.deepcopy(model)
    skipped = set(skip)

    def wanted(module: torch.nn.Module, name: str) -> bool:
        if not isinstance(module, torch.nn.Linear) or name in skipped or name.rsplit(".", 1)[-1] in skipped:
            return False
        return method != "int4" or module.in_features % group_size == 0

    if not any(wanted(m, n) for n, m in target.named_modules()):
        raise ValueError(f"model has no linear layer left to quantize after skip={list(skip)!r}")
    _torchao().quantize_(target, config, filter_fn=wanted)
    return target.eval()


def quantized_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules whose weight is a quantized tensor (torchao or bitsandbytes) (chapter 08)."""
    names = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and _is_quantized(weight):
            names.append(name)
    return names


def _is_quantized(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, torch.nn.Parameter) or t.dtype in (torch.uint8, torch.int8)


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really stores: inner tensors of a torchao subclass, a bitsandbytes quant state."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    total = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)          # bitsandbytes Params4bit: absmax (+ nested state)
    for part in ("absmax", "offset"):
        inner = getattr(state, part, None)
        if isinstance(inner, torch.Tensor):
            total += inner.numel() * inner.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None and isinstance(getattr(nested, "absmax", None), torch.Tensor):
        total += nested.absmax.numel() * nested.absmax.element_size()
    return total


def stored_bytes(model: torch.nn.Module, buffers: bool = False) -> int:
    """Bytes the model's distinct parameters (and, with ``buffers=True``, buffers) take in memory (chapter 08).

    Unlike ``numel * element_size``, this looks inside quantized tensor types (torchao's qdata,
    scales and zero points; bitsandbytes' packed bytes and absmax), and counts tied weights once.
    """
    seen, total = set(), 0
    tensors = list(model.parameters()) + (list(model.buffers()) if buffers else [])
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += _tensor_bytes(t)
    return total


def serialized_bytes(model: torch.nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())`` in bytes: the checkpoint of a torchao-quantized model (chapter 08).

    ``save_pretrained`` writes safetensors, which cannot hold torchao's tensor types when the model
    was quantized after loading; ``torch.save`` (the format torchao documents) can. For an
    unquantized model this is within a few kB of the safetensors checkpoint.
    """
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def bitsandbytes_config(method: str = "nf4", compute_dtype: torch.dtype = torch.bfloat16,
                        double_quant: bool = True):
    """transformers' ``BitsAndBytesConfig`` for loading a model quantized on a GPU (chapter 08).

    ``"nf4"`` (QLoRA's 4-bit NormalFloat) or ``"fp4"`` with ``compute_dtype`` matmuls and, with
    ``double_quant``, quantized scales; ``"int8"``: LLM.int8(). Pass the result to
    ``minilib.models.load_model(source, quantization_config=..., device_map="cuda")``. Raises
    :class:`BackendUnavailableError` where bitsandbytes or a CUDA GPU is missing.
    """
    if method not in BITSANDBYTES_METHODS:
        raise ValueError(f"method must be one of {BITSANDBYTES_METHODS} for bitsandbytes, got {method!r}")
    if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
        raise ValueError(f"compute_dtype must be a floating torch.dtype, got {compute_dtype!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BackendUnavailableError(f"backend 'bitsandbytes' is not installed: {BITSANDBYTES_PIP}")
    if not torch.cuda.is_available():
        raise BackendUnavailableError("backend 'bitsandbytes' needs a CUDA GPU and none is visible; on a CPU use "
                                      "minilib.quantization.quantize(model, 'int8') (torchao)")
    from transformers import BitsAndBytesConfig

    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=double_quant)
