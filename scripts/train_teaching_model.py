"""Build the teaching model shipped in ``minilib/assets/teaching`` (chapter 00).

Two stages, each reproducible from its seed and fixed step count:

1. data (``--rebuild-data``, run on the reference Python): build the corpus from the running
   CPython's pydoc topics and stdlib docstrings, write the snapshot ``corpus.jsonl.gz`` and
   train the byte-level BPE tokenizer on its train split;
2. model: train a 12-layer ``LlamaForCausalLM`` for exactly ``--steps`` steps on the snapshot's
   train split and write ``model.safetensors``, ``config.json``, and ``manifest.json``.

Example: ``python scripts/train_teaching_model.py --rebuild-data --device cuda``.
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
    p.add_argument("--rebuild-data", action="store_true", help="rebuild corpus snapshot and tokenizer")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for field in dataclasses.fields(spec):
        p.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(spec, field.name)),
                       default=getattr(spec, field.name))
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

    if args.rebuild_data:
        docs = teaching.build_corpus()
        teaching.save_corpus(docs, out / "corpus.jsonl.gz")
        tokenizer = teaching.train_tokenizer([d.text for d in docs if d.split == "train"], spec.vocab_size)
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

    ppl = {s: evaluation.perplexity(model, streams[s], window=spec.seq_len) for s in ("validation", "test")}
    unigram = {s: teaching.unigram_perplexity(streams["train"], evaluation.windows(streams[s], spec.seq_len)[:, 1:],
                                              spec.vocab_size) for s in ("validation", "test")}
    log(f"trained {spec.steps} steps in {seconds:.0f} s; validation ppl {ppl['validation']:.2f} "
        f"(unigram {unigram['validation']:.2f}); test ppl {ppl['test']:.2f} (unigram {unigram['test']:.2f})")
    manifest = {
        "name": "minilib teaching LLaMA",
        "corpus": {"sha256": teaching.corpus_hash(docs), "documents": len(docs),
                   "tokens": {s: int(streams[s].numel()) for s in teaching.SPLITS},
                   "source": "pydoc_data topics + stdlib docstrings", "split_rule": "sha256(key) % 100: "
                   "<80 train, <90 validation, <95 calibration, else test"},
        "config": json.loads(model.config.to_json_string()),
        "spec": dataclasses.asdict(spec),
        "command": "python scripts/train_teaching_model.py " + " ".join(sys.argv[1:]),
        "steps": spec.steps, "seed": spec.seed, "device": args.device,
        "train_seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "versions": teaching.environment_versions(),
        "history": [{"step": s, "train_loss": round(l, 4), "validation_ppl": round(p, 3)} for s, l, p in history],
        "validation_ppl": round(ppl["validation"], 3), "test_ppl": round(ppl["test"], 3),
        "unigram_validation_ppl": round(unigram["validation"], 3), "unigram_test_ppl": round(unigram["test"], 3),
        "model_sha256": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "training_log.txt").write_text("\n".join(log_lines) + "\n")


if __name__ == "__main__":
    main()
