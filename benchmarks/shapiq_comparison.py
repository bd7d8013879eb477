"""Our Shapley estimators against every shapiq approximator, at equal budget, side by side in one run.

What is measured. Every estimator gets the same budget of real game evaluations, 40·n (n the
number of players), on each game below, for ``--seeds`` seeds (20 by default), and is scored by
the relative squared error ‖φ̂ − φ‖²/‖φ‖² against the exact Shapley values (all 2**n coalitions
enumerated). Per game the table gives the mean over seeds for every estimator and the ratio
ours / best shapiq, where "ours" is ``ml.surrogate.corrected_shapley`` with its defaults
(``model="auto"``: the network or a 2-/3-additive regression, whichever predicts held-out masks
best; the stratified residual correction on top, so it stays unbiased). A ratio below 1 means
ours is more accurate than every shapiq approximator on that game. A second ratio row does the same
for ``corrected_shapley(model="auto+", design="border")`` (an explicit option, not the default: a
hierarchically shrunk 3-/4-additive regression, blended with an exp-link 2-additive one for positive
values by held-out error; sizes next to ∅ and N evaluated whole where that costs up to twice what
sampling them would).

Games (exact values by enumeration; the family has pairwise and higher-order interactions):

- ``gated-10/s``: the issue's game: 10 players, main effects, strong pairwise terms, a gating
  player (player 0 switches on extra pairwise and 3-way terms of a group of 4), and a 3-way
  term (seeds s = 0, 1, 2);
- ``saturating-10/s``: 1 − exp(−(main + pairwise)): interactions of every order (s = 0, 1);
- ``sparse-high-order-10/s``: main + pairwise + random 3-, 4- and 5-way terms (s = 0, 1);
- ``voting-10/0``: a weighted majority game (a threshold: non-smooth, every order);
- ``teaching-ppl_ratio``: ``ml.teaching.exact_table("ppl_ratio")``, the shipped 12-layer
  model's 2**12 table (its ``metadata["model_sha256"]`` is recorded with the results).

Estimators. Ours: the corrected estimator with each surrogate family (``auto``, ``mlp``,
``kadd2``, ``kadd3``), with ``model="auto+", design="border"``, and with the first version's chain correction (``model="mlp"``,
``chain_fraction=0.5``), the uncorrected surrogate estimate (``auto``), antithetic permutation
sampling and stratified sampling (Neyman; it falls back to proportional allocation at these
budgets). shapiq (1.4.1, an optional dependency: ``pip install "minilib[bench]"``): every
approximator of ``shapiq.approximator.SV_APPROXIMATORS`` (SPEX and ProxySPEX with
``index="SV", max_order=1``, the order-1 Shapley value; their default FBII index is a Banzhaf
value), the ``pairing_trick=True`` variants of those that have it, kADDSHAP with
``max_order=3``, and the order-1 Shapley configurations of the interaction approximators
(SVARMIQ, RegressionFSII, SHAPIQ, KernelSHAPIQ, InconsistentKernelSHAPIQ). shapiq gets a
plain function of boolean coalitions; its runs are counted in distinct coalitions too. SPEX and
ProxySPEX take 4–34 s a run (the others milliseconds), so they run on the first
``--slow-seeds`` seeds only (1 by default: SPEX took 34 s a run on 2 busy cores; never the best here).

Restricting a run: ``--games`` and ``--estimators`` (substrings of the estimator names) select what
runs; ``--merge OLD.json`` keeps OLD's runs of every (game, estimator) pair not rerun, so a new
estimator can be added to the table next to a fresh run of its peers (carried rows are marked †
and named in the JSON's ``meta["merged"]``).

Output: the table printed, and with ``--out`` (default ``benchmarks/results/shapiq_comparison``)
a JSON file of every run plus the summary and versions, and a Markdown table. One thread
(``torch.set_num_threads(1)``). Usage: ``python benchmarks/shapiq_comparison.py [--seeds 20]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
import warnings
from functools import partial
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

import minilib as ml
from minilib.games import CountingGame, TabularGame, all_coalitions

BUDGET_PER_PLAYER = 40
OURS = "ours: corrected (auto)"
OURS_PLUS = "ours: corrected (auto+, border)"
COMPARED = {"_comparison": OURS, "_comparison_plus": OURS_PLUS}   # summary key: which of ours is compared
EXACT = 1e-12   # a relative squared error below this is exact up to floating-point rounding


# --- the games --------------------------------------------------------------------------------------

def mobius_table(n: int, terms: list[tuple[tuple[int, ...], float]], transform=None) -> TabularGame:
    """The game Σ_T a_T [T ⊆ S] (optionally transformed) as a table over all 2**n coalitions."""
    masks = all_coalitions(n)
    values = np.zeros(len(masks))
    for members, coef in terms:
        values += coef * masks[:, list(members)].all(axis=1)
    return TabularGame(transform(values) if transform else values)


def gated_game(seed: int, n: int = 10) -> TabularGame:
    """Main effects, strong pairwise terms, a gating player and a 3-way term (the issue's game)."""
    rng = np.random.default_rng(seed)
    terms = [((i,), rng.uniform(0.2, 1.0)) for i in range(n)]
    terms += [((i, j), rng.normal(0, 0.5)) for i, j in combinations(range(n), 2)]
    group = [int(j) for j in rng.choice(np.arange(1, n), size=4, replace=False)]
    terms += [((0, j), rng.uniform(0.5, 1.5)) for j in group]                     # player 0 gates the group
    terms += [((0, a, b), rng.normal(0, 0.7)) for a, b in combinations(group, 2)]
    terms.append((tuple(int(t) for t in rng.choice(np.arange(1, n), size=3, replace=False)), 2.0))
    return mobius_table(n, terms)


def saturating_game(seed: int, n: int = 10) -> TabularGame:
    """1 − exp(−(main + pairwise)): a smooth game with interactions of every order."""
    rng = np.random.default_rng(seed)
    terms = [((i,), rng.uniform(0.1, 0.5)) for i in range(n)]
    terms += [((i, j), rng.normal(0, 0.15)) for i, j in combinations(range(n), 2)]
    return mobius_table(n, terms, transform=lambda x: 1 - np.exp(-x))


def sparse_high_order_game(seed: int, n: int = 10) -> TabularGame:
    """Main + pairwise + three 3-way, two 4-way and one 5-way random terms."""
    rng = np.random.default_rng(seed)
    terms = [((i,), rng.uniform(0.2, 1.0)) for i in range(n)]
    terms += [((i, j), rng.normal(0, 0.4)) for i, j in combinations(range(n), 2)]
    terms += [(tuple(int(t) for t in rng.choice(n, k, replace=False)), rng.normal(0, 1.0)) for k in (3, 3, 3, 4, 4, 5)]
    return mobius_table(n, terms)


def voting_game(seed: int, n: int = 10) -> TabularGame:
    """A weighted majority game: weights U(1, 10), quota half their sum."""
    weights = np.random.default_rng(seed).uniform(1, 10, n)
    game = ml.games.WeightedVotingGame(weights, weights.sum() / 2)
    return TabularGame(game(all_coalitions(n)))


def games() -> dict[str, TabularGame]:
    out = {f"gated-10/{s}": gated_game(s) for s in (0, 1, 2)}
    out.update({f"saturating-10/{s}": saturating_game(s) for s in (0, 1)})
    out.update({f"sparse-high-order-10/{s}": sparse_high_order_game(s) for s in (0, 1)})
    out["voting-10/0"] = voting_game(0)
    out["teaching-ppl_ratio"] = ml.teaching.exact_table("ppl_ratio")
    return out


# --- the estimators: f(game, budget, seed) -> values, distinct evaluations ----------------------------

def ours(estimator):
    def run(game, budget, seed):
        est = estimator(game, budget, np.random.default_rng(seed))
        return est.values, est.n_evals
    return run


def stratified(game, budget, rng):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ml.estimators.AllocationFallbackWarning)
        return ml.estimators.stratified_shapley(game, budget, rng)


