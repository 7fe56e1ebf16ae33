"""Data set plugins on miniature copies of the published formats, the preprocessing cache,
correlated sampling, and every data set recipe validated and run end to end."""

from __future__ import annotations

import json
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

import gem.data as gdata
from data_fixtures import (BACKGROUND, CELEBA_SIZE, FACE_COLOURS, expected_face_box, shapes3d_labels,
                           write_celeba, write_dsprites, write_image_folder, write_lsun_lmdb, write_shapes3d)
from gem import hookimpl
from gem.data import (CORRELATION_PRESETS, MissingDataError, build_image_cache, cache_file,
                      plan_correlation)
from gem.interfaces import BuildContext, RelationOracle
from gem.plugins import Registry, make_plugin_manager
from gem.recipe import RecipeError, apply_overrides, load_recipe_file, validate_recipe
from gem_plugins import celeba, dsprites, image_folder, lsun, shapes3d
from gem.somers_d import somers_d_matrix
from gem_plugins.synthetic import attribute_scores

ROOT = Path(__file__).resolve().parents[1]

try:
    import lmdb  # noqa: F401
    HAVE_LMDB = True
except ImportError:
    HAVE_LMDB = False
needs_lmdb = pytest.mark.skipif(not HAVE_LMDB, reason="lmdb is not installed (pip install lmdb, the 'lmdb' extra)")
h5py = pytest.importorskip("h5py", reason="h5py is not installed (pip install h5py, the 'h5' extra)")


def make_registry(*extra) -> Registry:
    """Built-ins and installed entry points, plus ``extra`` plugins."""
    return Registry(make_plugin_manager(extra_plugins=extra))


def context(tmp_path: Path, seed: int = 0) -> BuildContext:
    return BuildContext(seed=seed, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache")


def colour_close(pixel, colour, tol=40) -> bool:
    return bool(np.abs(np.asarray(pixel, dtype=int) - np.asarray(colour, dtype=int)).max() <= tol)


# ---------------------------------------------------------------------------------------------
# The cache


def _gradient(i: int) -> np.ndarray:
    return np.full((8, 8, 3), (i * 10) % 250, dtype=np.uint8)


def test_image_cache_skips_lists_and_is_reused(tmp_path):
    sources = list(range(12))
    calls = []

    def load(i):
        calls.append(i)
        if i == 3:
            raise OSError("image file is truncated")
        if i == 7:
            return None
        return _gradient(i)

    path = cache_file(tmp_path, "toy", {"size": 8}, sources)
    images, kept, skipped = build_image_cache(path, sources, load, 8, desc="toy", names=[f"f{i}" for i in sources])
    assert images.shape == (10, 8, 8, 3) and not images.flags.writeable
    assert kept.tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10, 11]
    assert skipped == [("f3", "OSError: image file is truncated"), ("f7", "no image")]
    np.testing.assert_array_equal(images[:, 0, 0, 0], [i * 10 for i in kept])
    # The file on disk is a plain .npy of the kept rows only, with its sidecar; no temporary left.
    assert np.load(path).shape == (10, 8, 8, 3)
    assert json.loads(path.with_suffix(".json").read_text())["rows"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, path.with_suffix(".json").name])

    def explode(i):
        raise AssertionError("the cache must be reused, not rebuilt")

    again = build_image_cache(path, sources, explode, 8, desc="toy", names=[f"f{i}" for i in sources])
    np.testing.assert_array_equal(again.images, images)
    assert again.kept.tolist() == kept.tolist() and again.skipped == skipped
    assert sorted(calls) == sources


def test_image_cache_copies_when_the_header_shrinks(tmp_path):
    # Force the rare path where the shorter shape needs a shorter header: rows are copied.
    path = tmp_path / "c.npy"
    writer = gdata._RowWriter(path, 5, (8, 8, 3))
    writer.offset += 64  # pretend the new header no longer has the old length
    for i in range(3):
        writer.write([i], _gradient(i + 1)[None])
    writer.finish(3)
    out = np.load(path)
    assert out.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(out[:, 0, 0, 0], [10, 20, 30])
    assert [p.name for p in tmp_path.iterdir()] == ["c.npy"]


