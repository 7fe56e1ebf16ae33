"""Contract tests: every registered plugin honours the interface of its stage.

The parameter lists are read from the real plugin manager when this module is imported, so a
new extractor, data set or graph learner (built-in or installed through the ``gem`` entry-point
group) is covered by registering it. Method-specific behaviour (loss formulas against reference
values, estimator weights, samplers ...) stays in the per-method test files.

* extractors: built at the smallest size the architectures allow, they encode to (mean, logvar)
  of shape (B, latent_dim), decode to images in [0, 1] (also every extra decoder), lower their
  loss on a fixed batch through :func:`gem.training.run_step`, and come back identical from a
  state_dict;
* data sets: with an empty root they build (those that make their own images) or raise
  :class:`gem.data.MissingDataError` naming what is expected where; what builds, and the
  built-in ones on miniature copies of their files (``data_fixtures``), satisfy
  :class:`gem.interfaces.ImageDataset`;
* graph learners: forward gives a finite (n, n) graph with a unit diagonal, penalty a scalar;
  trainable ones move with a gradient step and come back identical from a state_dict.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from gem.data import MissingDataError
from gem.interfaces import BuildContext, ImageDataset
from gem.plugins import Registry, make_plugin_manager
from gem.relations import RelationModel
from gem.labels import auxiliary_variable
from gem.training import run_step

_REGISTRY = Registry(make_plugin_manager())
EXTRACTORS = _REGISTRY.names("extractor")
DATASETS = _REGISTRY.names("dataset")
GRAPH_LEARNERS = _REGISTRY.names("graph")

#: The smallest image the Burgess encoder/decoder (four stride-2 layers) and the data sets allow.
SIZE = 16
#: The image size of an extractor whose options have no ``image_size`` (gem's default everywhere).
DEFAULT_SIZE = 64

#: Shared option fields, set only where an options dataclass has them: small networks, a U-Net of
#: two levels, a full-resolution discriminator (a pooled one would fall below 16 pixels), a short
#: sampler, and a learning rate at which a few dozen steps on a fixed batch reliably lower the loss.
TINY_EXTRACTOR = {
    "image_size": SIZE, "channels": 8, "hidden": 32, "lr": 2e-3,
    "unet_channels": 8, "unet_mults": [1, 2], "unet_blocks": 1, "sample_steps": 2,
    "disc_downsample": 1, "disc_hidden": 64,
}
STEPS = 40
SEED = 0


def _options(registration, overrides: dict[str, Any]) -> Any:
    """The registration's options with those ``overrides`` its dataclass has; None without options."""
    if registration.options is None:
        return None
    fields = {f.name for f in dataclasses.fields(registration.options)}
    return registration.options(**{k: v for k, v in overrides.items() if k in fields})


def labelled_blobs(n: int = 16, size: int = SIZE, seed: int = 0) -> ImageDataset:
    """A tiny labelled data set: a coloured disc whose x, y position (4 levels each), colour (3)
    and radius (2) are the factors; attribute scores are the classes on the 0-5 scale."""
    g = np.random.default_rng(seed)
    names, levels = ["x", "y", "colour", "size"], [4, 4, 3, 2]
    factors = np.stack([g.integers(0, k, n) for k in levels], axis=1)
    yy, xx = np.mgrid[0:size, 0:size] / size
    palette = np.array([[0.9, 0.2, 0.2], [0.2, 0.9, 0.2], [0.2, 0.2, 0.9]])
    images = np.empty((n, size, size, 3), dtype=np.float64)
    for i, (px, py, colour, radius) in enumerate(factors):
        disc = (xx - 0.25 - px / 6) ** 2 + (yy - 0.25 - py / 6) ** 2 < (0.12 + 0.08 * radius) ** 2
        images[i] = 0.1 + disc[..., None] * palette[colour] * 0.8
    scores = np.round(factors / (np.array(levels) - 1) * 5).astype(np.int64)
    return ImageDataset(images=np.round(images * 255).astype(np.uint8), attributes=list(names), factors=factors,
                        factor_names=list(names), factor_levels=list(levels), attribute_scores=scores)


#: A small signed impact matrix in attribute order (unit diagonal, both signs, a zero).
ANCHOR = torch.tensor([[1.0, 0.5, 0.0, -0.2],
                       [0.0, 1.0, -0.3, 0.0],
                       [0.1, 0.0, 1.0, 0.2],
                       [-0.4, 0.0, 0.0, 1.0]])


