"""minilib.data: text sources, the S128/S2048 and calibration protocols, BOS handling, no leakage.

Hub sources run their real ``datasets.load_dataset`` call on small local files written here;
nothing is downloaded.
"""

from __future__ import annotations

import copy
import gzip
import json
import sys

import pytest
import torch

import minilib as ml
from minilib import data

datasets = pytest.importorskip("datasets")

WORDS = ("the model keeps every layer that matters and drops the rest of them quietly while "
         "perplexity on held out text barely moves at all across many careful runs").split()


def _lines(n: int, width: int = 40, offset: int = 0) -> list[str]:
    return [" ".join(WORDS[(offset + i + j) % len(WORDS)] for j in range(width)) + f" row{i}" for i in range(n)]


def _write(path, rows: list[str], field: str = "text"):
    """Write rows as the file type its suffix names: .txt, .jsonl, .json.gz or .parquet."""
    name = path.name
    if name.endswith(".txt"):
        path.write_text("\n".join(rows) + "\n")
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps({field: r}) + "\n" for r in rows))
    elif name.endswith(".json.gz"):
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps({field: r, "url": "x"}) + "\n" for r in rows)
    elif name.endswith(".parquet"):
        datasets.Dataset.from_dict({field: rows}).to_parquet(str(path))
    return path


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The teaching tokenizer made to put a BOS token first by default, as LLaMA tokenizers do."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    bos = tokenizer.eos_token
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, tokenizer.eos_token_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=bos)


FILES = {"wikitext2": ("wiki.txt", "text"), "ptb": ("ptb.jsonl", "sentence"), "c4": ("c4.json.gz", "text"),
         "c4_train": ("c4-train.json.gz", "text"), "bookcorpus": ("books.parquet", "text")}


@pytest.mark.parametrize("source", list(FILES))
def test_each_hub_source_reads_local_files_through_load_dataset(source, tmp_path, monkeypatch):
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(k) or real(*a, **k))
    name, field = FILES[source]
    rows = _lines(5)
    path = _write(tmp_path / name, rows, field)
    assert data.load_texts(source, data_files=path, cache_dir=tmp_path / "hf") == rows
    assert len(calls) == 1 and calls[0]["data_files"] == {data.SOURCES[source].split: [str(path)]}


