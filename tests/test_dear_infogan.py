"""DEAR and InfoGAN: their causal prior, supervised and information terms against hand-computed values,
and what each learns on a tiny batch (the contract every extractor meets: tests/test_contracts.py)."""

import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from scipy.stats import norm

from gem.interfaces import BuildContext, ImageDataset
from gem.relations import RelationModel
from gem_plugins.dear import (CausalPrior, MonotonePiecewiseLinear, WeakSupervisionLoss, dataset_label_scale,
                              find_cycle, super_graph_mask)
from gem_plugins.graph_learners import GCNGraph, GCNGraphOptions, IdentityGraph
from gem_plugins.infogan import InfoGANLoss, gaussian_nll
from gem_plugins.losses import JointAdversarialLoss
from data_fixtures import blob_images

TINY = {"image_size": 32, "channels": 8, "hidden": 32, "lr": 2e-3}
ATTRIBUTES = ["a", "b", "c", "d"]


_images = blob_images


def _labels(n=16, seed=0):
    """Factor classes of the blob images: red above 0.6 (2 classes), size (3), x position (4)."""
    g = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        cx, _, r = g.uniform(0.3, 0.7), g.uniform(0.3, 0.7), g.uniform(0.1, 0.3)
        colour = g.uniform(0.2, 1.0, size=3)
        rows.append([float(colour[0] > 0.6), min(int((r - 0.1) / 0.2 * 3), 2), min(int((cx - 0.3) / 0.4 * 4), 3)])
    return torch.tensor(rows, dtype=torch.float32)


def _context(tmp_path, attributes=ATTRIBUTES, dataset=None):
    return BuildContext(seed=0, run_dir=tmp_path, cache_dir=tmp_path, attributes=list(attributes), dataset=dataset)


def _bound_relation(context, n=4):
    relation = RelationModel(IdentityGraph(None, context), n)
    relation.bind(np.arange(n), np.ones(n))
    return relation


# ---------------------------------------------------------------- DEAR: causal prior

def _chain_prior():
    """Three latents with the edges 0 -> 1 (weight 2), 1 -> 2 (-1) and 0 -> 2 (0.5)."""
    mask = super_graph_mask([["x", "y"], ["y", "z"], ["x", "z"]], ["x", "y", "z"])
    prior = CausalPrior(mask)
    with torch.no_grad():
        prior.weight.copy_(torch.tensor([[0.0, 2.0, 0.5], [0.0, 0.0, -1.0], [7.0, 7.0, 0.0]]))  # 7s are masked out
    return prior


def test_scm_solves_the_structural_equations_by_hand():
    prior = _chain_prior()
    assert torch.equal(prior.adjacency(), torch.tensor([[0.0, 2.0, 0.5], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0]]))
    eps = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]])
    # z0 = e0; z1 = 2 z0 + e1; z2 = 0.5 z0 - z1 + e2 (the maps start as the identity).
    expected = torch.tensor([[1.0, 4.0, 0.5 - 4.0 + 3.0], [0.0, -1.0, 1.0 + 1.0]])
    assert torch.allclose(prior(eps), expected)
    a = prior.adjacency().detach().numpy().astype(np.float64)
    np.testing.assert_allclose(prior(eps).detach().numpy(), (np.linalg.inv(np.eye(3) - a.T) @ eps.numpy().T).T, atol=1e-6)
    # The affine map of DEAR's linear SCM acts after the linear part: z = 2 (I - A^T)^-1 e + 1.
    with torch.no_grad():  # y0 + s (x - t0) with t0 = -5: s = 2, y0 = -9
        prior.maps.log_slope.fill_(math.log(2.0 - 1e-3))
        prior.maps.start.fill_(-9.0)
    assert torch.allclose(prior(eps), 2 * expected + 1, atol=1e-5)


