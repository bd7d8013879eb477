"""The teaching model: an offline corpus, a byte-level BPE tokenizer and a tiny LLaMA.

Introduced in chapter 00 (quick start). Everything here works without a network:
the corpus is built from text that ships with CPython (``pydoc_data`` topics and the
standard library's docstrings), and the trained checkpoint and tokenizer ship inside
``minilib`` as package data, loaded through ``from_pretrained`` like any Hugging Face model.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import math
import re
import sys
import sysconfig
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

SPLITS = ("train", "validation", "calibration", "test")
"""The four corpus splits, in the order of :func:`split_of`'s buckets."""

EOS_TOKEN = "<|endoftext|>"
UNIGRAM_SMOOTHING = 1.0  # add-one smoothing for the unigram baseline

# Stdlib folders that are tests, demos or vendored data, not documentation.
_SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
               "turtledemo", "__pycache__", "ensurepip", "pydoc_data", "__phello__"}


@dataclass(frozen=True)
class Document:
    """One corpus document: a pydoc topic or one stdlib module's docstrings (chapter 00)."""

    key: str
    text: str

    @property
    def split(self) -> str:
        return split_of(self.key)


def split_unit(key: str) -> str:
    """The unit that goes to one split as a whole: a stdlib top-level package, or one pydoc topic (chapter 00).

    Modules of one package share text (``asyncio.transports`` and ``asyncio.sslproto`` repeat
    sentences; the 97 ``encodings`` codecs share their docstrings), so splitting module by
    module puts the same sentences in training and evaluation text. ``module:json.decoder``
    and ``module:json`` are both ``package:json``; ``topic:assert`` is its own unit.
    """
    kind, _, name = key.partition(":")
    if kind == "module":
        return "package:" + name.split(".")[0]
    return key


def split_of(key: str) -> str:
    """Assign a document to a split by a hash of its unit, :func:`split_unit` (chapter 00).

    The rule depends only on the document's name (``topic:assert``, ``module:json.decoder``),
    never on its text or on the order documents are found, so a document stays in the same
    split on every Python version: buckets ``sha256(unit) % 100`` below 80 train, below 90
    validation, below 95 calibration, else test (80/10/5/5 % of units, not of tokens).
    """
    bucket = int(hashlib.sha256(split_unit(key).encode("utf-8")).hexdigest()[:8], 16) % 100
    if bucket < 80:
        return "train"
    if bucket < 90:
        return "validation"
    if bucket < 95:
        return "calibration"
    return "test"


