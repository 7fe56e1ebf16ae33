"""Disentanglement metrics (gem.disentanglement), relation recovery with bootstrap intervals and
oracle quality (gem.metrics): reference cases, invariances and determinism."""

import math

import numpy as np
import pytest

from gem import disentanglement as dis
from gem.disentanglement import compute_disentanglement, split_pool
from gem.metrics import oracle_quality, relation_error, relation_error_bootstrap

LEVELS = np.array([4, 5, 3])
N_POOL = 1500
SIZES = dict(n_train=1000, n_test=500)   # small, so the suite stays fast (the defaults are 10,000 / 5,000)
PERM = np.array([2, 0, 1])
SCALE = np.array([2.0, -0.5, 3.0])
OFFSET = np.array([1.0, -2.0, 0.5])


def _factors(seed=0, n=N_POOL):
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, level, n) for level in LEVELS], axis=1)


@pytest.fixture(scope="module")
def factors():
    return _factors()


@pytest.fixture(scope="module")
def codes(factors):
    """perfect: the factors themselves; noisy: axis-aligned with noise; transformed: noisy with
    its codes permuted, rescaled (with sign flips) and shifted; random: independent of the factors."""
    rng = np.random.default_rng(1)
    noisy = factors / LEVELS + 0.05 * rng.normal(size=factors.shape)
    return {
        "perfect": factors.astype(float),
        "noisy": noisy,
        "transformed": noisy[:, PERM] * SCALE + OFFSET,
        "random": rng.normal(size=(len(factors), 4)),
    }


@pytest.fixture(scope="module")
def results(codes, factors):
    return {name: compute_disentanglement(c, factors, seed=0, **SIZES) for name, c in codes.items()}


ALL_KEYS = {"mig", "dci_disentanglement", "dci_completeness", "dci_informativeness_train",
            "dci_informativeness_test", "sap", "modularity", "explicitness_train", "explicitness_test",
            "spearman_mcc", "factorvae_score", "factorvae_score_train", "factorvae_active_dims",
            "betavae_score", "betavae_score_train"}


def test_keys_are_floats(results):
    for result in results.values():
        assert set(result) == ALL_KEYS
        assert all(isinstance(v, float) and math.isfinite(v) for v in result.values())


def test_perfect_axis_aligned_code_scores_the_maximum(results):
    r = results["perfect"]
    assert r["mig"] > 0.98                      # < 1 only by the finite-sample MI of other codes
    assert r["dci_disentanglement"] == pytest.approx(1.0, abs=1e-6)
    assert r["dci_completeness"] == pytest.approx(1.0, abs=1e-6)
    assert r["dci_informativeness_train"] == 1.0 and r["dci_informativeness_test"] == 1.0
    assert r["modularity"] == pytest.approx(1.0, abs=1e-3)
    assert r["explicitness_test"] > 0.99
    assert r["spearman_mcc"] == pytest.approx(1.0)
    assert r["factorvae_score"] == 1.0 and r["factorvae_active_dims"] == 3.0
    assert r["betavae_score"] == 1.0
    # SAP's linear SVM on one code cannot isolate middle classes: far from 1, far above random
    assert r["sap"] > 0.3


def test_random_code_scores_near_chance(results):
    r, K = results["random"], len(LEVELS)
    assert r["mig"] < 0.02
    assert r["dci_disentanglement"] < 0.05 and r["dci_completeness"] < 0.05
    assert r["dci_informativeness_test"] < 0.4       # chance is 1/3 .. 1/5
    assert r["sap"] < 0.05
    assert r["explicitness_test"] == pytest.approx(0.5, abs=0.05)
    assert r["spearman_mcc"] < 0.1
    assert r["factorvae_score"] < 1 / K + 0.1 and r["betavae_score"] < 1 / K + 0.1
    # modularity is not 0 for a random code (evenly spread small MIs count as partly modular)
    assert r["modularity"] < results["perfect"]["modularity"] - 0.3


def test_permuted_and_rescaled_code_keeps_its_scores(results, codes, factors):
    noisy, moved = results["noisy"], results["transformed"]
    for key in ("mig", "modularity", "spearman_mcc", "factorvae_score", "factorvae_score_train"):
        assert moved[key] == pytest.approx(noisy[key], abs=1e-9), key    # exactly invariant
    for key in ("dci_disentanglement", "dci_completeness", "dci_informativeness_test",
                "explicitness_test", "betavae_score"):
        assert moved[key] == pytest.approx(noisy[key], abs=0.02), key    # regularised / tree fits
    # SAP is invariant to permuting codes only (its SVM is regularised, so scale matters)
    permuted = dis.sap(codes["noisy"][:, PERM], factors, **SIZES)["sap"]
    assert permuted == pytest.approx(noisy["sap"], abs=1e-12)
    assert noisy["mig"] > 0.9 and noisy["dci_disentanglement"] > 0.9