def test_piecewise_linear_map_and_its_inverse_by_hand():
    f = MonotonePiecewiseLinear(1, knots=3)  # knots -5, 0, 5
    with torch.no_grad():
        f.log_slope.copy_(torch.log(torch.tensor([[1.0, 3.0]]) - 1e-3))
        f.start.fill_(-5.0)
    x = torch.tensor([[-7.0], [-1.0], [2.0], [8.0]])
    # Slope 1 up to 0 (value 0 there), slope 3 after (value 15 at 5); both ends extrapolate.
    expected = torch.tensor([[-7.0], [-1.0], [6.0], [24.0]])
    assert torch.allclose(f(x), expected, atol=1e-5)
    assert torch.allclose(f.inverse(expected), x, atol=1e-5)
    g = MonotonePiecewiseLinear(2, knots=100)  # starts as the identity
    z = torch.linspace(-8, 8, 33).view(-1, 1).repeat(1, 2)
    assert torch.allclose(g(z), z, atol=1e-4)


def test_intervention_moves_only_descendants():
    prior = _chain_prior()
    z = prior(torch.tensor([[1.0, 2.0, 3.0]]))  # (1, 4, -0.5)
    done = prior.intervene(z, 1, 10.0)
    # do(z1 = 10): z0 stays 1, z2 = 0.5 * 1 - 10 + e2 (= 3).
    assert torch.allclose(done, torch.tensor([[1.0, 10.0, 0.5 - 10.0 + 3.0]]), atol=1e-5)
    root = prior.intervene(z, 0, -1.0)  # z1 = -2 + 2, z2 = -0.5 - 0 + 3
    assert torch.allclose(root, torch.tensor([[-1.0, 0.0, 2.5]]), atol=1e-5)


def test_super_graph_must_be_a_dag_with_known_names():
    assert torch.equal(super_graph_mask(None, ["a", "b", "c"]), torch.tensor([[0.0, 1, 1], [0, 0, 1], [0, 0, 0]]))
    assert find_cycle(np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]])) == [0, 1, 2, 0]
    assert find_cycle(np.array([[0, 1, 1], [0, 0, 1], [0, 0, 0]])) is None
    with pytest.raises(ValueError, match=r"cycle \(a -> b -> c -> a\)"):
        super_graph_mask([["a", "b"], ["b", "c"], ["c", "a"]], ["a", "b", "c"])
    with pytest.raises(ValueError, match="'e', which is not one of the recipe's attributes"):
        super_graph_mask([["a", "e"]], ["a", "b", "c"])


def test_adjacency_stays_a_dag_while_training(registry, tmp_path):
    reg = registry.get("extractor", "dear")
    with pytest.raises(ValueError, match="super_graph edges"):
        reg.options(super_graph=[["a", "a"]])
    torch.manual_seed(0)
    # Against the attribute order: d -> a -> b, and c -> a.
    options = reg.options(**TINY, disc_lr=2e-3, adjacency_lr=0.1, super_graph=[["d", "a"], ["a", "b"], ["c", "a"]])
    context = _context(tmp_path)
    model = reg.build(options, context)
    relation, acc, optimizers = _bound_relation(context), Accelerator(cpu=True), model.configure_optimizers()
    x, u = _images(), _labels()
    for _ in range(5):
        model.training_step(x, relation, acc, optimizers, u=u)
    a = model.prior.adjacency().detach()
    allowed = torch.zeros(4, 4)
    allowed[3, 0] = allowed[0, 1] = allowed[2, 0] = 1
    assert bool((a[allowed == 1] != 0).all())  # the allowed edges moved off zero ...
    assert bool((a[allowed == 0] == 0).all())  # ... and nothing else did
    assert torch.equal(torch.linalg.matrix_power(a.abs(), 4), torch.zeros(4, 4))  # nilpotent: no cycle
    assert find_cycle(a.numpy() != 0) is None


# ---------------------------------------------------------------- DEAR: supervision

def test_supervised_loss_by_hand():
    codes = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    labels01 = torch.tensor([[1.0, 0.5], [0.0, 1.0]])
    binary = torch.tensor([True, False])
    loss, terms = WeakSupervisionLoss()(codes, labels01, binary)
    # Column 0: BCE with logits, -log sigmoid(0) and -log(1 - sigmoid(1)); column 1: squared error
    # against 2 * label - 1, i.e. (2 - 0)^2 and (-1 - 1)^2.
    expected = (math.log(2.0) + math.log(1 + math.e) + 4.0 + 4.0) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert terms["sup"] is loss
    missing = torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]])  # only two observed entries
    loss, _ = WeakSupervisionLoss()(codes, missing, binary)
    assert loss.item() == pytest.approx((math.log(2.0) + 4.0) / 2, rel=1e-6)