def _clean(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip()


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _module_docstrings(path: Path) -> list[str]:
    """Docstrings of a module and of its classes and functions, in source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                found.append((getattr(node, "lineno", 0), _clean(doc)))
    return [doc for _, doc in sorted(found, key=lambda item: item[0])]


def build_corpus(stdlib_dir: str | Path | None = None) -> list[Document]:
    """Build the corpus from the running Python's own text (chapter 00).

    Documents are the ``pydoc_data`` topics (the text behind ``help('assert')``) and, per
    stdlib module, its docstrings joined in source order. Sorted by key, so the result is
    deterministic for a given Python build. Use :func:`load_corpus` for the shipped snapshot
    that the teaching model was trained on.
    """
    from pydoc_data.topics import topics

    docs = [Document(f"topic:{name}", _clean(text)) for name, text in topics.items() if text.strip()]
    root = Path(stdlib_dir) if stdlib_dir is not None else Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_PARTS or part.startswith("test") for part in rel.parts):
            continue
        docstrings = _module_docstrings(path)
        if docstrings:
            docs.append(Document(f"module:{_module_name(rel)}", "\n\n".join(docstrings)))
    return sorted(docs, key=lambda d: d.key)


def corpus_hash(docs: Iterable[Document]) -> str:
    """SHA-256 over keys and texts, the corpus's identity in manifests (chapter 00)."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc.key.encode("utf-8") + b"\x00" + doc.text.encode("utf-8") + b"\x00")
    return h.hexdigest()


def save_corpus(docs: Sequence[Document], path: str | Path) -> None:
    """Write documents as gzipped JSON lines with a fixed mtime, so the file is byte-stable (chapter 00)."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for doc in docs:
            gz.write((json.dumps({"key": doc.key, "text": doc.text}, ensure_ascii=False) + "\n").encode("utf-8"))


def _read_corpus(path: str | Path) -> list[Document]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f]


SHARED_NGRAM = 12
"""Run length, in tokens, that no validation, calibration or test text may share with an earlier split."""


def ngram_hashes(ids, n: int = SHARED_NGRAM) -> np.ndarray:
    """64-bit hashes of every ``n``-token run of a 1-D id sequence, in order (chapter 00).

    A polynomial hash with wrap-around arithmetic: equal runs always get equal hashes, so a
    test "no hash shared" is conservative (a collision could only flag a run that is not shared).
    """
    a = np.asarray(ids, dtype=np.uint64).reshape(-1)
    if a.size < n:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(a.size - n + 1, dtype=np.uint64)
    for k in range(n):
        h = h * np.uint64(1_000_003) + a[k: a.size - n + 1 + k]
    return h


_PARAGRAPH_BREAK = re.compile(r"\n\n")


def _paragraph_of(text: str) -> np.ndarray:
    """For each character of ``text``, the index of its paragraph (blocks separated by blank lines)."""
    owner = np.zeros(len(text) + 1, dtype=np.int64)
    for start in (m.end() for m in _PARAGRAPH_BREAK.finditer(text)):
        owner[start] += 1
    return np.cumsum(owner)[:-1] if len(text) else owner[:0]


def _drop_shared_paragraphs(text: str, tokenizer, seen: np.ndarray, eos: int, n: int) -> str:
    """``text`` without the paragraphs that hold an ``n``-token run whose hash is in ``seen``.

    The document is checked as it sits in a token stream, between two ``<|endoftext|>`` tokens,
    so runs that start or end at the document's edges count too. A run is charged to the
    paragraph each of its tokens starts in, and the blank line before a paragraph belongs to the
    one above it, so a repeated paragraph can take its predecessor along: conservative, never
    leaky. Dropping a paragraph can join its neighbours into new runs, hence the loop.
    """
    while text:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = [eos] + list(enc["input_ids"]) + [eos]
        bad = np.flatnonzero(np.isin(ngram_hashes(ids, n), seen))
        if not bad.size:
            return text
        owner = _paragraph_of(text)
        starts = np.array([0] + [a for a, _ in enc["offset_mapping"]] + [len(text) - 1])
        tokens = np.unique(np.concatenate([np.arange(b, b + n) for b in bad]))
        drop = set(owner[np.clip(starts[tokens], 0, len(text) - 1)].tolist())
        paragraphs = _PARAGRAPH_BREAK.split(text)
        text = "\n\n".join(p for i, p in enumerate(paragraphs) if i not in drop).strip()
    return text


def remove_shared_text(docs: Sequence[Document], tokenizer, n: int = SHARED_NGRAM) -> list[Document]:
    """The corpus with every ``n``-token run that repeats earlier-split text cut out, paragraph by paragraph (chapter 00).

    Splits are cleaned in :data:`SPLITS` order: validation against train, calibration against
    train and validation, test against all three, so no window of a later split repeats
    ``n`` tokens of an earlier one (stdlib docstrings repeat boilerplate across packages).
    Training documents are never changed; documents left empty are dropped. Ordered by key.
    """
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    by_split = {s: [d for d in docs if d.split == s] for s in SPLITS}
    seen = np.unique(ngram_hashes(encode_documents(tokenizer, by_split["train"]).numpy(), n))
    out = list(by_split["train"])
    for split in SPLITS[1:]:
        kept = []
        for doc in by_split[split]:
            text = _drop_shared_paragraphs(doc.text, tokenizer, seen, eos, n)
            if text:
                kept.append(Document(doc.key, text))
        stream = ngram_hashes(encode_documents(tokenizer, kept).numpy(), n)
        if np.isin(stream, seen).any():  # a run across two documents' boundary: not seen in practice
            raise RuntimeError(f"split {split!r} still shares a {n}-token run with earlier splits across a "
                               "document boundary")
        seen = np.union1d(seen, stream)
        out.extend(kept)
    return sorted(out, key=lambda d: d.key)


def teaching_model_path() -> Path:
    """Folder of the shipped checkpoint, tokenizer, corpus snapshot and manifest (chapter 00)."""
    return Path(str(resources.files("minilib") / "assets" / "teaching"))


def load_corpus(split: str | None = None) -> list[Document]:
    """The shipped corpus snapshot the teaching model was trained on, optionally one split (chapter 00)."""
    docs = _read_corpus(teaching_model_path() / "corpus.jsonl.gz")
    if split is None:
        return docs
    _check_split(split)
    return [d for d in docs if d.split == split]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """Train a byte-level BPE tokenizer with ``tokenizers`` and wrap it for transformers (chapter 00).

    Byte-level means every string round-trips exactly, whatever characters it holds.
    ``<|endoftext|>`` separates documents and serves as BOS, EOS and padding token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (256 bytes + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=EOS_TOKEN, unk_token=None,
                                   model_max_length=1_000_000,  # documents are long; windows are cut later
                                   clean_up_tokenization_spaces=False)


def encode_documents(tokenizer, docs: Sequence[Document]) -> torch.Tensor:
    """One token stream: each document's ids followed by ``<|endoftext|>`` (chapter 00)."""
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    ids: list[int] = []
    if not docs:
        return torch.zeros(0, dtype=torch.long)
    for enc in tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def token_stream(tokenizer, split: str) -> torch.Tensor:
    """The shipped corpus's ``split`` as one 1-D token stream (chapter 00)."""
    return encode_documents(tokenizer, load_corpus(split))


def calibration_ids(tokenizer, n_seqs: int, seq_len: int, split: str = "calibration",
                    seed: int | None = None) -> torch.Tensor:
    """``n_seqs`` windows of ``seq_len`` tokens from a split, shape ``(n_seqs, seq_len)`` (chapter 00).

    With ``seed=None`` the windows are consecutive and non-overlapping from the start of the
    split (the default calibration set everywhere in the book). With an integer ``seed`` they
    are non-overlapping windows chosen at random, for calibration-sensitivity studies.
    """
    _check_split(split)
    for name, value in (("n_seqs", n_seqs), ("seq_len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one predicted token), got {seq_len}")
    stream = token_stream(tokenizer, split)
    n_windows = stream.numel() // seq_len
    if n_windows < n_seqs:
        raise ValueError(f"split {split!r} holds {n_windows} windows of seq_len={seq_len}; "
                         f"n_seqs must be at most {n_windows}, got {n_seqs}")
    windows = stream[: n_windows * seq_len].view(n_windows, seq_len)
    if seed is None:
        return windows[:n_seqs].clone()
    g = torch.Generator().manual_seed(seed)
    return windows[torch.randperm(n_windows, generator=g)[:n_seqs]].clone()


def unigram_perplexity(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on ``train_ids`` (chapter 00).

    The baseline a language model must beat: it knows token frequencies and nothing else.
    """
    counts = torch.bincount(train_ids.flatten(), minlength=vocab_size).double() + UNIGRAM_SMOOTHING
    logp = torch.log(counts / counts.sum())
    return float(torch.exp(-logp[eval_ids.flatten()].mean()))


@dataclass(frozen=True)
class TeachingSpec:
    """Architecture and training recipe of the teaching model (chapter 00)."""

    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 12
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 256
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 1500
    lr: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.1
    seed: int = 0
    eval_every: int = 250
    keep_best: bool = True
    """Return the weights of the evaluation with the lowest validation PPL (early stopping), not the last."""


def teaching_config(spec: TeachingSpec, tokenizer):
    """The ``LlamaConfig`` of the teaching model: a real LLaMA, only small (chapter 00)."""
    from transformers import LlamaConfig

    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    return LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                       intermediate_size=spec.intermediate_size,
                       num_hidden_layers=spec.num_hidden_layers,
                       num_attention_heads=spec.num_attention_heads,
                       num_key_value_heads=spec.num_key_value_heads,
                       max_position_embeddings=spec.max_position_embeddings,
                       bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                       tie_word_embeddings=True, rms_norm_eps=1e-5)


def _lr_at(step: int, spec: TeachingSpec) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_teaching_model(spec: TeachingSpec, tokenizer, train_ids: torch.Tensor,
                         valid_ids: torch.Tensor, device: str = "cpu", log=print):
    """Train a fresh ``LlamaForCausalLM`` for exactly ``spec.steps`` steps (chapter 00).

    Batches are random ``seq_len`` windows of the training stream drawn from a seeded
    generator; the step count, not a time budget, fixes the result. Returns the model (on
    CPU, float32) and a list of ``(step, train_loss, train_ppl, validation_ppl)`` records:
    ``train_loss`` averages the batches since the last record, ``train_ppl`` is measured in eval
    mode on a fixed sample of training windows as large as the validation split, so the two
    perplexities side by side show when the model starts to memorise. With ``spec.keep_best``
    the returned weights are those of the record with the lowest validation PPL, so the model
    stops before it memorises (the test split, never seen in training or selection, reports).
    """
    from transformers import LlamaForCausalLM

    from .evaluation import perplexity

    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(teaching_config(spec, tokenizer)).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(spec.seed)
    n_start = train_ids.numel() - spec.seq_len - 1
    history: list[tuple[int, float, float, float]] = []
    running = 0.0
    train_windows = train_ids[: train_ids.numel() // spec.seq_len * spec.seq_len].view(-1, spec.seq_len)
    n_sample = min(len(train_windows), max(1, valid_ids.numel() // spec.seq_len))
    train_sample = train_windows[torch.linspace(0, len(train_windows) - 1, n_sample).long()].reshape(-1)
    best: tuple[float, dict] | None = None
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, spec)
        starts = torch.randint(0, n_start, (spec.batch_size,), generator=gen)
        batch = torch.stack([train_ids[s: s + spec.seq_len] for s in starts.tolist()]).to(device)
        model.train()
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.item()
        if (step + 1) % spec.eval_every == 0 or step + 1 == spec.steps:
            model.eval()
            ppl = perplexity(model, valid_ids.to(device), window=spec.seq_len)
            train_ppl = perplexity(model, train_sample.to(device), window=spec.seq_len)
            n = spec.eval_every if (step + 1) % spec.eval_every == 0 else (step + 1) % spec.eval_every
            history.append((step + 1, running / n, train_ppl, ppl))
            log(f"step {step + 1:6d}  lr {_lr_at(step, spec):.2e}  train loss {running / n:.4f}  "
                f"train ppl {train_ppl:.2f}  validation ppl {ppl:.2f}")
            running = 0.0
            if spec.keep_best and (best is None or ppl < best[0]):
                best = (ppl, {k: v.detach().clone() for k, v in model.state_dict().items()})
    if best is not None:
        model.load_state_dict(best[1])
    model.eval()
    return model.to("cpu").float(), history


def manifest() -> dict:
    """The shipped model's manifest: corpus hash, config, recipe, versions, final PPL (chapter 00)."""
    return json.loads((teaching_model_path() / "manifest.json").read_text())


def load_teaching_model(device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Load the shipped teaching LLaMA and its tokenizer, offline, via ``from_pretrained`` (chapter 00).

    Returns ``(model, tokenizer)`` with the model in eval mode. This is the same code path
    as loading any Hugging Face checkpoint; only the folder is local package data.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = teaching_model_path()
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"the teaching checkpoint is missing from {path}; "
                                "build it with scripts/train_teaching_model.py")
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def environment_versions() -> dict:
    """Versions of Python and the libraries that shape results, for manifests (chapter 00)."""
    import numpy
    import tokenizers
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "numpy": numpy.__version__}



EXACT_CALIBRATION = {"n_seqs": 8, "seq_len": 128, "split": "calibration"}
"""Calibration set of the shipped exact tables: the first 8 windows of 128 calibration tokens
(the default calibration set of every chapter)."""


def exact_table_path(utility: str = "ppl_ratio") -> Path:
    """Where the shipped 2**12 value table of ``utility`` lives (chapter 03)."""
    from .evaluation import UTILITIES

    if utility not in UTILITIES:
        raise ValueError(f"utility must be one of {UTILITIES}, got {utility!r}")
    return teaching_model_path() / f"exact_{utility}.npz"


def exact_table(utility: str = "ppl_ratio"):
    """The teaching model's exact value table over all 2**12 keep-masks, as a ``TabularGame`` (chapter 03).

    Precomputed by ``scripts/precompute_exact.py`` on :data:`EXACT_CALIBRATION`; the metadata
    holds the model hash, calibration spec and library versions it was computed with.
    """
    from .games import TabularGame

    path = exact_table_path(utility)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; build it with scripts/precompute_exact.py")
    return TabularGame.load(path)


def exact_calibration_ids(tokenizer) -> torch.Tensor:
    """The calibration ids the shipped exact tables were computed on (chapter 03)."""
    return calibration_ids(tokenizer, EXACT_CALIBRATION["n_seqs"], EXACT_CALIBRATION["seq_len"],
                           split=EXACT_CALIBRATION["split"])