def test_every_metric_is_deterministic_and_matches_its_standalone_function(results, codes, factors):
    again = compute_disentanglement(codes["noisy"], factors, seed=0, dci_trees=5, **SIZES)
    assert compute_disentanglement(codes["noisy"], factors, seed=0, dci_trees=5, **SIZES) == again
    for key in ALL_KEYS - {k for k in ALL_KEYS if k.startswith("dci")}:
        assert again[key] == results["noisy"][key], key
    threads = dis.dci(codes["noisy"], factors, seed=0, dci_trees=5, n_jobs=2, **SIZES)
    assert threads == {k: v for k, v in again.items() if k.startswith("dci")}
    other = compute_disentanglement(codes["noisy"], factors, seed=1, dci_trees=5, **SIZES)
    assert other != again
    assert dis.mig(codes["noisy"], factors, **SIZES) == {"mig": results["noisy"]["mig"]}
    assert dis.factorvae_score(codes["noisy"], factors, **SIZES)["factorvae_score"] == results["noisy"]["factorvae_score"]
    subset = compute_disentanglement(codes["noisy"], factors, metrics=["betavae_score", "explicitness"], **SIZES)
    assert set(subset) == {"betavae_score", "betavae_score_train", "explicitness_train", "explicitness_test"}
    assert subset["explicitness_test"] == results["noisy"]["explicitness_test"]


def test_mig_hand_computed():
    # factors a and b are independent; code z1 is a with one error, code z2 is b rescaled
    a = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    b = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    z1 = np.array([0, 0, 0, 1, 1, 1, 1, 1], dtype=float)
    z2 = 3.0 * b
    ln = np.log
    mi_a_z1 = 3 / 8 * ln(2) + 1 / 8 * ln(2 / 5) + 1 / 2 * ln(8 / 5)     # counts (0,0):3 (0,1):1 (1,1):4
    mi_b_z1 = 1 / 4 * ln(4 / 3) + 1 / 8 * ln(2 / 3) + 1 / 4 * ln(4 / 5) + 3 / 8 * ln(6 / 5)
    mi_a_z2, mi_b_z2, h = 0.0, ln(2), ln(2)
    expected = 0.5 * ((mi_a_z1 - mi_a_z2) / h + (mi_b_z2 - mi_b_z1) / h)
    result = dis.mig(np.stack([z1, z2], 1), np.stack([a, b], 1), n_train=8, n_test=0)
    assert result["mig"] == pytest.approx(expected, abs=1e-12)
    mi = dis.discrete_mutual_info(dis.histogram_discretize(np.stack([z1, z2], 1)), np.stack([a, b], 1))
    np.testing.assert_allclose(mi, [[mi_a_z1, mi_b_z1], [mi_a_z2, mi_b_z2]], atol=1e-12)
    np.testing.assert_allclose(dis.discrete_entropy(np.stack([a, b], 1)), [h, h])


def test_histogram_discretize_is_disentanglement_libs():
    x = np.linspace(0.0, 1.0, 41)[:, None]
    bins = dis.histogram_discretize(x, num_bins=20)[:, 0]
    assert bins.min() == 1 and bins.max() == 20
    np.testing.assert_array_equal(bins, np.digitize(x[:, 0], np.histogram(x[:, 0], 20)[1][:-1]))
    assert (dis.histogram_discretize(np.ones((5, 1)), 20) == dis.histogram_discretize(np.ones((5, 1)), 20)[0]).all()