OUR_ESTIMATORS = {
    OURS: ours(ml.surrogate.corrected_shapley),
    "ours: corrected (mlp)": ours(partial(ml.surrogate.corrected_shapley, model="mlp")),
    "ours: corrected (kadd2)": ours(partial(ml.surrogate.corrected_shapley, model="kadd2")),
    "ours: corrected (kadd3)": ours(partial(ml.surrogate.corrected_shapley, model="kadd3")),
    OURS_PLUS: ours(partial(ml.surrogate.corrected_shapley, model="auto+", design="border")),
    "ours: corrected, chains (mlp; first version)":
        ours(partial(ml.surrogate.corrected_shapley, model="mlp", chain_fraction=0.5)),
    "ours: surrogate, uncorrected (auto)": ours(ml.surrogate.surrogate_estimate),
    "ours: permutation (antithetic)": ours(ml.estimators.permutation_shapley),
    "ours: stratified (Neyman)": ours(stratified),
}


def shapiq_estimators() -> tuple[dict, set[str], str]:
    """Every shapiq configuration that estimates order-1 Shapley values from a game function."""
    import shapiq
    import shapiq.approximator as A

    def run(cls, kwargs):
        def f(game, budget, seed):
            counting = CountingGame(game)
            approx = cls(n=game.n_players, random_state=seed, **kwargs)
            result = approx.approximate(budget, lambda coalitions: counting(np.asarray(coalitions, dtype=bool)))
            return np.array([result[(i,)] for i in range(game.n_players)]), counting.n_evals
        return f

    sv = {"index": "SV", "max_order": 1}
    out, slow = {}, set()
    for cls in A.SV_APPROXIMATORS:
        kwargs = sv if cls.__name__ in ("SPEX", "ProxySPEX") else {}
        out[f"shapiq: {cls.__name__}"] = run(cls, kwargs)
        if cls.__name__ in ("SPEX", "ProxySPEX"):
            slow.add(f"shapiq: {cls.__name__}")
        if cls.__name__ in ("KernelSHAP", "kADDSHAP", "SVARM", "UnbiasedKernelSHAP"):
            out[f"shapiq: {cls.__name__} (pairing)"] = run(cls, {**kwargs, "pairing_trick": True})
    out["shapiq: kADDSHAP (max_order=3)"] = run(A.kADDSHAP, {"max_order": 3})
    for cls in (A.SVARMIQ, A.SHAPIQ, A.KernelSHAPIQ, A.InconsistentKernelSHAPIQ):
        out[f"shapiq: {cls.__name__} (SV)"] = run(cls, sv)
    out["shapiq: RegressionFSII (order 1)"] = run(A.RegressionFSII, {"max_order": 1})
    version = getattr(shapiq, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version
        version = dist_version("shapiq")
    return out, slow, version


# --- the run ------------------------------------------------------------------------------------------

def summarise(runs: list[dict], names: list[str], game_names: list[str]) -> dict:
    table = {g: {} for g in game_names}
    for g in game_names:
        for name in names:
            errs = [r["rse"] for r in runs if r["game"] == g and r["estimator"] == name and r["error"] is None]
            table[g][name] = {"mean_rse": float(np.mean(errs)) if errs else None, "runs": len(errs),
                              "sem_rse": float(np.std(errs, ddof=1) / np.sqrt(len(errs))) if len(errs) > 1 else None}
    for g in game_names:
        peers = {k: v["mean_rse"] for k, v in table[g].items() if k.startswith("shapiq:") and v["mean_rse"] is not None}
        best = min(peers, key=peers.get)
        for key, mine in COMPARED.items():
            if table[g].get(mine, {}).get("mean_rse") is None:
                continue
            table[g][key] = {"ours": mine, "best_shapiq": best, "best_shapiq_rse": peers[best],
                             "ours_rse": table[g][mine]["mean_rse"],
                             "ratio_ours_over_best_shapiq": table[g][mine]["mean_rse"] / peers[best]}
    return table


def ratio_text(c: dict) -> str:
    """The ratio, or "both exact" when both errors are rounding noise (a ratio of two round-offs means nothing)."""
    if max(c["ours_rse"], c["best_shapiq_rse"]) < EXACT:
        return "both exact"
    return f"{c['ratio_ours_over_best_shapiq']:.2f}"


def markdown(summary: dict, names: list[str], meta: dict, carried: set[str] = frozenset()) -> str:
    game_names = list(summary)
    lines = [f"# Ours vs shapiq {meta['shapiq']} at 40·n evaluations, {meta['seeds']} seeds",
             "", f"Mean relative squared error ‖φ̂ − φ‖²/‖φ‖² over seeds (SPEX/ProxySPEX: first {meta['slow_seeds']} "
             f"seeds). Teaching table model_sha256 `{meta['teaching_model_sha256']}`. Written by "
             "`benchmarks/shapiq_comparison.py`." + (" † carried over from an earlier run of the same code "
                                                     f"({meta['merged']['from']}); the other rows ran together."
                                                     if carried else ""), "",
             "| estimator | " + " | ".join(game_names) + " |", "|---|" + "---|" * len(game_names)]
    for name in names:
        cells = [summary[g][name]["mean_rse"] for g in game_names]
        mark = " †" if name in carried else ""
        lines.append(f"| {name}{mark} | " + " | ".join("n/a" if c is None else f"{c:.2e}" for c in cells) + " |")
    first = next(k for k in COMPARED if k in summary[game_names[0]])
    lines.append("| **best shapiq** | " + " | ".join(f"{summary[g][first]['best_shapiq'][8:]}" for g in game_names) + " |")
    for key, mine in COMPARED.items():
        if all(key in summary[g] for g in game_names):
            label = "ours" if mine == OURS else f"ours {mine[len('ours: corrected '):]}"
            lines.append(f"| **{label} / best shapiq** | "
                         + " | ".join(f"**{ratio_text(summary[g][key])}**" for g in game_names) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--slow-seeds", type=int, default=1, help="seeds for SPEX and ProxySPEX (seconds a run)")
    parser.add_argument("--games", nargs="*", help="only these games (names as in the table)")
    parser.add_argument("--estimators", nargs="*", help="only estimators whose name contains one of these")
    parser.add_argument("--merge", help="a JSON of an earlier run: keep its runs of the (game, estimator) pairs "
                                        "not run now")
    parser.add_argument("--out", default="benchmarks/results/shapiq_comparison",
                        help="write OUT.json and OUT.md ('' to skip)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", UserWarning)            # shapiq's and the network's small-sample notes
    peers, slow, shapiq_version = shapiq_estimators()
    everything = {**OUR_ESTIMATORS, **peers}
    estimators = {k: f for k, f in everything.items() if not args.estimators or any(p in k for p in args.estimators)}
    all_games = games()
    chosen = {g: all_games[g] for g in (args.games or all_games)}
    teaching = all_games["teaching-ppl_ratio"]
    runs, start = [], time.perf_counter()
    for g, game in chosen.items():
        n = game.n_players
        budget = BUDGET_PER_PLAYER * n
        phi = ml.shapley.exact_shapley(game)
        for name, estimate in estimators.items():
            tic = time.perf_counter()
            for seed in range(args.slow_seeds if name in slow else args.seeds):
                row = {"game": g, "estimator": name, "seed": seed, "budget": budget, "error": None}
                try:
                    values, n_evals = estimate(game, budget, seed)
                    row.update(rse=ml.estimators.relative_squared_error(values, phi), n_evals=int(n_evals))
                except Exception as exc:                    # a peer that cannot run here is reported, not hidden
                    row.update(rse=None, n_evals=None, error=f"{type(exc).__name__}: {exc}"[:300])
                runs.append(row)
            done = [r for r in runs if r["game"] == g and r["estimator"] == name]
            errs = [r["rse"] for r in done if r["error"] is None]
            print(f"{g:24s} {name:48s} mean rse {np.mean(errs) if errs else float('nan'):.3e}  "
                  f"max evals {max((r['n_evals'] or 0) for r in done)}  {time.perf_counter() - tic:6.1f} s",
                  flush=True)
    carried: set[str] = set()
    merged = None
    if args.merge:
        old = json.loads(Path(args.merge).read_text())
        keep = [r for r in old["runs"] if r["game"] in chosen and r["estimator"] not in estimators]
        carried = {r["estimator"] for r in keep}
        runs = keep + runs
        merged = {"from": f"{args.merge}, {old['meta'].get('seconds')} s run", "estimators": sorted(carried)}
    names = [k for k in everything if k in estimators or k in carried]
    summary = summarise(runs, names, list(chosen))
    meta = {"budget": "40·n", "seeds": args.seeds, "slow_seeds": args.slow_seeds, "shapiq": shapiq_version,
            "numpy": np.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "minilib": ml.__version__, "seconds": round(time.perf_counter() - start, 1),
            "teaching_model_sha256": teaching.metadata.get("model_sha256"),
            "teaching_table_sha256": hashlib.sha256(np.ascontiguousarray(teaching.values).tobytes()).hexdigest(),
            "estimators_run": list(estimators), "merged": merged}
    text = markdown(summary, names, meta, carried)
    print("\n" + text)
    for g in chosen:
        for key in COMPARED:
            if key in summary[g]:
                c = summary[g][key]
                print(f"{g:24s} {c['ours']:34s} {c['ours_rse']:.2e}  best shapiq {c['best_shapiq_rse']:.2e} "
                      f"({c['best_shapiq']})  ratio {ratio_text(c)}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        head = json.dumps({"meta": meta, "summary": summary}, indent=1)[:-2]   # one line per run below
        rows = ",\n  ".join(json.dumps(r) for r in runs)
        out.with_suffix(".json").write_text(f'{head},\n "runs": [\n  {rows}\n ]\n}}\n')
        out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
