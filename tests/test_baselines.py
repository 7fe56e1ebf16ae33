"""Baseline losses against hand-computed values, and GEM's adversarial term. That every extractor
builds, encodes, decodes, learns and round-trips its state is checked by tests/test_contracts.py."""

import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from scipy.stats import norm

from gem.interfaces import BuildContext
from gem.relations import RelationModel
from gem_plugins.graph_learners import IdentityGraph
from gem_plugins.losses import (AnnealedCapacityLoss, BetaTCVAELoss, DIPVAELoss, FactorVAELoss, kl_normal,
                                log_importance_weights, permute_dims, reconstruction_loss)
from data_fixtures import blob_images


def test_kl_normal_closed_form():
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, math.log(2.0)]])
    # Per sample: 0.5 (mu^2 + var - log var - 1); dim 0: 0.5 and 0; dim 1: 0.5 (1 - ln 2) twice.
    expected = torch.tensor([0.25, 0.5 * (1 - math.log(2.0))])
    assert torch.allclose(kl_normal(mu, logvar), expected)


def test_capacity_schedule_and_loss():
    loss = AnnealedCapacityLoss(gamma=100.0, c_max=20.0, capacity_steps=1000)
    assert loss.capacity(0) == 0.0
    assert loss.capacity(250) == pytest.approx(5.0)
    assert loss.capacity(1000) == pytest.approx(20.0)
    assert loss.capacity(5000) == pytest.approx(20.0)
    x = torch.full((1, 3, 2, 2), 0.5)
    logits = torch.zeros_like(x)  # BCE of 0.5 vs 0.5 = ln 2 per pixel
    mu, logvar = torch.tensor([[2.0, 0.0]]), torch.zeros(1, 2)  # KL = 2 nats
    total, terms = loss(logits, x, mu, logvar, step=250)
    assert terms["kl"].item() == pytest.approx(2.0)
    assert total.item() == pytest.approx(12 * math.log(2.0) + 100.0 * abs(2.0 - 5.0), rel=1e-6)


def _log_q(z, mu, logvar, dims):
    """log N(z; mu_j, var_j) summed over ``dims``, for every pair (i, j), with scipy."""
    sd = np.exp(0.5 * logvar)
    out = np.zeros((len(z), len(z)))
    for i in range(len(z)):
        for j in range(len(z)):
            out[i, j] = sum(norm.logpdf(z[i, k], mu[j, k], sd[j, k]) for k in dims)
    return out


@pytest.fixture
def codes():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(5, 2, generator=g, dtype=torch.float64)
    logvar = 0.3 * torch.randn(5, 2, generator=g, dtype=torch.float64)
    z = mu + torch.randn(5, 2, generator=g, dtype=torch.float64) * (0.5 * logvar).exp()
    return z, mu, logvar


def test_tc_minibatch_weighted_sampling_matches_scipy(codes):
    z, mu, logvar = codes
    n_data = 1000
    loss = BetaTCVAELoss(dataset_size=n_data, sampling="mws")
    terms = loss.decomposition(z, mu, logvar)
    zn, mn, ln = z.numpy(), mu.numpy(), logvar.numpy()
    B = len(zn)

    def log_q(dims):  # Chen et al. Eq. 7: log (1/(N M)) sum_j q(z_i | x_j)
        m = _log_q(zn, mn, ln, dims)
        return np.log(np.exp(m).sum(1)) - math.log(B * n_data)

    log_qz = log_q([0, 1])
    log_prod = log_q([0]) + log_q([1])
    log_qzx = np.diag(_log_q(zn, mn, ln, [0, 1]))
    log_pz = norm.logpdf(zn).sum(1)
    assert terms["tc"].item() == pytest.approx(np.mean(log_qz - log_prod), abs=1e-10)
    assert terms["mi"].item() == pytest.approx(np.mean(log_qzx - log_qz), abs=1e-10)
    assert terms["dw_kl"].item() == pytest.approx(np.mean(log_prod - log_pz), abs=1e-10)