def test_row_writer_writes_rows_in_any_order_without_a_memmap(tmp_path):
    path = tmp_path / "r.npy"
    writer = gdata._RowWriter(path, 4, (8, 8, 3))
    assert not hasattr(writer, "array")  # plain file writes: filled pages never count in the RSS
    writer.write([3, 1], np.stack([_gradient(3), _gradient(1)]))
    writer.write([0, 2], np.stack([_gradient(0), _gradient(2)]))
    writer.finish(4)
    np.testing.assert_array_equal(np.load(path)[:, 0, 0, 0], [0, 10, 20, 30])


def test_image_cache_workers_keep_source_order(tmp_path):
    sources = list(range(40))
    images, kept, _ = build_image_cache(tmp_path / "w.npy", sources, _gradient, 8, workers=3)
    np.testing.assert_array_equal(images[:, 0, 0, 0], (np.arange(40) * 10) % 250)


def test_image_cache_with_nothing_readable_is_an_error_and_caches_nothing(tmp_path):
    def broken(i):
        raise OSError("bad")

    with pytest.raises(MissingDataError, match="none of the 3 images could be read"):
        build_image_cache(tmp_path / "x.npy", [0, 1, 2], broken, 8, dataset="toy")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MissingDataError, match="no images"):
        build_image_cache(tmp_path / "x.npy", [], broken, 8)


def test_cache_file_changes_with_sources_and_options(tmp_path):
    a = cache_file(tmp_path, "p", {"size": 64}, ["a", "b"])
    assert a == cache_file(tmp_path, "p", {"size": 64}, ["a", "b"])
    assert a != cache_file(tmp_path, "p", {"size": 32}, ["a", "b"])
    assert a != cache_file(tmp_path, "p", {"size": 64}, ["a", "c"])


# ---------------------------------------------------------------------------------------------
# CelebA


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("celeba")
    return root, write_celeba(root, n=40)


def test_face_box_formula_by_hand():
    # eyes (70,110), (108,110); mouth corners (74,150), (104,150): centre (89, 130),
    # spread max(38, 40) = 40, side 3 * 40 = 120 -> (29, 70, 149, 190).
    row = (70, 110, 108, 110, 89, 130, 74, 150, 104, 150)
    assert celeba.face_box(row, 178, 218) == pytest.approx((29, 70, 149, 190))
    # Near a corner the box is shifted inside, keeping its size.
    assert celeba.face_box((10, 20, 48, 20, 0, 0, 14, 60, 44, 60), 178, 218) == pytest.approx((0, 0, 120, 120))
    # Larger than the image: clamped to the shorter side.
    assert celeba.face_box(row, 178, 218, scale=9) == pytest.approx((0, 40, 178, 218))


def test_celeba_crop_lands_on_the_landmark_face(celeba_root, tmp_path):
    root, truth = celeba_root
    ds = celeba.build_celeba(celeba.CelebAOptions(root=str(root), image_size=32), context(tmp_path))
    assert ds.images.shape == (40, 32, 32, 3) and ds.images.dtype == np.uint8
    for i in (0, 2, 17):  # 2 lies near the corner: its box was shifted inside the image
        img = ds.images[i]
        for (y, x), colour in zip([(6, 6), (6, 25), (25, 6), (25, 25)], FACE_COLOURS):
            assert colour_close(img[y, x], colour), (i, y, x, img[y, x], colour)
        # No background at the borders: the crop is exactly the face square.
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        assert not any(colour_close(p, BACKGROUND, 20) for p in border)
    assert expected_face_box(truth["landmarks"][2], *CELEBA_SIZE)[:2] == (0, 0)


def test_celeba_labels_aliases_and_negation(celeba_root, tmp_path):
    root, truth = celeba_root
    attrs = ["Gender", "Beard", "Blond", "Makeup", "not Smiling", "~Young", "Bangs", "Bald", "Heavy Makeup"]
    ds = celeba.build_celeba(celeba.CelebAOptions(root=str(root), attributes=attrs, image_size=32),
                             context(tmp_path))
    col = {name: k for k, name in enumerate(celeba.ATTRIBUTES)}
    pos = truth["labels"] > 0
    expected = np.stack([pos[:, col["Male"]], ~pos[:, col["No_Beard"]], pos[:, col["Blond_Hair"]],
                         pos[:, col["Heavy_Makeup"]], ~pos[:, col["Smiling"]], ~pos[:, col["Young"]],
                         pos[:, col["Bangs"]], pos[:, col["Bald"]], pos[:, col["Heavy_Makeup"]]], axis=1)
    np.testing.assert_array_equal(ds.factors, expected.astype(int))
    np.testing.assert_array_equal(ds.attribute_scores, expected * 5)
    assert ds.attributes == attrs and ds.factor_names == attrs and ds.factor_levels == [2] * len(attrs)
    np.testing.assert_allclose(ds.true_impact, somers_d_matrix(expected.astype(int) * 5))
    assert ds.info["attribute_columns"]["Beard"] == "not No_Beard"
    assert ds.info["attribute_columns"]["~Young"] == "not Young"


