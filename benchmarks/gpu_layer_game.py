"""Masked evaluations on a GPU at the paper's scale: layer skipping vs zero-and-restore.

Builds a LLaMA-2-7B-shaped ``LlamaForCausalLM`` (32 layers, width 4096, MLP 11008, vocabulary
32000; random weights, since nothing may be downloaded — speed does not depend on the values)
in bfloat16 on the GPU, and evaluates the same keep-masks, drawn like the paper's stage 1
(keep 30/27/24/21/18 of 32, uniform within a stratum), on 10 × 128 calibration tokens:

- zero-and-restore, one mask per forward (the public code's method; all 32 layers run);
- ``LayerGame`` with ``mask_batch_size=1`` (skipping, one mask per forward);
- ``LayerGame`` with a larger ``mask_batch_size`` (skipping, several masks per forward).

It checks that skipping and zeroing give the same losses and prints masks per second and the
ratios. ``--small`` runs a tiny configuration on any device, to test the script itself.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import minilib as ml


def build(small: bool, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=32,
                          num_attention_heads=4, num_key_value_heads=4)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval(), cfg


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--masks-per-stratum", type=int, default=8)
    parser.add_argument("--mask-batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    start = time.perf_counter()
    model, cfg = build(args.small, args.device, dtype)
    print(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters ({dtype}) on "
          f"{args.device} in {time.perf_counter() - start:.1f} s")
    rng = np.random.default_rng(0)
    ids = torch.randint(0, cfg.vocab_size, (10, 128), generator=torch.Generator().manual_seed(0)).to(args.device)
    masks = np.concatenate([np.stack([np.isin(np.arange(32), rng.choice(32, k, replace=False))
                                      for _ in range(args.masks_per_stratum)]) for k in (30, 27, 24, 21, 18)])
    warm = ml.evaluation.LayerGame(model, ids, utility="neg_loss", mask_batch_size=1)
    warm(masks[:2])

    def zero_and_restore() -> np.ndarray:
        out = []
        for keep in masks:
            with ml.layers.zero_layers(model, ~keep):
                out.append(float(ml.evaluation.token_nll(model, ids).double().mean()))
        return np.array(out)

    timings, losses = {}, {}
    for name, fn in [("zero-and-restore", zero_and_restore),
                     ("skip, 1 mask/forward", lambda: ml.evaluation.LayerGame(model, ids, "neg_loss", 1).losses(masks)),
                     (f"skip, {args.mask_batch_size} masks/forward",
                      lambda: ml.evaluation.LayerGame(model, ids, "neg_loss", args.mask_batch_size).losses(masks))]:
        sync(args.device)
        t0 = time.perf_counter()
        losses[name] = fn()
        sync(args.device)
        timings[name] = time.perf_counter() - t0
        print(f"{name:24s}: {len(masks) / timings[name]:8.2f} masks/s")
    ref = losses["zero-and-restore"]
    for name, value in losses.items():
        print(f"max |loss difference| {name} vs zero-and-restore: {np.abs(value - ref).max():.2e}")
    base = timings["zero-and-restore"]
    for name, t in timings.items():
        print(f"speed-up of {name}: {base / t:.2f}x")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")


if __name__ == "__main__":
    main()
