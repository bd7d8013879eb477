"""Healing a pruned model: a short LoRA fine-tune with upstream ``peft``, merged back into the weights.

Introduced in chapter 08. Removing layers costs quality; Shortened LLaMA, LLM-Streamline and the
paper's recovery experiments win much of it back with a brief low-rank fine-tune. :func:`heal`
does exactly that with ``peft`` (``LoraConfig`` -> ``get_peft_model`` -> train -> ``merge_and_unload``):
a fixed number of steps, seeded batches drawn from text disjoint from the calibration set, a
progress bar and a loss curve. The result is a plain ``PreTrainedModel`` again (the adapters
merged into the weights), so it saves, reloads, prunes and evaluates like any other model.
:func:`save_adapter` / :func:`load_adapter` ship the small adapter instead of the whole model.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .evaluation import input_device
from .layers import decoder_layers

PEFT_PIP = 'pip install "peft>=0.13"  # or: pip install "minilib[heal]"'
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class MissingPeftError(ImportError):
    """``peft`` is not installed (chapter 08); the message holds the ``pip install`` command."""


def _peft():
    if importlib.util.find_spec("peft") is None:
        raise MissingPeftError(f"healing needs the peft package: {PEFT_PIP}")
    import peft

    return peft


@dataclass(frozen=True)
class HealingSpec:
    """How to heal (chapter 08): the LoRA shape and a fixed, seeded training run.

    ``rank`` and ``alpha`` set the adapters ``B @ A`` (scaled by ``alpha / rank``) added to every
    linear layer whose name ends in one of ``target_modules``; ``steps`` AdamW steps of
    ``batch_size`` rows each, learning rate ``lr`` with ``warmup`` linear warm-up steps (default
    ``steps // 10``) and a cosine decay to zero, gradients clipped at ``max_grad_norm``. ``seed`` fixes the adapters'
    initialisation and the order of the batches.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LLAMA_TARGETS
    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.warmup is not None and (not isinstance(self.warmup, int) or isinstance(self.warmup, bool)
                                        or not 0 <= self.warmup < self.steps):
            raise ValueError(f"warmup must be None (steps // 10) or an int in [0, steps={self.steps}), "
                             f"got {self.warmup!r}")
        for name in ("alpha", "lr", "max_grad_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0 <= self.weight_decay:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if isinstance(self.target_modules, str) or not self.target_modules \
                or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty sequence of module names such as "
                             f"{LLAMA_TARGETS}, got {self.target_modules!r}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def warmup_steps(self) -> int:
        """The warm-up length in steps: ``warmup``, or ``steps // 10`` when it is None."""
        return self.steps // 10 if self.warmup is None else self.warmup


@dataclass
class HealingResult:
    """What :func:`heal` returns (chapter 08).

    ``model`` is the healed model with the adapters merged (a plain ``PreTrainedModel``, eval
    mode); ``history`` holds ``(step, train_loss)`` for every step and ``eval_history`` holds
    ``(step, eval_loss)`` at step 0 and every ``eval_every`` steps when evaluation ids were given;
    ``trainable_params`` is the adapters' size; ``seconds`` the training wall time.
    """

    model: torch.nn.Module
    spec: HealingSpec
    history: list[tuple[int, float]]
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        """Spec and headline numbers as a plain dict (for manifests and tables)."""
        out = {"spec": asdict(self.spec), "trainable_params": self.trainable_params,
               "total_params": self.total_params, "seconds": round(self.seconds, 1),
               "first_train_loss": self.history[0][1], "last_train_loss": self.history[-1][1]}
        if self.eval_history:
            out["eval_loss_before"], out["eval_loss_after"] = self.eval_history[0][1], self.eval_history[-1][1]
        return out


def linear_module_names(model: torch.nn.Module) -> tuple[str, ...]:
    """The distinct short names of the linear layers inside the decoder layers (chapter 08).

    These are the names ``target_modules`` may use (``q_proj``, ``down_proj``, ... on LLaMA).
    """
    names = {name.rsplit(".", 1)[-1] for name, module in decoder_layers(model).named_modules()
             if isinstance(module, torch.nn.Linear)}
    return tuple(sorted(names))


def lora_config(model: torch.nn.Module, spec: HealingSpec):
    """A ``peft.LoraConfig`` for ``spec``, after checking its target modules exist in ``model`` (chapter 08)."""
    peft = _peft()
    available = linear_module_names(model)
    unknown = [t for t in spec.target_modules if t not in available]
    if unknown:
        raise ValueError(f"target_modules: {unknown} name no linear layer of this model's decoder layers; "
                         f"accepted: {list(available)}")
    return peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                           target_modules=list(spec.target_modules), bias="none", task_type="CAUSAL_LM")


def _check_ids(name: str, ids) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2 \
            or ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"{name} must be a 2-D integer tensor (rows, tokens) with at least one row of "
                         f"at least 2 tokens, got {getattr(ids, 'shape', type(ids).__name__)}")
    return ids.long()


