"""SSIM, FID and KID through torchmetrics, with pluggable feature extractors (gem.fidelity)."""

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from gem.fidelity import fid, fid_from_features, kid, kid_from_features, load_feature_extractor, ssim

# Two Gaussians in a 4-D "feature space"; the test controls the feature distribution by using an
# extractor that returns its input.
MU1 = np.array([0.0, 1.0, 0.0, -1.0])
MU2 = np.array([1.0, 0.5, 0.0, 0.0])
SIGMA1 = np.array([[0.614, 0.205, -0.079, -0.285], [0.205, 1.254, -0.214, -0.288],
                   [-0.079, -0.214, 1.122, 0.665], [-0.285, -0.288, 0.665, 2.386]])
SIGMA2 = np.array([[0.913, -0.067, -0.447, -0.114], [-0.067, 1.112, 0.046, 0.239],
                   [-0.447, 0.046, 1.057, 0.138], [-0.114, 0.239, 0.138, 0.83]])


def frechet(mu1, s1, mu2, s2):
    """Closed form: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))."""
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


class SmallConv(nn.Module):
    """A fixed random conv net: (B, 3, H, W) -> (B, 8)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(torch.relu(self.conv(x))).flatten(1)


@pytest.fixture(scope="module")
def gaussians():
    rng = np.random.default_rng(0)
    n = 100_000
    return rng.multivariate_normal(MU1, SIGMA1, n), rng.multivariate_normal(MU2, SIGMA2, n)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    real = rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    noise = rng.integers(-30, 31, real.shape)
    fake = np.clip(real.astype(int) + noise, 0, 255).astype(np.uint8)
    return real, fake


def test_fid_of_a_set_with_itself_is_zero(gaussians):
    x, _ = gaussians
    assert fid(x[:5000], x[:5000], feature_extractor=nn.Identity()) == pytest.approx(0.0, abs=1e-8)


def test_fid_equals_closed_form_of_the_sample_moments(gaussians):
    # exact: FID is the Fréchet distance of the fitted Gaussians (sample means, unbiased covariances)
    x, y = gaussians[0][:3000], gaussians[1][:3000]
    expected = frechet(x.mean(0), np.cov(x.T), y.mean(0), np.cov(y.T))
    assert fid(x, y, feature_extractor=nn.Identity()) == pytest.approx(expected, rel=1e-8)


def test_fid_between_two_gaussians_matches_population_closed_form(gaussians):
    # 100,000 samples per set: the estimate's standard deviation over seeds is about 0.013
    # (measured over 20 seeds); the tolerance 0.08 is about 6 of them (2.7% of the value).
    expected = frechet(MU1, SIGMA1, MU2, SIGMA2)
    assert expected == pytest.approx(2.966, abs=1e-3)
    assert fid(*gaussians, feature_extractor=nn.Identity(), batch_size=20000) == pytest.approx(expected, abs=0.08)


def test_kid_equals_unbiased_polynomial_mmd(gaussians):
    x, y = gaussians[0][:300], gaussians[1][:400]
    d = x.shape[1]

    def k(a, b):
        return (a @ b.T / d + 1.0) ** 3

    m = 300   # one subset of the full smaller size: the subset of x is all of x
    kxx, kyy = k(x, x), k(y, y)
    # torchmetrics draws a random subset of y; reproduce its value by evaluating with the same seed
    result = kid_from_features(x, y, subsets=1, subset_size=m, seed=3)
    torch.manual_seed(3)
    torch.randperm(len(x))
    y_sub = y[torch.randperm(len(y))[:m].numpy()]
    kyy, kxy = k(y_sub, y_sub), k(x, y_sub)
    expected = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                - 2 * kxy.mean())
    assert result["kid_mean"] == pytest.approx(expected, rel=1e-9)
    assert result["kid_std"] == 0.0 and result["kid_subset_size"] == m


def test_kid_is_deterministic_and_keeps_global_rng(gaussians):
    x, y = gaussians[0][:500], gaussians[1][:500]
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = kid(x, y, feature_extractor=nn.Identity(), subsets=5, subset_size=100, seed=7)
    assert torch.rand(1) == expected_next
    b = kid(x, y, feature_extractor=nn.Identity(), subsets=5, subset_size=100, seed=7)
    assert a == b
    assert a["kid_mean"] > 0.1
    # two independent samples of one distribution: KID near 0 (KID of a set with itself is not 0:
    # overlapping subsets put k(x, x) terms into the cross term, a negative bias)
    x2 = np.random.default_rng(5).multivariate_normal(MU1, SIGMA1, 500)
    same = kid(x, x2, feature_extractor=nn.Identity(), subsets=20, subset_size=200, seed=0)
    assert abs(same["kid_mean"]) < 0.1 * a["kid_mean"]


def test_ssim_identical_noisy_and_layouts(images):
    real, fake = images
    assert ssim(real, real) == pytest.approx(1.0, abs=1e-6)
    value = ssim(real, fake)
    assert 0.0 < value < 0.99
    assert ssim(fake, real) == pytest.approx(value, abs=1e-6)
    # uint8 (N, H, W, C) and float (N, C, H, W) in [0, 1] are the same images
    as_float = torch.from_numpy(real).permute(0, 3, 1, 2).float() / 255
    as_float_fake = torch.from_numpy(fake).permute(0, 3, 1, 2).float() / 255
    assert ssim(as_float, as_float_fake, batch_size=5) == pytest.approx(value, abs=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        ssim(real, fake[:3])


def test_import_path_and_module_extractors_agree(images):
    real, fake = images[0][:, :4, :4], images[1][:, :4, :4]   # 48 flattened features, 24 images
    by_path = fid(real, fake, feature_extractor="torch.nn:Flatten")
    by_module = fid(real, fake, feature_extractor=nn.Flatten())
    by_function = fid(real, fake, feature_extractor=lambda x: x.reshape(len(x), -1))
    assert by_path == pytest.approx(by_module, rel=1e-9) and by_path == pytest.approx(by_function, rel=1e-9)


def test_extractor_files_torchscript_pickle_and_state_dict(tmp_path, images):
    real, fake = images
    net = SmallConv().eval()
    reference = fid(real, fake, feature_extractor=net)
    assert reference > 0

    script = tmp_path / "net.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # torch.jit is deprecated in torch >= 2.10, still works
        torch.jit.script(net).save(str(script))
    assert fid(real, fake, feature_extractor=str(script)) == pytest.approx(reference, rel=1e-6)

    pickled = tmp_path / "net_pickled.pt"
    torch.save(net, pickled)
    with pytest.raises(ValueError, match="weights_only=False"):
        load_feature_extractor(pickled)
    assert fid(real, fake, feature_extractor=pickled, weights_only=False) == pytest.approx(reference, rel=1e-6)

    state = tmp_path / "state.pt"
    torch.save(net.state_dict(), state)
    with pytest.raises(ValueError, match="state dict"):
        load_feature_extractor(state)
    with pytest.raises(ValueError, match="package.module:attr"):
        load_feature_extractor(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="cannot import"):
        load_feature_extractor("no_such_package_xyz:Net")


def test_missing_inception_says_what_to_install(images):
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if _TORCH_FIDELITY_AVAILABLE:
        pytest.skip("torch-fidelity is installed")
    with pytest.raises(ModuleNotFoundError, match=r"pip install torch-fidelity.*feature_extractor"):
        fid(*images)


def test_fid_accepts_iterables_of_batches(images):
    real, fake = images
    whole = fid(real, fake, feature_extractor=SmallConv())
    batches = fid((real[i:i + 7] for i in range(0, len(real), 7)), iter([fake]), feature_extractor=SmallConv())
    assert batches == pytest.approx(whole, rel=1e-9)
    assert fid_from_features(np.ones((3, 2)) * [[1], [2], [3]], np.ones((3, 2)) * [[1], [2], [3]]) == pytest.approx(0, abs=1e-6)
