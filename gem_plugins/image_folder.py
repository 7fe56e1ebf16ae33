"""The ``image_folder`` data set: any folder of images, optionally with a CSV of attribute scores.

Images are found recursively by extension (jpg, jpeg, png, webp, bmp, gif, tif, tiff), sorted
by relative path, centre-cropped to a square (or squashed, ``crop: none``) and resized.

The optional CSV has a header row; its first column is the image file name relative to the
folder, every other column one attribute (the header names it) with numeric values:

* a column holding only 0 and 1 is binary: 1 -> score 5, 0 -> score 0 (the ends of the oracle's
  0-5 scale); its factor is the 0/1 label (2 levels);
* any other column holds scores in [0, 5], rounded to the nearest integer (6 levels).

With a CSV, the images are the CSV's rows in CSV order (files listed but absent are skipped and
listed in the report), the scores feed the ``labels`` oracle and the true impact matrix. Without
one, ``attributes`` names what an MLLM oracle scores.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from gem import hookimpl
from gem.data import (IMAGE_EXTENSIONS, ImageDataOptions, MissingDataError, build_image_cache, cache_file,
                      cache_info, center_square_box, crop_resize, find_images, open_rgb)
from gem.errors import DataError
from gem.interfaces import BuildContext, ImageDataset
from gem.labels import true_impact


def _extensions() -> list[str]:
    return [e.lstrip(".") for e in IMAGE_EXTENSIONS]


@dataclass
class ImageFolderOptions(ImageDataOptions):
    """Recipe options of the ``image_folder`` data set (besides those of :class:`gem.data.ImageDataOptions`).

    Attributes
    ----------
    root : the folder of images.
    max_images : use the first N images; None: all.
    attributes_csv : optional CSV of attribute scores (path relative to root, or absolute).
    attributes : the attributes GEM models: a subset of the CSV columns (default: all of them),
        or, without a CSV, the names an MLLM oracle scores (required then).
    recursive : search sub-folders.
    extensions : file extensions that count as images.
    crop : center (largest centred square) or none (squash the whole image).
    workers : decoding threads while the cache is built.
    """

    attributes_csv: Optional[str] = None
    attributes: list[str] = field(default_factory=list)
    recursive: bool = True
    extensions: list[str] = field(default_factory=_extensions)
    crop: Literal["center", "none"] = "center"
    workers: int = 4

    def __post_init__(self) -> None:
        self.attributes = list(self.attributes)
        self.extensions = [e.lower().lstrip(".") for e in self.extensions]
        self.check_root("image_folder", "the folder of images")
        if not self.attributes and not self.attributes_csv:
            raise ValueError("image_folder: give attributes (names for the oracle) or attributes_csv "
                             "(a CSV of scores)")
        if len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"image_folder: attributes listed twice in {self.attributes}")
        if not self.extensions:
            raise ValueError("image_folder: extensions must not be empty")
        self.check_sizes("image_folder", workers=1)


def read_scores_csv(path: Path) -> tuple[list[str], list[str], np.ndarray, list[bool]]:
    """``(file names, column names, scores int (N, n) 0..5, binary flag per column)`` of a CSV.

    0/1 columns are mapped to 0/5; other columns must lie in [0, 5] and are rounded.
    """
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = [r for r in csv.reader(fh) if any(cell.strip() for cell in r)]
    if len(rows) < 2 or len(rows[0]) < 2:
        raise DataError(f"image_folder: {path} needs a header (file, attribute, ...) and at least one row")
    header = [h.strip() for h in rows[0]]
    files, values = [], []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"image_folder: {path} line {line}: {len(row)} cells for {len(header)} columns")
        files.append(row[0].strip())
        try:
            values.append([float(cell) for cell in row[1:]])
        except ValueError:
            raise DataError(f"image_folder: {path} line {line}: every attribute value must be a number, "
                            f"got {row[1:]}") from None
    data = np.array(values, dtype=np.float64)
    binary = [bool(np.isin(data[:, k], (0.0, 1.0)).all()) for k in range(data.shape[1])]
    for k, name in enumerate(header[1:]):
        column = data[:, k]
        if not np.isfinite(column).all() or column.min() < 0 or column.max() > 5:
            raise DataError(f"image_folder: {path} column {name!r} must hold scores in [0, 5] (or 0/1), "
                            f"got values from {column.min()} to {column.max()}")
    scores = np.where(binary, data * 5, np.floor(data + 0.5)).astype(np.int64)
    return files, header[1:], scores, binary


def build_image_folder(options: ImageFolderOptions, context: BuildContext) -> ImageDataset:
    """Load a folder of images (through the cache), with CSV attribute scores when given."""
    root = Path(options.root).expanduser()
    exts = [f".{e}" for e in options.extensions]
    if not root.is_dir():
        raise MissingDataError("image_folder", root, [f"{root}/  (images: {', '.join(exts)})"],
                               detail="the folder does not exist")
    scores_all: Optional[np.ndarray] = None
    attributes = list(options.attributes)
    csv_path = None
    if options.attributes_csv:
        csv_path = Path(options.attributes_csv).expanduser()
        csv_path = csv_path if csv_path.is_absolute() else root / csv_path
        if not csv_path.is_file():
            raise MissingDataError("image_folder", root, [f"{csv_path}  (CSV: file, attribute, ...)"],
                                   detail="the attributes CSV is missing")
        names, columns, scores_all, binary = read_scores_csv(csv_path)
        attributes = attributes or list(columns)
        unknown = [a for a in attributes if a not in columns]
        if unknown:
            raise DataError(f"image_folder: attributes {unknown} are not columns of {csv_path}; "
                            f"columns: {', '.join(columns)}")
        picked = [columns.index(a) for a in attributes]
        scores_all, binary = scores_all[:, picked], [binary[k] for k in picked]
    else:
        names = [p.relative_to(root).as_posix() for p in find_images(root, options.recursive, exts)]
    if options.max_images is not None:
        names = names[:options.max_images]
        scores_all = scores_all[:options.max_images] if scores_all is not None else None
    if not names:
        raise MissingDataError("image_folder", root,
                               [f"{root}/{'**/' if options.recursive else ''}*{{{','.join(exts)}}}"],
                               detail="no images found")
    size = int(options.image_size)

    def load(name: str) -> np.ndarray:
        image = open_rgb(root / name)
        box = center_square_box(image.width, image.height) if options.crop == "center" else None
        return crop_resize(image, box, size)

    cache = cache_file(context.cache_dir, "image_folder",
                       {"root": str(root.resolve()), "crop": options.crop, "image_size": size}, names)
    cached = build_image_cache(cache, names, load, size, desc="preprocess image_folder",
                               workers=options.workers, dataset="image_folder")
    info = {"description": f"images from {root}", "root": str(root), **cache_info(cache, len(names), cached)}
    if scores_all is None:
        return ImageDataset(images=cached.images, attributes=attributes, info=info)
    scores = scores_all[cached.kept]
    factors = np.where(binary, scores // 5, scores)
    info["attributes_csv"] = str(csv_path)
    info["binary_attributes"] = [a for a, b in zip(attributes, binary) if b]
    return ImageDataset(
        images=cached.images,
        attributes=attributes,
        factors=factors,
        factor_names=attributes,
        factor_levels=[2 if b else 6 for b in binary],
        attribute_scores=scores,
        true_impact=true_impact(scores),
        info=info,
    )


@hookimpl
def gem_register_datasets(register):
    register("image_folder", build_image_folder, options=ImageFolderOptions,
             description="any folder of images, optionally with a CSV of 0-5 (or 0/1) attribute scores")
