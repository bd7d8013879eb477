"""Stage 1 of the paper on a GPU: prefix-tree evaluation vs one forward per mask vs zero-and-restore.

Models: ``--model llama7b`` builds a LLaMA-2-7B-shaped ``LlamaForCausalLM`` (32 layers, width
4096, MLP 11008, vocabulary 32000; random weights, since nothing may be downloaded: speed does not
depend on the values) in bfloat16; ``--model smollm2-135m`` loads the real 30-layer model offline
(``ml.models.load_model``); ``--model small`` is a tiny 32-layer configuration that tests the
script itself on any device. Masks are drawn like the paper's stage 1 (keep 30/27/24/21/18 of 32,
scaled to L; uniform within a stratum, distinct), on 10 × 128 calibration tokens.

Measured side by side in one run, each on the same masks:

- zero-and-restore, one mask per forward (the public code's method; all L layers run), on the
  first ``--reference-masks`` masks only;
- one forward per mask, dropped layers skipped (``LayerGame(engine="forward", mask_batch_size=1)``),
  on the same subset;
- the prefix tree (``LayerGame``'s default engine, ``--mask-batch-size`` masks breadth-first) on
  all ``--n-masks`` masks, and on the subset for the loss check.

It asserts equal losses on the subset, and prints masks per second, the time for all masks, the
ratios and peak GPU memory.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import minilib as ml
from prefix_tree import stage1_masks  # benchmarks/ is on sys.path when run as a script


def build(kind: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if kind == "smollm2-135m":
        model, _ = ml.models.load_model(kind, dtype=dtype)
        return model.to(device).eval()
    if kind == "small":
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=32,
                          num_attention_heads=4, num_key_value_heads=4)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def timed(device: str, fn):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama7b", choices=["llama7b", "smollm2-135m", "small"])
    parser.add_argument("--n-masks", type=int, default=8000)
    parser.add_argument("--reference-masks", type=int, default=200)
    parser.add_argument("--mask-batch-size", type=int, default=64)
    parser.add_argument("--row-chunk", type=int, default=640)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, seconds = timed(args.device, lambda: build(args.model, args.device, dtype))
    n = len(ml.layers.decoder_layers(model))
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters ({dtype}), "
          f"L = {n}, on {args.device}, built in {seconds:.1f} s")
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (10, 128), generator=torch.Generator().manual_seed(0)).to(args.device)
    masks = stage1_masks(n, args.n_masks, seed=0)
    subset = masks[: args.reference_masks]
    print(f"{len(masks)} distinct masks, strata keep {ml.pruning.paper_keep_sizes(n)}; reference subset {len(subset)}")
    ml.evaluation.LayerGame(model, ids, "neg_loss", engine="forward", mask_batch_size=1)(subset[:2])   # warm-up

    def zero_and_restore() -> np.ndarray:
        out = []
        for keep in subset:
            with ml.layers.zero_layers(model, ~keep):
                out.append(float(ml.evaluation.token_nll(model, ids).double().mean()))
        return np.array(out)

    def game(engine: str, batch: int) -> ml.evaluation.LayerGame:
        g = ml.evaluation.LayerGame(model, ids, "neg_loss", engine=engine, mask_batch_size=batch, progress=False)
        g.layer_forwards = 0
        return g

    tree_game = game("prefix", args.mask_batch_size)
    runs = {"zero-and-restore": timed(args.device, zero_and_restore),
            "one forward per mask": timed(args.device, lambda: game("forward", 1).losses(subset)),
            "prefix tree": timed(args.device, lambda: tree_game.losses(subset))}
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    full_game = game("prefix", args.mask_batch_size)
    _, t_all = timed(args.device, lambda: full_game.losses(masks))
    ref = runs["zero-and-restore"][0]
    for name, (losses, t) in runs.items():
        print(f"{name:22s}: {len(subset) / t:8.2f} masks/s on the subset; max |Δ loss| vs zero-and-restore "
              f"{np.abs(losses - ref).max():.1e}")
        assert np.abs(losses - ref).max() <= (5e-2 if dtype == torch.bfloat16 else 1e-5), name
    t_zero, t_one, t_tree = (runs[k][1] for k in runs)
    print(f"prefix tree, all {len(masks)} masks: {t_all:.1f} s ({len(masks) / t_all:.1f} masks/s), "
          f"{full_game.layer_forwards} layer forwards vs {int(masks.sum())} for one forward per mask "
          f"({masks.sum() / full_game.layer_forwards:.2f}x fewer)")
    print(f"ratios on the subset: prefix tree {t_zero / t_tree:.2f}x zero-and-restore, "
          f"{t_one / t_tree:.2f}x one forward per mask; one forward per mask {t_zero / t_one:.2f}x zero-and-restore")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory during the full run: {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")


if __name__ == "__main__":
    main()
