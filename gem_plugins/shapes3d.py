"""The ``shapes3d`` data set: DeepMind's 3dshapes (Burgess & Kim, 2018) from ``3dshapes.h5``.

480,000 renders of an object in a room, 64x64 RGB, every combination of six factors:
floor_hue (10), wall_hue (10), object_hue (10), scale (8), shape (4), orientation (15), in
row-major order. The file holds ``images`` (480000, 64, 64, 3) uint8 and ``labels``
(480000, 6) float64 factor values. It is read lazily with h5py (optional ``h5`` extra) in blocks
and copied once into the memory-mapped cache in a seeded random order: the file itself is sorted
by factors, and the pipeline scores the first images and evaluates on the last ones.
Optional correlated sampling (Träuble et al., 2021; Roth et al., 2023) ties factor pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gem import hookimpl
from gem.data import FactorDataOptions, MissingDataError, shuffled_subset
from gem.data_download import SOURCES, download_command
from gem.errors import DataError, MissingDependencyError
from gem.interfaces import BuildContext, ImageDataset
from gem_plugins.factor_grid import factor_grid_dataset

#: The factors in the column order of ``labels``, with their number of values.
FACTOR_LEVELS: dict[str, int] = {
    "floor_hue": 10, "wall_hue": 10, "object_hue": 10, "scale": 8, "shape": 4, "orientation": 15,
}

#: The published factor values (used when a file does not hold every value of a factor).
FACTOR_VALUES: dict[str, np.ndarray] = {
    "floor_hue": np.linspace(0.0, 1.0, 10, endpoint=False),
    "wall_hue": np.linspace(0.0, 1.0, 10, endpoint=False),
    "object_hue": np.linspace(0.0, 1.0, 10, endpoint=False),
    "scale": np.linspace(0.75, 1.25, 8),
    "shape": np.arange(4, dtype=np.float64),
    "orientation": np.linspace(-30.0, 30.0, 15),
}

#: The published file, as gem data downloads it (one table of names, addresses and checksums).
FILE_NAME = SOURCES["shapes3d"].files[0].name
N_IMAGES = 480_000
URL = SOURCES["shapes3d"].files[0].url

#: Pair correlated by a bare preset (``correlation: strong``) when no pair is named.
DEFAULT_PAIRS: list[list[str]] = [["object_hue", "scale"]]

_CHUNK = 2048


def _all_factors() -> list[str]:
    return list(FACTOR_LEVELS)


@dataclass
class Shapes3DOptions(FactorDataOptions):
    """Recipe options of the ``shapes3d`` data set (see :class:`gem.data.FactorDataOptions`).

    factors default to all six; there are 480,000 images; a bare correlation preset correlates
    ``object_hue`` and ``scale``, and ``correlation: confounder`` ties ``floor_hue`` to all others
    unless ``confounder`` names another factor.
    """

    root: str = "data/shapes3d"
    factors: list[str] = field(default_factory=_all_factors)

    def __post_init__(self) -> None:
        self.check("shapes3d", FACTOR_LEVELS, N_IMAGES, FILE_NAME)


def _h5py():
    try:
        import h5py
    except ImportError:
        raise MissingDependencyError("the shapes3d data set reads 3dshapes.h5 with h5py, which is not installed: "
                                     "pip install h5py (or pip install 'gem-disentangle[h5]')") from None
    return h5py


def resolve_file(root: str) -> Path:
    """``root`` itself when it is a file, else ``root/3dshapes.h5``; MissingDataError if absent."""
    path = Path(root).expanduser()
    target = path if path.is_file() else path / FILE_NAME
    if not target.is_file():
        raise MissingDataError(
            "shapes3d", path, [f"{path / FILE_NAME}  (HDF5: 'images' {N_IMAGES}x64x64x3 uint8, "
                               f"'labels' {N_IMAGES}x6 float64)"],
            hint=f"download {URL} into that folder (see docs/datasets.md)", fix=download_command("shapes3d", root))
    return target


def label_classes(labels: np.ndarray) -> np.ndarray:
    """Factor values (N, 6) to class indices 0..levels-1 (N, 6), column order of FACTOR_LEVELS.

    A column that holds every published value is ranked with ``np.unique``/``searchsorted``;
    a column that holds only some (a subset file) is matched to the published values.
    """
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 2 or labels.shape[1] != len(FACTOR_LEVELS):
        raise DataError(f"shapes3d: 'labels' must have shape (N, 6), got {labels.shape}")
    classes = np.empty(labels.shape, dtype=np.int64)
    for k, (name, levels) in enumerate(FACTOR_LEVELS.items()):
        column = labels[:, k]
        values = np.unique(column)
        if len(values) == levels:
            classes[:, k] = np.searchsorted(values, column)
            continue
        grid = FACTOR_VALUES[name]
        nearest = np.abs(column[:, None] - grid[None, :]).argmin(axis=1)
        if np.abs(grid[nearest] - column).max() > 1e-3:
            raise DataError(f"shapes3d: column {k} ({name}) of 'labels' has {len(values)} distinct values that "
                            f"do not match the published {levels} values {np.round(grid, 3).tolist()}")
        classes[:, k] = nearest
    return classes


def _read_blocks(path: Path, order: np.ndarray):
    """(cache rows, images) blocks read from the file in ascending row order."""
    h5py = _h5py()
    by_source = np.argsort(order, kind="stable")
    with h5py.File(path, "r") as f:
        images = f["images"]
        for start in range(0, len(order), _CHUNK):
            rows = by_source[start:start + _CHUNK]
            src = order[rows]
            lo, hi = int(src[0]), int(src[-1]) + 1
            if hi - lo <= 4 * len(src):
                block = images[lo:hi][src - lo]
            else:
                block = images[src]
            yield rows, block


def build_shapes3d(options: Shapes3DOptions, context: BuildContext) -> ImageDataset:
    """Load 3dshapes.h5 (through the cache) with factors, oracle scores and the true impact."""
    path = resolve_file(options.root)
    h5py = _h5py()
    with h5py.File(path, "r") as f:
        for key in ("images", "labels"):
            if key not in f:
                raise MissingDataError("shapes3d", path, ["dataset 'images' (N, 64, 64, 3) uint8",
                                                          "dataset 'labels' (N, 6) float64"],
                                       detail=f"the HDF5 file has no dataset {key!r}")
        shape = f["images"].shape
        labels = f["labels"][:]
    if len(shape) != 4 or shape[-1] != 3 or shape[0] != len(labels):
        raise DataError(f"shapes3d: {path} holds images of shape {shape} and {len(labels)} label rows; "
                        f"expected (N, 64, 64, 3) and N rows")
    if shape[0] == 0:
        raise MissingDataError("shapes3d", path, [f"{FILE_NAME} with at least one image"], detail="the file is empty")
    if options.max_images is not None and options.max_images > shape[0]:
        raise DataError(f"shapes3d: max_images is {options.max_images} but {path} holds {shape[0]} images")
    seed = int(context.seed if options.seed is None else options.seed)
    order = shuffled_subset(shape[0], options.max_images, seed)
    return factor_grid_dataset(
        "shapes3d", path, shape[0], order, lambda: _read_blocks(path, order), options, label_classes(labels),
        FACTOR_LEVELS, DEFAULT_PAIRS, seed, context.cache_dir,
        "DeepMind 3dshapes: an object in a room, six factors on a full grid")


@hookimpl
def gem_register_datasets(register):
    register("shapes3d", build_shapes3d, options=Shapes3DOptions,
             description="DeepMind 3dshapes (3dshapes.h5) with its six factors; optional correlated sampling")