def test_celeba_split_and_max_images(celeba_root, tmp_path):
    root, truth = celeba_root
    ctx = context(tmp_path)
    test = celeba.build_celeba(celeba.CelebAOptions(root=str(root), split="test", image_size=32), ctx)
    assert len(test) == 6
    col = celeba.ATTRIBUTES.index("Bangs")
    np.testing.assert_array_equal(test.factors[:, 0], truth["labels"][-6:, col] > 0)
    valid = celeba.build_celeba(celeba.CelebAOptions(root=str(root), split="valid", image_size=32), ctx)
    train = celeba.build_celeba(celeba.CelebAOptions(root=str(root), split="train", max_images=5, image_size=32), ctx)
    assert len(valid) == 4 and len(train) == 5
    full = celeba.build_celeba(celeba.CelebAOptions(root=str(root), image_size=32), ctx)
    np.testing.assert_array_equal(train.images, full.images[:5])


def test_celeba_cache_is_reused(celeba_root, tmp_path, monkeypatch):
    root, _ = celeba_root
    opts = celeba.CelebAOptions(root=str(root), image_size=32, max_images=10)
    first = celeba.build_celeba(opts, context(tmp_path))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again: the cache was not reused")

    monkeypatch.setattr(celeba, "open_rgb", no_decoding)
    second = celeba.build_celeba(opts, context(tmp_path))
    np.testing.assert_array_equal(first.images, second.images)
    assert second.info["cache_file"] == first.info["cache_file"]


