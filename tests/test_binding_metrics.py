"""Latent binding (Hungarian on |Spearman rho|) and the array metrics."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from gem.binding import Binding, bind_latents, spearman_matrix
from gem.metrics import relation_error, spearman_mcc


def test_spearman_matrix_matches_scipy_with_nan_and_constant():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, (200, 3)).astype(float)
    y = rng.normal(size=(200, 4))
    x[rng.random(200) < 0.1, 1] = np.nan
    x[:, 2] = 3.0  # constant
    rho = spearman_matrix(x, y)
    assert rho.shape == (3, 4) and np.isfinite(rho).all()
    for i in range(2):
        ok = ~np.isnan(x[:, i])
        for k in range(4):
            ref = scipy.stats.spearmanr(x[ok, i], y[ok, k]).statistic
            assert rho[i, k] == pytest.approx(ref, abs=1e-12)
    assert (rho[2] == 0).all()


def test_bind_recovers_permutation_and_signs():
    rng = np.random.default_rng(1)
    n_rows, n, d = 1000, 5, 7
    scores = rng.integers(0, 6, (n_rows, n)).astype(float)
    scores[rng.random((n_rows, n)) < 0.05] = np.nan   # missing scores, different rows per column
    filled = np.where(np.isnan(scores), rng.integers(0, 6, scores.shape), scores)
    perm = np.array([4, 0, 6, 2, 5])                   # attribute i lives in latent perm[i]
    signs = np.array([1, -1, -1, 1, -1])
    latents = rng.normal(size=(n_rows, d))
    latents[:, perm] = signs * filled + 0.3 * rng.normal(size=(n_rows, n))
    binding = bind_latents(latents, scores)
    assert isinstance(binding, Binding)
    np.testing.assert_array_equal(binding.latent_of, perm)
    np.testing.assert_array_equal(binding.sign, signs)
    assert binding.rho.shape == (n, d)
    assert (np.abs(binding.rho[np.arange(n), perm]) > 0.9).all()
    # torch inputs give the same binding
    again = bind_latents(torch.from_numpy(latents).float(), torch.from_numpy(scores))
    np.testing.assert_array_equal(again.latent_of, perm)


def test_bind_constant_column_and_zero_sign():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 6, (100, 2)).astype(float)
    scores[:, 1] = 2.0
    latents = np.column_stack([scores[:, 0], rng.normal(size=100)])
    binding = bind_latents(latents, scores)
    assert np.isfinite(binding.rho).all() and (binding.rho[1] == 0).all()
    np.testing.assert_array_equal(binding.latent_of, [0, 1])
    np.testing.assert_array_equal(binding.sign, [1, 1])


def test_bind_needs_enough_latents():
    with pytest.raises(ValueError, match="d >= n"):
        bind_latents(np.zeros((10, 2)), np.zeros((10, 3)))


def test_relation_error_hand_made():
    true = np.array([[1.0, 0.5, -0.3],
                     [0.02, 1.0, 0.0],
                     [0.4, -0.6, 1.0]])
    learned = np.array([[0.0, 0.4, 0.1],
                        [-0.1, 1.0, 0.2],
                        [0.4, -0.3, 0.7]])
    # off-diagonal errors: 0.1, 0.4, 0.12, 0.2, 0.0, 0.3 -> mean 1.12 / 6, max 0.4
    # edges with |true| > 0.05: (0,1)+ agree, (0,2)- vs + disagree, (2,0) agree, (2,1) agree -> 3/4
    out = relation_error(learned, true)
    assert out["mae"] == pytest.approx(1.12 / 6)
    assert out["max_abs"] == pytest.approx(0.4)
    assert out["sign_agreement"] == pytest.approx(0.75)
    assert out["n_edges"] == 6 and out["n_sign_edges"] == 4
    weak = relation_error(learned, np.eye(3))
    assert math.isnan(weak["sign_agreement"])


def test_spearman_mcc_monotone_transform_of_permuted_factors():
    rng = np.random.default_rng(3)
    factors = rng.integers(0, 8, (500, 3))
    perm = [2, 0, 1]
    latents = np.column_stack([np.exp(factors[:, perm[0]]), -factors[:, perm[1]] ** 3,
                               np.tanh(factors[:, perm[2]] / 3.0), rng.normal(size=500)])
    out = spearman_mcc(latents, factors)
    assert out["mcc"] == pytest.approx(1.0, abs=1e-12)
    assert dict(out["matched"]) == {perm[k]: k for k in range(3)}
    noisy = spearman_mcc(rng.normal(size=(500, 3)), factors)
    assert noisy["mcc"] < 0.2
