"""Reconstruction and generation fidelity: SSIM, FID and KID through torchmetrics.

The maths is torchmetrics' (``StructuralSimilarityIndexMeasure``, ``FrechetInceptionDistance``,
``KernelInceptionDistance``); this module adds the image conversions, batching, determinism and a
pluggable feature extractor.

Images
------
Arrays or tensors (N, ...). A **uint8** input is scaled to [0, 1] and, when it is (N, H, W, C)
with C in (1, 3) (gem's data set layout), moved to channels first; a floating input is taken as
(N, C, H, W) in [0, ``data_range``] and kept in its dtype. ``channels_last=True/False`` overrides
the guess. FID and KID may also be given an iterable of such batches (e.g. a generator of
decoded samples), so large sets never sit in memory.

Feature extractor
-----------------
FID and KID compare feature statistics; the features come from ``feature_extractor``:

* ``None`` or ``"inception"``: the standard Inception-v3 pool features (2048) of the FID
  literature, torchmetrics' ``NoTrainInceptionV3`` built on torch-fidelity (``pip install
  torch-fidelity``, which pulls torchvision). torch-fidelity downloads its weights on first use;
  with the network closed pass ``inception_weights=<path to pt_inception-2015-12-05-6726825d.pth>``.
  Images go in as float [0, 1], are rounded to uint8 (torchmetrics' own ``normalize=True``
  truncates instead; rounding keeps uint8 sources exact) and resized to 299x299 by the network.
* an ``nn.Module`` or any callable: called on float batches (B, C, H, W) in [0, 1] on ``device``;
  its output is flattened to (B, F).
* ``"package.module:attr"``: imported; a module instance is used as is, a class or a factory
  function is called without arguments.
* a path to a TorchScript file (``torch.jit.save``) or a ``torch.save``'d module. TorchScript
  loads without unpickling code. A pickled module only loads with ``weights_only=False``, which
  runs code from the file: it is refused unless you pass ``weights_only=False``. A state dict
  has no architecture and is refused with a hint.

Features are extracted once per set, in batches, under ``torch.no_grad()`` in eval mode, and
handed to torchmetrics as float64 (N, F) through an identity module, so FID and KID share one
extraction and the extractor never needs a ``num_features`` attribute or a 299x299 dummy pass.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
import torch
from torch import nn

from gem.errors import ConfigurationError, MissingDependencyError

__all__ = [
    "INSTALL_HINT", "FeatureExtractor", "as_image_tensor", "ssim", "load_feature_extractor",
    "extract_features", "fid_from_features", "kid_from_features", "fid", "kid",
]

FeatureSpec = Union[None, str, os.PathLike, nn.Module, Callable[[torch.Tensor], torch.Tensor]]

INSTALL_HINT = (
    "FID and KID need image features. The standard Inception-v3 needs torch-fidelity: "
    "`pip install torch-fidelity` (it pulls torchvision). Or pass feature_extractor=... : an "
    "nn.Module, an importable 'package.module:attr', or a TorchScript / torch.save'd module file."
)


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------

def as_image_tensor(x: Any, channels_last: Optional[bool] = None) -> torch.Tensor:
    """A floating tensor from an image batch (see the module notes for the layout rules).

    uint8 (and other integer) inputs become float32 in [0, 1]; floating inputs keep their dtype
    and values. ``channels_last=None`` moves the channels first only for an integer (N, H, W, C)
    input with C in (1, 3).
    """
    tensor = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
    integer = not (tensor.is_floating_point() or tensor.is_complex())
    if channels_last is None:
        channels_last = integer and tensor.dim() == 4 and tensor.shape[-1] in (1, 3)
    if channels_last:
        if tensor.dim() != 4:
            raise ValueError(f"channels_last needs a (N, H, W, C) batch; got shape {tuple(tensor.shape)}")
        tensor = tensor.permute(0, 3, 1, 2)
    if integer:
        tensor = tensor.to(torch.float32) / 255.0
    return tensor.contiguous()


def _batches(images: Any, batch_size: int, channels_last: Optional[bool]) -> Iterable[torch.Tensor]:
    """Float batches of an array / tensor (sliced) or of an iterable of batches (as given)."""
    if isinstance(images, (np.ndarray, torch.Tensor)) or (hasattr(images, "shape") and hasattr(images, "__getitem__")):
        for start in range(0, len(images), batch_size):
            yield as_image_tensor(images[start:start + batch_size], channels_last)
    else:
        for batch in images:
            yield as_image_tensor(batch, channels_last)


def _device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def ssim(x: Any, y: Any, *, data_range: float = 1.0, channels_last: Optional[bool] = None, batch_size: int = 64,
         device: Any = None, **kwargs: Any) -> float:
    """Mean structural similarity (Wang et al., 2004) of paired images, torchmetrics'
    ``StructuralSimilarityIndexMeasure`` (Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03).

    Parameters
    ----------
    x, y : image batches of the same shape (see the module notes; float (N, C, H, W) in
        [0, data_range], or uint8 (N, H, W, C) as gem stores images)
    data_range : value range of float images (1 for [0, 1]; uint8 inputs are scaled to [0, 1])
    kwargs : passed to ``StructuralSimilarityIndexMeasure`` (e.g. ``kernel_size``)

    Returns
    -------
    float: SSIM averaged over images, 1 for identical images.
    """
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    if tuple(np.shape(x)) != tuple(np.shape(y)):
        raise ValueError(f"ssim needs paired images of the same shape; got {tuple(np.shape(x))} and {tuple(np.shape(y))}")
    dev = _device(device)
    # Evaluation runs on one process; a metric that synchronised would wait for the others.
    metric = StructuralSimilarityIndexMeasure(data_range=data_range, sync_on_compute=False, **kwargs).to(dev)
    for bx, by in zip(_batches(x, batch_size, channels_last), _batches(y, batch_size, channels_last)):
        dtype = torch.promote_types(bx.dtype, by.dtype)
        metric.update(bx.to(dev, dtype), by.to(dev, dtype))
    return float(metric.compute())


# ---------------------------------------------------------------------------------------------
# feature extractors
# ---------------------------------------------------------------------------------------------

class FeatureExtractor(nn.Module):
    """Wraps any module or callable so it returns (B, F) features; ``num_features`` when known.

    Outputs are flattened per sample; a tuple or list output uses its first element.
    """

    def __init__(self, net: Union[nn.Module, Callable[[torch.Tensor], Any]], num_features: Optional[int] = None):
        super().__init__()
        if isinstance(net, nn.Module):
            self.net = net
        else:
            self._fn = net
        known = num_features if num_features is not None else getattr(net, "num_features", None)
        self.num_features = int(known) if isinstance(known, (int, np.integer)) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x) if hasattr(self, "net") else self._fn(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.reshape(x.shape[0], -1)


class _InceptionFeatures(nn.Module):
    """torchmetrics' Inception-v3 (torch-fidelity weights), pool features (2048) from float [0, 1]."""

    num_features = 2048

    def __init__(self, weights_path: Optional[str] = None):
        super().__init__()
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise MissingDependencyError(INSTALL_HINT)
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=weights_path)

    def train(self, mode: bool = True) -> "_InceptionFeatures":
        return super().train(False)   # always in eval mode, as torchmetrics keeps it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return self.net((x * 255).round().clamp(0, 255).to(torch.uint8))