def test_tc_stratified_sampling_matches_scipy(codes):
    z, mu, logvar = codes
    n_data, B = 50, 5
    weights = log_importance_weights(B, n_data).exp().numpy()
    # Each row: own posterior 1/N, one stratum (N - M + 1) / (N (M - 1)), others 1/(M - 1).
    assert np.allclose(np.diag(weights), 1 / n_data)
    assert np.allclose(weights.sum(1), 1.0)
    assert np.allclose(np.sort(weights[0])[1], (n_data - B + 1) / (n_data * (B - 1)))
    terms = BetaTCVAELoss(dataset_size=n_data, sampling="mss").decomposition(z, mu, logvar)
    zn, mn, ln = z.numpy(), mu.numpy(), logvar.numpy()

    def log_q(dims):
        return np.log((weights * np.exp(_log_q(zn, mn, ln, dims))).sum(1))

    assert terms["tc"].item() == pytest.approx(np.mean(log_q([0, 1]) - log_q([0]) - log_q([1])), abs=1e-10)


def test_tc_estimate_is_large_for_dependent_codes_and_small_for_independent():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(512, 1, generator=g)
    dependent = torch.cat([base, base + 0.05 * torch.randn(512, 1, generator=g)], 1)
    independent = torch.randn(512, 2, generator=g)
    logvar = torch.full((512, 2), math.log(0.01))
    loss = BetaTCVAELoss(dataset_size=512, sampling="mss")
    tc_dep = loss.decomposition(dependent, dependent, logvar)["tc"].item()
    tc_ind = loss.decomposition(independent, independent, logvar)["tc"].item()
    assert tc_dep > 1.0 and abs(tc_ind) < 0.5 * tc_dep


def test_permute_dims_keeps_each_marginal():
    z = torch.arange(40.0).view(20, 2)
    p = permute_dims(z, torch.Generator().manual_seed(0))
    for k in range(2):
        assert sorted(p[:, k].tolist()) == sorted(z[:, k].tolist())
    assert not torch.equal(p, z)


def test_factorvae_terms():
    logits = torch.tensor([[2.0, 0.5], [0.0, 1.0]])
    x = torch.full((2, 3, 2, 2), 0.5)
    mu, logvar = torch.zeros(2, 2), torch.zeros(2, 2)
    loss = FactorVAELoss(gamma=10.0)
    total, terms = loss(torch.zeros_like(x), x, mu, logvar, logits)
    assert terms["tc"].item() == pytest.approx(((2.0 - 0.5) + (0.0 - 1.0)) / 2)
    assert total.item() == pytest.approx(12 * math.log(2.0) + 0.0 + 10.0 * 0.25, rel=1e-6)
    d_loss, _ = loss.discriminator(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]]))
    expected = 0.5 * (-math.log(math.e / (math.e + 1)) - math.log(math.e ** 3 / (1 + math.e ** 3)))
    assert d_loss.item() == pytest.approx(expected, rel=1e-6)


def test_dip_penalties():
    mu = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 1.0]])
    logvar = torch.log(torch.tensor([[0.5, 1.0], [0.5, 1.0], [0.5, 1.0]]))
    cov = np.cov(mu.numpy().T, bias=True)
    dip1 = DIPVAELoss("i", lambda_od=2.0, lambda_d=3.0)
    assert np.allclose(dip1.covariance(mu, logvar).numpy(), cov)
    expected = 2.0 * 2 * cov[0, 1] ** 2 + 3.0 * ((cov[0, 0] - 1) ** 2 + (cov[1, 1] - 1) ** 2)
    assert dip1.penalty(mu, logvar).item() == pytest.approx(expected, rel=1e-6)
    dip2 = DIPVAELoss("ii", lambda_od=2.0, lambda_d=3.0)
    cov2 = cov + np.diag([0.5, 1.0])
    assert np.allclose(dip2.covariance(mu, logvar).numpy(), cov2)
    expected2 = 2.0 * 2 * cov2[0, 1] ** 2 + 3.0 * ((cov2[0, 0] - 1) ** 2 + (cov2[1, 1] - 1) ** 2)
    assert dip2.penalty(mu, logvar).item() == pytest.approx(expected2, rel=1e-6)


