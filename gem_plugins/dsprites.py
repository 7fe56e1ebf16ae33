"""The ``dsprites`` data set: DeepMind's dSprites (Matthey et al., 2017) from its ``.npz``.

737,280 binary 64x64 sprites, every combination of shape (3), scale (6), orientation (40),
posX (32) and posY (32); the colour factor is constant and dropped. The file
``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz`` holds ``imgs`` (737280, 64, 64) uint8 0/1,
``latents_classes`` (N, 6) and ``latents_values`` (N, 6). ``imgs`` is streamed out of the zip
member block by block (never loaded whole) into the memory-mapped cache as RGB 0/255, in a
seeded random order (the file is sorted by factors). Optional correlated sampling ties factor
pairs as in Träuble et al. (2021) and Roth et al. (2023).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from gem import hookimpl
from gem.data import FactorDataOptions, MissingDataError, shuffled_subset
from gem.data_download import SOURCES, download_command
from gem.errors import DataError
from gem.interfaces import BuildContext, ImageDataset
from gem_plugins.factor_grid import factor_grid_dataset

#: The varying factors (columns 1..5 of ``latents_classes``) and their number of classes.
FACTOR_LEVELS: dict[str, int] = {"shape": 3, "scale": 6, "orientation": 40, "posX": 32, "posY": 32}

#: Column of each factor in ``latents_classes`` (column 0, colour, is constant).
FACTOR_COLUMNS: dict[str, int] = {"shape": 1, "scale": 2, "orientation": 3, "posX": 4, "posY": 5}

#: The published file, as gem data downloads it (one table of names, addresses and checksums).
FILE_NAME = SOURCES["dsprites"].files[0].name
N_IMAGES = 737_280
URL = SOURCES["dsprites"].files[0].url

#: Pair correlated by a bare preset (``correlation: strong``) when no pair is named.
DEFAULT_PAIRS: list[list[str]] = [["scale", "posX"]]

_BLOCK = 4096


def _all_factors() -> list[str]:
    return list(FACTOR_LEVELS)


@dataclass
class DSpritesOptions(FactorDataOptions):
    """Recipe options of the ``dsprites`` data set (see :class:`gem.data.FactorDataOptions`).

    factors default to shape, scale, orientation, posX and posY; there are 737,280 images; a bare
    correlation preset correlates ``scale`` and ``posX``, and ``correlation: confounder`` ties
    ``shape`` to all others unless ``confounder`` names another factor.
    """

    root: str = "data/dsprites"
    factors: list[str] = field(default_factory=_all_factors)

    def __post_init__(self) -> None:
        self.check("dsprites", FACTOR_LEVELS, N_IMAGES, FILE_NAME, " (colour is constant in dSprites)")


def resolve_file(root: str) -> Path:
    """``root`` itself when it is a file, else ``root/<the published npz>``; MissingDataError if absent."""
    path = Path(root).expanduser()
    target = path if path.is_file() else path / FILE_NAME
    if not target.is_file():
        raise MissingDataError(
            "dsprites", path, [f"{path / FILE_NAME}  (npz: 'imgs' {N_IMAGES}x64x64 uint8, "
                               f"'latents_classes' {N_IMAGES}x6, 'latents_values' {N_IMAGES}x6)"],
            hint=f"download {URL} into that folder (see docs/datasets.md)", fix=download_command("dsprites", root))
    return target


def _read_exact(fp: IO[bytes], size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = fp.read(left)
        if not chunk:
            raise DataError(f"dsprites: 'imgs' ends {left} bytes early (truncated file)")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _npz_member_header(zf: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    with zf.open(f"{key}.npy") as fp:
        return _read_header(fp)


def _read_header(fp: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(fp)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(fp)
    if fortran:
        raise DataError("dsprites: 'imgs' is stored in Fortran order; expected C order")
    return tuple(shape), dtype


def iter_npz_rows(path: Path, key: str, block: int = _BLOCK) -> Iterator[tuple[int, np.ndarray]]:
    """Stream ``(start, rows)`` blocks of the array ``key`` out of an npz without loading it whole."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fp:
        shape, dtype = _read_header(fp)
        row_items = int(np.prod(shape[1:]))
        for start in range(0, shape[0], block):
            count = min(block, shape[0] - start)
            data = _read_exact(fp, count * row_items * dtype.itemsize)
            yield start, np.frombuffer(data, dtype=dtype).reshape(count, *shape[1:])


def _read_blocks(path: Path, order: np.ndarray, total: int):
    position = np.full(total, -1, dtype=np.int64)
    position[order] = np.arange(len(order))
    last = int(order.max())
    for start, rows in iter_npz_rows(path, "imgs"):
        if start > last:
            break
        where = position[start:start + len(rows)]
        chosen = where >= 0
        if chosen.any():
            yield where[chosen], (rows[chosen] > 0).astype(np.uint8) * 255


def build_dsprites(options: DSpritesOptions, context: BuildContext) -> ImageDataset:
    """Load dSprites (through the cache) with factors, oracle scores and the true impact."""
    path = resolve_file(options.root)
    try:
        with zipfile.ZipFile(path) as zf:
            members = set(zf.namelist())
            missing = [k for k in ("imgs", "latents_classes") if f"{k}.npy" not in members]
            if missing:
                raise MissingDataError("dsprites", path, ["imgs (N, 64, 64) uint8", "latents_classes (N, 6) int"],
                                       detail=f"the npz has no {missing}")
            shape, _ = _npz_member_header(zf, "imgs")
    except zipfile.BadZipFile:
        raise DataError(f"dsprites: {path} is not an npz (zip) file") from None
    with np.load(path, allow_pickle=False) as npz:
        latents = np.asarray(npz["latents_classes"], dtype=np.int64)
    if len(shape) != 3 or latents.shape != (shape[0], 6):
        raise DataError(f"dsprites: {path} holds imgs of shape {shape} and latents_classes of shape "
                        f"{latents.shape}; expected (N, 64, 64) and (N, 6)")
    if shape[0] == 0:
        raise MissingDataError("dsprites", path, [f"{FILE_NAME} with at least one image"], detail="the file is empty")
    if options.max_images is not None and options.max_images > shape[0]:
        raise DataError(f"dsprites: max_images is {options.max_images} but {path} holds {shape[0]} images")
    all_names = list(FACTOR_LEVELS)
    all_levels = list(FACTOR_LEVELS.values())
    all_classes = latents[:, [FACTOR_COLUMNS[n] for n in all_names]]
    bad = (all_classes < 0) | (all_classes >= np.array(all_levels))
    if bad.any():
        k = int(np.argwhere(bad)[0, 1])
        raise DataError(f"dsprites: latents_classes column {FACTOR_COLUMNS[all_names[k]]} ({all_names[k]}) "
                        f"leaves 0..{all_levels[k] - 1}")
    seed = int(context.seed if options.seed is None else options.seed)
    order = shuffled_subset(shape[0], options.max_images, seed)
    return factor_grid_dataset(
        "dsprites", path, shape[0], order, lambda: _read_blocks(path, order, shape[0]), options, all_classes,
        FACTOR_LEVELS, DEFAULT_PAIRS, seed, context.cache_dir,
        "DeepMind dSprites: white sprites on black, five factors on a full grid (colour is constant and dropped)")


@hookimpl
def gem_register_datasets(register):
    register("dsprites", build_dsprites, options=DSpritesOptions,
             description="DeepMind dSprites (the published npz) with five factors; optional correlated sampling")