def test_celeba_skips_unreadable_and_missing_images(tmp_path):
    root = tmp_path / "celeba"
    write_celeba(root, n=12)
    (root / celeba.IMAGE_DIR / "000004.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / celeba.IMAGE_DIR / "000009.jpg").unlink()
    ds = celeba.build_celeba(celeba.CelebAOptions(root=str(root), image_size=32), context(tmp_path))
    assert len(ds) == 10 and ds.info["skipped_images"] == 2
    assert ds.info["skipped_files"][0].startswith("000004.jpg: ")
    assert ds.info["skipped_files"][1] == "000009.jpg: file not found"
    assert ds.factors.shape == (10, 6)


def test_celeba_kaggle_nesting_is_found(tmp_path):
    root = tmp_path / "celeba"
    write_celeba(root, n=6)
    flat = root / celeba.IMAGE_DIR
    nested = root / "tmp_move"
    flat.rename(nested)
    flat.mkdir()
    nested.rename(flat / celeba.IMAGE_DIR)
    ds = celeba.build_celeba(celeba.CelebAOptions(root=str(root), image_size=32), context(tmp_path))
    assert len(ds) == 6 and ds.info["skipped_images"] == 0


def test_celeba_missing_files_are_listed(tmp_path):
    with pytest.raises(MissingDataError) as err:
        celeba.build_celeba(celeba.CelebAOptions(root=str(tmp_path / "nowhere"), split="train"), context(tmp_path))
    message = str(err.value)
    for name in ("img_align_celeba", "list_attr_celeba.txt", "list_landmarks_align_celeba.txt",
                 "list_eval_partition.txt", str(tmp_path / "nowhere")):
        assert name in message
    assert isinstance(err.value, FileNotFoundError)


@pytest.mark.parametrize("kwargs, message", [
    ({"attributes": ["Moustache"]}, "unknown attribute 'Moustache'"),
    ({"attributes": []}, "must not be empty"),
    ({"max_images": 0}, "max_images"),
    ({"image_size": 8}, "image_size"),
    ({"crop_scale": 0.1}, "crop_scale"),
    ({"workers": 0}, "workers"),
])
def test_celeba_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        celeba.CelebAOptions(**kwargs)


# ---------------------------------------------------------------------------------------------
# LSUN


COLOURS = [(220, 20, 20), (20, 220, 20), (20, 20, 220), (220, 220, 20)]


@needs_lmdb
def test_lsun_lmdb_centre_crop_and_corrupt_value(tmp_path):
    keys = write_lsun_lmdb(tmp_path / "lsun" / "horse", COLOURS)
    ds = lsun.build_lsun(lsun.LSUNOptions(root=str(tmp_path / "lsun"), category="horse", image_size=32),
                         context(tmp_path))
    assert len(keys) == 4 and ds.images.shape == (4, 32, 32, 3)
    for img, colour in zip(ds.images, COLOURS):          # LMDB key order = written order here
        assert colour_close(img[16, 16], colour)
        assert colour_close(img[2, 2], (0, 0, 0), 30) and colour_close(img[29, 29], (0, 0, 0), 30)
    assert ds.info["skipped_images"] == 1
    assert ds.info["skipped_files"][0].startswith("zz-corrupt: ")
    assert ds.attributes == lsun.DEFAULT_ATTRIBUTES["horse"]
    assert ds.attribute_scores is None and ds.factors is None and ds.true_impact is None


@needs_lmdb
def test_lsun_scene_lmdb_name_and_max_images(tmp_path):
    write_lsun_lmdb(tmp_path / "bedroom_train_lmdb", COLOURS)
    ds = lsun.build_lsun(lsun.LSUNOptions(root=str(tmp_path), category="bedroom", max_images=2, image_size=32),
                         context(tmp_path))
    assert len(ds) == 2 and ds.info["source"].startswith("lmdb: ")


def test_lsun_image_folder_layout(tmp_path):
    from data_fixtures import scene

    folder = tmp_path / "horse" / "sub"
    folder.mkdir(parents=True)
    for i, colour in enumerate(COLOURS[:3]):
        scene(90, 60, colour).save(folder / f"{i}.png")
    ds = lsun.build_lsun(lsun.LSUNOptions(root=str(tmp_path), category="horse", image_size=32,
                                          attributes=["Rider"], source="folder"), context(tmp_path))
    assert ds.attributes == ["Rider"] and len(ds) == 3
    for img, colour in zip(ds.images, COLOURS):
        assert colour_close(img[16, 16], colour)


def test_lsun_missing_data_lists_both_layouts(tmp_path):
    with pytest.raises(MissingDataError) as err:
        lsun.build_lsun(lsun.LSUNOptions(root=str(tmp_path), category="bedroom"), context(tmp_path))
    message = str(err.value)
    assert "bedroom_train_lmdb/data.mdb" in message and str(tmp_path / "bedroom") in message


def test_lsun_needs_attributes_for_an_unknown_category():
    with pytest.raises(ValueError, match="give the attributes"):
        lsun.LSUNOptions(category="church_outdoor")
    assert lsun.LSUNOptions(category="church_outdoor", attributes=["Tower"]).attributes == ["Tower"]


def _block_import(monkeypatch, blocked: str) -> None:
    import builtins

    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == blocked:
            raise ImportError(f"No module named {blocked!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_lsun_lmdb_missing_package_message(monkeypatch):
    _block_import(monkeypatch, "lmdb")
    with pytest.raises(ImportError, match="pip install lmdb"):
        lsun._lmdb()


# ---------------------------------------------------------------------------------------------
# Shapes3D


@pytest.fixture(scope="module")
def shapes3d_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("shapes3d") / "3dshapes.h5"
    return path, write_shapes3d(path, n=300)


def test_shapes3d_images_factors_and_scores(shapes3d_file, tmp_path):
    path, truth = shapes3d_file
    ds = shapes3d.build_shapes3d(shapes3d.Shapes3DOptions(root=str(path.parent)), context(tmp_path, seed=5))
    order = gdata.shuffled_subset(300, None, 5)
    assert ds.images.shape == (300, 64, 64, 3)
    np.testing.assert_array_equal(ds.images, truth["images"][order])
    np.testing.assert_array_equal(ds.factors, truth["classes"][order])
    assert ds.factor_names == list(shapes3d.FACTOR_LEVELS) and ds.factor_levels == [10, 10, 10, 8, 4, 15]
    np.testing.assert_array_equal(ds.attribute_scores, attribute_scores(ds.factors, ds.factor_names))
    np.testing.assert_allclose(ds.true_impact, somers_d_matrix(ds.attribute_scores))
    assert ds.sample_weights is None


def test_shapes3d_subset_factor_choice_and_resize(shapes3d_file, tmp_path):
    path, truth = shapes3d_file
    opts = shapes3d.Shapes3DOptions(root=str(path), factors=["shape", "scale"], max_images=50, image_size=32, seed=1)
    ds = shapes3d.build_shapes3d(opts, context(tmp_path))
    order = gdata.shuffled_subset(300, 50, 1)
    assert ds.images.shape == (50, 32, 32, 3) and ds.attributes == ["shape", "scale"]
    np.testing.assert_array_equal(ds.factors, truth["classes"][order][:, [4, 3]])
    # Resized from the same pictures: the mean colour barely moves.
    np.testing.assert_allclose(ds.images.mean(axis=(1, 2)), truth["images"][order].mean(axis=(1, 2)), atol=4)


def test_shapes3d_label_values_to_classes():
    classes = np.array([[0, 9, 3, 7, 2, 14], [5, 1, 3, 0, 0, 7]])
    np.testing.assert_array_equal(shapes3d.label_classes(shapes3d_labels(classes)), classes)
    with pytest.raises(ValueError, match="published"):
        shapes3d.label_classes(shapes3d_labels(classes) + 0.05)


def test_shapes3d_missing_file_and_h5py_message(tmp_path, monkeypatch):
    with pytest.raises(MissingDataError, match="3dshapes.h5") as err:
        shapes3d.build_shapes3d(shapes3d.Shapes3DOptions(root=str(tmp_path)), context(tmp_path))
    assert str(tmp_path / "3dshapes.h5") in str(err.value)
    _block_import(monkeypatch, "h5py")
    with pytest.raises(ImportError, match="pip install h5py"):
        shapes3d._h5py()


def test_shapes3d_correlated_sampling(shapes3d_file, tmp_path):
    path, _ = shapes3d_file
    opts = shapes3d.Shapes3DOptions(root=str(path.parent), correlation="strong",
                                    correlated_pairs=[["object_hue", "scale"], ["floor_hue", "wall_hue", "inverse"]])
    ds = shapes3d.build_shapes3d(opts, context(tmp_path))
    w = ds.sample_weights
    assert w.shape == (300,) and np.isclose(w.sum(), 1) and (w > 0).all()
    levels = np.array(ds.factor_levels) - 1
    c = ds.factors / levels
    expected = correlated_weights(c, [(2, 3), (0, 1, "inverse")], 0.04)
    np.testing.assert_allclose(w, expected / expected.sum(), rtol=1e-9)
    assert ds.info["correlation"] == "strong" and ds.info["correlation_sigma"] == 0.04
    assert ds.info["correlated_pairs"][0].startswith("object_hue ~ scale")
    assert ds.info["correlated_pairs"][1].startswith("floor_hue ~ 1 - wall_hue")
    np.testing.assert_allclose(ds.true_impact, somers_d_matrix(ds.attribute_scores, weights=w))


# ---------------------------------------------------------------------------------------------
# dSprites


@pytest.fixture(scope="module")
def dsprites_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dsprites") / dsprites.FILE_NAME
    return path, write_dsprites(path, n=300)


def test_dsprites_images_factors_and_scores(dsprites_file, tmp_path):
    path, truth = dsprites_file
    ds = dsprites.build_dsprites(dsprites.DSpritesOptions(root=str(path.parent), max_images=120),
                                 context(tmp_path, seed=2))
    order = gdata.shuffled_subset(300, 120, 2)
    assert ds.images.shape == (120, 64, 64, 3)
    np.testing.assert_array_equal(ds.images, np.repeat(truth["imgs"][order][..., None] * 255, 3, axis=-1))
    np.testing.assert_array_equal(ds.factors, truth["classes"][order][:, 1:])
    assert ds.factor_names == ["shape", "scale", "orientation", "posX", "posY"]
    assert ds.factor_levels == [3, 6, 40, 32, 32]
    np.testing.assert_array_equal(ds.attribute_scores,
                                  np.floor(ds.factors / (np.array(ds.factor_levels) - 1) * 5 + 0.5))


def test_a_factor_grid_measures_disentanglement_on_its_uniform_images(dsprites_file, tmp_path):
    # Correlated sampling changes what training draws, not the images: drawn uniformly, their
    # factors are as independent as the grid's.
    path, _ = dsprites_file
    ds = dsprites.build_dsprites(dsprites.DSpritesOptions(root=str(path.parent), correlation="strong"),
                                 context(tmp_path))
    assert ds.sample_weights is not None
    source, rows = ds.independent_sample(100, 3)
    assert source is ds
    np.testing.assert_array_equal(rows, gdata.uniform_rows(len(ds), 100, 3))
    assert len(np.unique(rows)) == 100
    source, rows = ds.independent_sample(10_000, 3)
    np.testing.assert_array_equal(rows, np.arange(len(ds)))


def test_dsprites_streams_in_blocks(dsprites_file, tmp_path, monkeypatch):
    path, truth = dsprites_file
    blocks = list(dsprites.iter_npz_rows(path, "imgs", block=64))
    assert [start for start, _ in blocks] == [0, 64, 128, 192, 256]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), truth["imgs"])


