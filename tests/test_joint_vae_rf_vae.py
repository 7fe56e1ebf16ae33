"""JointVAE and RF-VAE: loss terms against hand-computed values, their codes, decoders and relevance
weights (what every extractor must do is checked by tests/test_contracts.py)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from gem.interfaces import BuildContext
from gem.relations import RelationModel
from gem_plugins.graph_learners import IdentityGraph
from gem_plugins.joint_vae import JointVAELoss, gumbel_softmax, kl_categorical_uniform
from gem_plugins.rf_vae import RFVAELoss
from data_fixtures import blob_images

ROOT = Path(__file__).resolve().parents[1]
LN2 = math.log(2.0)
TINY = {"image_size": 32, "channels": 8, "hidden": 32, "lr": 2e-3}


_images = blob_images


def test_kl_categorical_uniform_closed_form():
    q = torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    # Σ_k q_k log(q_k K): row 0 = 0.5 ln 1.5 + 2 · 0.25 ln 0.75, row 1 = 0 (uniform).
    expected = 0.5 * (0.5 * math.log(1.5) + 0.5 * math.log(0.75))
    assert kl_categorical_uniform(q.log()).item() == pytest.approx(expected, rel=1e-6)
    # Shifting the logits changes nothing; a near one-hot posterior holds log K nats.
    assert kl_categorical_uniform(q.log() + 3.0).item() == pytest.approx(expected, rel=1e-6)
    assert kl_categorical_uniform(torch.tensor([[60.0, 0.0, 0.0, 0.0]])).item() == pytest.approx(math.log(4), rel=1e-6)


def test_joint_vae_capacities_and_loss():
    loss = JointVAELoss([3], gamma_z=10.0, c_z=40.0, steps_z=1000, gamma_c=20.0, c_c=1.1, steps_c=100)
    assert loss.capacity_z(250) == pytest.approx(10.0)
    assert loss.capacity_z(5000) == pytest.approx(40.0)
    assert loss.capacity_c(50) == pytest.approx(0.55)
    assert loss.capacity_c(100) == pytest.approx(math.log(3))  # capped below 1.1 at log K
    # Two variables: the cap is log 2 + log 3 ≈ 1.79, so 1.1 is reached.
    assert JointVAELoss([2, 3], c_c=1.1, steps_c=100).capacity_c(1000) == pytest.approx(1.1)

    x = torch.full((1, 3, 2, 2), 0.5)
    logits = torch.zeros_like(x)  # BCE ln 2 per pixel, 12 pixels
    mu, logvar = torch.tensor([[2.0, 0.0]]), torch.zeros(1, 2)  # KL_z = 2 nats
    q = torch.tensor([[0.5, 0.25, 0.25]])
    kl_c = 0.5 * math.log(1.5) + 0.5 * math.log(0.75)
    total, terms = loss(logits, x, mu, logvar, [q.log()], step=250)  # C_z = 10, C_c = min(2.75, ln 3)
    assert terms["kl"].item() == pytest.approx(2.0)
    assert terms["kl_c"].item() == pytest.approx(kl_c, rel=1e-6)
    assert terms["capacity_c"].item() == pytest.approx(math.log(3))
    expected = 12 * LN2 + 10.0 * abs(2.0 - 10.0) + 20.0 * abs(kl_c - math.log(3))
    assert total.item() == pytest.approx(expected, rel=1e-6)
    # KL_c sums over variables.
    _, terms2 = loss(logits, x, mu, logvar, [q.log(), torch.zeros(1, 2)], step=0)
    assert terms2["kl_c"].item() == pytest.approx(kl_c, rel=1e-6)


def test_gumbel_softmax_on_simplex_and_one_hot_when_cold():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 4, generator=g)
    warm = gumbel_softmax(logits, 0.67, generator=g)
    assert warm.shape == (200, 4)
    assert torch.all(warm >= 0) and torch.allclose(warm.sum(1), torch.ones(200))
    assert warm.max(1).values.min() < 0.99  # not one-hot at the paper's temperature
    cold = gumbel_softmax(logits, 1e-4, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(cold.sum(1), torch.ones(200))
    assert torch.allclose(cold.max(1).values, torch.ones(200))
    # Cold samples follow softmax(logits): strongly preferred category wins almost always.
    skewed = torch.tensor([[4.0, 0.0, 0.0]]).repeat(2000, 1)
    picks = gumbel_softmax(skewed, 1e-4, generator=torch.Generator().manual_seed(2)).argmax(1)
    p0 = math.exp(4) / (math.exp(4) + 2)
    assert (picks == 0).float().mean().item() == pytest.approx(p0, abs=0.03)


def test_rf_vae_weights_and_terms():
    loss = RFVAELoss(gamma=2.0, lambda_min=0.1, lambda_max=10.0, eta=3.0)
    r = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(loss.kl_weights(r), torch.tensor([10.0, 5.05, 0.1]))
    x = torch.full((2, 3, 2, 2), 0.5)
    mu = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])  # per-dimension KL: 1, 0.5, 1
    logvar = torch.zeros(2, 3)
    tc_logits = torch.tensor([[2.0, 0.5], [0.0, 1.0]])  # TC = mean(1.5, -1) = 0.25
    total, terms = loss(torch.zeros_like(x), x, mu, logvar, r, tc_logits)
    assert terms["kl"].item() == pytest.approx(2.5)
    assert terms["kl_weighted"].item() == pytest.approx(10.0 * 1 + 5.05 * 0.5 + 0.1 * 1)
    assert terms["tc"].item() == pytest.approx(0.25)
    assert terms["relevance_l1"].item() == pytest.approx(1.5)
    expected = 12 * LN2 + 12.625 + 2.0 * 0.25 + 3.0 * 1.5
    assert total.item() == pytest.approx(expected, rel=1e-6)
    # Gradient on r: (λ_min − λ_max)·KL_j + η (the TC logits are fixed here).
    r = r.clone().requires_grad_(True)
    loss(torch.zeros_like(x), x, mu, logvar, r, tc_logits)[0].backward()
    assert torch.allclose(r.grad, torch.tensor([-9.9 * 1 + 3, -9.9 * 0.5 + 3, -9.9 * 1 + 3]))


def _build(registry, name, tmp_path, **extra):
    reg = registry.get("extractor", name)
    context = BuildContext(seed=0, run_dir=tmp_path, cache_dir=tmp_path, attributes=["a", "b", "c", "d"])
    return reg.build(reg.options(**TINY, **extra), context), context


@pytest.mark.parametrize("name, extra, terms", [
    ("joint_vae", {"discrete": [3, 2]}, {"recon", "kl", "kl_c", "capacity", "capacity_c"}),
    ("rf_vae", {"disc_hidden": 16}, {"recon", "kl_weighted", "tc", "tc_d", "relevance_l1", "relevance_mean"}),
])
def test_training_step_logs_the_method_terms(registry, tmp_path, name, extra, terms):
    """(Learning, shapes and state round trips of every extractor: tests/test_contracts.py.)"""
    torch.manual_seed(0)
    model, context = _build(registry, name, tmp_path, **extra)
    relation = RelationModel(IdentityGraph(None, context), 4)
    relation.bind(np.arange(4), np.ones(4))
    logs = model.training_step(_images(n=8), relation, Accelerator(cpu=True), model.configure_optimizers())
    assert terms <= set(logs)


def test_joint_vae_codes_and_decoders(registry, tmp_path):
    model, _ = _build(registry, "joint_vae", tmp_path, discrete=[3, 2], decode_category=1)
    x = _images(n=5)
    mu, logvar, logits = model.encode_joint(x)
    assert mu.shape == (5, 4) and [tuple(l.shape) for l in logits] == [(5, 3), (5, 2)]
    code = model.category_code(2, [2, 0], mu)
    assert code.tolist() == [[0, 0, 1, 1, 0]] * 2
    # decode() uses category decode_category of every variable.
    z = torch.randn(5, 4)
    assert torch.allclose(model.decode(z), model.decode_joint(z, model.category_code(5, [1, 1], z)))
    decoders = model.extra_decoders()
    assert sorted(decoders) == ["c0_category_0", "c0_category_2", "c1_category_0"]
    assert torch.allclose(decoders["c0_category_2"](z), model.decode_joint(z, model.category_code(5, [2, 1], z)))
    assert not torch.allclose(decoders["c0_category_2"](z), model.decode(z))
    # One discrete variable: the names are just the category.
    single, _ = _build(registry, "joint_vae", tmp_path)
    assert sorted(single.extra_decoders()) == ["category_1", "category_2"]


def test_joint_vae_gradients_reach_the_graph_and_only_z_goes_through_it(registry, tmp_path):
    model, context = _build(registry, "joint_vae", tmp_path)
    seen = []

    def relation(z):
        seen.append(tuple(z.shape))
        return z * weight

    relation.is_bound = True
    weight = torch.ones(4, requires_grad=True)
    model.training_step(_images(n=4), relation, Accelerator(cpu=True), model.configure_optimizers())
    assert seen == [(4, 4)]
    assert weight.grad is not None and torch.any(weight.grad != 0)


def test_rf_vae_relevance_stays_in_unit_interval_and_is_optimised(registry, tmp_path):
    torch.manual_seed(0)
    model, context = _build(registry, "rf_vae", tmp_path, disc_hidden=16, relevance_lr=1.0, relevance_init=0.9)
    optimizers = model.configure_optimizers()
    assert any(p is model.relevance for g in optimizers["vae"].param_groups for p in g["params"])
    relation = RelationModel(IdentityGraph(None, context), 4)
    for _ in range(3):
        model.training_step(_images(n=8), relation, Accelerator(cpu=True), optimizers)
        r = model.relevance.detach()
        assert torch.all((r >= 0) & (r <= 1))
    assert not torch.allclose(model.relevance.detach(), torch.full((4,), 0.9))


def test_registered_with_paper_descriptions(registry):
    assert "Dupont 2018" in registry.get("extractor", "joint_vae").description
    assert "Kim et al. 2019" in registry.get("extractor", "rf_vae").description


@pytest.mark.parametrize("name, options, match", [
    ("joint_vae", {"discrete": []}, "discrete must list"),
    ("joint_vae", {"discrete": [3, 1]}, "discrete must list"),
    ("joint_vae", {"temperature": 0.0}, "temperature must be > 0"),
    ("joint_vae", {"gamma_c": -1.0}, "gamma_c must be >= 0"),
    ("joint_vae", {"capacity_z": -1.0}, "capacity_z must be >= 0"),
    ("joint_vae", {"capacity_c_steps": 0}, "capacity_c_steps must be >= 1"),
    ("joint_vae", {"discrete": [4, 2], "decode_category": 2}, "decode_category must be in 0 .. 1"),
    ("joint_vae", {"lr": 0.0}, "lr must be > 0"),
    ("rf_vae", {"relevance_init": 1.5}, "relevance_init must be in"),
    ("rf_vae", {"lambda_min": 20.0}, "lambda_min must be <= lambda_max"),
    ("rf_vae", {"eta": -1.0}, "eta must be >= 0"),
    ("rf_vae", {"gamma": -1.0}, "gamma must be >= 0"),
    ("rf_vae", {"relevance_lr": 0.0}, "relevance_lr must be > 0"),
    ("rf_vae", {"disc_hidden": 0}, "disc_hidden must be >= 1"),
])
def test_bad_options_rejected(registry, name, options, match):
    with pytest.raises(ValueError, match=match):
        registry.get("extractor", name).options(**options)


def test_latent_dim_must_match_attributes(registry, tmp_path):
    for name in ("joint_vae", "rf_vae"):
        reg = registry.get("extractor", name)
        context = BuildContext(seed=0, run_dir=tmp_path, cache_dir=tmp_path, attributes=["a", "b"])
        with pytest.raises(ValueError, match="latent_dim is 3"):
            reg.build(reg.options(latent_dim=3), context)


@pytest.mark.parametrize("path, plugin", [("recipes/joint_vae_dsprites.yaml", "joint_vae"),
                                          ("recipes/rf_vae_shapes3d.yaml", "rf_vae")])
def test_recipes_validate(registry, path, plugin):
    from gem.recipe import load_recipe_file, validate_recipe

    recipe = validate_recipe(load_recipe_file(ROOT / path), registry)
    assert recipe.extractor["plugin"] == plugin and recipe.graph["plugin"] == "identity"
