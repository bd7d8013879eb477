"""Heal pruned SmolLM2-135M with LoRA and ship the adapters (chapter 08).

For each entry (the paper's choice at 15 and 8 of 30 layers removed, and the dense model as the
control that separates healing from adapting to the text), prune SmolLM2-135M, train a LoRA
adapter with :func:`minilib.healing.train_adapter` on windows of the teaching corpus's *train*
split (disjoint from the calibration and held-out text of the shipped tables), save it in
float16 with :func:`minilib.healing.save_adapter`, reload it onto a freshly pruned model, merge,
and record held-out perplexity before and after. Writes ``minilib/assets/smollm2/healing/``:
one folder per adapter and ``manifest.json`` (spec, loss curves, perplexities, hashes, versions,
wall time). Chapter 08 and ``tests/test_healing.py`` reload the adapters and check the
perplexities against the manifest. About 25 minutes on 2 CPU cores:

    python scripts/heal_smollm2.py 2>&1 | tee scripts/logs/heal_smollm2.log
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

import minilib as ml

OUT = Path(__file__).resolve().parents[1] / "minilib" / "assets" / "smollm2" / "healing"


def removal_levels(n_layers: int, fractions=(0.5, 0.25)) -> dict[str, int]:
    return {f"minus{round(n_layers * f)}": round(n_layers * f) for f in fractions} | {"dense": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--only", nargs="*", help="entries to (re)train, e.g. minus15 dense")
    args = parser.parse_args()

    t_start = time.perf_counter()
    model, tok = ml.models.load_model("smollm2-135m")
    n_layers = ml.models.describe(model)["n_layers"]
    shipped = ml.pruning.load_shipped_pruning("smollm2")
    order = np.argsort(np.asarray(shipped.results["paper"]["scores"]), kind="stable")
    heldout = shipped.heldout_ids
    train = ml.data.evaluation_ids(tok, "teaching", 128, split="train")
    spec = ml.healing.HealingSpec(rank=args.rank, alpha=2.0 * args.rank, steps=args.steps,
                                  batch_size=args.batch_size, lr=args.lr, warmup=args.steps // 20, seed=args.seed)
    OUT.mkdir(parents=True, exist_ok=True)
    manifest_path = OUT / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"entries": {}}
    manifest.update({
        "model": "smollm2-135m", "gguf_sha256": ml.models.file_sha256(ml.models.smollm2_gguf_path()),
        "n_layers": n_layers, "method": "paper (Hamming semivalue of the surrogate, shipped pruning.json)",
        "train_data": {"source": "teaching corpus, train split", "seq_len": 128, "rows": int(train.shape[0]),
                       "ids_sha256": ml.data.ids_hash(train)},
        "heldout": {split: {"shape": list(ids.shape), "ids_sha256": ml.data.ids_hash(ids)}
                    for split, ids in heldout.items()},
        "versions": {**ml.teaching.environment_versions(), "peft": importlib.metadata.version("peft")}, "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "command": "python scripts/heal_smollm2.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "only"),
    })
    manifest["spec"] = dataclasses.asdict(spec)
    for key, n_remove in removal_levels(n_layers).items():
        if args.only and key not in args.only:
            continue
        removed = sorted(order[:n_remove].tolist())
        print(f"== {key}: remove {removed}", flush=True)
        pruned = ml.layers.prune_layers(copy.deepcopy(model), removed) if removed else copy.deepcopy(model)
        before = {split: ml.healing.mean_loss(pruned, ids) for split, ids in heldout.items()}
        print(f"   before: PPL {({s: round(math.exp(v), 3) for s, v in before.items()})}", flush=True)
        peft_model, result = ml.healing.train_adapter(copy.deepcopy(pruned), train, spec,
                                                      eval_ids=heldout["validation"], eval_every=args.eval_every)
        folder = ml.healing.save_adapter(peft_model, OUT / key)
        merged = ml.healing.load_adapter(pruned, folder)          # what a reader gets: the float16 adapter, merged
        after = {split: ml.healing.mean_loss(merged, ids) for split, ids in heldout.items()}
        print(f"   after {result.seconds:.0f} s: PPL {({s: round(math.exp(v), 3) for s, v in after.items()})}",
              flush=True)
        weights = folder / "adapter_model.safetensors"
        manifest["entries"][key] = {
            "removed": removed, "n_remove": n_remove,
            "loss_before": before, "loss_after": after,
            "ppl_before": {s: math.exp(v) for s, v in before.items()},
            "ppl_after": {s: math.exp(v) for s, v in after.items()},
            "train_loss": [round(v, 5) for _, v in result.history],
            "validation_loss_curve": result.eval_history,
            "trainable_params": result.trainable_params, "seconds": round(result.seconds, 1),
            "adapter_bytes": weights.stat().st_size,
            "adapter_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        }
        manifest["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"done in {time.perf_counter() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
