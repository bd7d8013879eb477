"""Tests of ``minilib.surrogate``: fitting with a training/validation/test split, accuracy reports
over distinct masks, the optimizers, vectorised estimation through the network, the residual
correction, persistence, and input validation (chapter 05).

Every game here is small (5-8 players) and every fit takes about a second at most, so the whole
module runs in seconds. Tolerances are stated where they are used, with the reason.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import minilib as ml
from minilib import surrogate as S
from minilib.estimators import BudgetTooSmallError, _uniform_masks, hamming_size_weights
from minilib.games import TabularGame, all_coalitions

FAST = {"optimizer": "lbfgs", "max_epochs": 40}  # full-batch L-BFGS: converges in well under a second here


def random_surrogate(n: int, seed: int = 0, scale: float = 2.0, output: str = "sigmoid") -> S.Surrogate:
    """An untrained surrogate with large random weights: a smooth but clearly non-additive game."""
    torch.manual_seed(seed)
    model = S.SurrogateMLP(n, output=output)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return S.Surrogate(model.eval(), {}, np.zeros(0, int), np.zeros(0, int))


def interacting_table(n: int, seed: int = 0) -> TabularGame:
    """A positive game with main effects, pairwise and higher-order interactions."""
    rng = np.random.default_rng(seed)
    masks = all_coalitions(n).astype(float)
    w = rng.uniform(0.2, 1.0, n)
    pair = rng.normal(0, 0.3, (n, n))
    values = masks @ w + 0.5 * np.einsum("mi,ij,mj->m", masks, np.triu(pair, 1), masks) \
        + 0.3 * masks[:, :3].prod(axis=1)
    return TabularGame(values - values.min() + 0.1)


# --- fitting -----------------------------------------------------------------------------------

def test_additive_game_shapley_recovered():
    n = 6
    w = np.linspace(0.5, 1.5, n)
    masks = all_coalitions(n)
    values = masks @ w
    sur = S.fit_surrogate(masks, values, rng=0, output="linear", optimizer="lbfgs", max_epochs=200)
    err = np.abs(sur.predict(masks) - values).max()
    # φ_i(f) − w_i = φ_i(f − v), and Shapley weights of each player sum to 1, so
    # |φ_i(f) − w_i| <= 2·max|f − v|. The fit must be good (max error < 1 % of the smallest
    # weight); the recovered values then lie within 2 % of every weight.
    assert err < 0.01 * w.min(), err
    phi = S.surrogate_shapley(sur).values
    assert np.abs(phi - w).max() <= 2 * err + 1e-6
    assert np.allclose(phi, w, rtol=0.02, atol=0)


def test_three_way_split_is_disjoint_by_mask_and_stratified():
    n = 6
    rng = np.random.default_rng(0)
    masks = S.sample_stratified_masks(n, 600, [5, 4, 3, 2], rng)   # drawn with replacement: many repeats
    values = interacting_table(n)(masks)
    sur = S.fit_surrogate(masks, values, rng=1, **FAST)
    train, val, test = sur.train_index, sur.validation_index, sur.held_out_index
    assert len(train) + len(val) + len(test) == len(masks)
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(len(masks)))
    # disjoint as *masks*, not only as row numbers: no validation or test mask was trained on
    key = ml.games.coalition_index
    for a, b in ((train, val), (train, test), (val, test)):
        assert not np.isin(key(masks[a]), key(masks[b])).any()
    # stratified by weight: each weight sends its share of its distinct masks to each set, within one
    distinct = {w: len(np.unique(key(masks[masks.sum(1) == w]))) for w in np.unique(masks.sum(1))}
    for rows, fraction in ((val, 0.15), (test, 0.15)):
        for w, d in distinct.items():
            got = len(np.unique(key(masks[rows][masks[rows].sum(1) == w])))
            assert abs(got - fraction * d) < 1, (w, d, got)
        assert len(np.unique(key(masks[rows]))) == round(fraction * sum(distinct.values()))
    # the reported accuracy is the test set's, the early-stopping set's is reported apart
    report = sur.report["held_out"]
    assert report["overall"]["n"] == len(np.unique(key(masks[test])))              # distinct masks
    assert sum(r["n"] for r in report["by_weight"].values()) == report["overall"]["n"]
    again = S.accuracy_report(sur.predict(masks[test]), values[test], masks[test])
    assert again["overall"] == pytest.approx(report["overall"])
    assert sur.report["validation"]["overall"]["n"] == len(np.unique(key(masks[val])))
    assert 1 <= sur.report["best_epoch"] <= sur.report["epochs"] == len(sur.history)
    assert sur.n_game_evals == len(np.unique(key(masks)))            # distinct masks: the real cost


def test_stratified_split_with_few_masks_per_weight():
    """Weights of 2-3 distinct masks: totals stay right, every weight keeps a training mask, singletons train."""
    n = 12
    gen = np.random.default_rng(0)
    masks = np.concatenate([np.ones((1, n), bool)] +
                           [_uniform_masks(gen, n, np.arange(n), k, 2 + k % 2) for k in range(3, 11)])
    masks = np.unique(masks, axis=0)
    weights = masks.sum(1)
    train, val, test = S.stratified_split(masks, (0.2, 0.2), rng=0)
    assert len(val) == len(test) == round(0.2 * (len(masks) - 1))               # the full model cannot leave
    assert (weights[train] == n).any()
    for w in np.unique(weights):
        assert (weights[train] == w).any(), w                                   # at least one trained on
    again = S.stratified_split(masks, (0.2, 0.2), rng=0)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, val, test)))
    assert len(S.stratified_split(masks, 0.2, rng=0)) == 2                     # one fraction: (train, held out)
    with pytest.raises(ValueError, match=r"fractions must be numbers in \[0, 1\)"):
        S.stratified_split(masks, (0.5, 0.5), rng=0)


def test_too_few_masks_report_nan_never_training_error():
    n = 5
    masks = all_coalitions(n)[[0, 1, 3, 7, 15, 31]]                              # one distinct mask per weight
    values = masks.sum(1) + 0.5
    with pytest.warns(UserWarning) as caught:
        sur = S.fit_surrogate(masks, values, rng=0, output="linear", optimizer="lbfgs", max_epochs=3)
    messages = " | ".join(str(w.message) for w in caught)
    assert "validation set" in messages and "early stopping" in messages and "held-out report is NaN" in messages
    assert len(sur.held_out_index) == len(sur.validation_index) == 0
    held = sur.report["held_out"]
    assert held["overall"]["n"] == 0 and np.isnan([held["overall"][k] for k in ("rmse", "r2", "spearman")]).all()
    assert set(held["by_weight"]) == set(range(n + 1))                          # every weight listed, n = 0
    assert all(r["n"] == 0 and np.isnan(r["rmse"]) for r in held["by_weight"].values())
    assert sur.report["epochs"] == sur.report["best_epoch"] == 3                # no early stopping: all epochs
    assert np.isfinite(sur.report["train"]["rmse"])


def test_no_held_out_sets_when_asked():
    n = 6
    masks = all_coalitions(n)
    values = interacting_table(n)(masks)
    sur = S.fit_surrogate(masks, values, rng=0, val_fraction=0, test_fraction=0, optimizer="lbfgs", max_epochs=4)
    assert len(sur.train_index) == len(masks) and sur.report["epochs"] == 4
    assert np.isnan(sur.report["held_out"]["overall"]["rmse"])


def test_accuracy_report_counts_each_distinct_mask_once():
    n = 4
    masks = all_coalitions(n)
    actual = masks @ np.arange(1.0, n + 1)
    predicted = actual + np.random.default_rng(0).normal(0, 0.3, len(masks))
    once = S.accuracy_report(predicted, actual, masks)
    copies = np.r_[np.arange(16), np.full(30, 5), np.full(10, 14)]              # two masks drawn many times
    repeated = S.accuracy_report(predicted[copies], actual[copies], masks[copies])
    flat = lambda r: [r["overall"][k] for k in sorted(r["overall"])] + [  # noqa: E731
        x[k] for w in sorted(r["by_weight"]) for x in [r["by_weight"][w]] for k in sorted(x)]
    assert flat(repeated) == pytest.approx(flat(once), rel=1e-12, nan_ok=True)
    assert repeated["overall"]["n"] == 16 and repeated["by_weight"][2]["n"] == 6
    # a mask's repeated values (a noisy game) are averaged: one row, its mean value
    noisy = S.accuracy_report(np.array([1.0, 1.0, 2.0]), np.array([0.0, 2.0, 2.0]), masks[[5, 5, 6]])
    assert noisy["overall"]["n"] == 2 and noisy["overall"]["rmse"] == pytest.approx(0)
    assert noisy["by_weight"][2]["spearman"] != noisy["by_weight"][2]["spearman"]   # NaN: 2 masks
    with pytest.raises(ValueError, match="one row per mask"):
        S.accuracy_report(predicted[:-1], actual, masks)


def test_sgd_is_the_papers_recipe_and_trains(monkeypatch):
    """optimizer='sgd': SGD(lr 0.008, momentum 0.9), StepLR(100, 0.1), 300 epochs, batches of 300."""
    n = 8
    w = np.linspace(0.1, 0.8, n)
    game = TabularGame(np.exp(-(~all_coalitions(n)).astype(float) @ w))        # smooth, in (0, 1]
    masks = S.sample_stratified_masks(n, 6000, range(1, n), rng=0)
    seen = {}
    real_sgd, real_step = torch.optim.SGD, torch.optim.lr_scheduler.StepLR

    def sgd(params, **kw):
        seen["sgd"] = kw
        return real_sgd(params, **kw)

    def step(opt, **kw):
        seen["step"] = kw
        return real_step(opt, **kw)

    monkeypatch.setattr(torch.optim, "SGD", sgd)
    monkeypatch.setattr(torch.optim.lr_scheduler, "StepLR", step)
    sur = S.fit_surrogate(masks, game(masks), rng=0, optimizer="sgd")
    assert seen == {"sgd": {"lr": 0.008, "momentum": 0.9}, "step": {"step_size": 100, "gamma": 0.1}}
    assert sur.report["epochs"] == 300 and sur.report["optimizer"] == "sgd"        # no early stopping
    # it trains: test R² 0.92 measured (0.92-0.96 over seeds 0-3); predicting the mean gives 0
    assert sur.report["held_out"]["overall"]["r2"] > 0.8, sur.report["held_out"]["overall"]


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "lbfgs"])
def test_fit_is_deterministic(optimizer):
    n = 6
    masks = all_coalitions(n)[1:]
    values = interacting_table(n)(masks)
    kw = {"optimizer": optimizer, "max_epochs": 30}
    a, b = (S.fit_surrogate(masks, values, rng=7, **kw) for _ in range(2))
    c = S.fit_surrogate(masks, values, rng=8, **kw)
    assert np.array_equal(a.held_out_index, b.held_out_index)
    assert np.array_equal(a.validation_index, b.validation_index)
    assert all(torch.equal(a.model.state_dict()[k], b.model.state_dict()[k]) for k in a.model.state_dict())
    assert np.array_equal(a.predict(masks), b.predict(masks))
    assert not np.array_equal(a.predict(masks), c.predict(masks))


@pytest.mark.parametrize("output", ["sigmoid", "exp"])
def test_save_load_round_trip(tmp_path, output):
    n = 6
    masks = all_coalitions(n)[1:]
    values = interacting_table(n)(masks)
    values = values / values.max()
    sur = S.fit_surrogate(masks, values, rng=0, output=output, **FAST)
    sur.save(tmp_path / "s")
    back = S.Surrogate.load(tmp_path / "s")
    assert np.array_equal(back.predict(masks), sur.predict(masks))
    assert back.model.config == sur.model.config and back.model.config["output"] == output
    assert back.report == json.loads(json.dumps(sur.report))
    assert np.array_equal(back.train_index, sur.train_index)
    assert np.array_equal(back.held_out_index, sur.held_out_index)
    assert np.array_equal(back.validation_index, sur.validation_index) and len(sur.validation_index)
    assert back.n_game_evals == sur.n_game_evals


def test_exp_head_fits_full_model_exactly_where_sigmoid_cannot():
    """ppl_ratio-like game: v(N) = 1 and one layer less costs 25 %: a sigmoid must undershoot v(N)."""
    n = 6
    masks = all_coalitions(n)
    values = np.exp(-(~masks).astype(float) @ np.full(n, 0.29))                   # v(N) = 1, v(N∖i) = 0.75
    fits = {out: S.fit_surrogate(masks, values, rng=0, output=out, optimizer="lbfgs", max_epochs=100)
            for out in ("sigmoid", "exp")}
    full = np.ones((1, n), bool)
    assert abs(fits["exp"].predict(full)[0] - 1) < 0.01
    assert abs(fits["sigmoid"].predict(full)[0] - 1) > abs(fits["exp"].predict(full)[0] - 1)


# --- estimation through the network ------------------------------------------------------------

def test_exact_mode_is_exact_shapley_of_the_surrogate_as_a_game():
    n = 8
    sur = random_surrogate(n)
    table = TabularGame(sur.predict(all_coalitions(n)))
    est = S.surrogate_shapley(sur, method="exact")
    assert np.allclose(est.values, ml.shapley.exact_shapley(table), atol=1e-12)
    assert np.allclose(S.surrogate_shapley(sur).values, est.values)              # "auto" is exact for L <= 20
    assert est.values.sum() == pytest.approx(table.values[-1] - table.values[0])  # efficiency


def test_sampling_modes_agree_with_exact_values():
    n = 8
    sur = random_surrogate(n, seed=1)
    exact = S.surrogate_shapley(sur, method="exact").values
    perm = S.surrogate_shapley(sur, n_samples=4000, rng=0, method="permutation")
    # independent samples: the error is ~N(0, stderr²); 4 standard errors for each of 8 players
    assert np.all(np.abs(perm.values - exact) <= 4 * perm.stderr), (perm.values - exact) / perm.stderr
    sizes = [7, 5, 3]
    target = S.surrogate_semivalue_exact(sur, hamming_size_weights(n, sizes))
    ham = S.surrogate_shapley(sur, n_samples=6000, rng=0, method="hamming", keep_sizes=sizes)
    assert np.all(np.abs(ham.values - target) <= 4 * ham.stderr), (ham.values - target) / ham.stderr
    assert np.abs(ham.values - exact).max() > 4 * ham.stderr.max()  # and it is not the Shapley value


def test_hamming_marginals_equal_brute_force():
    n, sizes, n_samples = 7, [6, 4, 2], 30
    sur = random_surrogate(n, seed=2)
    fast = S._hamming_marginals(sur, n_samples, sizes, np.random.default_rng(3))
    gen = np.random.default_rng(3)                                  # the same draws, rebuilt by hand
    bases = np.concatenate([_uniform_masks(gen, n, np.arange(n), k, n_samples // len(sizes)) for k in sizes])
    brute = np.empty((len(bases), n))
    for row, b in enumerate(bases):
        for i in range(n):
            with_i, without_i = b.copy(), b.copy()
            with_i[i], without_i[i] = True, False
            brute[row, i] = sur.predict(with_i)[0] - sur.predict(without_i)[0]
    assert fast.shape == brute.shape
    assert np.allclose(fast, brute, atol=1e-5)                    # float32 network, two summation orders


def test_permutation_marginals_equal_brute_force():
    n, n_samples = 7, 20
    sur = random_surrogate(n, seed=3)
    fast = S._permutation_marginals(sur, n_samples, np.random.default_rng(4))
    gen = np.random.default_rng(4)
    orders = np.argsort(gen.random((n_samples // 2, n)), axis=1)
    brute = np.zeros((len(orders), n))
    for row, order in enumerate(orders):
        for chain in (order, order[::-1]):                          # antithetic pair: mean of both
            prefixes = np.zeros((n + 1, n), bool)
            for t, player in enumerate(chain):
                prefixes[t + 1:, player] = True
            steps = np.diff(sur.predict(prefixes))
            brute[row, chain] += steps / 2
    assert np.allclose(fast, brute, atol=1e-5)


def test_stage3_query_weights():
    paper = S.stage3_query_weights(32, [30, 27, 24, 21, 18])
    assert sum(paper.values()) == pytest.approx(1)
    off = sum(p for w, p in paper.items() if w not in (30, 27, 24, 21, 18))
    assert off == pytest.approx(0.5)                                 # the paper's strata: half off-strata
    ours = S.stage3_query_weights(12, [11, 10, 9, 8, 7])
    assert sum(p for w, p in ours.items() if w not in range(7, 12)) == pytest.approx(8 / 120)
    # against a count of the queries _hamming_marginals actually makes
    gen = np.random.default_rng(0)
    bases = np.concatenate([_uniform_masks(gen, 12, np.arange(12), k, 2000) for k in (11, 10, 9, 8, 7)])
    flips = bases[:, None, :] ^ np.eye(12, dtype=bool)
    weights = np.concatenate([np.repeat(bases.sum(1), 12), flips.sum(2).ravel()])
    counts = np.bincount(weights, minlength=13) / len(weights)
    assert np.allclose([ours.get(w, 0) for w in range(13)], counts, atol=0.01)


def test_sample_stratified_masks_returns_exactly_n_masks():
    sizes = [5, 4, 3]
    for n_masks in (3, 23, 24, 25, 601):
        masks = S.sample_stratified_masks(6, n_masks, sizes, rng=0)
        assert masks.shape == (n_masks, 6)
        per = np.array([(masks.sum(1) == k).sum() for k in sizes])
        assert per.sum() == n_masks and per.max() - per.min() <= 1
        assert list(per) == sorted(per, reverse=True)                  # the first strata get the extra masks
    assert (S.sample_stratified_masks(12, 23, [11, 10], rng=0).sum(1) == 11).sum() == 12   # 23 -> 12 + 11
    # a multiple of the strata draws exactly what it drew before the remainder was spread (seeded stream)
    gen = np.random.default_rng(0)
    before = np.concatenate([_uniform_masks(gen, 6, np.arange(6), k, 8) for k in sizes])
    assert np.array_equal(S.sample_stratified_masks(6, 24, sizes, rng=0), before)
    with pytest.raises(ValueError, match=r"n_masks \(at least len\(keep_sizes\) = 3\)"):
        S.sample_stratified_masks(6, 2, sizes, rng=0)
    with pytest.raises(ValueError, match="n_masks"):
        S.sample_stratified_masks(6, 24.0, sizes, rng=0)


def test_stderr_meanings_follow_estimate():
    """stderr is the standard error for each method's own target (Estimate's docstring), NaN where unknown.

    surrogate_shapley's target is the surrogate's value φ(f): exact -> 0, sampled -> its Monte
    Carlo error. surrogate_estimate's target is φ(v): its spread over rng is unknown -> NaN.
    corrected_shapley is unbiased for φ(v): a finite, positive standard error.
    """
    sur = random_surrogate(6)
    assert np.array_equal(S.surrogate_shapley(sur, method="exact").stderr, np.zeros(6))
    perm = S.surrogate_shapley(sur, n_samples=200, rng=0, method="permutation").stderr
    assert np.all(np.isfinite(perm) & (perm > 0))
    game = interacting_table(6, seed=2)
    assert np.isnan(S.surrogate_estimate(game, 60, rng=0, **FAST).stderr).all()
    corrected = S.corrected_shapley(game, 40, rng=0, model="mlp", **FAST).stderr
    assert np.all(np.isfinite(corrected) & (corrected > 0))
    exact = S.corrected_shapley(game, 2 ** 6, rng=0, model="mlp", **FAST)     # every coalition: exact, 0
    assert np.array_equal(exact.stderr, np.zeros(6)) and np.allclose(exact.values, ml.shapley.exact_shapley(game))
    for f in (S.surrogate_shapley, S.surrogate_estimate, S.corrected_shapley):
        assert "bias" in f.__doc__ and "Estimate" in f.__doc__


# --- budgeted estimators and the correction ------------------------------------------------------

@pytest.mark.parametrize("correction", ["strata", "chains"])
def test_correction_is_unbiased_with_a_bad_surrogate(correction):
    n, seeds = 5, 150
    game = interacting_table(n, seed=1)
    exact = ml.shapley.exact_shapley(game)
    bad = {"model": "mlp", "optimizer": "adam", "max_epochs": 1, "output": "linear"}   # learned nothing
    budget = 64 if correction == "chains" else 24                      # strata: 32 would be every coalition
    runs = [S.corrected_shapley(game, budget, rng=s, correction=correction, **bad) for s in range(seeds)]
    est = np.array([r.values for r in runs])
    assert max(r.n_evals for r in runs) <= budget
    se = est.std(axis=0, ddof=1) / np.sqrt(seeds)
    assert np.all(np.abs(est.mean(axis=0) - exact) <= 3 * se), (est.mean(axis=0) - exact) / se
    # the test has teeth: the same bad surrogate, uncorrected, is far off
    plain = np.array([S.surrogate_estimate(game, budget, rng=s, **bad).values for s in range(20)])
    assert np.abs(plain.mean(axis=0) - exact).max() > 10 * se.max()


def test_correction_from_a_pool_is_unbiased_and_only_draws_pool_masks():
    """A pre-evaluated pool (a shipped table) replaces fresh stratified masks without biasing the estimate."""
    n, seeds = 5, 150
    game = interacting_table(n, seed=1)
    exact = ml.shapley.exact_shapley(game)
    gen = np.random.default_rng(0)
    pool = all_coalitions(n)[gen.permutation(2 ** n)[:12]]
    bad = {"model": "mlp", "optimizer": "adam", "max_epochs": 1, "output": "linear"}
    seen: list[np.ndarray] = []

    class Spy:
        n_players = n

        def __call__(self, masks):
            seen.append(np.asarray(masks))
            return game(masks)

    runs = [S.corrected_shapley(Spy(), 64, rng=s, pool=pool, **bad) for s in range(seeds)]
    est = np.array([r.values for r in runs])
    se = est.std(axis=0, ddof=1) / np.sqrt(seeds)
    assert np.all(np.abs(est.mean(axis=0) - exact) <= 3 * se), (est.mean(axis=0) - exact) / se
    assert max(r.n_evals for r in runs) <= 64
    # every evaluated mask is a chain prefix (nested sets) or a pool mask of an allowed size
    pool_keys = {m.tobytes() for m in pool if 1 <= m.sum() <= n - 1}
    drawn = {m.tobytes() for block in seen for m in block} - {m.tobytes() for m in all_coalitions(n)
                                                              if m.sum() in (0, n)}
    assert drawn & pool_keys
    with pytest.raises(ValueError, match="pool must be a bool array"):
        S.corrected_shapley(game, 64, rng=0, pool=np.ones((3, n + 1), dtype=bool))


def test_budgeted_estimators_respect_budget_and_are_accurate_on_a_smooth_game():
    n = 8
    w = np.linspace(0.1, 0.8, n)
    game = TabularGame(np.exp(-(~all_coalitions(n)).astype(float) @ w))      # a product game, like ppl_ratio
    exact = ml.shapley.exact_shapley(game)
    for estimate in (S.surrogate_estimate(game, 120, rng=0), S.corrected_shapley(game, 120, rng=0)):
        assert estimate.n_evals <= 120
        assert ml.estimators.relative_squared_error(estimate.values, exact) < 1e-3, estimate
    # stratified: ∅, N and 2 masks per size 1..7 in each half; chains: 4 antithetic chains of
    # 2·(n − 1) = 14 new masks each, on half the budget
    for minimum, kwargs in ((30, {}), (112, {"chain_fraction": 0.5})):
        assert S.corrected_min_budget(n, kwargs.get("chain_fraction")) == minimum
        with pytest.raises(BudgetTooSmallError, match=f"at least {minimum}"):
            S.corrected_shapley(game, minimum - 1, rng=0, **kwargs)
        assert S.corrected_shapley(game, minimum, rng=0, max_epochs=2, **kwargs).n_evals <= minimum


def test_paper_pipeline_writes_artefacts_that_reload(tmp_path):
    n = 6
    game = interacting_table(n)
    game = TabularGame(game.values / game.values.max())
    res = S.paper_pipeline(game, 100, [5, 4, 3], rng=0, mc_samples=3000, out_dir=tmp_path, **FAST)
    assert res.n_game_evals == len(np.unique(ml.games.coalition_index(res.masks))) == res.estimate.n_evals
    with np.load(tmp_path / "evaluations.npz") as data:
        assert np.array_equal(data["masks"], res.masks) and np.array_equal(data["values"], res.values)
    assert np.array_equal(res.values, game(res.masks))
    back = S.Surrogate.load(tmp_path / "surrogate")
    assert np.array_equal(back.predict(all_coalitions(n)), res.surrogate.predict(all_coalitions(n)))
    saved = json.loads((tmp_path / "estimate.json").read_text())
    assert np.allclose(saved["values"], res.estimate.values) and saved["ranking"] == res.ranking
    assert saved["keep_sizes"] == [5, 4, 3] and saved["n_game_evals"] == res.n_game_evals
    assert res.ranking == np.argsort(res.estimate.values, kind="stable").tolist()


def test_learning_curve_error_falls_with_more_masks_and_rows_are_independent_fits():
    """On a known smooth game the test error falls as n_masks grows, and every row is the fit its seed gives."""
    n = 8
    w = np.linspace(0.1, 0.8, n)
    game = TabularGame(np.exp(-(~all_coalitions(n)).astype(float) @ w) + 0.3 * all_coalitions(n)[:, :2].all(1))
    everything = (all_coalitions(n), game.values)
    sizes, fit = [7, 6, 5, 4, 3], {"optimizer": "lbfgs", "output": "exp"}
    curve = S.learning_curve(game, [30, 300], sizes, seeds=[0, 1, 2], test=everything, **fit)
    assert list(curve["n_masks"]) == [30] * 3 + [300] * 3 and list(curve["seed"]) == [0, 1, 2] * 2
    small, large = (curve[curve["n_masks"] == k] for k in (30, 300))
    # measured: RMSE on all 256 masks 0.085-0.149 from 30 masks, 0.007-0.012 from 300 (10.7x lower on
    # average); required: 5x lower on average, and every fit on 300 masks better than every fit on 30
    assert large["test_rmse"].mean() < small["test_rmse"].mean() / 5, curve[["n_masks", "test_rmse"]]
    assert large["test_rmse"].max() < small["test_rmse"].min()
    assert (large["test_r2"] > 0.99).all()
    # a row is exactly the independent fit of its seed: same masks, same split, same network
    row = curve.iloc[4]
    gen = np.random.default_rng(1)
    masks = S.sample_stratified_masks(n, 300, sizes, gen)
    again = S.fit_surrogate(masks, game(masks), rng=gen, **fit)
    assert row["n_evals"] == len(np.unique(masks, axis=0))
    assert row["test_rmse"] == pytest.approx(again.evaluate(*everything)["overall"]["rmse"], rel=1e-12)
    assert row["rmse"] == pytest.approx(again.report["held_out"]["overall"]["rmse"], rel=1e-12)


# --- bad inputs ----------------------------------------------------------------------------------

def test_bad_training_data_is_rejected_with_indices():
    masks = all_coalitions(4)
    values = masks.sum(1).astype(float)
    with pytest.raises(ValueError, match="16 masks but values shape"):
        S.fit_surrogate(masks, values[:-1])
    bad = masks.astype(int)
    bad[3, 2] = 2
    with pytest.raises(ValueError, match=r"binary.*\[\[3, 2\]\]"):
        S.fit_surrogate(bad, values)
    broken = values.copy()
    broken[[3, 7]] = [np.nan, np.inf]
    with pytest.raises(ValueError, match=r"NaN or inf at indices \[3, 7\]"):
        S.fit_surrogate(masks, broken)          # raised, never dropped: dropping shifts labels onto wrong masks
    with pytest.raises(ValueError, match="NaN or inf"):
        S.fit_surrogate(masks, broken.tolist())
    with pytest.raises(ValueError, match=r"optimizer must be one of \('adam', 'sgd', 'lbfgs'\)"):
        S.fit_surrogate(masks, values, optimizer="rmsprop")
    for kw, name in [({"val_fraction": 1.0}, "val_fraction and test_fraction"),
                     ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction and test_fraction"),
                     ({"test_fraction": -0.1}, "val_fraction and test_fraction"), ({"lr": 0}, "lr"),
                     ({"max_epochs": 0}, "max_epochs"), ({"patience": 1.5}, "patience"),
                     ({"batch_size": 0}, "batch_size"), ({"hidden": 0}, "hidden"), ({"depth": 0}, "depth")]:
        with pytest.raises(ValueError, match=name):
            S.fit_surrogate(masks, values, **kw)
    with pytest.raises(ValueError, match="bool or 0/1"):
        S.fit_surrogate(masks.astype(str), values)
    with pytest.raises(ValueError, match="at least one mask"):
        S.fit_surrogate(masks[:0], values[:0])
    with pytest.raises(ValueError, match="positive"):
        S.fit_surrogate(masks, values, output="exp")                 # v(∅) = 0 cannot be exp(z)
    with pytest.raises(ValueError, match="output"):
        S.SurrogateMLP(4, output="relu")


def test_bad_queries_are_rejected():
    sur = random_surrogate(6)
    with pytest.raises(ValueError, match="6 columns"):
        sur.predict(np.ones((3, 5), bool))
    with pytest.raises(ValueError, match="n_samples must be an int >= 2"):
        S.surrogate_shapley(sur, n_samples=1, method="permutation")
    with pytest.raises(ValueError, match="method must be"):
        S.surrogate_shapley(sur, n_samples=100, method="kernel")
    with pytest.raises(ValueError, match="keep_sizes"):
        S.surrogate_shapley(sur, n_samples=100, method="hamming")
    with pytest.raises(ValueError, match="<= 20"):
        S.surrogate_shapley(random_surrogate(21), method="exact")
    assert S.surrogate_shapley(random_surrogate(21), n_samples=20, rng=0).n_evals == 0   # auto: sampling


# --- many layers (L > 20): sampling through the net ----------------------------------------------

def clear_ranking_game(n: int, seed: int = 0) -> tuple[ml.games.PairwiseGame, list[int]]:
    """Additive + weak pairwise game whose 4 least important players stand well apart, and those 4.

    Main effects: 4 players in [0.01, 0.02], the rest in [0.05, 0.1], shuffled; interactions
    N(0, 0.002) shift a Shapley value by ½ Σ_j p_ij, about 0.006 at L = 32: the bottom 4 stay
    at least ~0.02 below the others (closed form :meth:`~minilib.games.PairwiseGame.shapley_values`).
    """
    rng = np.random.default_rng(seed)
    main = rng.permutation(np.concatenate([rng.uniform(0.01, 0.02, 4), rng.uniform(0.05, 0.1, n - 4)]))
    game = ml.games.PairwiseGame(main, np.triu(rng.normal(0, 0.002, (n, n)), 1))
    bottom = sorted(np.argsort(game.shapley_values())[:4].tolist())
    assert bottom == sorted(np.argsort(main)[:4].tolist())            # the ranking really is clear
    return game, bottom


@pytest.mark.parametrize("n", [21, 24, 32])
def test_surrogate_shapley_samples_by_default_above_20_players(n):
    sur = random_surrogate(n, seed=n)
    est = S.surrogate_shapley(sur, rng=0)                             # no n_samples: used to raise
    assert est.method == "surrogate (permutation)" and np.all(est.stderr > 0)
    same = S.surrogate_shapley(sur, n_samples=S.default_surrogate_samples(n), rng=0)
    assert np.array_equal(est.values, same.values) and S.default_surrogate_samples(n) == 1000 * n
    # every antithetic chain telescopes to f(N) − f(∅): efficiency holds exactly, sampling or not
    ends = sur.predict(np.array([np.zeros(n, bool), np.ones(n, bool)]))
    assert est.values.sum() == pytest.approx(ends[1] - ends[0], abs=1e-5)
    # the default's Monte Carlo error is small next to the values (0.2 % measured; 1 % allowed)
    assert est.stderr.max() < 0.01 * np.abs(est.values).mean()


@pytest.mark.parametrize("n", [24, 32])
def test_budgeted_estimators_above_20_players(n):
    game, bottom = clear_ranking_game(n)
    exact = game.shapley_values()
    budget = 600
    for estimate in (S.surrogate_estimate(game, budget, rng=0), S.corrected_shapley(game, budget, rng=0)):
        assert estimate.n_evals <= budget
        assert sorted(np.argsort(estimate.values)[:4].tolist()) == bottom, estimate
        assert ml.estimators.relative_squared_error(estimate.values, exact) < 1e-3, estimate
    assert np.all(np.isfinite(estimate.stderr) & (estimate.stderr > 0))  # corrected: correction + net MC error


@pytest.mark.parametrize("correction", ["strata", "chains"])
def test_corrected_stderr_includes_the_surrogate_monte_carlo_error(monkeypatch, correction):
    """φ(f) through the surrogate with standard error 1 per fold: the folds' weighted errors add in quadrature.

    On a 3-additive game the 3-additive surrogate has no residual, so the stratified
    correction's own standard error is 0 and only the K folds' √(K · (1/K)²) is left.
    """
    real = S.surrogate_shapley

    def noisy(*args, **kwargs):
        est = real(*args, **kwargs)
        return ml.estimators.Estimate(est.values, np.ones_like(est.values), est.n_evals, est.method)

    monkeypatch.setattr(ml.surrogate_estimators, "surrogate_shapley", noisy)
    game = interacting_table(6, seed=2)                               # main + pairwise + one 3-way term
    if correction == "strata":
        est, folds = S.corrected_shapley(game, 40, rng=0, model="kadd3"), ml.surrogate_estimators._n_folds(6, 40)
    else:
        est, folds = S.corrected_shapley(game, 200, rng=0, chain_fraction=0.5, model="mlp", **FAST), 2
    assert np.allclose(est.stderr, 1 / np.sqrt(folds), rtol=0.01), (est.stderr, folds)


def test_paper_pipeline_above_20_players():
    n = 32
    game, bottom = clear_ranking_game(n, seed=1)
    sizes = ml.pruning.paper_keep_sizes(n)
    res = S.paper_pipeline(game, 300, sizes, rng=0, mc_samples=20_000)
    assert res.n_game_evals <= 300 and sorted(res.ranking[:4]) == bottom


def test_corrected_budget_arithmetic_for_every_chain_fraction():
    """The chains' worst case (no repeated mask) fits the budget, and the stated minimum is the least that runs."""
    for n in (4, 8, 32):
        for cf in (0.05, 0.3, 0.5, 0.9, 0.99, 0.999, 0.9999):
            low = S.corrected_min_budget(n, cf)
            assert S._chain_pairs(n, low, cf) >= 4 > S._chain_pairs(n, low - 1, cf)
            for budget in range(low, low + 6 * n):
                assert 2 + S._chain_pairs(n, budget, cf) * 2 * (n - 1) <= budget, (n, cf, budget)