def test_matrix_level_definitions():
    assert dis.dci_from_importance(np.eye(3)) == pytest.approx((1.0, 1.0), abs=1e-6)
    assert dis.dci_from_importance(np.ones((3, 3))) == pytest.approx((0.0, 0.0), abs=1e-6)
    # two codes for one factor: disentangled codes, incomplete factor
    d, c = dis.dci_from_importance(np.array([[0.5, 0.0], [0.5, 0.0], [0.0, 1.0]]))
    # factor 0 spread over 2 of 3 codes: 1 - ln 2 / ln 3; factor 1 on one code: 1; equal shares
    assert d == pytest.approx(1.0, abs=1e-6) and c == pytest.approx(0.5 * (1 - np.log(2) / np.log(3)) + 0.5, abs=1e-6)
    assert dis.modularity_from_mutual_info(np.array([[1.0, 0.0], [0.0, 2.0]])) == 1.0
    # code 0: squared MIs 1 and 1 -> 1 - 1/1 = 0; code 1: no information -> 0
    assert dis.modularity_from_mutual_info(np.array([[1.0, 1.0], [0.0, 0.0]])) == 0.0
    assert dis.mig_from_mutual_info(np.array([[0.6, 0.1], [0.2, 0.5]]), np.array([1.0, 1.0])) == pytest.approx(0.4)


def test_intervention_metrics_on_a_correlated_pool():
    """FactorVAE and BetaVAE batches condition on the pool, so correlated factors work."""
    rng = np.random.default_rng(3)
    a = rng.integers(0, 4, 3000)
    b = np.where(rng.random(3000) < 0.7, a, rng.integers(0, 4, 3000))   # b mostly copies a
    f = np.stack([a, b], 1)
    groups = dis._Groups(f)
    rows = groups.sample_same(1, np.array([5, 17]), 64, rng)
    assert (f[rows[0], 1] == f[5, 1]).all() and (f[rows[1], 1] == f[17, 1]).all()
    r = compute_disentanglement(f.astype(float), f, metrics=["factorvae", "betavae"], **SIZES)
    assert r["factorvae_score"] == 1.0 and r["betavae_score"] == 1.0


def test_split_pool_and_input_errors(factors, codes):
    train, test = split_pool(100, 60, 30, seed=0)
    assert len(train) == 60 and len(test) == 30 and not set(train) & set(test)
    train, test = split_pool(90, 60, 30, seed=0)
    assert len(train) == 60 and len(test) == 30
    assert (split_pool(90, 60, 30, seed=0)[0] == train).all()
    with pytest.warns(UserWarning, match="fewer than n_train"):
        train, test = split_pool(80, 60, 30, seed=0)
    assert (len(train), len(test)) == (53, 27)
    with pytest.warns(UserWarning, match="same proportion"):
        train, test = split_pool(45, 60, 30, seed=0)
    assert (len(train), len(test)) == (30, 15)
    constant = factors.copy()
    constant[:, 1] = 2
    with pytest.raises(ValueError, match=r"\[1\] are constant"):
        dis.mig(codes["noisy"], constant)
    with pytest.raises(ValueError, match="unknown disentanglement metric"):
        compute_disentanglement(codes["noisy"], factors, metrics=["beta"])
    with pytest.raises(ValueError, match="NaN"):
        dis.mig(np.full((10, 2), np.nan), factors[:10])
    with pytest.raises(ValueError, match="same N"):
        dis.mig(codes["noisy"][:10], factors)


# ---------------------------------------------------------------------------------------------
# relation recovery with bootstrap intervals
# ---------------------------------------------------------------------------------------------

def _scores(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, n)
    y = np.clip(x + rng.integers(-1, 2, n), 0, 5)            # y follows x
    z = rng.integers(0, 6, n)                                  # z is independent
    return np.stack([x, y, z], 1)


def test_relation_error_bootstrap_resamples_scored_rows():
    from gem.somers_d import somers_d_matrix

    true = somers_d_matrix(_scores(20000, 0))
    scores = _scores(300, 1)
    result = relation_error_bootstrap(scores, true, somers_d_matrix, n_boot=100, seed=0)
    point = relation_error(somers_d_matrix(scores), true)
    for key, value in point.items():
        assert result[key] == pytest.approx(value, nan_ok=True)
    assert result["mae_ci"][0] <= result["mae_ci"][1] and result["mae_ci"][0] >= 0
    assert result["impact_ci_low"].shape == (3, 3)
    assert (result["impact_ci_low"] <= result["impact"] + 1e-12).mean() > 0.8
    assert (result["impact"] <= result["impact_ci_high"] + 1e-12).mean() > 0.8
    assert (np.diag(result["edge_error"]) == 0).all() and (np.diag(result["edge_error_ci_high"]) == 0).all()
    assert (result["edge_error_ci_low"] <= result["edge_error_ci_high"]).all()
    assert result["sign_agreement_ci"][1] <= 1.0 and result["n_boot"] == 100
    # deterministic, and more scored rows give a narrower interval
    assert relation_error_bootstrap(scores, true, somers_d_matrix, n_boot=100, seed=0)["mae_ci"] == result["mae_ci"]
    wide = result["mae_ci"][1] - result["mae_ci"][0]
    big = relation_error_bootstrap(_scores(3000, 2), true, somers_d_matrix, n_boot=100, seed=0)
    assert big["mae_ci"][1] - big["mae_ci"][0] < wide
    assert big["mae"] < 0.05