def test_dsprites_missing_file(tmp_path):
    with pytest.raises(MissingDataError, match=dsprites.FILE_NAME):
        dsprites.build_dsprites(dsprites.DSpritesOptions(root=str(tmp_path)), context(tmp_path))


# ---------------------------------------------------------------------------------------------
# Image folder


def test_image_folder_with_csv_skips_corrupt_and_maps_binary(tmp_path):
    truth = write_image_folder(tmp_path / "imgs")
    ds = image_folder.build_image_folder(
        image_folder.ImageFolderOptions(root=str(tmp_path / "imgs"), attributes_csv="attributes.csv", image_size=32),
        context(tmp_path))
    kept = ["a/one.png", "a/two.jpg", "b/c/three.webp", "four.PNG", "five.bmp"]
    assert len(ds) == 5 and ds.attributes == ["Smiling", "Brightness", "Glasses"]
    for img, name in zip(ds.images, kept):
        assert colour_close(img[16, 16], truth["colours"][name])
    np.testing.assert_array_equal(ds.attribute_scores, [[0, 5, 5], [5, 3, 0], [0, 0, 5], [5, 5, 0], [0, 3, 5]])
    np.testing.assert_array_equal(ds.factors[:, 0], [0, 1, 0, 1, 0])   # binary columns keep 0/1
    assert ds.factor_levels == [2, 6, 2]
    assert ds.info["skipped_images"] == 3
    skipped = ds.info["skipped_files"]
    assert skipped[0].startswith("broken.jpg: ") and skipped[1] == "missing.png: file not found"
    assert skipped[2].startswith("notes.png: not a readable image")
    np.testing.assert_allclose(ds.true_impact, somers_d_matrix(ds.attribute_scores))


