"""Text for calibration and evaluation: the offline teaching corpus and the paper's datasets.

Introduced in chapter 07. Sources are named, independent of any tokenizer: ``teaching`` (the
shipped corpus, offline), and through Hugging Face ``datasets`` the paper's protocol --
WikiText-2 (raw, test), PTB (test), a C4 validation shard for evaluation, and BookCorpus or a
C4 train shard for calibration. Every Hub source goes through one call of
``datasets.load_dataset``; ``data_files=`` points that same call at local files (``.txt``,
``.json``/``.jsonl`` (``.gz``), ``.parquet``, ``.csv``), which is how the tests run it offline.
A path to a UTF-8 text file is a source too: its whole text is one document.

Calibration and evaluation never share text: the Hub sources calibrate on other datasets
(BookCorpus, C4 train) than they evaluate on (WikiText-2, PTB, C4 validation); the teaching
source calibrates on its ``calibration`` split and evaluates on ``validation``/``test``. Those
splits hold whole stdlib packages and share no 12-token run with each other or with the training
text (``teaching.remove_shared_text``); calibration windows that contain any 12-token run of the
evaluation splits are still skipped, a guard that matters for a reader's own files.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

# Length of the token runs that calibration windows must not share with evaluation text: the one
# the teaching corpus's splits are cleaned with.
from .teaching import SHARED_NGRAM as NGRAM


@dataclass(frozen=True)
class TextSource:
    """Where a source's rows live and how they become one text stream (chapter 07).

    ``path``/``name``/``split``/``data_files``/``revision`` are ``datasets.load_dataset``
    arguments; ``field`` is the text column; ``sep`` joins rows into an evaluation stream
    (``None``: the tokenizer's EOS token); ``max_rows`` and ``max_windows`` cut the stream as
    the published protocol does (C4: 1,100 documents, 256 windows).
    """

    path: str
    name: str | None
    split: str
    field: str = "text"
    data_files: str | None = None
    revision: str | None = None
    sep: str | None = "\n\n"
    max_rows: int | None = None
    max_windows: int | None = None
    role: str = "evaluation"


# Legacy script datasets (PTB, BookCorpus) load from the Hub's Parquet export: datasets>=4 runs no scripts.
SOURCES: dict[str, TextSource] = {
    "teaching": TextSource("teaching", None, "test", sep=None, role="both"),
    "wikitext2": TextSource("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
    "ptb": TextSource("ptb-text-only/ptb_text_only", "penn_treebank", "test", field="sentence",
                      revision="refs/convert/parquet", sep=" "),
    "c4": TextSource("allenai/c4", None, "validation", data_files="en/c4-validation.00000-of-00008.json.gz",
                     sep=" ", max_rows=1100, max_windows=256),
    "c4_train": TextSource("allenai/c4", None, "train", data_files="en/c4-train.00000-of-01024.json.gz",
                           role="calibration"),
    "bookcorpus": TextSource("bookcorpus/bookcorpus", "plain_text", "train", revision="refs/convert/parquet",
                             role="calibration"),
}
TEXT_SOURCES = tuple(SOURCES)
TEACHING_EVAL_SPLITS = ("validation", "test")
_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _text_file(source) -> Path | None:
    """``source`` as a path when it names an existing file rather than a named source."""
    if isinstance(source, os.PathLike) or (isinstance(source, str) and source not in SOURCES):
        path = Path(source).expanduser()
        return path if path.is_file() else None
    return None


def _source(source: str) -> TextSource:
    if _text_file(source) is not None:
        return TextSource(str(source), None, "file", sep="\n\n", role="both")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {TEXT_SOURCES} or a text file's path, got {source!r}")
    return SOURCES[source]


def _builder(first_file) -> str:
    first = Path(first_file)
    suffixes = [s for s in first.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    if not suffixes or suffixes[-1] not in _BUILDERS:
        raise ValueError(f"data_files: cannot tell the format of {str(first)!r}; use one of {tuple(_BUILDERS)}")
    return _BUILDERS[suffixes[-1]]


def _rows(source: str, split: str | None, data_files, cache_dir) -> tuple[Sequence[str], TextSource]:
    """The rows' texts: a list for the teaching corpus, a lazily indexed ``datasets`` column otherwise."""
    spec = _source(source)
    split = split or spec.split
    if spec.split == "file":
        return [_text_file(source).read_text(encoding="utf-8")], spec
    if source == "teaching":
        from .teaching import load_corpus

        return [d.text for d in load_corpus(split)], spec
    try:
        import datasets
    except ImportError:
        from .models import MissingDependencyError

        raise MissingDependencyError(f"source {source!r} needs the datasets package; install with: "
                                     'pip install "datasets>=3"  # or: pip install "minilib[real]"') from None
    if data_files is None:
        kwargs = dict(path=spec.path, name=spec.name, revision=spec.revision,
                      data_files={spec.split: spec.data_files} if spec.data_files else None)
    else:  # the same call on local files: offline tests, or a reader's own copy
        files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
        kwargs = dict(path=_builder(files[0]), data_files={split: [str(f) for f in files]})
    dataset = datasets.load_dataset(**{k: v for k, v in kwargs.items() if v is not None}, split=split,
                                    cache_dir=None if cache_dir is None else str(cache_dir))
    field = spec.field if spec.field in dataset.column_names else "text"
    if field not in dataset.column_names:
        raise ValueError(f"source {source!r}: no {spec.field!r} or 'text' column in {dataset.column_names}")
    if spec.max_rows is not None and len(dataset) > spec.max_rows:
        dataset = dataset.select(range(spec.max_rows))
    return _Column(dataset, field), spec


class _Column(Sequence):
    """One text column of a ``datasets.Dataset``, read row by row (BookCorpus has 74 M rows)."""

    def __init__(self, dataset, field: str):
        self.dataset, self.field = dataset, field

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.dataset[i][self.field]
        return self.dataset[int(i)][self.field]


def load_texts(source: str, split: str | None = None, data_files=None, cache_dir=None) -> list[str]:
    """The rows of a text source as strings: documents, lines or sentences as the dataset has them (chapter 07).

    ``split`` defaults to the source's own (teaching: ``test``; WikiText-2, PTB: ``test``; C4:
    ``validation``; BookCorpus, C4 train: ``train``). ``data_files`` replaces the Hub files with
    local ones read by the same ``datasets.load_dataset`` call; ``cache_dir`` is its cache folder.
    """
    rows, _ = _rows(source, split, data_files, cache_dir)
    return list(rows[:]) if isinstance(rows, _Column) else list(rows)


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` puts BOS first by default: LLaMA's do, GPT-2-style ones don't (chapter 07)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    return len(with_special) > len(tokenizer("a", add_special_tokens=False)["input_ids"]) and with_special[0] == bos


def encode(tokenizer, texts: Sequence[str], sep: str = "\n\n") -> torch.Tensor:
    """Join ``texts`` with ``sep`` and tokenize them as one stream, a 1-D LongTensor (chapter 07).

    The tokenizer's own specials are not added mid-stream; a BOS token is put first, once,
    exactly when the tokenizer would add one by default (:func:`adds_bos`), as evaluating the
    joined text with ``tokenizer(text)`` does in the published protocols.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one str (wrap it in a list)")
    ids = tokenizer(sep.join(texts), add_special_tokens=False)["input_ids"]
    if adds_bos(tokenizer):
        ids = [tokenizer.bos_token_id] + list(ids)
    return torch.tensor(ids, dtype=torch.long)


def _check_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2 (one predicted token), got {seq_len!r}")


def _sep(spec: TextSource, tokenizer) -> str:
    return spec.sep if spec.sep is not None else (tokenizer.eos_token or "\n\n")


def evaluation_ids(tokenizer, source: str = "teaching", seq_len: int = 128, split: str | None = None,
                   max_windows: int | None = None, data_files=None, cache_dir=None) -> torch.Tensor:
    """Consecutive, non-overlapping ``seq_len`` windows of a source's stream, ``(rows, seq_len)`` (chapter 07).

    The S128 / S2048 protocol: the rows joined into one token stream, cut into windows from its
    start, the incomplete tail dropped; C4 keeps its first 1,100 documents and 256 windows.
    """
    _check_len(seq_len)
    rows, spec = _rows(source, split, data_files, cache_dir)
    texts = list(rows[:]) if isinstance(rows, _Column) else list(rows)
    stream = encode(tokenizer, texts, sep=_sep(spec, tokenizer))
    n = stream.numel() // seq_len
    limit = max_windows if max_windows is not None else spec.max_windows
    n = min(n, limit) if limit is not None else n
    if n < 1:
        raise ValueError(f"source {source!r} holds {stream.numel()} tokens, fewer than seq_len={seq_len}")
    return stream[: n * seq_len].view(n, seq_len).clone()


def _ngrams(ids: torch.Tensor, n: int) -> set[tuple[int, ...]]:
    flat = ids.reshape(-1).tolist() if ids.ndim <= 1 else None
    if flat is None:  # windows: runs never cross a row boundary
        return set().union(*(_ngrams(row, n) for row in ids))
    return {tuple(flat[i: i + n]) for i in range(len(flat) - n + 1)}


def shared_ngrams(a: torch.Tensor, b: torch.Tensor, n: int = NGRAM) -> set[tuple[int, ...]]:
    """Token runs of length ``n`` found in both ``a`` and ``b`` (1-D streams or rows of windows) (chapter 07)."""
    return _ngrams(a, n) & _ngrams(b, n)


def _clean_starts(ids: list[int], seq_len: int, banned: set, n: int) -> np.ndarray:
    """Start offsets of the ``seq_len`` windows of ``ids`` that contain no banned ``n``-token run."""
    n_starts = len(ids) - seq_len + 1
    if n_starts < 1:
        return np.zeros(0, dtype=np.int64)
    if not banned:
        return np.arange(n_starts)
    bad = np.array([tuple(ids[i: i + n]) in banned for i in range(len(ids) - n + 1)], dtype=np.int64)
    seen = np.concatenate([[0], np.cumsum(bad)])  # seen[k] = banned runs starting before k
    last = seq_len - n + 1  # a window starting at j holds the runs starting at j .. j + last - 1
    return np.flatnonzero(seen[np.arange(n_starts) + last] - seen[np.arange(n_starts)] == 0)


def _row_order(n_rows: int, rng: np.random.Generator):
    """Row indices in random order without repeats: a permutation, or rejection draws for huge datasets."""
    if n_rows <= 2_000_000:
        yield from rng.permutation(n_rows).tolist()
        return
    seen: set[int] = set()
    while len(seen) < min(n_rows, 200_000):
        i = int(rng.integers(n_rows))
        if i not in seen:
            seen.add(i)
            yield i


def calibration_ids(tokenizer, source: str = "teaching", n_seqs: int = 10, seq_len: int = 128, seed: int = 0,
                    split: str | None = None, data_files=None, cache_dir=None,
                    avoid: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """``n_seqs`` random ``seq_len``-token windows from distinct rows, ``(n_seqs, seq_len)`` (chapter 07).

    The paper's (and LLM-Pruner's / Shortened-LLaMA's) protocol: visit rows in a seeded random
    order, keep those with at least ``seq_len`` tokens (BOS included when the tokenizer adds
    one), take one uniformly random window from each. A text file is one document, so from it
    come ``n_seqs`` distinct non-overlapping windows of its stream, chosen at random.
    Deterministic for a given ``seed``.
    Windows holding any ``NGRAM``-token run of ``avoid`` are never chosen; ``avoid=None``
    means the source's default: for ``teaching``, its ``validation`` and ``test`` splits (the Hub
    sources calibrate on datasets they are never evaluated on). An evaluation split as
    calibration (e.g. ``source="wikitext2"`` with its test split) is refused.
    """
    if not isinstance(n_seqs, int) or isinstance(n_seqs, bool) or n_seqs <= 0:
        raise ValueError(f"n_seqs must be a positive int, got {n_seqs!r}")
    _check_len(seq_len)
    spec = _source(source)
    split = split or ("calibration" if source == "teaching" else spec.split)
    if (source == "teaching" and split in TEACHING_EVAL_SPLITS) or (spec.role == "evaluation" and split == spec.split):
        raise ValueError(f"split {split!r} of source {source!r} is evaluation text; calibrate on another split "
                         f"or source (teaching's 'calibration' split, 'bookcorpus', 'c4_train')")
    if avoid is None:
        avoid = [encode(tokenizer, load_texts("teaching", s), sep=_sep(spec, tokenizer))
                 for s in TEACHING_EVAL_SPLITS] if source == "teaching" else []
    banned = set().union(*(_ngrams(a, NGRAM) for a in avoid)) if len(avoid) else set()
    rows, _ = _rows(source, split, data_files, cache_dir)
    rng = np.random.default_rng(seed)
    if spec.split == "file":
        stream = encode(tokenizer, rows)
        n = stream.numel() // seq_len
        windows = [w for w in stream[: n * seq_len].view(n, seq_len)
                   if len(_clean_starts(w.tolist(), seq_len, banned, NGRAM))]
        if len(windows) < n_seqs:
            raise ValueError(f"{source!r} holds {len(windows)} windows of seq_len={seq_len} tokens; "
                             f"n_seqs must be at most {len(windows)}, got {n_seqs}")
        return torch.stack([windows[i] for i in rng.permutation(len(windows))[:n_seqs].tolist()])
    chosen: list[torch.Tensor] = []
    for i in _row_order(len(rows), rng):
        ids = encode(tokenizer, [rows[i]]).tolist()
        starts = _clean_starts(ids, seq_len, banned, NGRAM)
        if len(starts):
            j = int(starts[rng.integers(len(starts))])
            chosen.append(torch.tensor(ids[j: j + seq_len], dtype=torch.long))
            if len(chosen) == n_seqs:
                return torch.stack(chosen)
    raise ValueError(f"source {source!r} (split {split!r}) has only {len(chosen)} rows with a clean window of "
                     f"seq_len={seq_len} tokens; n_seqs must be at most {len(chosen)}, got {n_seqs}")


def text_hash(texts: Sequence[str]) -> str:
    """SHA-256 of a list of texts (each length-prefixed), their identity in manifests (chapter 07)."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def ids_hash(ids: torch.Tensor) -> str:
    """SHA-256 of token ids with their shape, the calibration set's identity in manifests (chapter 07)."""
    arr = np.ascontiguousarray(ids.detach().cpu().numpy().astype(np.int64))
    h = hashlib.sha256(repr(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()
