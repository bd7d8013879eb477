"""Chapter 07's pruning table on SmolLM2-135M: every method's choice at 3/6/9/12 removed layers, scored on held-out text.

Stages (each writes ``scripts/stage1/pruning_<stage>.json``; run them in any order, in parallel
processes, then ``assemble``):

- ``cheap``: the paper's method (surrogate + Hamming semivalue from the shipped stage-1 table),
  leave-one-out (from the table), Block Influence, angular BI, Taylor+, tail, random (10 seeds),
  and surrogate-guided search (the paper's surrogate searched, 5 candidates per size verified);
- ``corrected``: surrogate Shapley + unbiased correction at the paper's budget (2,066 real
  evaluations: half antithetic chains, half drawn from the table's stratified masks);
- ``sleb``: 12 greedy rounds on the full calibration set;
- ``evopress``: evolutionary search per size, 2,066 / 4 real evaluations each (the paper's
  budget shared over the four sizes), multi-step selection on 2 → 5 → 10 calibration sequences;
- ``stability``: the one-shot methods' choice of 6 layers on 4 other calibration samples, and
  the paper's method on 5 random halves of the table;
- ``heldout``: mean token NLL of every chosen mask on the calibration set and on two held-out
  texts (the teaching corpus's validation and test splits, 32 windows of 128 SmolLM2 tokens
  each, seed 0), by prefix tree;
- ``zeroshot``: local zero-shot accuracy (``ml.zero_shot.local_accuracy``) at 6 and 12 removed;
- ``assemble``: ``minilib/assets/smollm2/pruning.json`` and ``heldout_ids.npz``.

Masked evaluations on the full calibration set go through a copy of the stage-1 store
(``scripts/stage1/pruning.sqlite``), so table masks cost no compute; every method is still
charged each distinct mask it asked for (a :class:`~minilib.games.CountingGame`).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import minilib as ml
from minilib.games import CountingGame

HERE = Path(__file__).resolve().parent / "stage1"
ASSETS = Path(ml.__file__).resolve().parent / "assets" / "smollm2"
REMOVE = (3, 6, 9, 12)
N_RANDOM = 10
N_HELDOUT = 32
SEED = 0


def setup():
    model, tok = ml.models.load_model("smollm2-135m")
    table = ml.store.load_shipped_table("smollm2")
    return model, tok, table


def full_game(model, table) -> ml.evaluation.LayerGame:
    store = HERE / "pruning.sqlite"
    if not store.exists():
        shutil.copy(HERE / "smollm2.sqlite", store)
    return ml.evaluation.LayerGame(model, table.calibration_ids, "ppl_ratio", store=store)


def removed_of(keep: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero(~np.asarray(keep))]


def ranking_choices(scores: np.ndarray) -> dict[str, list[int]]:
    order = np.argsort(scores, kind="stable")
    return {str(r): sorted(int(i) for i in order[:r]) for r in REMOVE}


def paper_method(table, seed: int = SEED, rows=None):
    masks, values = table.masks, table.values("ppl_ratio")
    if rows is not None:
        masks, values = masks[rows], values[rows]
    gen = np.random.default_rng(seed)
    surrogate = ml.surrogate.fit_surrogate(masks, values, rng=gen)
    sizes = ml.pruning.paper_keep_sizes(masks.shape[1])
    est = ml.surrogate.surrogate_shapley(surrogate, n_samples=80_000, rng=gen, method="hamming", keep_sizes=sizes)
    return surrogate, est.values


def stage_cheap(model, tok, table) -> dict:
    n = table.masks.shape[1]
    out: dict = {}
    start = time.perf_counter()
    surrogate, phi = paper_method(table)
    out["paper"] = {"scores": phi.tolist(), "choices": ranking_choices(phi), "n_evals": len(table.masks),
                    "seconds": time.perf_counter() - start,
                    "held_out": surrogate.report["held_out"]["overall"]}
    v = table.values("ppl_ratio")
    loo = np.array([v[np.flatnonzero((table.masks.sum(1) == n - 1) & ~table.masks[:, i])[0]] for i in range(n)])
    loo_scores = table.values("ppl_ratio")[table.masks.all(1)][0] - loo
    out["loo"] = {"scores": loo_scores.tolist(), "choices": ranking_choices(loo_scores), "n_evals": n + 1}
    ids = table.calibration_ids
    for method in ("block_influence", "block_influence_angular", "taylor_plus"):
        start = time.perf_counter()
        scores = ml.baselines.layer_scores(model, ids, method)
        out[method] = {"scores": np.where(np.isfinite(scores), scores, 1e9).tolist(),
                       "choices": ranking_choices(scores), "n_evals": 0, "seconds": time.perf_counter() - start}
    tail = (n - np.arange(n)).astype(float)
    out["tail"] = {"choices": ranking_choices(tail), "n_evals": 0}
    out["random"] = {"choices": [ranking_choices(np.random.default_rng(s).permutation(n).astype(float))
                                 for s in range(N_RANDOM)], "n_evals": 0}
    game = CountingGame(full_game(model, table))
    start = time.perf_counter()
    found = ml.search.surrogate_search(surrogate, game, [n - r for r in REMOVE], n_verify=5,
                                       rng=np.random.default_rng(SEED))
    out["surrogate_search"] = {
        "choices": {str(n - k): removed_of(res.keep) for k, res in found.items()},
        "verify_evals": {str(n - k): res.n_evals for k, res in found.items()},
        "n_evals": len(table.masks) + game.n_evals, "seconds": time.perf_counter() - start,
        "candidates": {str(n - k): res.details for k, res in found.items()}}
    return out


def stage_corrected(model, tok, table) -> dict:
    n = table.masks.shape[1]
    game = CountingGame(full_game(model, table))
    start = time.perf_counter()
    est = ml.surrogate.corrected_shapley(game, len(table.masks), rng=np.random.default_rng(SEED),
                                         keep_sizes=ml.pruning.paper_keep_sizes(n), pool=table.masks)
    return {"corrected": {"scores": est.values.tolist(), "stderr": est.stderr.tolist(),
                          "choices": ranking_choices(est.values), "n_evals": int(est.n_evals),
                          "seconds": time.perf_counter() - start}}


def stage_sleb(model, tok, table) -> dict:
    n = table.masks.shape[1]
    game = CountingGame(full_game(model, table))
    keep = np.ones(n, dtype=bool)
    order, evals = [], {}
    start = time.perf_counter()
    for r in range(1, max(REMOVE) + 1):
        cand = np.flatnonzero(keep)
        masks = np.repeat(keep[None], len(cand), axis=0)
        masks[np.arange(len(cand)), cand] = False
        best = int(cand[int(np.argmax(game(masks)))])
        keep[best] = False
        order.append(best)
        if r in REMOVE:
            evals[str(r)] = int(game.n_evals)
        print(f"sleb round {r}: removed {best}, {game.n_evals} evaluations", flush=True)
    return {"sleb": {"order": order, "choices": {str(r): sorted(order[:r]) for r in REMOVE},
                     "n_evals_per_level": evals, "n_evals": evals[str(max(REMOVE))],
                     "seconds": time.perf_counter() - start}}


def stage_evopress(model, tok, table, levels=REMOVE) -> dict:
    """Evolution per size; ``EVOPRESS_LEVELS=3,6`` runs some sizes only (one process per size runs them in parallel)."""
    n = table.masks.shape[1]
    budget = len(table.masks) // len(REMOVE)
    ids = table.calibration_ids
    out = {"choices": {}, "n_evals_per_level": {}, "history": {}, "evals_per_stage": {}, "seconds": {},
           "budget_per_level": budget}
    for r in levels:
        levels_ = [ml.evaluation.LayerGame(model, ids[:s], "ppl_ratio", progress=False) for s in (2, 5)]
        levels_.append(CountingGame(full_game(model, table)))
        start = time.perf_counter()
        res = ml.search.evolutionary_search(levels_, n - r, budget, rng=np.random.default_rng(SEED + r))
        out["choices"][str(r)] = sorted(res.removed)
        out["n_evals_per_level"][str(r)] = res.n_evals
        out["history"][str(r)] = [res.history, res.history_evals]
        out["evals_per_stage"][str(r)] = res.details["evals_per_level"]
        out["seconds"][str(r)] = time.perf_counter() - start
        print(f"evopress remove {r}: {res.removed} value {res.value:.4f} evals {res.n_evals}", flush=True)
    return {"evopress": out}


def evopress_results() -> dict | None:
    """The per-size evolution files merged into one entry (None until every size is done)."""
    merged: dict = {}
    for r in REMOVE:
        path = HERE / f"pruning_evopress_{r}.json"
        if not path.exists():
            return None
        for key, value in json.loads(path.read_text())["evopress"].items():
            merged.setdefault(key, {}).update(value) if isinstance(value, dict) else merged.update({key: value})
    merged["n_evals"] = sum(merged["n_evals_per_level"].values())
    return {"evopress": merged}


def stage_stability(model, tok, table) -> dict:
    n = table.masks.shape[1]
    out: dict = {"calibration_seeds": [1, 2, 3, 4], "one_shot": {}, "paper_halves": []}
    old = HERE / "pruning_stability.json"
    if os.environ.get("STABILITY_PAPER_ONLY") and old.exists():   # refit the surrogate halves, keep the rest
        out["one_shot"] = json.loads(old.read_text())["stability"]["one_shot"]
    for seed in out["calibration_seeds"] if not out["one_shot"] else []:
        ids = ml.data.calibration_ids(tok, "teaching", n_seqs=10, seq_len=128, seed=seed)
        game = ml.evaluation.LayerGame(model, ids, "ppl_ratio", progress=False)
        row = {"loo": ranking_choices(ml.baselines.leave_one_out(game))["6"]}
        for method in ("block_influence", "block_influence_angular", "taylor_plus"):
            row[method] = ranking_choices(ml.baselines.layer_scores(model, ids, method))["6"]
        row["calibration_sha256"] = ml.store.calibration_hash(ids)
        out["one_shot"][str(seed)] = row
        print(f"stability seed {seed}: {row}", flush=True)
    gen = np.random.default_rng(SEED)
    for half in range(5):
        rows = np.sort(gen.permutation(len(table.masks))[: len(table.masks) // 2])
        rows = np.union1d(rows, np.flatnonzero(table.masks.all(1)))
        _, phi = paper_method(table, seed=half + 1, rows=rows)
        out["paper_halves"].append(ranking_choices(phi)["6"])
    return {"stability": out}


def heldout_ids(tok) -> dict[str, torch.Tensor]:
    gen = np.random.default_rng(SEED)
    out = {}
    for split in ml.data.TEACHING_EVAL_SPLITS:
        ids = ml.data.evaluation_ids(tok, "teaching", 128, split=split)
        out[split] = ids[np.sort(gen.choice(len(ids), N_HELDOUT, replace=False))]
    return out


def all_choices() -> set[tuple[int, ...]]:
    found: set[tuple[int, ...]] = {()}
    for stage in ("cheap", "corrected", "sleb", *(f"evopress_{r}" for r in REMOVE)):
        path = HERE / f"pruning_{stage}.json"
        if not path.exists():
            print(f"heldout: no {path.name} yet, its choices are left for a later run", flush=True)
            continue
        for entry in json.loads(path.read_text()).values():
            for choice in entry["choices"] if isinstance(entry["choices"], list) else [entry["choices"]]:
                found.update(tuple(sorted(v)) for v in choice.values())
    return found


def stage_heldout(model, tok, table) -> dict:
    """Losses of every choice made so far; choices evaluated by an earlier run are kept, not recomputed."""
    n = table.masks.shape[1]
    path = HERE / "pruning_heldout.json"
    out = json.loads(path.read_text())["heldout"] if path.exists() else {"removed": [], "losses": {}}
    done = {tuple(r) for r in out["removed"]}
    todo = sorted(all_choices() - done, key=lambda c: (len(c), c))
    masks = np.ones((len(todo), n), dtype=bool)
    for row, c in enumerate(todo):
        masks[row, list(c)] = False
    for split, ids in {"calibration": table.calibration_ids, **heldout_ids(tok)}.items():
        start = time.perf_counter()
        fresh = ml.evaluation.mask_losses(model, ids, masks).tolist() if len(todo) else []
        out["losses"][split] = out["losses"].get(split, []) + fresh
        print(f"heldout {split}: {len(todo)} new masks in {time.perf_counter() - start:.0f} s", flush=True)
    out["removed"] += [list(c) for c in todo]
    return {"heldout": out}


ZERO_SHOT_ITEMS = ml.store.SHIPPED / "smollm2" / "zero_shot_items.jsonl"
"""The frozen items of the local task (200, drawn from the teaching corpus's test split as it was
when the table was built), so the scores stay reproducible when the corpus is re-split."""


def stage_zeroshot(model, tok, table) -> dict:
    """Local zero-shot accuracy at 6 and 12 removed; ``ZEROSHOT_METHODS=a,b`` scores some methods only."""
    items = ml.zero_shot.load_items(ZERO_SHOT_ITEMS)
    cheap = json.loads((HERE / "pruning_cheap.json").read_text())
    rest = {k: v for s in ("corrected", "sleb") if (HERE / f"pruning_{s}.json").exists()
            for k, v in json.loads((HERE / f"pruning_{s}.json").read_text()).items()}
    rest.update(evopress_results() or {})
    methods = {**cheap, **rest}
    wanted = os.environ.get("ZEROSHOT_METHODS")
    wanted = wanted.split(",") if wanted else [m for m in methods if m not in ("random", "block_influence_angular")]
    out: dict = {"pruned": {}}
    if "dense" in wanted:
        out["dense"] = ml.zero_shot.local_accuracy(model, tok, items=items).acc_norm
    for name in (m for m in wanted if m != "dense"):
        for r in ("6", "12"):
            pruned = ml.layers.prune_layers(copy.deepcopy(model), methods[name]["choices"][r])
            out["pruned"].setdefault(name, {})[r] = ml.zero_shot.local_accuracy(pruned, tok, items=items).acc_norm
            print(f"zero-shot {name} {r}: {out['pruned'][name][r]:.3f}", flush=True)
    return {"zeroshot": out}


def zeroshot_results() -> dict:
    """Every ``pruning_zeroshot*.json`` merged."""
    merged: dict = {"pruned": {}}
    for path in sorted(HERE.glob("pruning_zeroshot*.json")):
        part = json.loads(path.read_text())["zeroshot"]
        merged["pruned"].update(part["pruned"])
        if "dense" in part:
            merged["dense"] = part["dense"]
    merged["items_sha256"] = hashlib.sha256(ZERO_SHOT_ITEMS.read_bytes()).hexdigest()
    return {"zeroshot": merged}


def stage_assemble(model, tok, table) -> dict:
    merged: dict = {}
    for stage in ("cheap", "corrected", "sleb", "stability", "heldout"):
        path = HERE / f"pruning_{stage}.json"
        if path.exists():
            merged.update(json.loads(path.read_text()))
    merged.update(evopress_results() or {})
    merged.update(zeroshot_results())
    merged["manifest"] = {
        "model": "smollm2-135m", "model_fingerprint": table.manifest["model_fingerprint"],
        "calibration_sha256": table.manifest["calibration_sha256"], "remove": list(REMOVE),
        "heldout": f"teaching validation/test splits, {N_HELDOUT} windows x 128 SmolLM2 tokens each, seed {SEED}",
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "versions": table.manifest["versions"], "script": "scripts/precompute_pruning_table.py"}
    ids = heldout_ids(tok)
    np.savez_compressed(ASSETS / "heldout_ids.npz", **{k: v.numpy().astype(np.int32) for k, v in ids.items()})
    (ASSETS / "pruning.json").write_text(json.dumps(merged, indent=1))
    return {}


STAGES = {"cheap": stage_cheap, "corrected": stage_corrected, "sleb": stage_sleb, "evopress": stage_evopress,
          "stability": stage_stability, "heldout": stage_heldout, "zeroshot": stage_zeroshot,
          "assemble": stage_assemble}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages", nargs="+", choices=list(STAGES))
    args = parser.parse_args()
    torch.manual_seed(SEED)
    model, tok, table = setup()
    for stage in args.stages:
        start = time.perf_counter()
        name = stage
        if stage == "evopress" and os.environ.get("EVOPRESS_LEVELS"):
            levels = [int(r) for r in os.environ["EVOPRESS_LEVELS"].split(",")]
            result = stage_evopress(model, tok, table, levels)
            name = f"evopress_{'_'.join(map(str, levels))}"
        elif stage == "zeroshot" and os.environ.get("ZEROSHOT_METHODS"):
            result = stage_zeroshot(model, tok, table)
            name = f"zeroshot_{os.environ['ZEROSHOT_METHODS'].replace(',', '_')}"
        else:
            result = STAGES[stage](model, tok, table)
        if result:
            (HERE / f"pruning_{name}.json").write_text(json.dumps(result, indent=1))
        print(f"stage {stage} done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
