"""minilib.teaching: the shipped corpus, tokenizer, checkpoint and manifest.

The properties that matter: the shipped files are the ones the manifest describes (hashes,
token counts, validation perplexity recomputed here); the byte-level tokenizer round-trips any
text; the split rule depends only on a document's key and keeps each stdlib package in one split;
no later split repeats a 12-token run of an earlier one; the corpus can be rebuilt offline.
"""

from __future__ import annotations

import collections
import hashlib
import math
import sys

import numpy as np
import pytest
import torch
import transformers as tf

import minilib as ml
from minilib import teaching

MANIFEST = teaching.manifest()
SEQ_LEN = MANIFEST["spec"]["seq_len"]


@pytest.fixture(scope="module")
def corpus() -> list[teaching.Document]:
    return teaching.load_corpus()


@pytest.fixture(scope="module")
def streams(tokenizer) -> dict[str, torch.Tensor]:
    return {split: teaching.token_stream(tokenizer, split) for split in teaching.SPLITS}


# ---------------------------------------------------------------- shipped files vs manifest

def test_model_file_hash_matches_manifest():
    digest = hashlib.sha256((teaching.teaching_model_path() / "model.safetensors").read_bytes()).hexdigest()
    assert digest == MANIFEST["model_sha256"]


def test_loaded_model_matches_manifest(model, tokenizer):
    assert isinstance(model, tf.LlamaForCausalLM)
    assert not model.training
    cfg = MANIFEST["config"]
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings"):
        assert getattr(model.config, key) == cfg[key] == MANIFEST["spec"][key], key
    assert sum(p.numel() for p in model.parameters()) == MANIFEST["parameters"]
    assert next(model.parameters()).dtype == torch.float32
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.convert_tokens_to_ids(teaching.EOS_TOKEN) == model.config.eos_token_id


def test_corpus_matches_manifest(corpus):
    assert teaching.corpus_hash(corpus) == MANIFEST["corpus"]["sha256"]
    assert len(corpus) == MANIFEST["corpus"]["documents"]
    keys = [d.key for d in corpus]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all(d.text and d.text == d.text.strip() for d in corpus)


def test_token_counts_match_manifest(streams):
    assert {s: int(v.numel()) for s, v in streams.items()} == MANIFEST["corpus"]["tokens"]


def test_save_corpus_is_byte_stable(corpus, tmp_path):
    path = tmp_path / "corpus.jsonl.gz"     # gzip records the file's base name, so keep it
    teaching.save_corpus(corpus, path)
    assert path.read_bytes() == (teaching.teaching_model_path() / "corpus.jsonl.gz").read_bytes()
    assert teaching._read_corpus(path) == corpus


def test_unigram_baseline_matches_manifest(streams):
    """Recomputed as the training script does: on the predicted tokens of each window."""
    vocab = MANIFEST["config"]["vocab_size"]
    for split in ("validation", "test"):
        targets = ml.evaluation.windows(streams[split], SEQ_LEN)[:, 1:]
        unigram = teaching.unigram_perplexity(streams["train"], targets, vocab)
        assert unigram == pytest.approx(MANIFEST[f"unigram_{split}_ppl"], abs=1e-3), split
    # the model is far better than token frequencies alone
    assert MANIFEST["validation_ppl"] < MANIFEST["unigram_validation_ppl"] / 5
    assert MANIFEST["test_ppl"] < MANIFEST["unigram_test_ppl"] / 5


def test_validation_perplexity_matches_manifest(model, streams):
    """The slowest test (~10 s on 2 cores): the full validation split, as in the manifest."""
    ppl = ml.evaluation.perplexity(model, streams["validation"], window=SEQ_LEN, batch_size=32)
    assert ppl == pytest.approx(MANIFEST["validation_ppl"], rel=1e-3)
    assert ppl < MANIFEST["unigram_validation_ppl"] / 5


# ---------------------------------------------------------------- splits

