"""What layer removal and weight quantization each buy on this CPU, side by side in one run.

What is measured. For one model (``--model teaching`` or ``smollm2-135m``), five variants: the dense
float32 model (the reference), the dense model with torchao weight-only int8 and int4 linear layers
(``ml.quantization.quantize``), the model with the middle half of its layers removed (its cost
depends on how many layers remain, not on which), and that pruned model in int8. ``ml.efficiency.compare`` times them
round-robin (``--repeats`` runs each, medians): prefill of a 128-token prompt and 32 greedy decode
steps with the KV cache at batch 1, and reports stored weight bytes and the peak memory of a forward.

Why. Chapter 08 claims that on a CPU, weight-only quantization shrinks memory but does not speed a
small model up (dequantizing on every matmul costs more than the memory traffic it saves), while
removing layers speeds up both prefill and decode in proportion. These are the ratios behind that
claim; perplexity is measured in the chapter, not here.

Usage: python benchmarks/quantization.py [--model teaching] [--repeats 7] [--threads 2]
Writes benchmarks/results/quantization_<model>.md.
"""

from __future__ import annotations

import argparse
import copy
import platform
from pathlib import Path

import torch

import minilib as ml

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="teaching", choices=["teaching", "smollm2-135m"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, _ = ml.models.load_model(args.model)
    n = len(ml.layers.decoder_layers(model))
    middle = list(range(n // 4, n // 4 + n // 2))
    pruned = ml.layers.prune_layers(copy.deepcopy(model), middle)
    variants = {"dense fp32": model, "dense int8": ml.quantization.quantize(model, "int8"),
                "dense int4": ml.quantization.quantize(model, "int4"),
                f"-{len(middle)} layers fp32": pruned, f"-{len(middle)} layers int8": ml.quantization.quantize(pruned, "int8")}
    frame = ml.efficiency.compare(variants, repeats=args.repeats, checkpoint=False)
    frame["weights_MiB"] = frame["param_bytes"] / 2**20
    frame["weights_ratio"] = frame["param_bytes"] / frame.loc["dense fp32", "param_bytes"]
    columns = ["n_layers", "weights_MiB", "weights_ratio", "peak_memory_ratio", "prefill_ms", "prefill_speedup",
               "decode_tokens_per_s", "decode_speedup"]
    table = frame[columns].round(3)
    print(table.to_string())
    header = (f"# Quantization and layer removal on {args.model}, CPU\n\n"
              f"`python benchmarks/quantization.py --model {args.model} --repeats {args.repeats} "
              f"--threads {args.threads}`; {platform.machine()}, torch {torch.__version__}, "
              f"{args.threads} threads, batch 1, 128-token prompt, 32 decode steps, medians of {args.repeats} "
              f"round-robin runs. Ratios are against the dense float32 model (speedup > 1 is faster).\n\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"quantization_{args.model}.md").write_text(header + table.to_markdown() + "\n")


if __name__ == "__main__":
    main()
