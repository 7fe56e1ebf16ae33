"""Tests of the procedural ``synthetic`` data set plugin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from gem.interfaces import BuildContext, ImageDataset
from gem_plugins import synthetic
from gem_plugins.synthetic import FACTOR_LEVELS, SyntheticOptions, build_synthetic, render, sample_factors


def _context(tmp_path: Path, seed: int = 0) -> BuildContext:
    return BuildContext(seed=seed, run_dir=tmp_path, cache_dir=tmp_path)


def _build(tmp_path: Path, **options) -> ImageDataset:
    options.setdefault("n_images", 500)
    return build_synthetic(SyntheticOptions(**options), _context(tmp_path))


def _column(ds: ImageDataset, name: str) -> np.ndarray:
    return ds.factors[:, ds.factor_names.index(name)]


def test_shapes_and_dtypes(tmp_path):
    ds = _build(tmp_path)
    n = len(ds.attributes)
    assert isinstance(ds, ImageDataset) and len(ds) == 500
    assert ds.images.shape == (500, 64, 64, 3) and ds.images.dtype == np.uint8
    assert ds.attributes == ds.factor_names == SyntheticOptions().factors
    assert ds.factor_levels == [FACTOR_LEVELS[name] for name in ds.factor_names]
    assert ds.factors.shape == (500, n) and np.issubdtype(ds.factors.dtype, np.integer)
    assert (ds.factors >= 0).all() and (ds.factors < np.array(ds.factor_levels)).all()
    assert ds.attribute_scores.shape == (500, n) and np.issubdtype(ds.attribute_scores.dtype, np.integer)
    assert ds.attribute_scores.min() == 0 and ds.attribute_scores.max() == 5
    assert ds.true_impact.shape == (n, n)
    np.testing.assert_allclose(np.diag(ds.true_impact), 1.0)
    assert {"correlations", "factor_levels", "description"} <= set(ds.info)
    assert ds.info["correlations"][0] == {"parent": "object_hue", "child": "scale", "strength": 0.7}


def test_scores_are_the_rounded_rescaled_classes(tmp_path):
    ds = _build(tmp_path, factors=["shape", "orientation"], correlations=[])
    # shape: 4 levels -> 0, 5/3, 10/3, 5; orientation: class 7 of 15 -> 2.5 rounds up.
    assert dict(zip(range(4), [0, 2, 3, 5])) == {c: s for c, s in zip(ds.factors[:, 0], ds.attribute_scores[:, 0])}
    expected = np.floor(ds.factors[:, 1] / 14 * 5 + 0.5)
    np.testing.assert_array_equal(ds.attribute_scores[:, 1], expected)


def test_image_size_option(tmp_path):
    ds = _build(tmp_path, n_images=20, image_size=32)
    assert ds.images.shape == (20, 32, 32, 3)


def test_deterministic_from_seed(tmp_path):
    a = _build(tmp_path / "a")
    b = _build(tmp_path / "b")
    np.testing.assert_array_equal(a.factors, b.factors)
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    c = _build(tmp_path / "c", seed=1)
    assert not np.array_equal(a.factors, c.factors)
    assert not np.array_equal(np.asarray(a.images), np.asarray(c.images))


def test_option_seed_overrides_context_seed(tmp_path):
    from_context = build_synthetic(SyntheticOptions(n_images=50), _context(tmp_path, seed=3))
    from_option = build_synthetic(SyntheticOptions(n_images=50, seed=3), _context(tmp_path, seed=0))
    np.testing.assert_array_equal(from_context.factors, from_option.factors)
    assert from_option.info["seed"] == 3


def test_marginals_are_uniform():
    options = SyntheticOptions(n_images=20000, factors=list(FACTOR_LEVELS),
                               correlations=[["object_hue", "scale", 0.7], ["floor_hue", "wall_hue", 0.6],
                                             ["shape", "position", -0.5], ["scale", "orientation", 0.5]])
    factors = sample_factors(options, seed=0)
    for k, name in enumerate(options.factors):
        counts = np.bincount(factors[:, k], minlength=FACTOR_LEVELS[name])
        assert len(counts) == FACTOR_LEVELS[name]
        assert scipy.stats.chisquare(counts).pvalue > 1e-3, (name, counts)


def test_configured_correlations_show_up():
    options = SyntheticOptions(n_images=20000)
    factors = sample_factors(options, seed=0)
    names = options.factors

    def rho(a: str, b: str) -> float:
        return scipy.stats.spearmanr(factors[:, names.index(a)], factors[:, names.index(b)]).statistic

    for parent, child, strength in options.correlations:
        assert np.sign(rho(parent, child)) == np.sign(strength)
        assert abs(rho(parent, child)) > 0.5 * abs(strength), (parent, child)
    assert any(s < 0 for _, _, s in options.correlations)
    assert abs(rho("object_hue", "position")) < 0.05
    assert abs(rho("floor_hue", "shape")) < 0.05


def test_children_of_correlated_parents_keep_uniform_marginals():
    # a -> b and both a, b -> c: the parents of c are correlated, so the copula must rescale.
    options = SyntheticOptions(n_images=20000, factors=["floor_hue", "wall_hue", "object_hue"],
                               correlations=[["floor_hue", "wall_hue", 0.8], ["floor_hue", "object_hue", 0.6],
                                             ["wall_hue", "object_hue", 0.6]])
    factors = sample_factors(options, seed=1)
    counts = np.bincount(factors[:, 2], minlength=10)
    assert scipy.stats.chisquare(counts).pvalue > 1e-3, counts


def test_true_impact_is_somers_d_and_asymmetric(tmp_path):
    ds = _build(tmp_path, n_images=3000)
    i, j = ds.attributes.index("shape"), ds.attributes.index("position")
    expected = scipy.stats.somersd(ds.attribute_scores[:, i], ds.attribute_scores[:, j]).statistic
    assert ds.true_impact[i, j] == pytest.approx(expected)
    # shape (4 levels) -> position (10 levels), negatively: ties on shape make the two directions differ.
    assert ds.true_impact[i, j] < -0.2 and ds.true_impact[j, i] < -0.2
    assert abs(ds.true_impact[i, j] - ds.true_impact[j, i]) > 0.01
    unrelated = ds.true_impact[ds.attributes.index("object_hue"), j]
    assert abs(unrelated) < 0.1


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    first = _build(tmp_path)
    files = list(tmp_path.glob("synthetic-*.npy"))
    assert len(files) == 1 and files[0].name == Path(first.info["cache_file"]).name
    assert len(files[0].stem.split("-")[1]) == 12
    assert not list(tmp_path.glob("*.tmp"))
    mtime = files[0].stat().st_mtime_ns

    def no_render(*args, **kwargs):
        raise AssertionError("the cached images should have been reused")

    monkeypatch.setattr(synthetic, "render", no_render)
    second = _build(tmp_path)
    assert files[0].stat().st_mtime_ns == mtime
    assert isinstance(second.images, np.memmap) and not second.images.flags.writeable
    np.testing.assert_array_equal(np.asarray(first.images), np.asarray(second.images))
    # Other options or another seed get their own file.
    with pytest.raises(AssertionError, match="reused"):
        _build(tmp_path, seed=5)


def test_factor_changes_change_the_right_pixels():
    names = ["floor_hue", "wall_hue", "object_hue", "scale", "orientation", "position", "shape"]
    base = np.array([2, 5, 0, 7, 7, 5, 0])
    image = render(base, names, 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8

    other_hue = base.copy()
    other_hue[2] = 5
    changed = (render(other_hue, names, 64) != image).any(-1)
    assert changed.sum() > 0.05 * 64 * 64          # the object is big enough to matter
    assert not changed[:20].any()                   # the top of the wall is untouched
    assert not changed[:, :4].any()                 # so are the far left ...
    assert not changed[:, -4:].any()                # ... and right edges

    other_wall = base.copy()
    other_wall[1] = 0
    changed = (render(other_wall, names, 64) != image).any(-1)
    assert changed[:30].all() and not changed[45:].any()   # wall above, floor below the horizon

    for k in (3, 4, 5, 6, 0):  # scale, orientation, position, shape, floor hue
        other = base.copy()
        other[k] = 1
        assert (render(other, names, 64) != image).any(-1).sum() > 20, names[k]


def test_the_window_is_a_two_level_factor_that_shows_on_the_wall_and_rests_absent():
    from gem_plugins.synthetic import RESTING_CLASS

    assert FACTOR_LEVELS["window"] == 2 and RESTING_CLASS["window"] == 0
    names = ["wall_hue", "window"]
    without, with_window = render(np.array([[3, 0], [3, 1]]), names, 64)
    changed = (without != with_window).any(-1)
    assert changed.sum() > 100
    rows, cols = np.nonzero(changed)
    assert rows.max() < 0.6 * 64 and cols.max() < 0.5 * 64  # on the wall, left of the middle
    np.testing.assert_array_equal(without, render(np.array([3]), ["wall_hue"], 64))


def test_render_fills_unlisted_factors_and_batches():
    classes = np.array([[0, 3], [9, 1], [4, 2]])
    batch = render(classes, ["object_hue", "shape"], 48)
    assert batch.shape == (3, 48, 48, 3)
    np.testing.assert_array_equal(batch[1], render(classes[1], ["object_hue", "shape"], 48))
    from gem_plugins.synthetic import RESTING_CLASS

    full = np.array([RESTING_CLASS[n] for n in FACTOR_LEVELS])  # the middle class, no window
    full[list(FACTOR_LEVELS).index("object_hue")] = 4
    full[list(FACTOR_LEVELS).index("shape")] = 2
    np.testing.assert_array_equal(batch[2], render(full, list(FACTOR_LEVELS), 48))


def test_unlisted_factors_are_fixed(tmp_path):
    ds = _build(tmp_path, n_images=200, factors=["object_hue", "shape"], correlations=[])
    # The wall and floor hues are fixed: the top-left and bottom-left pixels never change.
    assert (np.asarray(ds.images)[:, 0, 0] == ds.images[0, 0, 0]).all()
    assert (np.asarray(ds.images)[:, -1, 0] == ds.images[0, -1, 0]).all()
    assert ds.info["fixed_factors"]["floor_hue"] == 5


def test_unknown_factor_lists_allowed_names():
    with pytest.raises(ValueError) as err:
        SyntheticOptions(factors=["floor_hue", "colour"])
    message = str(err.value)
    assert "colour" in message
    for name in FACTOR_LEVELS:
        assert name in message


@pytest.mark.parametrize("correlations, match", [
    ([["floor_hue", "wall_hue", 0.5], ["wall_hue", "floor_hue", 0.5]], "cycle"),
    ([["floor_hue", "wall_hue", 0.5], ["wall_hue", "scale", 0.5], ["scale", "floor_hue", 0.5]], "cycle"),
    ([["floor_hue", "floor_hue", 0.5]], "self-loop"),
    ([["floor_hue", "scale", 0.8], ["wall_hue", "scale", 0.6]], "sum to"),
    ([["floor_hue", "scale", 1.0]], r"\(-1, 1\)"),
    ([["floor_hue", "orientation", 0.5]], "not among"),
    ([["floor_hue", "wall_hue"]], "parent, child, strength"),
    ([["floor_hue", "wall_hue", 0.3], ["floor_hue", "wall_hue", 0.2]], "twice"),
])
def test_invalid_correlations(correlations, match):
    with pytest.raises(ValueError, match=match):
        SyntheticOptions(correlations=correlations)


def test_registration():
    import pluggy

    from gem.hooks import PROJECT, specs
    from gem.plugins import Registry

    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(specs)
    pm.register(synthetic, name="synthetic")
    registration = Registry(pm).get("dataset", "synthetic")
    assert registration.factory is build_synthetic
    assert registration.options is SyntheticOptions
    assert registration.description


def test_strength_sets_every_edge_and_keeps_signs():
    from gem.somers_d import somers_d_matrix

    options = SyntheticOptions(n_images=4000, strength=0.9)
    assert options.edges() == [["object_hue", "scale", 0.9], ["floor_hue", "wall_hue", 0.9],
                               ["shape", "position", -0.9], ["wall_hue", "window", 0.9]]
    levels = np.array([FACTOR_LEVELS[name] for name in options.factors])

    def strongest(opts):
        d = somers_d_matrix(np.minimum(sample_factors(opts, 0) * 6 // levels, 5))
        return np.abs(d - np.diag(np.diag(d))).max()

    assert strongest(SyntheticOptions(n_images=4000, strength=0.0)) < 0.06
    assert strongest(SyntheticOptions(n_images=4000, strength=0.4)) < strongest(options)
    with pytest.raises(ValueError, match=r"strength must be in \[0.0, 0.99\]"):
        SyntheticOptions(strength=1.0)
    two_parents = [["object_hue", "scale", 0.1], ["floor_hue", "scale", 0.1]]
    with pytest.raises(ValueError, match="squared strengths into 'scale' sum to 1.62"):
        SyntheticOptions(correlations=two_parents, strength=0.9)