def _check_images(images: torch.Tensor, batch: int, size: int, what: str) -> None:
    assert isinstance(images, torch.Tensor), what
    assert tuple(images.shape) == (batch, 3, size, size), f"{what}: shape {tuple(images.shape)}"
    assert bool(torch.isfinite(images).all()), what
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0, f"{what}: outside [0, 1]"


# ---------------------------------------------------------------------------------------------
# Extractors


@pytest.mark.parametrize("name", EXTRACTORS)
def test_extractor_contract(registry, tmp_path, name):
    torch.manual_seed(SEED)
    reg = registry.get("extractor", name)
    options = _options(reg, TINY_EXTRACTOR)
    size = getattr(options, "image_size", DEFAULT_SIZE)
    dataset = labelled_blobs(size=size)
    n = len(dataset.attributes)
    accelerator = Accelerator(cpu=True)
    context = BuildContext(seed=SEED, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache",
                           attributes=list(dataset.attributes), dataset=dataset, accelerator=accelerator)
    model = reg.build(options, context)
    assert model.latent_dim == n

    x = torch.from_numpy(dataset.images).permute(0, 3, 1, 2).float() / 255
    batch = len(x)

    # encode / decode
    with torch.no_grad():
        encoded = model.encode(x)
        assert isinstance(encoded, tuple) and len(encoded) == 2
        mu, logvar = encoded
        assert tuple(mu.shape) == tuple(logvar.shape) == (batch, n)
        assert bool(torch.isfinite(mu).all() and torch.isfinite(logvar).all())
        _check_images(model.decode(mu), batch, size, "decode(mean)")
        _check_images(model.decode(3 * torch.randn(batch, n)), batch, size, "decode(wide codes)")

    # training through the loop's own step, with a bound relation path around a registered graph
    graph_reg = registry.get("graph", "fixed")
    graph = graph_reg.build(_options(graph_reg, {}), context)
    graph.set_anchor(ANCHOR)
    relation = RelationModel(graph, n)
    relation.bind(np.arange(n), np.ones(n))
    optimizers = model.configure_optimizers()
    assert optimizers and all(isinstance(o, torch.optim.Optimizer) for o in optimizers.values())
    u = auxiliary_variable(model, dataset, name)
    extra = {"u": torch.from_numpy(u)} if u is not None else {}
    model.train()
    logs = [run_step(model, relation, optimizers, None, accelerator, x, step, **extra) for step in range(STEPS)]
    for entry in logs:
        assert "loss" in entry and all(np.isfinite(float(v)) for v in entry.values()), entry
    losses = [entry["loss"] for entry in logs]
    k = STEPS // 4
    assert np.mean(losses[-k:]) < np.mean(losses[:k]), f"loss did not fall: {losses[:k]} ... {losses[-k:]}"

    # after training: the same shapes, and every extra decoder draws images too
    model.eval()
    with torch.no_grad():
        mu, logvar = model.encode(x)
        assert tuple(mu.shape) == tuple(logvar.shape) == (batch, n)
        decoded = model.decode(relation(mu))
        _check_images(decoded, batch, size, "decode after training")
        for extra_name, decode in model.extra_decoders().items():
            _check_images(decode(relation(mu[:2])), 2, size, f"extra decoder {extra_name!r}")

    # state_dict into a freshly built instance: identical codes and images
    fresh = reg.build(_options(reg, TINY_EXTRACTOR), context)    # a new instance, new initial weights
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        fresh_mu, fresh_logvar = fresh.encode(x)
        assert torch.equal(fresh_mu, mu) and torch.equal(fresh_logvar, logvar)
        assert torch.equal(fresh.decode(relation(mu)), decoded)


# ---------------------------------------------------------------------------------------------
# Data sets


def _write_celeba(root: Path) -> dict:
    from data_fixtures import write_celeba

    write_celeba(root, n=16)
    return {"workers": 1}


def _write_lsun(root: Path) -> dict:
    from data_fixtures import scene, write_lsun_lmdb

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
    if importlib.util.find_spec("lmdb") is not None:
        write_lsun_lmdb(root / "bedroom_train_lmdb", colours)    # the official scene export (one corrupt value)
    else:                                                        # the folder layout needs no optional package
        (root / "bedroom").mkdir(parents=True)
        for i, colour in enumerate(colours):
            scene(96, 64, colour).save(root / "bedroom" / f"{i}.png")
    return {"category": "bedroom", "workers": 1}