_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _import_object(spec: str) -> Any:
    module_name, attr = spec.split(":", 1)
    try:
        obj = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigurationError(f"feature_extractor {spec!r}: cannot import {module_name!r} ({error})") from error
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigurationError(f"feature_extractor {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if callable(obj):   # a class or a factory: build it
        built = obj()
        if isinstance(built, nn.Module) or callable(built):
            return built
    raise ConfigurationError(f"feature_extractor {spec!r} is not an nn.Module, a class or a factory of one")


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``constants.pkl`` record (``torch.save`` has none)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())


def _load_file(path: Path, weights_only: bool) -> Any:
    if _is_torchscript(path):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)   # torch >= 2.10 deprecates torch.jit
            return torch.jit.load(str(path), map_location="cpu")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as error:
        raise ConfigurationError(
            f"feature_extractor file {str(path)!r} is a pickled module, which torch.load opens only with "
            "weights_only=False, and that runs code from the file. Pass weights_only=False if you trust "
            "it, or save the module as TorchScript (torch.jit.script(model).save(path))."
        ) from error
    if isinstance(obj, dict):
        raise ConfigurationError(
            f"feature_extractor file {str(path)!r} holds a state dict, not a module: it has no architecture. "
            "Point feature_extractor to 'package.module:attr' that builds the module and loads these weights."
        )
    if not (isinstance(obj, nn.Module) or callable(obj)):
        raise ConfigurationError(f"feature_extractor file {str(path)!r} holds a {type(obj).__name__}, not a module")
    return obj