def test_image_folder_without_csv(tmp_path):
    write_image_folder(tmp_path / "imgs")
    ds = image_folder.build_image_folder(
        image_folder.ImageFolderOptions(root=str(tmp_path / "imgs"), attributes=["Red"], image_size=32),
        context(tmp_path))
    assert len(ds) == 5 and ds.info["source_images"] == 7 and ds.attribute_scores is None
    assert {s.split(":")[0] for s in ds.info["skipped_files"]} == {"broken.jpg", "notes.png"}


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="give attributes"):
        image_folder.ImageFolderOptions(root="x")
    with pytest.raises(MissingDataError, match="does not exist"):
        image_folder.build_image_folder(image_folder.ImageFolderOptions(root=str(tmp_path / "no"), attributes=["a"]),
                                        context(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingDataError, match="no images found"):
        image_folder.build_image_folder(image_folder.ImageFolderOptions(root=str(tmp_path / "empty"), attributes=["a"]),
                                        context(tmp_path))
    (tmp_path / "empty" / "bad.csv").write_text("file,a\nx.png,7\n")
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        image_folder.build_image_folder(image_folder.ImageFolderOptions(root=str(tmp_path / "empty"),
                                                                        attributes_csv="bad.csv"), context(tmp_path))


# ---------------------------------------------------------------------------------------------
# Correlated sampling


def correlated_weights(c: np.ndarray, pairs, sigma: float) -> np.ndarray:
    """The closed form: prod over pairs exp(-(c_i - c_j)^2 / (2 sigma^2)), c_j -> 1 - c_j when inverse."""
    w = np.ones(len(c))
    for pair in pairs:
        target = 1 - c[:, pair[1]] if len(pair) > 2 else c[:, pair[1]]
        w *= np.exp(-(c[:, pair[0]] - target) ** 2 / (2 * sigma ** 2))
    return w


def test_sampling_probabilities_by_hand():
    c = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.5], [0.5, 0.25, 0.0]])
    sigma = 0.5
    p = gdata.sampling_probabilities(c, [(0, 1), (1, 2, "inverse")], sigma)
    # image 0: exp(-(0-0)^2/0.5) * exp(-(0-(1-1))^2/0.5) = 1
    # image 1: exp(-1/0.5) * exp(-(1-0.5)^2/0.5) = exp(-2) * exp(-0.5)
    # image 2: exp(-0.0625/0.5) * exp(-(0.25-1)^2/0.5) = exp(-0.125) * exp(-1.125)
    w = np.array([1.0, np.exp(-2.5), np.exp(-1.25)])
    np.testing.assert_allclose(p, w / w.sum())
    np.testing.assert_allclose(correlated_weights(c, [(0, 1), (1, 2, "inverse")], sigma), w)
    np.testing.assert_allclose(gdata.sampling_probabilities(c, [], sigma), 1 / 3)
    p = gdata.sampling_probabilities(c, [(0, 1)], 0.001)  # would underflow without log space
    assert np.isfinite(p).all() and np.isclose(p.sum(), 1)