def _write_shapes3d(root: Path) -> dict:
    pytest.importorskip("h5py", reason="h5py is not installed (pip install h5py, the 'h5' extra)")
    from data_fixtures import write_shapes3d
    from gem_plugins import shapes3d

    write_shapes3d(root / shapes3d.FILE_NAME, n=40)
    return {"correlation": "medium"}    # so sample_weights are checked too


def _write_dsprites(root: Path) -> dict:
    from data_fixtures import write_dsprites
    from gem_plugins import dsprites

    write_dsprites(root / dsprites.FILE_NAME, n=40)
    return {}


def _write_image_folder(root: Path) -> dict:
    from data_fixtures import write_image_folder

    write_image_folder(root)
    return {"attributes_csv": "attributes.csv", "workers": 1}


#: Built-in data sets with miniature copies of their published files: name -> writer(root) that
#: lays the files out under root and returns the options (besides root and image_size) to read them.
FIXTURES: dict[str, Callable[[Path], dict]] = {
    "celeba": _write_celeba,
    "lsun": _write_lsun,
    "shapes3d": _write_shapes3d,
    "dsprites": _write_dsprites,
    "image_folder": _write_image_folder,
}

#: Options a built-in data set cannot do without (its defaults do not validate).
REQUIRED = {"image_folder": {"attributes": ["a"]}}

#: Tiny sizes for data sets that make their own images.
TINY_DATASET = {"image_size": SIZE, "n_images": 24, "workers": 1}


