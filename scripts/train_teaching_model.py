"""Build the teaching model shipped in ``minilib/assets/teaching`` (chapter 00).

Two stages, each reproducible from its seed and fixed step count:

1. data (``--rebuild-data``, run on the reference Python, or ``--resplit``, from the shipped
   snapshot): build the corpus from the running CPython's pydoc topics and stdlib docstrings
   (or read the snapshot), split it by top-level package (``teaching.split_of``), train the
   byte-level BPE tokenizer on the train split, cut from every later split the paragraphs that
   repeat a 12-token run of an earlier one (``teaching.remove_shared_text``), and write the
   snapshot ``corpus.jsonl.gz`` and the tokenizer;
2. model: train a 12-layer ``LlamaForCausalLM`` for exactly ``--steps`` steps on the snapshot's
   train split and write ``model.safetensors``, ``config.json``, and ``manifest.json``.

Example: ``python scripts/train_teaching_model.py --resplit --device cpu``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from minilib import evaluation, teaching


def parse_args() -> argparse.Namespace:
    spec = teaching.TeachingSpec()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=teaching.teaching_model_path())
    p.add_argument("--data-from", type=Path, default=None,
                   help="folder holding corpus.jsonl.gz and the tokenizer (default: --out)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--rebuild-data", action="store_true",
                      help="rebuild the corpus snapshot from the running Python, then the tokenizer")
    data.add_argument("--resplit", action="store_true",
                      help="re-split and clean the existing snapshot, then rebuild the tokenizer")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for field in dataclasses.fields(spec):
        default = getattr(spec, field.name)
        kind = (lambda v: v.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)
        p.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=default)
    return p.parse_args()


def _portable_tokenizer_config(folder: Path) -> None:
    """Name the generic fast-tokenizer class, which every transformers 5.x resolves."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    args = parse_args()
    spec = teaching.TeachingSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(teaching.TeachingSpec)})
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_from or out
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    removed: dict[str, int] = {}
    if args.rebuild_data or args.resplit:
        docs = teaching.build_corpus() if args.rebuild_data else teaching._read_corpus(data_dir / "corpus.jsonl.gz")
        tokenizer = teaching.train_tokenizer([d.text for d in docs if d.split == "train"], spec.vocab_size)
        clean = teaching.remove_shared_text(docs, tokenizer)
        kept = {d.key: d for d in clean}
        for split in teaching.SPLITS:
            before = [d for d in docs if d.split == split]
            removed[split] = sum(len(d.text) - len(kept[d.key].text) if d.key in kept else len(d.text)
                                 for d in before)
        log("characters cut as repeats of earlier splits: " + ", ".join(f"{s} {removed[s]}" for s in teaching.SPLITS)
            + f"; documents {len(docs)} -> {len(clean)}")
        docs = clean
        teaching.save_corpus(docs, out / "corpus.jsonl.gz")
        tokenizer.save_pretrained(out)
        _portable_tokenizer_config(out)
        log(f"built corpus: {len(docs)} documents, hash {teaching.corpus_hash(docs)[:16]}")
    else:
        from transformers import AutoTokenizer
        docs = teaching._read_corpus(data_dir / "corpus.jsonl.gz")
        tokenizer = AutoTokenizer.from_pretrained(data_dir)
        if data_dir != out:
            (out / "corpus.jsonl.gz").write_bytes((data_dir / "corpus.jsonl.gz").read_bytes())
            tokenizer.save_pretrained(out)
            _portable_tokenizer_config(out)
    streams = {s: teaching.encode_documents(tokenizer, [d for d in docs if d.split == s]) for s in teaching.SPLITS}
    log("tokens per split: " + ", ".join(f"{s} {streams[s].numel()}" for s in teaching.SPLITS))
    log(f"spec: {json.dumps(dataclasses.asdict(spec))}  device: {args.device}")

    start = time.time()
    model, history = teaching.train_teaching_model(spec, tokenizer, streams["train"], streams["validation"],
                                                   device=args.device, log=log)
    seconds = time.time() - start
    model.save_pretrained(out)

    ppl = {s: evaluation.perplexity(model, streams[s], window=spec.seq_len) for s in ("train", "validation", "test")}
    unigram = {s: teaching.unigram_perplexity(streams["train"], evaluation.windows(streams[s], spec.seq_len)[:, 1:],
                                              spec.vocab_size) for s in ("validation", "test")}
    log(f"trained {spec.steps} steps in {seconds:.0f} s; train ppl {ppl['train']:.2f}; "
        f"validation ppl {ppl['validation']:.2f} "
        f"(unigram {unigram['validation']:.2f}); test ppl {ppl['test']:.2f} (unigram {unigram['test']:.2f})")
    manifest = {
        "name": "minilib teaching LLaMA",
        "corpus": {"sha256": teaching.corpus_hash(docs), "documents": len(docs),
                   "tokens": {s: int(streams[s].numel()) for s in teaching.SPLITS},
                   "source": "pydoc_data topics + stdlib docstrings",
                   "split_rule": "sha256(split_unit(key)) % 100, unit = top-level package or topic: "
                   "<80 train, <90 validation, <95 calibration, else test",
                   "shared_ngram": teaching.SHARED_NGRAM,
                   "characters_cut": removed or None},
        "config": json.loads(model.config.to_json_string()),
        "spec": dataclasses.asdict(spec),
        "command": "python scripts/train_teaching_model.py " + " ".join(sys.argv[1:]),
        "steps": spec.steps, "seed": spec.seed, "device": args.device,
        "kept_step": min(history, key=lambda r: r[3])[0] if spec.keep_best else spec.steps,
        "train_seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "versions": teaching.environment_versions(),
        "history": [{"step": s, "train_loss": round(l, 4), "train_ppl": round(t, 3), "validation_ppl": round(p, 3)}
                    for s, l, t, p in history],
        "train_ppl": round(ppl["train"], 3),
        "validation_ppl": round(ppl["validation"], 3), "test_ppl": round(ppl["test"], 3),
        "unigram_validation_ppl": round(unigram["validation"], 3), "unigram_test_ppl": round(unigram["test"], 3),
        "model_sha256": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "training_log.txt").write_text("\n".join(log_lines) + "\n")


if __name__ == "__main__":
    main()