def test_reconstruction_loss_sums_pixels_and_averages_batch():
    x = torch.tensor([[[[1.0]]], [[[0.0]]]])
    logits = torch.zeros_like(x)
    assert reconstruction_loss(logits, x).item() == pytest.approx(math.log(2.0))
    assert reconstruction_loss(logits, x, "gaussian").item() == pytest.approx(0.25)


_images = blob_images


TINY = {"image_size": 32, "channels": 8, "hidden": 32, "lr": 2e-3}


def test_latent_dim_must_match_attributes(registry, tmp_path):
    reg = registry.get("extractor", "beta_vae")
    context = BuildContext(seed=0, run_dir=tmp_path, cache_dir=tmp_path, attributes=["a", "b"])
    with pytest.raises(ValueError, match="latent_dim is 3 but the recipe models 2 attributes"):
        reg.build(reg.options(latent_dim=3), context)


def test_negative_weights_rejected(registry):
    with pytest.raises(ValueError, match="beta must be >= 0"):
        registry.get("extractor", "beta_vae").options(beta=-1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        registry.get("extractor", "factor_vae").options(disc_lr=0)


@pytest.mark.parametrize("pairs, expected", [(4, 8), (0, 32)])
def test_gem_adversarial_term_uses_the_requested_pairs(registry, tmp_path, pairs, expected):
    reg = registry.get("extractor", "gem_vae")
    context = BuildContext(seed=0, run_dir=tmp_path, cache_dir=tmp_path, attributes=["a", "b", "c", "d"])
    model = reg.build(reg.options(**TINY, adversarial_pairs=pairs, disc_downsample=2), context)
    seen = []
    model.discriminator.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    relation = RelationModel(IdentityGraph(None, context), 4)
    relation.bind(np.arange(4), np.ones(4))
    logs = model.training_step(_images(), relation, Accelerator(cpu=True), model.configure_optimizers())
    assert "adv_d" in logs and "adv_g" in logs
    assert seen == [(expected, 3, 32, 32)] * 2  # D step, then encoder/decoder step; pooled inside D


def test_gem_has_no_adversarial_term_before_binding(registry, tmp_path):
    reg = registry.get("extractor", "gem_vae")
    context = BuildContext(seed=0, run_dir=tmp_path, cache_dir=tmp_path, attributes=["a", "b"])
    model = reg.build(reg.options(**TINY), context)
    relation = RelationModel(IdentityGraph(None, context), 2)
    logs = model.training_step(_images(), relation, Accelerator(cpu=True), model.configure_optimizers())
    assert "adv_g" not in logs


def test_gem_adversarial_every_k_steps(registry, tmp_path):
    reg = registry.get("extractor", "gem_vae")
    context = BuildContext(seed=0, run_dir=tmp_path, cache_dir=tmp_path, attributes=["a", "b"])
    model = reg.build(reg.options(**TINY, adversarial_every=3), context)
    relation = RelationModel(IdentityGraph(None, context), 2)
    relation.bind(np.arange(2), np.ones(2))
    optimizers = model.configure_optimizers()
    with_term = ["adv_g" in model.training_step(_images(), relation, Accelerator(cpu=True), optimizers)
                 for _ in range(6)]
    assert with_term == [True, False, False, True, False, False]
    with pytest.raises(ValueError, match="adversarial_every must be >= 1"):
        reg.options(adversarial_every=0)


def test_gem_rejects_a_discriminator_pooling_that_leaves_too_few_pixels():
    from gem_plugins.gem_vae import GemVAEOptions

    with pytest.raises(ValueError, match=r"disc_downsample 2 pools image_size 16 to 8 pixels.*use disc_downsample 1$"):
        GemVAEOptions(image_size=16)
    assert GemVAEOptions(image_size=16, disc_downsample=1).disc_downsample == 1
    assert GemVAEOptions(image_size=32).disc_downsample == 2