def load_feature_extractor(spec: FeatureSpec = None, *, weights_only: bool = True,
                           inception_weights: Optional[str] = None) -> FeatureExtractor:
    """Resolve a feature extractor specification (see the module notes) into a module.

    Parameters
    ----------
    spec : None / "inception", an nn.Module or callable, "package.module:attr", or a file path
    weights_only : passed to ``torch.load`` for a pickled module file (TorchScript needs neither)
    inception_weights : local Inception-v3 weights for torch-fidelity (offline machines)

    Returns
    -------
    FeatureExtractor

    Raises
    ------
    MissingDependencyError (a ModuleNotFoundError) : the Inception-v3 was asked for and
        torch-fidelity is missing; the message says what to install or pass instead.
    ConfigurationError (a ValueError) : a spec that is none of the accepted forms, or a file that
        cannot be used.
    """
    if isinstance(spec, FeatureExtractor):
        return spec
    if spec is None or (isinstance(spec, str) and spec.lower() == "inception"):
        return FeatureExtractor(_InceptionFeatures(inception_weights))
    if isinstance(spec, nn.Module) or (callable(spec) and not isinstance(spec, (str, os.PathLike))):
        return FeatureExtractor(spec)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        if path.is_file():
            return FeatureExtractor(_load_file(path, weights_only))
        if isinstance(spec, str) and _IMPORT_PATH.match(spec):
            return FeatureExtractor(_import_object(spec))
        raise ConfigurationError(f"feature_extractor {str(spec)!r} is neither an existing file nor an import path "
                                 "'package.module:attr'. " + INSTALL_HINT)
    raise ConfigurationError(f"feature_extractor of type {type(spec).__name__} is not accepted. " + INSTALL_HINT)


@torch.no_grad()
def extract_features(images: Any, extractor: FeatureSpec = None, *, batch_size: int = 64, device: Any = None,
                     channels_last: Optional[bool] = None, weights_only: bool = True,
                     inception_weights: Optional[str] = None) -> torch.Tensor:
    """Features (N, F) of an image set, float64 on the CPU, extracted in batches in eval mode."""
    net = load_feature_extractor(extractor, weights_only=weights_only, inception_weights=inception_weights)
    dev = _device(device)
    was_training = net.training
    net.eval().to(dev)
    out = [net(batch.to(dev)).detach().to("cpu", torch.float64) for batch in _batches(images, batch_size, channels_last)]
    net.train(was_training)
    if not out:
        raise ValueError("no images to extract features from")
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# FID and KID
# ---------------------------------------------------------------------------------------------