def test_error_intervals_contain_the_error_they_belong_to():
    """Resampled S is noisier than S, so the replicates' errors sit above the point estimate; the
    bias-corrected intervals still contain it (the uncorrected percentiles here do not)."""
    from gem.somers_d import somers_d_matrix

    true = somers_d_matrix(_scores(20000, 0))
    for seed in range(5):
        scores = _scores(1500, 10 + seed)
        result = relation_error_bootstrap(scores, true, somers_d_matrix, n_boot=200, seed=seed)
        low, high = result["mae_ci"]
        assert low <= result["mae"] <= high
        inside = (result["edge_error_ci_low"] <= result["edge_error"] + 1e-12) & \
                 (result["edge_error"] <= result["edge_error_ci_high"] + 1e-12)
        assert inside.mean() >= 0.9
    # Six independent attributes: the true impact is 0 off the diagonal, S holds only noise, and
    # the replicates' noise adds to it, so the uncorrected percentile interval misses the error.
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, (1500, 6))
    true = np.eye(6)
    result = relation_error_bootstrap(scores, true, somers_d_matrix, n_boot=200, seed=0)
    maes = [relation_error(somers_d_matrix(scores[rng.integers(0, len(scores), len(scores))]), true)["mae"]
            for _ in range(200)]
    assert np.percentile(maes, 2.5) > result["mae"]
    assert result["mae_ci"][0] <= result["mae"] <= result["mae_ci"][1]


def test_relation_error_bootstrap_with_any_impact_function():
    scores = _scores(200, 3).astype(float)
    corr = lambda s: np.corrcoef(s.T)   # noqa: E731
    result = relation_error_bootstrap(scores, corr(scores), corr, n_boot=30, seed=1)
    assert result["mae"] == 0.0 and result["edge_error"].max() == 0.0
    assert result["mae_ci"][1] > 0
    with pytest.raises(ValueError):
        relation_error_bootstrap(scores, corr(scores), corr, alpha=1.5)


# ---------------------------------------------------------------------------------------------
# oracle quality
# ---------------------------------------------------------------------------------------------

def test_oracle_quality_hand_computed():
    nan = np.nan
    scores = np.array([[0, 5, 3], [2, nan, 0], [0, 0, 0], [nan, nan, nan]])
    labels = np.array([[0, 5, 3], [1, 5, 0], [0, 5, 0], [0, 0, 0]])
    q = oracle_quality(scores, labels, attributes=["age", "smile", "beard"])
    assert q["binary"] == {"age": False, "smile": True, "beard": False}   # smile's labels are 0/5
    assert q["accuracy"] == pytest.approx({"age": 2 / 3, "smile": 1 / 2, "beard": 1.0})
    assert q["accuracy_mean"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert q["missing_rate"] == pytest.approx({"age": 1 / 4, "smile": 2 / 4, "beard": 1 / 4})
    assert q["missing_rate_overall"] == pytest.approx(4 / 12)
    assert q["all_zero_rate"] == pytest.approx(1 / 4)       # row 2; row 3 has no answer at all
    assert q["all_missing_rate"] == pytest.approx(1 / 4)
    assert q["n_images"] == 4


def test_oracle_quality_binary_threshold_and_rounding():
    scores = np.array([[2.6], [3.0], [4.4], [1.0]])
    labels01 = np.array([[0], [1], [1], [1]])                 # 0/1 labels need binary=True
    q = oracle_quality(scores, labels01, binary=True)
    assert q["accuracy"]["0"] == pytest.approx(3 / 4)
    assert oracle_quality(scores, labels01, binary=True, present_threshold=2.5)["accuracy"]["0"] == pytest.approx(2 / 4)
    # on the 0-5 scale a fractional score is rounded half up before the exact match
    exact = oracle_quality(np.array([[2.5], [3.4]]), np.array([[3], [3]]), binary=False)
    assert exact["accuracy"]["0"] == 1.0
    with pytest.raises(ValueError):
        oracle_quality(scores, labels01[:2])