def _grid(levels=(10, 10, 4)):
    mesh = np.meshgrid(*[np.arange(k) for k in levels], indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1), list(levels)


@dataclass
class _Corr:
    correlation: object = None
    correlated_pairs: list = None
    sigma: object = None
    confounder: object = None

    def __post_init__(self):
        self.correlated_pairs = self.correlated_pairs or []


@pytest.mark.parametrize("preset", ["weak", "medium", "strong"])
def test_presets_make_the_sampled_pair_correlated(preset):
    classes, levels = _grid()
    names = ["a", "b", "c"]
    plan = plan_correlation(_Corr(correlation=preset), names, default_pairs=[["a", "b"]])
    assert plan.sigma == CORRELATION_PRESETS[preset] and plan.pairs == ((0, 1, False),)
    rng = np.random.default_rng(0)
    drawn = classes[rng.choice(len(classes), size=4000, p=plan.probabilities(classes, levels))]
    uniform = classes[rng.choice(len(classes), size=4000)]
    rho = spearmanr(drawn[:, 0], drawn[:, 1]).statistic
    assert abs(spearmanr(uniform[:, 0], uniform[:, 1]).statistic) < 0.06
    assert abs(spearmanr(drawn[:, 0], drawn[:, 2]).statistic) < 0.06     # an unpaired factor stays free
    assert rho > {"weak": 0.2, "medium": 0.8, "strong": 0.95}[preset]


def test_inverse_pair_and_confounder():
    classes, levels = _grid()
    names = ["a", "b", "c"]
    rng = np.random.default_rng(1)
    inv = plan_correlation(_Corr(correlated_pairs=[["a", "b", "inverse"]], sigma=0.1), names)
    drawn = classes[rng.choice(len(classes), 3000, p=inv.probabilities(classes, levels))]
    assert spearmanr(drawn[:, 0], drawn[:, 1]).statistic < -0.8
    conf = plan_correlation(_Corr(correlation="confounder", confounder="c"), names)
    assert conf.pairs == ((2, 0, False), (2, 1, False)) and conf.sigma == 0.1
    drawn = classes[rng.choice(len(classes), 3000, p=conf.probabilities(classes, levels))]
    assert spearmanr(drawn[:, 2], drawn[:, 0]).statistic > 0.5 and spearmanr(drawn[:, 2], drawn[:, 1]).statistic > 0.5
    assert plan_correlation(_Corr(), names) is None


@pytest.mark.parametrize("kwargs, message", [
    ({"correlated_pairs": [["floor_hue", "nope"]]}, "unknown factor 'nope'"),
    ({"correlated_pairs": [["scale", "scale"]]}, "itself"),
    ({"correlated_pairs": [["scale", "shape", "backwards"]]}, "inverse"),
    ({"correlated_pairs": [["scale", "shape"], ["shape", "scale"]]}, "paired twice"),
    ({"correlation": "strong", "sigma": 0.0}, "sigma"),
    ({"sigma": 0.2}, "nothing is correlated"),
    ({"confounder": "colour"}, "unknown confounder"),
    ({"max_images": 0}, "max_images"),
    ({"factors": ["hue"]}, "unknown factor"),
    ({"image_size": 4}, "image_size"),
])
def test_factor_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        shapes3d.Shapes3DOptions(**kwargs)


def test_recipe_errors_name_the_key():
    registry = make_registry()
    data = {"dataset": {"plugin": "shapes3d", "correlation": "extreme"}}
    with pytest.raises(RecipeError, match="dataset.correlation.*'weak'"):
        validate_recipe(data, registry)
    with pytest.raises(RecipeError, match="dataset.*scale"):
        validate_recipe({"dataset": {"plugin": "dsprites", "correlated_pairs": [["scale", "colour"]]}}, registry)


# ---------------------------------------------------------------------------------------------
# Recipes