def test_labels_are_scaled_by_the_data_set_or_the_largest_seen(registry, tmp_path):
    images = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    factors = ImageDataset(images=images, attributes=ATTRIBUTES, factors=np.array([[0, 2, 1], [1, 0, 0], [0, 1, 0]]),
                           factor_levels=[2, 5, 2])
    np.testing.assert_array_equal(dataset_label_scale(factors, 4), [1.0, 4.0, 1.0])
    scores = ImageDataset(images=images, attributes=ATTRIBUTES, attribute_scores=np.full((3, 4), 2))
    np.testing.assert_array_equal(dataset_label_scale(scores, 4), [5.0] * 4)
    assert dataset_label_scale(None, 4) is None
    reg = registry.get("extractor", "dear")
    model = reg.build(reg.options(**TINY), _context(tmp_path, dataset=factors))
    labels01, binary = model.normalise_labels(torch.tensor([[1.0, 2.0, 1.0], [0.0, 4.0, -1.0]]))
    assert torch.allclose(labels01[:, :2], torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    assert labels01[0, 2] == 1 and torch.isnan(labels01[1, 2])  # a negative label is missing (DEAR: -1)
    assert binary.tolist() == [True, False, True]
    blind = reg.build(reg.options(**TINY, sup_type="mse"), _context(tmp_path))  # no data set: running maximum
    labels01, binary = blind.normalise_labels(torch.tensor([[1.0, 3.0, 0.0, 0.0, 9.0]]))  # K = 5 > n = 4
    assert labels01.shape == (1, 4) and binary.tolist() == [False] * 4
    assert blind.label_scale.tolist() == [1.0, 3.0, 1.0, 1.0]
    labels01, _ = blind.normalise_labels(torch.tensor([[2.0, 1.5, 0.0, 0.0, 0.0]]))
    assert labels01[0, :2].tolist() == [1.0, 0.5]


# ---------------------------------------------------------------- InfoGAN and the adversarial losses

def test_gaussian_nll_matches_scipy():
    g = torch.Generator().manual_seed(0)
    c = torch.rand(5, 3, generator=g, dtype=torch.float64) * 2 - 1
    mean = torch.randn(5, 3, generator=g, dtype=torch.float64)
    logvar = 0.5 * torch.randn(5, 3, generator=g, dtype=torch.float64)
    expected = -norm.logpdf(c.numpy(), mean.numpy(), np.exp(0.5 * logvar.numpy())).sum(1).mean()
    assert gaussian_nll(c, mean, logvar).item() == pytest.approx(expected, abs=1e-10)
    # With the fixed unit variance, -log Q is half the squared error plus a constant.
    fixed = gaussian_nll(c, mean, torch.zeros_like(mean)).item()
    assert fixed == pytest.approx(0.5 * ((c - mean) ** 2).sum(1).mean().item() + 1.5 * math.log(2 * math.pi))


def test_gan_losses_by_hand():
    real, fake, nll = torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0]), torch.tensor(0.3)
    loss = InfoGANLoss(lambda_info=2.0)
    d, d_terms = loss.discriminator(real, fake, nll)
    sp = lambda v: math.log1p(math.exp(v))  # softplus
    gan_d = (sp(-1.0) + sp(0.0)) / 2 + (sp(-2.0) + sp(0.0)) / 2
    assert d_terms["gan_d"].item() == pytest.approx(gan_d, rel=1e-6)
    assert d.item() == pytest.approx(gan_d + 2.0 * 0.3, rel=1e-6)
    g, g_terms = loss(fake, nll)
    assert g_terms["gan_g"].item() == pytest.approx((sp(2.0) + sp(0.0)) / 2, rel=1e-6)  # non-saturating
    assert g.item() == pytest.approx((sp(2.0) + sp(0.0)) / 2 + 0.6, rel=1e-6)
    # DEAR's joint terms: D separates encoder pairs (real) from generator pairs (fake); the encoder
    # and generator get the swapped labels.
    joint = JointAdversarialLoss()
    assert joint.discriminator(real, fake)[0].item() == pytest.approx(gan_d, rel=1e-6)
    assert joint(real, fake)[0].item() == pytest.approx((sp(1.0) + sp(0.0)) / 2 + (sp(2.0) + sp(0.0)) / 2, rel=1e-6)