def check_image_dataset(ds: ImageDataset, image_size: Optional[int]) -> None:
    """The :class:`gem.interfaces.ImageDataset` contract."""
    assert isinstance(ds, ImageDataset)
    images = ds.images
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3, (images.dtype, images.shape)
    n_images = images.shape[0]
    assert n_images > 0 and len(ds) == n_images
    if image_size is not None:
        assert images.shape[1:3] == (image_size, image_size)

    attributes = list(ds.attributes)
    assert attributes and all(isinstance(a, str) and a.strip() for a in attributes), attributes
    assert len(set(attributes)) == len(attributes), f"attributes listed twice: {attributes}"
    n = len(attributes)

    if ds.factors is not None:
        factors = np.asarray(ds.factors)
        assert np.issubdtype(factors.dtype, np.integer), factors.dtype
        assert factors.ndim == 2 and factors.shape[0] == n_images, factors.shape
        k = factors.shape[1]
        assert (factors >= 0).all()
        if ds.factor_names:
            assert len(ds.factor_names) == k
        if ds.factor_levels:
            assert len(ds.factor_levels) == k
            assert (factors < np.asarray(ds.factor_levels)).all(), "a factor class is not below its number of levels"

    scores = None
    if ds.attribute_scores is not None:
        scores = np.asarray(ds.attribute_scores)
        assert np.issubdtype(scores.dtype, np.integer), scores.dtype
        assert scores.shape == (n_images, n), scores.shape
        assert scores.min() >= 0 and scores.max() <= 5

    if ds.true_impact is not None:
        impact = np.asarray(ds.true_impact, dtype=np.float64)
        assert impact.shape == (n, n)
        assert np.isfinite(impact).all() and (np.abs(impact) <= 1 + 1e-9).all()
        # Somers' D of a column with itself: 1 where the column varies, 0 for a constant one.
        if scores is not None:
            varies = scores.min(axis=0) != scores.max(axis=0)
            np.testing.assert_allclose(np.diag(impact), varies.astype(float), atol=1e-9)
        else:
            assert np.isin(np.round(np.diag(impact), 9), (0.0, 1.0)).all()

    if ds.sample_weights is not None:
        weights = np.asarray(ds.sample_weights, dtype=np.float64)
        assert weights.shape == (n_images,)
        assert np.isfinite(weights).all() and (weights >= 0).all() and weights.sum() > 0

    if ds.independent_sample is not None:
        assert ds.factors is not None, "an independent sample needs factors to be measured against"
        wanted = min(7, n_images)
        source, rows = ds.independent_sample(wanted, 0)
        rows = np.asarray(rows)
        assert rows.ndim == 1 and 0 < len(rows) <= wanted and len(np.unique(rows)) == len(rows)
        assert rows.min() >= 0 and rows.max() < len(source)
        assert source.images.dtype == np.uint8 and source.images.shape[1:] == images.shape[1:]
        assert source.factors is not None and np.asarray(source.factors).shape[1] == np.asarray(ds.factors).shape[1]
        assert list(source.factor_names) == list(ds.factor_names)

    assert isinstance(ds.info, dict)


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_contract(registry, tmp_path, monkeypatch, name):
    reg = registry.get("dataset", name)
    fields = {f.name for f in dataclasses.fields(reg.options)} if reg.options is not None else set()
    image_size = SIZE if "image_size" in fields else None
    monkeypatch.chdir(tmp_path)    # relative default roots (data/<name>) point into an empty folder

    # No data under root: build what generates its own images, else a MissingDataError that says
    # what is expected where.
    empty = tmp_path / "empty"
    empty.mkdir()
    overrides = {**TINY_DATASET, **REQUIRED.get(name, {}), "root": str(empty)}
    context = BuildContext(seed=0, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache")
    try:
        built = reg.build(_options(reg, overrides), context)
    except MissingDataError as exc:
        message = str(exc)
        where = str(empty) if "root" in fields else exc.where
        assert where in message, message
        assert exc.expected, f"{name}: MissingDataError lists no expected files"
        assert all(item in message for item in exc.expected), message
        assert any(where in item for item in exc.expected), f"{name}: no expected path under {where}: {exc.expected}"
    else:
        check_image_dataset(built, image_size)

    # The built-in ones on miniature copies of their published files.
    if name in FIXTURES:
        root = tmp_path / "data"
        root.mkdir()
        extra = FIXTURES[name](root)
        ds = reg.build(_options(reg, {**TINY_DATASET, **extra, "root": str(root)}),
                       BuildContext(seed=0, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache_fixture"))
        check_image_dataset(ds, image_size)


# ---------------------------------------------------------------------------------------------
# Graph learners

#: A small signed impact matrix on three attributes (both signs, a zero, unit diagonal).
S = torch.tensor([[1.0, 0.6, -0.3], [0.2, 1.0, 0.0], [-0.5, 0.1, 1.0]])


def _check_graph(adjacency: torch.Tensor) -> None:
    assert isinstance(adjacency, torch.Tensor) and tuple(adjacency.shape) == (3, 3)
    assert bool(torch.isfinite(adjacency).all())
    torch.testing.assert_close(torch.diagonal(adjacency).detach(), torch.ones(3))


@pytest.mark.parametrize("name", GRAPH_LEARNERS)
def test_graph_learner_contract(registry, tmp_path, name):
    torch.manual_seed(SEED)
    reg = registry.get("graph", name)
    context = BuildContext(seed=SEED, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache",
                           attributes=["a", "b", "c"])
    graph = reg.build(_options(reg, {}), context)
    graph.set_anchor(S.clone())
    before = graph()
    _check_graph(before)
    penalty = graph.penalty()
    assert isinstance(penalty, torch.Tensor) and penalty.dim() == 0 and bool(torch.isfinite(penalty))

    if graph.trainable:
        params = [p for p in graph.parameters() if p.requires_grad]
        assert params, f"{name} is trainable but has no parameters"
        optimizer = torch.optim.Adam(params, lr=0.05)
        target = torch.eye(3)    # pull every relation towards 0
        for step in range(1, 4):
            optimizer.zero_grad()
            loss = (graph() - target).pow(2).sum() + graph.penalty()
            loss.backward()
            optimizer.step()
            graph.end_step(step)
        after = graph().detach()
        _check_graph(after)
        assert not torch.allclose(after, before.detach()), f"{name}: a gradient step did not change A"

    fresh = reg.build(_options(reg, {}), context)
    fresh.set_anchor(S.clone())
    if graph.trainable:
        assert not torch.allclose(fresh().detach(), graph().detach())
    fresh.load_state_dict(graph.state_dict())
    torch.testing.assert_close(fresh().detach(), graph().detach(), rtol=0, atol=0)
    torch.testing.assert_close(fresh.penalty().detach(), graph.penalty().detach(), rtol=0, atol=0)
