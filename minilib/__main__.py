"""Command line: ``python -m minilib prune --model teaching --method shapley_surrogate --remove 3 --out DIR``.

Introduced in chapter 06. ``--model`` is ``teaching`` (the shipped tiny LLaMA), a local folder,
or a Hugging Face model id (loaded with ``from_pretrained``; downloading needs a network).
Calibration text is the teaching corpus's calibration split unless ``--calibration-file`` names
a UTF-8 text file, so the command works offline for any model with a tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _load(model_arg: str, device: str, dtype: str):
    from . import teaching

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    if model_arg == "teaching":
        return teaching.load_teaching_model(device=device, dtype=torch_dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_arg, dtype=torch_dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(model_arg)


def _calibration(tokenizer, args) -> torch.Tensor:
    from . import teaching

    if args.calibration_file is None:
        docs = teaching.load_corpus("calibration")
        stream = torch.tensor(tokenizer("\n\n".join(d.text for d in docs), add_special_tokens=False)["input_ids"])
    else:
        text = Path(args.calibration_file).read_text(encoding="utf-8")
        stream = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    n_windows = stream.numel() // args.seq_len
    if n_windows < args.n_seqs:
        raise SystemExit(f"error: the calibration text holds {n_windows} windows of {args.seq_len} tokens; "
                         f"--n-seqs must be at most {n_windows}")
    return stream[: args.n_seqs * args.seq_len].view(args.n_seqs, args.seq_len)


def build_parser() -> argparse.ArgumentParser:
    from .pruning import METHODS

    parser = argparse.ArgumentParser(prog="python -m minilib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune", help="remove the least important decoder layers and save the model")
    p.add_argument("--model", required=True, help="'teaching', a local folder, or a Hugging Face id")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--remove", type=int, required=True, help="number of decoder layers to remove")
    p.add_argument("--out", type=Path, required=True, help="folder for the pruned model, tokenizer and report")
    p.add_argument("--budget", type=int, default=None, help="real masked evaluations (surrogate methods)")
    p.add_argument("--n-seqs", type=int, default=8, help="calibration sequences (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence (default 128)")
    p.add_argument("--calibration-file", default=None, help="UTF-8 text file for calibration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .evaluation import perplexity
    from .pruning import prune

    model, tokenizer = _load(args.model, args.device, args.dtype)
    ids = _calibration(tokenizer, args).to(args.device)
    try:
        result = prune(model, ids, args.method, args.remove, rng=args.seed, budget=args.budget, inplace=True)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    report = {**result.summary(), "model": args.model, "calibration": [args.n_seqs, args.seq_len],
              "calibration_ppl_after": perplexity(result.model, ids), "layers_after": len(result.scores) - args.remove}
    (args.out / "prune_result.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"removed layers {result.removed} by {args.method} "
          f"({result.n_evals} masked evaluations, {result.seconds:.1f} s); saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