# ---------------------------------------------------------------- training on a tiny batch

def test_dear_supervised_term_falls(registry, tmp_path):
    torch.manual_seed(0)
    reg = registry.get("extractor", "dear")
    model = reg.build(reg.options(**TINY, disc_lr=2e-3), _context(tmp_path))
    assert model.latent_dim == 4 and model.auxiliary == "labels"
    relation, acc, optimizers = _bound_relation(_context(tmp_path)), Accelerator(cpu=True), model.configure_optimizers()
    x, u = _images(), _labels()  # K = 3 labels for n = 4 latents: the last latent is unsupervised
    logs = [model.training_step(x, relation, acc, optimizers, u=u) for _ in range(40)]
    assert {"loss", "sup", "adv_d", "adv_g"} <= set(logs[0])
    sup = [log["sup"] for log in logs]
    assert np.isfinite(sup).all() and np.mean(sup[-5:]) < 0.7 * np.mean(sup[:5])
    assert int(model.steps_done) == 40
    assert model.sample_prior(5).shape == (5, 4)


def test_dear_without_labels_says_why(registry, tmp_path):
    reg = registry.get("extractor", "dear")
    model = reg.build(reg.options(**TINY), _context(tmp_path))
    with pytest.raises(ValueError, match="dear extractor learns from labels: training_step needs u="):
        model.training_step(_images(), _bound_relation(_context(tmp_path)), Accelerator(cpu=True),
                            model.configure_optimizers())


def _fixed_code_nll(model, noise_dim, n=256):
    """Q's -log Q(c|G(c, noise)) on fixed codes and noise, less the constant of the unit variance."""
    g = torch.Generator().manual_seed(1)
    c = torch.rand(n, 4, generator=g) * 2 - 1
    noise = torch.rand(n, noise_dim, generator=g) * 2 - 1
    with torch.no_grad():
        mean, logvar = model.encode(model.generate(c, noise))
    return gaussian_nll(c, mean, logvar).item() - 2 * math.log(2 * math.pi)


def test_infogan_recovers_its_codes(registry, tmp_path):
    torch.manual_seed(0)
    reg = registry.get("extractor", "infogan")
    # The paper's 1:5 ratio of D to G learning rates, little noise for a 32-unit network and a
    # stronger information term: a GAN needs more than 40 steps to put its codes into the images.
    model = reg.build(reg.options(**TINY, disc_lr=4e-4, noise_dim=8, lambda_info=2.0), _context(tmp_path))
    relation, acc, optimizers = _bound_relation(_context(tmp_path)), Accelerator(cpu=True), model.configure_optimizers()
    x = _images()
    before = _fixed_code_nll(model, 8)
    logs = [model.training_step(x, relation, acc, optimizers) for _ in range(150)]
    assert {"loss", "gan_d", "gan_g", "info", "info_d"} <= set(logs[0])
    after = _fixed_code_nll(model, 8)
    # A Q that ignores the image does best by predicting 0: 0.5 E[c^2] = 1/6 per code, 2/3 for 4.
    assert after < before and after < 0.75 * (4 / 6)
    assert int(model.steps_done) == 150
    mean, logvar = model.encode(x)
    assert torch.equal(logvar, torch.zeros_like(logvar))  # the fixed unit variance of Q


def test_infogan_learned_variance(registry, tmp_path):
    reg = registry.get("extractor", "infogan")
    model = reg.build(reg.options(**TINY, q_variance="learned", noise_dim=4), _context(tmp_path))
    logs = model.training_step(_images(), _bound_relation(_context(tmp_path)), Accelerator(cpu=True),
                               model.configure_optimizers())
    assert np.isfinite(logs["info"])
    _, logvar = model.encode(_images())
    assert logvar.shape == (16, 4) and bool((logvar != 0).any())