def test_corrected_budget_holds_near_chain_fraction_one():
    """chain_fraction=0.999 of 2·(n−1)·k + 1 kept k chain pairs and spent budget + 1 (their shared ∅ and N)."""
    n, fast = 32, {"model": "mlp", "optimizer": "lbfgs", "max_epochs": 1, "n_samples": 64}
    game = ml.games.PairwiseGame(np.linspace(0.01, 0.1, n))       # 32 players: chains rarely repeat a mask
    for cf in (0.999, 0.9999):
        low = S.corrected_min_budget(n, cf)
        for budget in [low, low + 1] + [2 * (n - 1) * k + 1 for k in (5, 6, 7)]:
            for seed in range(4):
                spent = S.corrected_shapley(game, budget, rng=seed, chain_fraction=cf, **fast).n_evals
                assert spent <= budget, (cf, budget, seed, spent)
    with pytest.raises(BudgetTooSmallError, match=f"at least {S.corrected_min_budget(n, 0.999)}"):
        S.corrected_shapley(game, S.corrected_min_budget(n, 0.999) - 1, chain_fraction=0.999)
    with pytest.raises(BudgetTooSmallError, match=f"at least {S.corrected_min_budget(n)}"):
        S.corrected_shapley(game, S.corrected_min_budget(n) - 1)


def test_paper_and_exp_surrogates_are_the_two_surrogates_chapter_05_derives():
    """The one-call rebuild that chapter 05's later pages use equals the first page's step-by-step fits."""
    table, strata = ml.teaching.exact_table("ppl_ratio"), [11, 10, 9, 8, 7]
    result, exp_fit = S.paper_and_exp_surrogates(table, strata, n_masks=300, seed=1)
    again = S.paper_pipeline(table, 300, strata, rng=1, output="sigmoid")
    refit = S.fit_surrogate(again.masks, again.values, rng=1, output="exp", optimizer="lbfgs")
    everything = all_coalitions(12)
    assert np.array_equal(result.masks, again.masks) and result.ranking == again.ranking
    assert np.allclose(result.surrogate.predict(everything), again.surrogate.predict(everything))
    assert np.allclose(exp_fit.predict(everything), refit.predict(everything))
    assert S.paper_and_exp_surrogates is ml.paper_pipeline.paper_and_exp_surrogates