def _lr_factor(step: int, spec: HealingSpec) -> float:
    warmup = spec.warmup_steps
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, spec.steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def mean_loss(model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss (nats per token) of ``model`` over the rows of ``input_ids`` (chapter 08)."""
    ids = _check_ids("input_ids", input_ids)
    was_training = model.training
    model.eval()
    device, total, count = input_device(model), 0.0, 0
    for start in range(0, ids.shape[0], batch_size):
        chunk = ids[start:start + batch_size].to(device)
        out = model(input_ids=chunk, labels=chunk)
        n = chunk.numel() - chunk.shape[0]
        total += float(out.loss) * n
        count += n
    model.train(was_training)
    return total / count


def _train_loop(peft_model, train_ids: torch.Tensor, spec: HealingSpec, eval_ids, eval_every: int,
                progress: bool) -> tuple[list[tuple[int, float]], list[tuple[int, float]], float]:
    """AdamW on the adapters for ``spec.steps`` seeded batches; returns the two loss curves and the seconds."""
    from tqdm.auto import tqdm

    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=spec.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, spec))
    order = torch.Generator().manual_seed(spec.seed)
    device = input_device(peft_model)
    history: list[tuple[int, float]] = []
    eval_history: list[tuple[int, float]] = []
    if eval_ids is not None:
        eval_history.append((0, mean_loss(peft_model, eval_ids)))
    start = time.perf_counter()
    peft_model.train()
    bar = tqdm(range(spec.steps), desc="healing (LoRA)", disable=not progress)
    for step in bar:
        rows = torch.randint(train_ids.shape[0], (spec.batch_size,), generator=order)
        batch = train_ids[rows].to(device)
        loss = peft_model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"healing diverged at step {step + 1} (loss {float(loss)}); "
                                     f"lower spec.lr (now {spec.lr})")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, spec.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        history.append((step + 1, value))
        bar.set_postfix(loss=f"{value:.3f}")
        if eval_ids is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < spec.steps:
            eval_history.append((step + 1, mean_loss(peft_model, eval_ids)))
            peft_model.train()
    peft_model.eval()
    seconds = time.perf_counter() - start
    if eval_ids is not None:
        eval_history.append((spec.steps, mean_loss(peft_model, eval_ids)))
    return history, eval_history, seconds


def _prepare(model, train_ids, spec, eval_ids, eval_every):
    spec = HealingSpec() if spec is None else spec
    if not isinstance(spec, HealingSpec):
        raise ValueError(f"spec must be a HealingSpec, got {type(spec).__name__}")
    train_ids = _check_ids("train_ids", train_ids)
    if eval_ids is not None:
        eval_ids = _check_ids("eval_ids", eval_ids)
    if not isinstance(eval_every, int) or isinstance(eval_every, bool) or eval_every < 0:
        raise ValueError(f"eval_every must be an int >= 0 (0: only before and after), got {eval_every!r}")
    return spec, train_ids, eval_ids, lora_config(model, spec)


def train_adapter(model: torch.nn.Module, train_ids: torch.Tensor, spec: HealingSpec | None = None, *,
                  eval_ids: torch.Tensor | None = None, eval_every: int = 0, progress: bool = True):
    """Wrap ``model`` (in place) with LoRA adapters and train them; returns ``(peft_model, HealingResult)`` (chapter 08).

    The adapters stay separate, so :func:`save_adapter` can ship them alone; the result's
    ``model`` is the unmerged ``PeftModel``. :func:`heal` is this plus ``merge_and_unload``.
    """
    spec, train_ids, eval_ids, config = _prepare(model, train_ids, spec, eval_ids, eval_every)
    peft = _peft()
    torch.manual_seed(spec.seed)                        # the adapters' initialisation
    with warnings.catch_warnings():                     # peft calls a transformers name deprecated in 5.x
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = peft.get_peft_model(model, config)
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in peft_model.parameters())
    history, eval_history, seconds = _train_loop(peft_model, train_ids, spec, eval_ids, eval_every, progress)
    return peft_model, HealingResult(peft_model, spec, history, eval_history, n_trainable, n_total, seconds)


def heal(model: torch.nn.Module, train_ids: torch.Tensor, spec: HealingSpec | None = None, *,
         eval_ids: torch.Tensor | None = None, eval_every: int = 0, inplace: bool = False,
         progress: bool = True) -> HealingResult:
    """Fine-tune LoRA adapters on ``train_ids`` for ``spec.steps`` steps and merge them (chapter 08).

    ``train_ids`` are rows of tokens (``(rows, seq_len)``) from text the calibration set never
    saw; every step draws ``spec.batch_size`` rows with a generator seeded by ``spec.seed``.
    ``eval_ids`` (optional) are scored before training, every ``eval_every`` steps and at the
    end. The input model is left unchanged unless ``inplace=True`` (which saves a copy of a large
    GPU model). Returns a :class:`HealingResult` whose ``model`` has the adapters merged: a plain
    ``PreTrainedModel`` that saves and reloads with ``save_pretrained``/``from_pretrained``.
    """
    _prepare(model, train_ids, spec, eval_ids, eval_every)     # fail before copying a large model
    from .quantization import quantized_modules

    quantized = quantized_modules(model)
    if quantized:
        raise ValueError(f"model has {len(quantized)} quantized linear layers (e.g. {quantized[0]!r}); merging LoRA into "
                         "them would need a re-quantization: heal the full-precision model and quantize afterwards, "
                         "or keep the adapter separate with train_adapter (QLoRA-style)")
    base = model if inplace else copy.deepcopy(model)
    peft_model, result = train_adapter(base, train_ids, spec, eval_ids=eval_ids, eval_every=eval_every,
                                       progress=progress)
    result.model = _merge(peft_model)
    return result


def save_adapter(peft_model, path: str | Path, dtype: torch.dtype | None = torch.float16) -> Path:
    """Save only the LoRA adapter (``adapter_model.safetensors`` + ``adapter_config.json``) (chapter 08).

    ``dtype`` casts the saved adapter weights (default float16: half the bytes; ``None`` keeps them).
    The base model is not written: ship the adapter and the recipe that prunes the base.
    """
    _peft()
    if not hasattr(peft_model, "peft_config"):
        raise ValueError(f"peft_model must be a peft PeftModel (from train_adapter), got {type(peft_model).__name__}")
    path = Path(path)
    peft_model.save_pretrained(str(path))
    (path / "README.md").unlink(missing_ok=True)     # peft's model-card template, all placeholders
    if dtype is not None:
        from safetensors.torch import load_file, save_file

        weights = path / "adapter_model.safetensors"
        save_file({k: v.to(dtype) for k, v in load_file(str(weights)).items()}, str(weights))
    return path


def load_adapter(model: torch.nn.Module, path: str | Path, merge: bool = True, inplace: bool = False):
    """Attach a saved LoRA adapter to ``model`` and (by default) merge it into the weights (chapter 08).

    ``model`` must have the architecture the adapter was trained on (same layers removed). The
    adapter weights are cast to the model's dtype. Returns the merged model, or the ``PeftModel``
    with ``merge=False``.
    """
    peft = _peft()
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"path: no adapter_config.json in {str(path)!r} (save one with save_adapter)")
    base = model if inplace else copy.deepcopy(model)
    dtype = next(base.parameters()).dtype
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = peft.PeftModel.from_pretrained(base, str(path), torch_dtype=dtype)
    for p in peft_model.parameters():
        if p.dtype != dtype and p.is_floating_point():
            p.data = p.data.to(dtype)
    if not merge:
        return peft_model.eval()
    return _merge(peft_model)


def _merge(peft_model) -> torch.nn.Module:
    """``merge_and_unload`` without the FutureWarning peft triggers through a renamed transformers method."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        merged = peft_model.merge_and_unload()
    return merged.eval()


@dataclass(frozen=True)
class ShippedHealing:
    """LoRA adapters shipped with ``minilib`` and their manifest (``scripts/heal_smollm2.py``) (chapter 08).

    ``entries`` maps a name (``"minus15"``, ``"minus8"``, ``"dense"``) to its removed layers,
    held-out losses before and after, loss curves and adapter hash; ``spec`` is the training recipe.
    """

    manifest: dict
    folder: Path

    @property
    def entries(self) -> dict:
        return self.manifest["entries"]

    @property
    def spec(self) -> dict:
        return self.manifest["spec"]

    def adapter_path(self, key: str) -> Path:
        """The folder of ``key``'s adapter, for :func:`load_adapter`."""
        if key not in self.entries:
            raise ValueError(f"key must be one of {sorted(self.entries)}, got {key!r}")
        return self.folder / key


def load_shipped_healing(name: str = "smollm2") -> ShippedHealing:
    """The adapters and manifest shipped for model ``name`` (chapter 08)."""
    import json

    from .store import SHIPPED

    folder = SHIPPED / name / "healing"
    if not (folder / "manifest.json").is_file():
        available = sorted(p.parent.parent.name for p in SHIPPED.glob("*/healing/manifest.json"))
        raise ValueError(f"name: no shipped healing adapters for {name!r}; available: {available}")
    return ShippedHealing(json.loads((folder / "manifest.json").read_text()), folder)