@pytest.mark.parametrize("name", ["dear", "infogan"])
def test_graph_gradients_are_left_for_the_graph_learner(registry, tmp_path, name):
    torch.manual_seed(0)
    reg = registry.get("extractor", name)
    context = _context(tmp_path)
    model = reg.build(reg.options(**TINY), context)
    graph = GCNGraph(GCNGraphOptions(hidden=4), context)
    graph.set_anchor(torch.tensor([[1.0, 0.5, 0, 0], [0, 1, 0, 0], [0, -0.3, 1, 0], [0, 0, 0, 1]]))
    relation = RelationModel(graph, 4)
    relation.bind(np.arange(4), np.ones(4))
    extra = {"u": _labels()} if name == "dear" else {}
    model.training_step(_images(), relation, Accelerator(cpu=True), model.configure_optimizers(), **extra)
    grad = graph.target.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_options_are_checked(registry, tmp_path):
    dear, infogan = registry.get("extractor", "dear"), registry.get("extractor", "infogan")
    with pytest.raises(ValueError, match="lambda_sup must be >= 0"):
        dear.options(lambda_sup=-1)
    with pytest.raises(ValueError, match="adjacency_lr must be > 0"):
        dear.options(adjacency_lr=0)
    with pytest.raises(ValueError, match="scm_knots must be >= 2"):
        dear.options(scm_knots=1)
    with pytest.raises(ValueError, match="noise_dim must be >= 0"):
        infogan.options(noise_dim=-1)
    with pytest.raises(ValueError, match="lambda_info must be >= 0"):
        infogan.options(lambda_info=-0.1)
    for reg in (dear, infogan):
        with pytest.raises(ValueError, match="latent_dim is 3 but the recipe models 4 attributes"):
            reg.build(reg.options(**TINY, latent_dim=3), _context(tmp_path))


def test_nonlinear_scm_trains(registry, tmp_path):
    torch.manual_seed(0)
    reg = registry.get("extractor", "dear")
    model = reg.build(reg.options(**TINY, scm="nonlinear", scm_knots=20, super_graph=[]), _context(tmp_path))
    assert not bool(model.prior.mask.any())
    logs = model.training_step(_images(), _bound_relation(_context(tmp_path)), Accelerator(cpu=True),
                               model.configure_optimizers(), u=_labels())
    assert np.isfinite(logs["loss"])
    assert model.prior.maps.log_slope.shape == (4, 19)


def test_dear_trains_in_the_loop_with_the_data_sets_labels(registry, tmp_path):
    from gem.recipe import TrainingOptions
    from gem.labels import auxiliary_variable
    from gem.training import Trainer

    g = np.random.default_rng(0)
    images = (g.uniform(0, 255, (24, 32, 32, 3))).astype(np.uint8)
    factors = np.stack([np.arange(24) % 2, np.arange(24) % 3, np.arange(24) % 4, np.arange(24) % 5], axis=1)
    dataset = ImageDataset(images=images, attributes=ATTRIBUTES, factors=factors, factor_levels=[2, 3, 4, 5])
    context = _context(tmp_path, dataset=dataset)
    reg = registry.get("extractor", "dear")
    model = reg.build(reg.options(**TINY), context)
    assert model.label_scale.tolist() == [1.0, 2.0, 3.0, 4.0] and bool(model.label_scale_known)
    options = TrainingOptions(steps=4, warmup_steps=0, batch_size=8, log_every=2, cpu=True)
    trainer = Trainer(model, RelationModel(IdentityGraph(None, context), 4), images, np.arange(24), options, seed=0,
                      accelerator=Accelerator(cpu=True), auxiliary=auxiliary_variable(model, dataset, "dear"))
    trainer.fit(4)
    assert [record["step"] for record in trainer.history] == [2, 4]
    assert all(np.isfinite(record["sup"]) for record in trainer.history)