@pytest.mark.parametrize("source, expected", [
    ("wikitext2", {"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "split": "test"}),
    ("ptb", {"path": "ptb-text-only/ptb_text_only", "name": "penn_treebank", "split": "test",
             "revision": "refs/convert/parquet"}),
    ("c4", {"path": "allenai/c4", "split": "validation",
            "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}}),
    ("bookcorpus", {"path": "bookcorpus/bookcorpus", "split": "train", "revision": "refs/convert/parquet"}),
])
def test_hub_sources_ask_load_dataset_for_the_protocols_files(source, expected, monkeypatch):
    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        return datasets.Dataset.from_dict({data.SOURCES[source].field: ["a b c"]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert data.load_texts(source) == ["a b c"]
    assert {k: calls[0][k] for k in expected} == expected


def test_c4_keeps_the_first_1100_documents_and_256_windows(tokenizer, tmp_path):
    path = _write(tmp_path / "c4.json.gz", _lines(1200, width=60))
    cache = tmp_path / "hf"
    assert len(data.load_texts("c4", data_files=path, cache_dir=cache)) == 1100
    assert data.evaluation_ids(tokenizer, "c4", seq_len=32, data_files=path, cache_dir=cache).shape == (256, 32)


@pytest.mark.parametrize("seq_len", [128, 2048])
def test_evaluation_windows_are_the_stream_cut_from_its_start(tokenizer, seq_len):
    ids = data.evaluation_ids(tokenizer, seq_len=seq_len)
    stream = data.encode(tokenizer, data.load_texts("teaching", "test"), sep=tokenizer.eos_token)
    assert ids.shape == (stream.numel() // seq_len, seq_len) and ids.shape[0] >= 5
    assert torch.equal(ids.flatten(), stream[: ids.numel()])
    assert data.evaluation_ids(tokenizer, seq_len=seq_len, max_windows=2).shape == (2, seq_len)


def test_teaching_stream_matches_the_teaching_module(tokenizer):
    stream = data.encode(tokenizer, data.load_texts("teaching", "test"), sep=tokenizer.eos_token)
    assert torch.equal(stream, ml.teaching.token_stream(tokenizer, "test")[:-1])  # no trailing separator


def test_bos_goes_first_once_only_for_tokenizers_that_add_it(tokenizer, bos_tokenizer, tmp_path):
    path = _write(tmp_path / "wiki.txt", _lines(30))
    bos = bos_tokenizer.bos_token_id
    assert data.adds_bos(bos_tokenizer) and not data.adds_bos(tokenizer)
    with_bos = data.evaluation_ids(bos_tokenizer, "wikitext2", seq_len=16, data_files=path, cache_dir=tmp_path)
    without = data.evaluation_ids(tokenizer, "wikitext2", seq_len=16, data_files=path, cache_dir=tmp_path)
    assert with_bos[0, 0] == bos and int((with_bos == bos).sum()) == 1
    assert int((without == bos).sum()) == 0
    n = min(with_bos.numel() - 1, without.numel())
    assert torch.equal(with_bos.flatten()[1: n + 1], without.flatten()[:n])  # the same stream, BOS aside
    row = "the model keeps every layer"
    length = len(data.encode(bos_tokenizer, [row]))  # one window per row: it starts at the BOS
    rows = data.calibration_ids(bos_tokenizer, "c4_train", n_seqs=3, seq_len=length, cache_dir=tmp_path,
                                data_files=_write(tmp_path / "c4.jsonl", [row] * 3))
    assert bool((rows[:, 0] == bos).all()) and int((rows[:, 1:] == bos).sum()) == 0


def test_calibration_is_deterministic_by_seed(tokenizer):
    a = data.calibration_ids(tokenizer, seed=0)
    assert a.shape == (10, 128)
    assert torch.equal(a, data.calibration_ids(tokenizer, seed=0))
    assert not torch.equal(a, data.calibration_ids(tokenizer, seed=1))
    assert data.ids_hash(a) == data.ids_hash(a.clone()) != data.ids_hash(a.view(20, 64))


NAMES = "zero one two three four five six seven eight nine ten eleven".split()


def test_calibration_windows_come_from_distinct_rows_of_the_file(tokenizer, tmp_path):
    path = _write(tmp_path / "books.parquet", [" ".join([name] * 30) for name in NAMES])
    ids = data.calibration_ids(tokenizer, "bookcorpus", n_seqs=12, seq_len=24, data_files=path, cache_dir=tmp_path)
    found = [{w for w in text.split() if w in NAMES} for text in tokenizer.batch_decode(ids)]
    assert ids.shape == (12, 24) and all(len(f) == 1 for f in found)
    assert set.union(*found) == set(NAMES)


def test_no_calibration_window_shares_a_12_token_run_with_evaluation_text(tokenizer):
    calibration = data.calibration_ids(tokenizer)
    for split in data.TEACHING_EVAL_SPLITS:
        evaluation = data.evaluation_ids(tokenizer, split=split)
        assert not data.shared_ngrams(calibration, evaluation, 12), split
    # the teaching splits share no run by construction, so the guard skips nothing there ...
    unguarded = data.calibration_ids(tokenizer, avoid=[])
    assert torch.equal(unguarded, calibration)
    # ... and is tested on text it must avoid: windows holding a run of `avoid` are never chosen
    guarded = data.calibration_ids(tokenizer, avoid=[unguarded[:3]])
    assert not data.shared_ngrams(guarded, unguarded[:3], 12)
    assert not any(torch.equal(row, other) for row in guarded for other in unguarded[:3])


def test_evaluation_text_is_refused_as_calibration(tokenizer):
    with pytest.raises(ValueError, match="evaluation text"):
        data.calibration_ids(tokenizer, split="test")
    with pytest.raises(ValueError, match="evaluation text"):
        data.calibration_ids(tokenizer, "wikitext2")


@pytest.mark.parametrize("kwargs, match", [
    ({"source": "wiki"}, "source must be one of"),
    ({"n_seqs": 0}, "n_seqs"), ({"n_seqs": -2}, "n_seqs"), ({"n_seqs": True}, "n_seqs"),
    ({"seq_len": 1}, "seq_len"), ({"seq_len": 12.5}, "seq_len"),
    ({"n_seqs": 500}, r"n_seqs must be at most \d+"),
])
def test_bad_calibration_arguments_are_named(tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.calibration_ids(tokenizer, **kwargs)


def test_bad_evaluation_arguments_are_named(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="seq_len"):
        data.evaluation_ids(tokenizer, seq_len=1)
    with pytest.raises(ValueError, match="source must be one of"):
        data.load_texts("penn")
    with pytest.raises(ValueError, match="fewer than seq_len"):
        data.evaluation_ids(tokenizer, "wikitext2", seq_len=4096, data_files=_write(tmp_path / "w.txt", ["short"]),
                            cache_dir=tmp_path)
    with pytest.raises(ValueError, match="data_files"):
        data.load_texts("wikitext2", data_files=tmp_path / "w.xml")
    with pytest.raises(TypeError, match="sequence of strings"):
        data.encode(tokenizer, "one string")


def test_text_hash_separates_texts():
    assert data.text_hash(["ab", "c"]) != data.text_hash(["a", "bc"])
    assert data.text_hash(["ab", "c"]) == data.text_hash(("ab", "c"))


def test_missing_datasets_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r'pip install "datasets'):
        data.load_texts("wikitext2")


def test_a_text_file_is_one_document_cut_into_random_windows(tokenizer, tmp_path):
    path = _write(tmp_path / "notes.txt", _lines(40))
    assert data.load_texts(str(path)) == [path.read_text()]
    stream = data.encode(tokenizer, [path.read_text()])
    windows = data.evaluation_ids(tokenizer, str(path), seq_len=32)
    assert torch.equal(windows.flatten(), stream[: windows.numel()])
    calibration = data.calibration_ids(tokenizer, str(path), n_seqs=5, seq_len=32, seed=3)
    assert calibration.shape == (5, 32) and all(any(torch.equal(c, w) for w in windows) for c in calibration)
    assert len({tuple(c.tolist()) for c in calibration}) == 5
    with pytest.raises(ValueError, match="n_seqs must be at most"):
        data.calibration_ids(tokenizer, str(path), n_seqs=windows.shape[0] + 1, seq_len=32)