RECIPES = ["celeba", "lsun_horse", "lsun_bedroom", "shapes3d", "dsprites"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates(name):
    recipe = validate_recipe(load_recipe_file(ROOT / "recipes" / f"{name}.yaml"), make_registry())
    assert recipe.name == name
    text = (ROOT / "recipes" / f"{name}.yaml").read_text()
    assert "data/" in text and "docs/datasets.md" in text    # says where the data go
    if name == "celeba":
        opts = recipe.plugin_options["dataset"]
        assert [celeba.resolve_attribute(a) for a in opts.attributes] == [
            ("Bangs", False), ("Bald", False), ("Male", False), ("No_Beard", True),
            ("Blond_Hair", False), ("Heavy_Makeup", False)]
        assert recipe.plugin_options["extractor"].lr == 1e-4 and recipe.training.batch_size == 32
        assert recipe.plugin_options["oracle"].model == "gpt-4o"


TINY = ["training.steps=4", "training.warmup_steps=2", "training.batch_size=8", "training.log_every=2",
        "training.cpu=true", "training.threads=1", "extractor.channels=8", "extractor.hidden=32", "extractor.image_size=32",
        "dataset.image_size=32", "scoring.n_images=24", "scoring.batch_size=24", "evaluation.n_images=8",
        "evaluation.traversal_steps=3", "ranker.bootstrap=10"]


class _BrightnessOracle(RelationOracle):
    """A stand-in MLLM for the label-free LSUN recipe: every attribute scored by brightness."""

    cache_key = "test-brightness"

    def __init__(self, options, context):
        pass

    def score(self, images, indices, attributes):
        level = np.clip(np.asarray(images).mean(axis=(1, 2, 3)) / 255 * 5, 0, 5).round()
        return np.repeat(level[:, None], len(attributes), axis=1)


_brightness_plugin = types.SimpleNamespace(gem_register_oracles=hookimpl(
    lambda register: register("test_brightness", _BrightnessOracle)))


def _run(name: str, root: Path, tmp_path: Path, oracle: dict, extra=(), registry=None) -> dict:
    from gem.pipeline import run_recipe

    data = load_recipe_file(ROOT / "recipes" / f"{name}.yaml")
    data["oracle"] = oracle
    data = apply_overrides(data, [*TINY, f"dataset.root={root}", f"cache_dir={tmp_path / 'cache'}", *extra])
    registry = registry or make_registry()
    recipe = validate_recipe(data, registry)
    result = run_recipe(recipe, registry, tmp_path / "run")
    assert (result.run_dir / "report.html").is_file()
    return json.loads((result.run_dir / "metrics.json").read_text())


def test_celeba_recipe_runs_end_to_end(celeba_root, tmp_path):
    root, _ = celeba_root
    metrics = _run("celeba", root, tmp_path, {"plugin": "labels"})
    assert metrics["oracle"]["images_scored"] == 24 and metrics["oracle"]["missing_scores"] == 0
    assert "oracle_vs_true" in metrics["relations"] and "spearman_mcc" in metrics["disentanglement"]["exogenous"]


def test_shapes3d_recipe_runs_end_to_end(shapes3d_file, tmp_path):
    path, _ = shapes3d_file
    metrics = _run("shapes3d", path.parent, tmp_path, {"plugin": "labels"},
                   ["dataset.max_images=80", "dataset.correlation=strong"])
    assert metrics["oracle"]["images_scored"] == 24 and "oracle_vs_true" in metrics["relations"]


def test_dsprites_recipe_runs_end_to_end(dsprites_file, tmp_path):
    path, _ = dsprites_file
    metrics = _run("dsprites", path.parent, tmp_path, {"plugin": "labels"}, ["dataset.max_images=80"])
    assert metrics["oracle"]["images_scored"] == 24 and "spearman_mcc" in metrics["disentanglement"]["exogenous"]


@needs_lmdb
def test_lsun_recipe_runs_end_to_end(tmp_path):
    colours = [tuple(int(v) for v in np.random.default_rng(i).integers(0, 256, 3)) for i in range(40)]
    write_lsun_lmdb(tmp_path / "lsun" / "horse", colours)
    metrics = _run("lsun_horse", tmp_path / "lsun", tmp_path, {"plugin": "test_brightness"},
                   registry=make_registry(_brightness_plugin))
    assert metrics["oracle"]["images_scored"] == 24 and "oracle_vs_true" not in metrics["relations"]