def _documented_split(key: str) -> str:
    """The rule written in the manifest, re-implemented independently."""
    unit = "package:" + key[len("module:"):].split(".")[0] if key.startswith("module:") else key
    bucket = int(hashlib.sha256(unit.encode("utf-8")).hexdigest(), 16) >> (256 - 32)
    bucket %= 100
    return "train" if bucket < 80 else "validation" if bucket < 90 else "calibration" if bucket < 95 else "test"


def test_split_of_follows_the_documented_rule(corpus):
    assert "sha256(split_unit(key)) % 100" in MANIFEST["corpus"]["split_rule"]
    for doc in corpus:
        assert doc.split == teaching.split_of(doc.key) == _documented_split(doc.key), doc.key
    # depends on the key only: the same key with another text lands in the same split
    assert teaching.Document("module:json", "x").split == teaching.Document("module:json", "y" * 1000).split


def test_a_package_never_straddles_two_splits(corpus):
    """asyncio.sslproto repeats asyncio.transports, the codecs repeat each other: one split per package."""
    assert teaching.split_unit("module:asyncio.sslproto") == teaching.split_unit("module:asyncio") == "package:asyncio"
    assert teaching.split_unit("topic:assert") == "topic:assert"
    splits = collections.defaultdict(set)
    for doc in corpus:
        splits[teaching.split_unit(doc.key)].add(doc.split)
    assert all(len(s) == 1 for s in splits.values())
    assert len(splits["package:encodings"]) == 1 and len([d for d in corpus if "encodings" in d.key]) > 50


def _runs(stream: torch.Tensor, n: int = 12) -> set[bytes]:
    """Every ``n``-token run of a stream as bytes: an exact set, independent of ``ngram_hashes``."""
    raw = stream.numpy().astype(np.int16).tobytes()
    width = 2 * n
    return {raw[2 * i: 2 * i + width] for i in range(stream.numel() - n + 1)}


def test_no_split_repeats_twelve_tokens_of_an_earlier_one(streams, tokenizer):
    """The leak the old per-module split had: 664 of 1,012 calibration runs were in the training text."""
    assert MANIFEST["corpus"]["shared_ngram"] == teaching.SHARED_NGRAM == 12
    earlier: set[bytes] = set()
    for split in teaching.SPLITS:
        runs = _runs(streams[split])
        if earlier:
            assert not runs & earlier, f"{split} repeats {len(runs & earlier)} 12-token runs of earlier splits"
        earlier |= runs
    # the book's default calibration set and every evaluation window, checked as windows
    train = _runs(streams["train"])
    windows = [teaching.exact_calibration_ids(tokenizer),
               *(ml.data.evaluation_ids(tokenizer, split=s) for s in ml.data.TEACHING_EVAL_SPLITS)]
    for ids in windows:
        assert not any(_runs(row) & train for row in ids)


def test_remove_shared_text_cuts_repeated_paragraphs(tokenizer):
    name = {s: next(f"module:leak{i}" for i in range(10_000) if teaching.split_of(f"module:leak{i}") == s)
            for s in teaching.SPLITS}
    shared = "Return the number of items in the container, counting repeated items once each time."
    other = "Encode the object and return a tuple of the output bytes and the length the codec consumed."
    docs = [teaching.Document(name["train"], f"Training text.\n\n{shared}"),
            teaching.Document(name["validation"], f"{shared}\n\n{other}"),
            teaching.Document(name["calibration"], shared),
            teaching.Document(name["test"], f"{other}\n\nSomething new here.")]
    clean = {d.key: d for d in teaching.remove_shared_text(docs, tokenizer)}
    assert clean[name["train"]] == docs[0]                                   # training text is never cut
    assert clean[name["validation"]].text == other
    assert name["calibration"] not in clean                                   # nothing left: dropped
    assert clean[name["test"]].text == "Something new here."                  # repeats validation: cut too
    assert list(clean) == sorted(clean)
    # text that shares no run with earlier splits is kept whole
    fresh = [docs[0], teaching.Document(name["test"], "Nothing here repeats.\n\nNor does this.")]
    assert teaching.remove_shared_text(fresh, tokenizer) == sorted(fresh, key=lambda d: d.key)