class _Identity(nn.Module):
    """Hands precomputed features to torchmetrics (which asks for ``num_features``)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _as_features(x: Any, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    t = t.detach().to("cpu", torch.float64)
    if t.dim() != 2 or len(t) < 2:
        raise ValueError(f"{name} features must be (N, F) with N >= 2; got shape {tuple(t.shape)}")
    return t


def fid_from_features(real_features: Any, fake_features: Any, chunk: int = 4096) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, F) and (M, F):
    ``||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))``, torchmetrics'
    ``FrechetInceptionDistance`` (unbiased covariances, float64)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _as_features(real_features, "real"), _as_features(fake_features, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} and {fake.shape[1]}")
    metric = FrechetInceptionDistance(feature=_Identity(real.shape[1]), sync_on_compute=False)
    for start in range(0, len(real), chunk):
        metric.update(real[start:start + chunk], real=True)
    for start in range(0, len(fake), chunk):
        metric.update(fake[start:start + chunk], real=False)
    return float(metric.compute())


def kid_from_features(real_features: Any, fake_features: Any, *, subsets: int = 100, subset_size: int = 1000,
                      degree: int = 3, gamma: Optional[float] = None, coef: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Kernel inception distance of two feature sets, torchmetrics' ``KernelInceptionDistance``.

    The unbiased MMD² with the polynomial kernel ``(x·y / F + 1)^3`` (``gamma = 1/F`` when None),
    averaged over ``subsets`` random subsets of ``subset_size`` rows of each set (capped at the
    smaller set's size). Deterministic for a fixed ``seed`` (the global torch RNG is left as it was).

    Returns ``{"kid_mean", "kid_std", "kid_subset_size"}``; papers often report ``kid_mean × 10³``.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _as_features(real_features, "real"), _as_features(fake_features, "fake")
    size = int(min(subset_size, len(real), len(fake)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=_Identity(real.shape[1]), subsets=int(subsets), subset_size=size,
                                         sync_on_compute=False,
                                         degree=int(degree), gamma=None if gamma is None else float(gamma),
                                         coef=float(coef))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {"kid_mean": float(mean), "kid_std": float(std), "kid_subset_size": float(size)}


def fid(real: Any, fake: Any, *, feature_extractor: FeatureSpec = None, batch_size: int = 64, device: Any = None,
        channels_last: Optional[bool] = None, weights_only: bool = True, inception_weights: Optional[str] = None) -> float:
    """FID between two image sets (arrays, tensors or iterables of batches; see the module notes).

    Both sets go through the same extractor; 0 for a set against itself. The literature uses
    the Inception-v3 (the default) and 10,000-50,000 images: fewer images bias FID upwards. Use
    more images than feature dimensions: with fewer, the covariances are singular and the
    eigenvalue step of torchmetrics is slow (tens of seconds at 768 features) and unstable.
    """
    net = load_feature_extractor(feature_extractor, weights_only=weights_only, inception_weights=inception_weights)
    options = dict(batch_size=batch_size, device=device, channels_last=channels_last)
    return fid_from_features(extract_features(real, net, **options), extract_features(fake, net, **options))


def kid(real: Any, fake: Any, *, feature_extractor: FeatureSpec = None, subsets: int = 100, subset_size: int = 1000,
        degree: int = 3, gamma: Optional[float] = None, coef: float = 1.0, seed: int = 0, batch_size: int = 64,
        device: Any = None, channels_last: Optional[bool] = None, weights_only: bool = True,
        inception_weights: Optional[str] = None) -> dict[str, float]:
    """KID between two image sets; see :func:`kid_from_features` for the keys and options."""
    net = load_feature_extractor(feature_extractor, weights_only=weights_only, inception_weights=inception_weights)
    options = dict(batch_size=batch_size, device=device, channels_last=channels_last)
    return kid_from_features(extract_features(real, net, **options), extract_features(fake, net, **options),
                             subsets=subsets, subset_size=subset_size, degree=degree, gamma=gamma, coef=coef, seed=seed)
