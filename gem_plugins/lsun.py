"""The ``lsun`` data set: one LSUN category (Yu et al., 2015), e.g. horse or bedroom.

Two layouts under ``root`` (searched in this order):

* the official LMDB export: ``<root>/<category>_<split>_lmdb/`` (scene categories such as
  ``bedroom_train_lmdb``) or ``<root>/<category>/`` holding ``data.mdb`` (object categories
  such as ``horse``); values are encoded images (WebP or JPEG), keys are arbitrary. Needs the
  optional ``lmdb`` package (``pip install lmdb``).
* a plain folder of images: ``<root>/<category>/`` (searched recursively).

LSUN has no labels: the attributes are the recipe's names, for an MLLM oracle. Images are
centre-cropped to a square and resized.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from gem import hookimpl
from gem.data import (ImageDataOptions, MissingDataError, build_image_cache, cache_file, cache_info,
                      center_square_box, crop_resize, find_images, open_rgb)
from gem.data_download import download_command
from gem.errors import MissingDependencyError
from gem.interfaces import BuildContext, ImageDataset

#: Attributes a category gets when the recipe names none (the GEM paper's Figure 5 scenes).
DEFAULT_ATTRIBUTES: dict[str, list[str]] = {
    "horse": ["Dark coat", "Large horse", "Running", "Rider", "Grass background", "Several horses"],
    "bedroom": ["Bright room", "Large bed", "Window", "Colourful", "Cluttered", "Wall decoration"],
}

URL = "https://github.com/fyu/lsun"


@dataclass
class LSUNOptions(ImageDataOptions):
    """Recipe options of the ``lsun`` data set (besides those of :class:`gem.data.ImageDataOptions`).

    Attributes
    ----------
    root : folder holding the category (see the module docstring and docs/datasets.md).
    max_images : use the first N images (LMDB key order or sorted file names); None: all.
    category : LSUN category, e.g. horse, bedroom, church_outdoor.
    split : train or val; only used in the scene LMDB name ``<category>_<split>_lmdb``.
    source : auto (LMDB if found, else a folder), lmdb or folder.
    attributes : attribute names for the oracle; default: six per category for horse and bedroom.
    workers : decoding threads while the cache is built.
    """

    root: str = "data/lsun"
    category: str = "bedroom"
    split: Literal["train", "val"] = "train"
    source: Literal["auto", "lmdb", "folder"] = "auto"
    attributes: list[str] = field(default_factory=list)
    workers: int = 4

    def __post_init__(self) -> None:
        if not self.category or "/" in self.category:
            raise ValueError(f"lsun: category must be a category name such as horse or bedroom, got {self.category!r}")
        self.attributes = list(self.attributes) or list(DEFAULT_ATTRIBUTES.get(self.category, []))
        if not self.attributes:
            raise ValueError(f"lsun: give the attributes to model for category {self.category!r} "
                             f"(defaults exist for {', '.join(DEFAULT_ATTRIBUTES)})")
        if len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"lsun: attributes listed twice in {self.attributes}")
        self.check_sizes("lsun", workers=1)
        self.check_root("lsun", "the LSUN folder")


def _lmdb():
    try:
        import lmdb
    except ImportError:
        raise MissingDependencyError("reading an LSUN LMDB export needs the lmdb package, which is not installed: "
                                     "pip install lmdb (or pip install 'gem-disentangle[lmdb]'), or export the "
                                     "images to a folder and set dataset.source: folder") from None
    return lmdb


def locate(options: LSUNOptions) -> tuple[str, Path]:
    """``("lmdb" | "folder", path)`` of the category under ``root``; MissingDataError if absent."""
    root = Path(options.root).expanduser()
    lmdb_dirs = [root / f"{options.category}_{options.split}_lmdb", root / options.category]
    folder = root / options.category
    if options.source in ("auto", "lmdb"):
        for path in lmdb_dirs:
            if (path / "data.mdb").is_file():
                return "lmdb", path
    if options.source in ("auto", "folder") and find_images(folder):
        return "folder", folder
    expected = []
    if options.source in ("auto", "lmdb"):
        expected += [f"{lmdb_dirs[0]}/data.mdb  (scene categories: the official {options.category}_{options.split}_lmdb)",
                     f"{lmdb_dirs[1]}/data.mdb  (object categories: the official {options.category} LMDB)"]
    if options.source in ("auto", "folder"):
        expected.append(f"{folder}/  (a folder of .jpg/.png/.webp images, searched recursively)")
    # `gem data download` knows the two categories of the recipes (bedroom: the train split).
    name = {("horse", options.split): "lsun_horse", ("bedroom", "train"): "lsun_bedroom"}.get(
        (options.category, options.split))
    raise MissingDataError("lsun", root, expected, detail=f"no images for category {options.category!r}",
                           hint=f"download with the scripts of {URL} (see docs/datasets.md)",
                           fix=download_command(name, options.root) if name else "")


def _lmdb_keys(path: Path, limit: Optional[int]) -> list[bytes]:
    env = _lmdb().open(str(path), readonly=True, lock=False, readahead=False, meminit=False,
                       max_readers=128, subdir=True)
    keys: list[bytes] = []
    try:
        with env.begin() as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                keys.append(bytes(key))
                if limit is not None and len(keys) >= limit:
                    break
    finally:
        env.close()
    return keys


def build_lsun(options: LSUNOptions, context: BuildContext) -> ImageDataset:
    """Load an LSUN category (through the cache), centre-cropped and resized; no labels."""
    kind, path = locate(options)
    size = int(options.image_size)
    env: Any = None
    if kind == "lmdb":
        sources: list[Any] = _lmdb_keys(path, options.max_images)
        names = [k.decode("utf-8", "replace") for k in sources]

        def read(key: bytes) -> bytes:
            with env.begin() as txn:  # one short read transaction per image: safe across threads
                value = txn.get(key)
            if value is None:
                raise KeyError(f"LMDB key {key!r} has no value")
            return value
    else:
        files = find_images(path)
        if options.max_images is not None:
            files = files[:options.max_images]
        sources = [f.relative_to(path).as_posix() for f in files]
        names = list(sources)

        def read(name: str) -> Path:
            return path / name

    def load(source: Any) -> np.ndarray:
        image = open_rgb(read(source))
        return crop_resize(image, center_square_box(image.width, image.height), size)

    if not sources:
        raise MissingDataError("lsun", path, [f"{path} with at least one image"], detail="the category is empty")
    cache = cache_file(context.cache_dir, f"lsun-{options.category}",
                       {"kind": kind, "path": str(path.resolve()), "image_size": size}, sources)
    try:
        if kind == "lmdb":
            env = _lmdb().open(str(path), readonly=True, lock=False, readahead=False, meminit=False,
                               max_readers=128, subdir=True)
        cached = build_image_cache(cache, sources, load, size, desc=f"preprocess lsun {options.category}",
                                   names=names, workers=options.workers, dataset="lsun")
    finally:
        if env is not None:
            env.close()
    return ImageDataset(
        images=cached.images,
        attributes=list(options.attributes),
        info={
            "description": f"LSUN {options.category}, centre-cropped and resized; no labels "
                           f"(attributes are scored by the oracle)",
            "source": f"{kind}: {path}",
            **cache_info(cache, len(sources), cached),
        },
    )


@hookimpl
def gem_register_datasets(register):
    register("lsun", build_lsun, options=LSUNOptions,
             description="an LSUN category (official LMDB export or an image folder), centre-cropped; no labels")