def test_ngram_hashes_match_runs():
    ids = np.array([5, 1, 4, 1, 5, 9, 2, 6, 5, 1, 4, 1])
    h = teaching.ngram_hashes(ids, 3)
    assert h.shape == (10,) and h[0] == h[8] and h[1] == h[9] and len(set(h.tolist())) == 8
    assert teaching.ngram_hashes(ids[:2], 3).size == 0


def test_split_proportions(corpus):
    """80/10/5/5 % of split units (packages and topics), not of documents: encodings alone is 97 documents."""
    units = {teaching.split_unit(d.key): d.split for d in corpus}
    counts = collections.Counter(units.values())
    share = {s: counts[s] / len(units) for s in teaching.SPLITS}
    # 258 units: binomial standard errors are 2.5 / 1.9 / 1.4 / 1.4 points; allow ~2.5 of them
    assert share["train"] == pytest.approx(0.80, abs=0.065)
    assert share["validation"] == pytest.approx(0.10, abs=0.05)
    assert share["calibration"] == pytest.approx(0.05, abs=0.035)
    assert share["test"] == pytest.approx(0.05, abs=0.035)
    # on many units the rule's proportions are exact to within a point
    many = collections.Counter(teaching.split_of(f"module:synthetic{i}.sub") for i in range(20_000))
    for split, expected in zip(teaching.SPLITS, (0.80, 0.10, 0.05, 0.05)):
        assert many[split] / 20_000 == pytest.approx(expected, abs=0.01), split


def test_load_corpus_splits_partition_the_corpus(corpus):
    parts = {s: teaching.load_corpus(s) for s in teaching.SPLITS}
    assert sum(len(p) for p in parts.values()) == len(corpus)
    for split, docs in parts.items():
        assert docs and all(d.split == split for d in docs)
    assert sorted(d.key for p in parts.values() for d in p) == [d.key for d in corpus]


def test_load_corpus_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        teaching.load_corpus("dev")


# ---------------------------------------------------------------- rebuilding the corpus

@pytest.fixture(scope="module")
def rebuilt() -> list[teaching.Document]:
    """The corpus rebuilt from the running Python's own text (~9 s)."""
    return teaching.build_corpus()


def test_rebuilt_corpus_keeps_every_split(rebuilt, corpus):
    keys = [d.key for d in rebuilt]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert any(k.startswith("topic:") for k in keys) and any(k.startswith("module:") for k in keys)
    shipped = {d.key: d.split for d in corpus}
    common = [d for d in rebuilt if d.key in shipped]
    assert len(common) >= 0.8 * len(corpus)        # the stdlib changes little between versions
    assert all(d.split == shipped[d.key] for d in common)


def test_rebuilt_corpus_reproduces_the_shipped_snapshot(rebuilt, tokenizer):
    # The snapshot was built with CPython 3.11 (the model was trained elsewhere, on 3.12, so
    # manifest()["versions"]["python"] is not the corpus's Python); other versions differ in text.
    if sys.version_info[:2] != (3, 11):
        pytest.skip(f"the shipped corpus was built with Python 3.11; this is "
                    f"{sys.version_info.major}.{sys.version_info.minor}, whose stdlib text differs")
    assert teaching.corpus_hash(teaching.remove_shared_text(rebuilt, tokenizer)) == MANIFEST["corpus"]["sha256"]


# ---------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("split", ["calibration", "test"])
def test_tokenizer_round_trips_documents(tokenizer, split):
    docs = teaching.load_corpus(split)
    encoded = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    for doc, ids in zip(docs, encoded):
        assert tokenizer.decode(ids) == doc.text, doc.key


@pytest.mark.parametrize("text", [
    "",
    "naïve café — déjà vu, Ærøskøbing, straße",
    "日本語のテキスト, 中文, 한국어, Ελληνικά, русский",
    "emoji 🎉🐍👩‍💻 and flags 🇫🇷",
    "\ttabs\tinside\t\tand\n\nnewlines\r\nCRLF  double  spaces ",
    "  leading and trailing spaces  ",
    "def f(x):\n\treturn x ** 2  # comment\n",
    "NUL \x00 and bell \x07 and zero-width \u200b joiner",
    f"special token in text {teaching.EOS_TOKEN} stays",
])
def test_tokenizer_round_trips_any_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < len(tokenizer) for i in ids)


