"""iVAE, iVAE + DDPM and the reduced DisDiff: the KL to a conditional prior, the VP schedule, the
denoising loss and the DDIM sampler against hand values, and what the diffusion terms learn."""

import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from scipy import integrate
from scipy.stats import norm

from gem.interfaces import BuildContext, ImageDataset
from gem.recipe import TrainingOptions
from gem.relations import RelationModel
from gem.labels import auxiliary_variable
from gem.training import Trainer
from gem_plugins.diffusion import (ConditionalUNet, VPSchedule, ddim_sample, ddpm_betas, denoising_loss, fixed_noise,
                                   to_image_space, to_model_space)
from gem_plugins.disdiff import DisDiffLoss
from gem_plugins.graph_learners import IdentityGraph
from gem_plugins.ivae import IVAEDDPMLoss, kl_gaussians
from gem_plugins.losses import kl_normal

TINY = {"image_size": 32, "channels": 8, "hidden": 32, "lr": 2e-3}
TINY_DIFFUSION = {"unet_channels": 8, "unet_mults": [1, 2], "unet_blocks": 1, "sample_steps": 3}
ATTRS = ["a", "b", "c", "d"]


def _images(n=16, size=32, seed=0):
    """Smooth random colour blobs with their factor classes (x position, y position, colour): (x, u)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, 3, size, size), dtype=np.float32)
    u = np.empty((n, 3), dtype=np.float32)
    for i in range(n):
        cx, cy, c = g.integers(0, 5), g.integers(0, 5), g.integers(0, 4)
        blob = ((xx - 0.3 - 0.1 * cx) ** 2 + (yy - 0.3 - 0.1 * cy) ** 2 < 0.04).astype(np.float32)
        colour = np.array([0.3, 0.6, 0.9])[[c % 3, (c + 1) % 3, (c + 2) % 3]]
        out[i] = 0.1 + blob[None] * colour[:, None, None] * 0.8
        u[i] = cx, cy, c
    return torch.from_numpy(out), torch.from_numpy(u)


def _dataset(n=16, size=32):
    x, u = _images(n, size)
    images = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return ImageDataset(images=images, attributes=ATTRS, factors=u.numpy().astype(int),
                        factor_names=["x", "y", "colour"], factor_levels=[5, 5, 4])


def _context(tmp_path, dataset=None, attributes=ATTRS):
    return BuildContext(seed=0, run_dir=tmp_path, cache_dir=tmp_path, attributes=attributes, dataset=dataset)


def _relation(context):
    relation = RelationModel(IdentityGraph(None, context), len(context.attributes))
    relation.bind(np.arange(len(context.attributes)), np.ones(len(context.attributes)))
    return relation


def _build(registry, name, tmp_path, dataset=None, **extra):
    reg = registry.get("extractor", name)
    options = dict(TINY, **(TINY_DIFFUSION if name != "ivae" else {}), **extra)
    context = _context(tmp_path, dataset if dataset is not None else (_dataset() if name != "disdiff" else None))
    return reg.build(reg.options(**options), context), context


# -- losses and the diffusion toolkit ----------------------------------------------------------

def test_kl_between_diagonal_gaussians():
    # q = N(1, 1), p = N(0, 2): 0.5 (ln 2 + (1 + 1) / 2 - 1) = 0.5 ln 2.
    one = kl_gaussians(torch.tensor([[1.0]]), torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([[math.log(2.0)]]))
    assert one.item() == pytest.approx(0.5 * math.log(2.0), rel=1e-6)
    g = torch.Generator().manual_seed(0)
    mu_q, mu_p = torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)
    lv_q, lv_p = 0.5 * torch.randn(3, 2, generator=g, dtype=torch.float64), 0.5 * torch.randn(3, 2, generator=g,
                                                                                           dtype=torch.float64)
    kl = kl_gaussians(mu_q, lv_q, mu_p, lv_p)
    assert kl.shape == (2,)
    for k in range(2):
        numeric = []
        for b in range(3):
            q = norm(mu_q[b, k].item(), math.exp(0.5 * lv_q[b, k].item()))
            p = norm(mu_p[b, k].item(), math.exp(0.5 * lv_p[b, k].item()))
            value, _ = integrate.quad(lambda z: q.pdf(z) * (q.logpdf(z) - p.logpdf(z)), -30, 30, limit=200)
            numeric.append(value)
        assert kl[k].item() == pytest.approx(np.mean(numeric), rel=1e-6)
    # Against the standard normal it is kl_normal.
    assert torch.allclose(kl_gaussians(mu_q, lv_q, torch.zeros_like(mu_q), torch.zeros_like(lv_q)),
                          kl_normal(mu_q, lv_q))


def test_vp_schedule_by_hand():
    sched = VPSchedule(beta_min=0.1, beta_max=20.0)
    # log ᾱ(t) = -(0.1 t + 0.5 * 19.9 t²)
    assert sched.alpha_bar(torch.tensor(0.0)).item() == pytest.approx(1.0)
    assert sched.alpha_bar(torch.tensor(0.5)).item() == pytest.approx(math.exp(-(0.05 + 0.5 * 19.9 * 0.25)), rel=1e-6)
    assert sched.alpha_bar(torch.tensor(1.0)).item() == pytest.approx(math.exp(-10.05), rel=1e-5)
    mean, std = sched.marginal(torch.tensor([0.5]))
    ab = math.exp(-2.5375)
    assert mean.item() == pytest.approx(math.sqrt(ab), rel=1e-6)
    assert std.item() == pytest.approx(math.sqrt(1 - ab), rel=1e-6)
    # The DDPM steps it discretises: 1e-4 ... 0.02, and ∏(1 - β_i) ≈ ᾱ(1).
    betas = ddpm_betas(1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert torch.log1p(-betas).sum().item() == pytest.approx(-10.05, rel=0.01)
    t = sched.sample_t(8, generator=torch.Generator().manual_seed(0))
    assert t.shape == (8,) and float(t.min()) >= sched.t_min and float(t.max()) <= 1.0
    assert sorted(((t - sched.t_min) / (1 - sched.t_min) * 8).floor().long().tolist()) == list(range(8))


def test_forward_noising_has_the_marginal_mean_and_variance():
    sched = VPSchedule()
    t = torch.full((200_000,), 0.3)
    x0 = torch.full((200_000, 1, 1, 1), 0.6)
    x_t = sched.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))).flatten()
    ab = math.exp(-(0.1 * 0.3 + 0.5 * 19.9 * 0.09))
    se = math.sqrt((1 - ab) / len(x_t))
    assert abs(x_t.mean().item() - math.sqrt(ab) * 0.6) < 5 * se
    assert x_t.var().item() == pytest.approx(1 - ab, rel=0.02)
    # predict_x0 inverts q_sample given the true noise.
    noise = torch.randn(2, 3, 4, 4)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    tt = torch.tensor([0.2, 0.9])
    assert torch.allclose(sched.predict_x0(sched.q_sample(x0, tt, noise), tt, noise), x0, atol=1e-4)


def test_denoising_loss_is_the_sigma_squared_weighted_score_matching_loss():
    g = torch.Generator().manual_seed(0)
    noise, guess = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    assert denoising_loss(noise.clone(), noise).item() == 0.0
    sigma = VPSchedule().marginal(torch.tensor(0.4))[1]
    # λ(t) ‖∇log q(x_t|x_0) − s‖² with λ = σ², true score −ε/σ, model score −ε̂/σ.
    score_matching = (sigma ** 2 * (-noise / sigma + guess / sigma) ** 2).mean()
    assert denoising_loss(guess, noise).item() == pytest.approx(score_matching.item(), rel=1e-5)


def test_ivae_ddpm_loss_weights():
    x = torch.full((2, 3, 2, 2), 0.5)
    logits = torch.zeros_like(x)  # sigmoid = 0.5: zero squared error
    noise = torch.ones(2, 3, 2, 2)
    mu, logvar = torch.tensor([[2.0, 0.0]]).repeat(2, 1), torch.zeros(2, 2)  # KL to N(0, I) = 2 nats
    loss = IVAEDDPMLoss(lambda_rec=0.1, lambda_kl=5e-4)
    total, terms = loss(torch.zeros_like(noise), noise, logits + 2.0, x, mu, logvar, torch.zeros(2, 2), torch.zeros(2, 2))
    rec = (torch.sigmoid(torch.tensor(2.0)).item() - 0.5) ** 2  # per pixel
    assert terms["ddpm"].item() == pytest.approx(1.0)
    assert terms["recon"].item() == pytest.approx(rec, rel=1e-5)
    assert terms["kl"].item() == pytest.approx(2.0)
    assert total.item() == pytest.approx(1.0 + 0.1 * rec + 5e-4 * 2.0, rel=1e-6)


def test_disentangling_loss_prefers_the_chosen_chunk():
    z_true = torch.zeros(1, 3)
    z_plain = torch.tensor([[1.0, 1.0, 1.0]])
    good = torch.tensor([[1.0, 0.0, 1.0]])  # only chunk 1 moved, towards the true code
    bad = torch.tensor([[0.0, 1.0, 1.0]])  # chunk 0 moved instead
    chunk, weight = torch.tensor([1]), torch.ones(1)
    low = DisDiffLoss.disentangling(z_plain, good, z_true, chunk, weight).item()
    high = DisDiffLoss.disentangling(z_plain, bad, z_true, chunk, weight).item()
    # Both cross-entropies see logits (0, 1, 0) for the right chunk: 2 (log(2 + e) − 1).
    assert low == pytest.approx(2 * (math.log(2 + math.e) - 1), rel=1e-6)
    assert high > low
    assert DisDiffLoss.disentangling(z_plain, good, z_true, chunk, torch.zeros(1)).item() == 0.0


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [1, 5])
def test_ddim_with_an_oracle_denoiser_recovers_x0(eta, steps):
    sched = VPSchedule()
    x0 = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1

    def oracle(x_t, t):  # the noise that takes x0 to x_t
        mean, std = sched.marginal(t)
        return (x_t - mean[:, None, None, None] * x0) / std[:, None, None, None]

    out = ddim_sample(oracle, torch.randn(3, 3, 8, 8), sched, steps=steps, eta=eta,
                      generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0, atol=1e-4)


def test_ddim_is_deterministic_with_eta_zero():
    torch.manual_seed(0)
    net = ConditionalUNet(cond_dim=2, channels=8, mults=[1, 2], blocks=1)
    torch.nn.init.normal_(net.out.weight, std=0.1)
    cond = torch.randn(2, 2)
    noise = fixed_noise((2, 3, 16, 16), seed=3)
    assert torch.equal(noise[0], noise[1])
    run = [ddim_sample(lambda x, t: net(x, t, cond), noise, VPSchedule(), steps=4) for _ in range(2)]
    assert torch.equal(run[0], run[1])
    assert not torch.allclose(run[0][0], run[0][1])  # same noise, different codes
    other = ddim_sample(lambda x, t: net(x, t, cond), fixed_noise((2, 3, 16, 16), seed=4), VPSchedule(), steps=4)
    assert not torch.allclose(other, run[0])
    assert float(run[0].min()) >= -1 and float(run[0].max()) <= 1


@pytest.mark.parametrize("size", [32, 64])
def test_unet_shapes(size):
    net = ConditionalUNet(cond_dim=3, channels=8, mults=[1, 2, 2], blocks=1)
    x = torch.randn(2, 3, size, size)
    out = net(x, torch.tensor([0.1, 0.9]), torch.randn(2, 3))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # zero output layer at start
    with pytest.raises(ValueError, match="pass cond"):
        net(x, torch.tensor([0.1, 0.9]))
    assert ConditionalUNet(0, channels=8, mults=[1, 2], blocks=1)(x, torch.tensor([0.5, 0.5])).shape == x.shape
    assert torch.allclose(to_image_space(to_model_space(x.sigmoid())), x.sigmoid(), atol=1e-6)


# -- the conditional prior -------------------------------------------------------------------

def test_u_is_normalised_by_the_factor_levels(registry, tmp_path):
    model, _ = _build(registry, "ivae", tmp_path)
    assert model.auxiliary == "labels" and model.u_dim == 3
    assert torch.allclose(model.u_scale, torch.tensor([1 / 4, 1 / 4, 1 / 3]))
    scores = ImageDataset(images=np.zeros((4, 32, 32, 3), np.uint8), attributes=ATTRS,
                          attribute_scores=np.zeros((4, 4), int))
    model, _ = _build(registry, "ivae", tmp_path, dataset=scores)
    assert model.u_dim == 4 and torch.allclose(model.u_scale, torch.full((4,), 0.2))
    reg = registry.get("extractor", "ivae")
    with pytest.raises(ValueError, match="needs K, the number of label columns"):
        reg.build(reg.options(**TINY), _context(tmp_path))
    with pytest.raises(ValueError, match="u_dim is 2 but the data set has 3 label columns"):
        reg.build(reg.options(**TINY, u_dim=2), _context(tmp_path, _dataset()))
    bare = reg.build(reg.options(**TINY, u_dim=2), _context(tmp_path))
    assert bare.u_dim == 2 and torch.equal(bare.u_scale, torch.ones(2))


@pytest.mark.parametrize("prior_mean", [False, True])
def test_prior_depends_on_u_and_trains(registry, tmp_path, prior_mean):
    torch.manual_seed(0)
    model, context = _build(registry, "ivae", tmp_path, prior_mean=prior_mean)
    x, u = _images()
    mu0, logvar0 = model.prior_params(u)
    assert torch.count_nonzero(mu0) == 0 and torch.count_nonzero(logvar0) == 0  # starts at N(0, I)
    optimizers = model.configure_optimizers()
    in_optimizer = {id(p) for group in optimizers["vae"].param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in model.prior.parameters())
    relation, acc = _relation(context), Accelerator(cpu=True)
    for _ in range(5):
        model.training_step(x, relation, acc, optimizers, u=u)
    mu_a, logvar_a = model.prior_params(torch.tensor([[0.0, 0.0, 0.0]]))
    mu_b, logvar_b = model.prior_params(torch.tensor([[4.0, 4.0, 3.0]]))
    assert not torch.allclose(logvar_a, logvar_b)
    assert torch.allclose(mu_a, mu_b) != prior_mean  # the mean moves with u only when learned


@pytest.mark.parametrize("name", ["ivae", "ivae_ddpm"])
def test_missing_or_malformed_u_is_a_clear_error(registry, tmp_path, name):
    model, context = _build(registry, name, tmp_path)
    x, u = _images(4)
    args = (x, _relation(context), Accelerator(cpu=True), model.configure_optimizers())
    with pytest.raises(ValueError, match=rf"extractor '{name}' learns from labels: training_step needs u="):
        model.training_step(*args)
    with pytest.raises(ValueError, match=r"u must have shape \(B, K\) = \(4, 3\), got \(4, 2\)"):
        model.training_step(*args, u=u[:, :2])


def test_trainer_feeds_ivae_its_labels(registry, tmp_path):
    dataset = _dataset(24, size=16)
    reg = registry.get("extractor", "ivae")
    context = _context(tmp_path, dataset)
    model = reg.build(reg.options(image_size=16, channels=4, hidden=8), context)
    options = TrainingOptions(steps=3, warmup_steps=0, batch_size=4, log_every=3, cpu=True)
    trainer = Trainer(model, RelationModel(IdentityGraph(None, context), 4), dataset.images, np.arange(24), options,
                      seed=0, accelerator=Accelerator(cpu=True), auxiliary=auxiliary_variable(model, dataset, "ivae"))
    trainer.fit(3)
    assert int(model.steps_done) == 3 and set(trainer.history[-1]) >= {"loss", "recon", "kl"}


# -- the diffusion models learn and sample --------------------------------------------------
# (Shapes, [0, 1] images, a falling loss and state round trips of every extractor, extra decoders
# included: tests/test_contracts.py.)

@pytest.mark.parametrize("name, steps, batch", [("ivae_ddpm", 40, 16), ("disdiff", 30, 8)])
def test_diffusion_term_learns_and_its_sampler_is_deterministic(registry, tmp_path, name, steps, batch):
    torch.manual_seed(0)
    model, context = _build(registry, name, tmp_path)
    relation, acc = _relation(context), Accelerator(cpu=True)
    optimizers = model.configure_optimizers()
    x, u = _images(batch)
    extra = {"u": u} if model.auxiliary == "labels" else {}
    logs = [model.training_step(x, relation, acc, optimizers, **extra) for _ in range(steps)]
    key = "ddpm" if name == "ivae_ddpm" else "recon"
    assert np.mean([log[key] for log in logs[-5:]]) < 0.8 * np.mean([log[key] for log in logs[:5]])
    assert set(logs[-1]) >= {"ivae_ddpm": {"ddpm", "recon", "kl"},
                             "disdiff": {"denoise", "recon", "dis", "kl", "readout"}}[name]
    assert int(model.steps_done) == steps
    extras = model.extra_decoders()
    assert set(extras) == {"diffusion"}
    with torch.no_grad():
        codes = relation(model.encode(x[:3])[0])
        images = extras["diffusion"](codes)
        assert images.shape == (3, 3, 32, 32)
        assert torch.equal(images, extras["diffusion"](codes))  # DDIM, eta 0, fixed noise


def test_ivae_has_no_extra_decoder(registry, tmp_path):
    model, _ = _build(registry, "ivae", tmp_path)
    assert model.extra_decoders() == {}


@pytest.mark.parametrize("name", ["ivae", "ivae_ddpm", "disdiff"])
def test_any_batch_size_and_64_pixels(registry, tmp_path, name):
    model, context = _build(registry, name, tmp_path, image_size=64)
    x, u = _images(3, size=64)
    extra = {"u": u} if model.auxiliary == "labels" else {}
    logs = model.training_step(x, _relation(context), Accelerator(cpu=True), model.configure_optimizers(), **extra)
    assert np.isfinite(logs["loss"])
    assert model.decode(model.encode(x[:1])[0]).shape == (1, 3, 64, 64)


def test_options_are_checked(registry):
    with pytest.raises(ValueError, match="lambda_kl must be >= 0"):
        registry.get("extractor", "ivae_ddpm").options(lambda_kl=-1)
    with pytest.raises(ValueError, match="lambda_dis must be >= 0"):
        registry.get("extractor", "disdiff").options(lambda_dis=-1)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        registry.get("extractor", "ivae").options(beta=-1)
    with pytest.raises(ValueError, match="not divisible by 2"):
        registry.get("extractor", "disdiff").options(image_size=32, unet_mults=[1, 1, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="sample_eta must be in"):
        registry.get("extractor", "ivae_ddpm").options(sample_eta=2.0)
    defaults = registry.get("extractor", "ivae_ddpm").options()
    assert (defaults.lr, defaults.lambda_rec, defaults.lambda_kl, defaults.prior_mean) == (2e-4, 0.1, 5e-4, False)