def test_encode_documents_separates_with_eos(tokenizer):
    docs = [teaching.Document("a", "first document"), teaching.Document("b", "second ✓")]
    eos = tokenizer.convert_tokens_to_ids(teaching.EOS_TOKEN)
    stream = teaching.encode_documents(tokenizer, docs).tolist()
    first = tokenizer.encode(docs[0].text, add_special_tokens=False)
    second = tokenizer.encode(docs[1].text, add_special_tokens=False)
    assert stream == first + [eos] + second + [eos]


# ---------------------------------------------------------------- calibration_ids

def test_calibration_ids_are_the_first_windows(tokenizer, streams):
    ids = teaching.calibration_ids(tokenizer, 3, 50)
    assert ids.shape == (3, 50) and ids.dtype == torch.long
    assert torch.equal(ids, streams["calibration"][:150].view(3, 50))
    test_ids = teaching.calibration_ids(tokenizer, 2, 40, split="test")
    assert torch.equal(test_ids, streams["test"][:80].view(2, 40))


def test_calibration_ids_seeded_windows(tokenizer, streams):
    a = teaching.calibration_ids(tokenizer, 5, 64, seed=1)
    assert torch.equal(a, teaching.calibration_ids(tokenizer, 5, 64, seed=1))
    assert not torch.equal(a, teaching.calibration_ids(tokenizer, 5, 64, seed=2))
    stream = streams["calibration"]
    all_windows = stream[: stream.numel() // 64 * 64].view(-1, 64)
    rows = [int(np.flatnonzero((all_windows == row).all(dim=1).numpy())[0]) for row in a]
    assert len(set(rows)) == 5                     # distinct, non-overlapping windows


def test_calibration_ids_too_many_seqs_says_the_maximum(tokenizer, streams):
    maximum = streams["calibration"].numel() // 128
    assert teaching.calibration_ids(tokenizer, maximum, 128).shape == (maximum, 128)
    with pytest.raises(ValueError) as err:
        teaching.calibration_ids(tokenizer, maximum + 1, 128)
    msg = str(err.value)
    assert "n_seqs" in msg and f"at most {maximum}" in msg


@pytest.mark.parametrize("kwargs,word", [
    ({"split": "dev"}, "split"),
    ({"n_seqs": 0}, "n_seqs"),
    ({"n_seqs": 2.0}, "n_seqs"),
    ({"seq_len": 1}, "seq_len"),
    ({"seq_len": True}, "seq_len"),
])
def test_calibration_ids_rejects_bad_arguments(tokenizer, kwargs, word):
    args = {"n_seqs": 2, "seq_len": 16, **kwargs}
    with pytest.raises(ValueError) as err:
        teaching.calibration_ids(tokenizer, **args)
    assert word in str(err.value)


def test_unigram_perplexity_of_a_uniform_stream():
    """Sanity check of the baseline: a stream using every token equally has ppl = vocab size."""
    vocab = 8
    ids = torch.arange(vocab).repeat(50)
    assert teaching.unigram_perplexity(ids, ids, vocab) == pytest.approx(vocab, rel=1e-12)
    assert math.isfinite(teaching.unigram_perplexity(ids[:4], ids, vocab))   # unseen tokens: smoothed


def test_manifest_reports_train_and_validation_ppl_and_the_kept_step():
    """Early stopping on validation PPL, with train PPL beside it: the gap is what memorisation looks like."""
    history = MANIFEST["history"]
    assert history and all({"step", "train_loss", "train_ppl", "validation_ppl"} <= set(r) for r in history)
    best = min(history, key=lambda r: r["validation_ppl"])
    assert MANIFEST["kept_step"] == best["step"] <= MANIFEST["steps"]
    assert MANIFEST["validation_ppl"] == pytest.approx(best["validation_ppl"], rel=1e-3)
    assert MANIFEST["train_ppl"] < MANIFEST["validation_ppl"]
    assert MANIFEST["spec"]["keep_best"] is True
