"""What every image data set plugin needs: a preprocessing cache, image helpers, correlated sampling.

Preprocessing cache
    :func:`build_image_cache` decodes, crops and resizes every source image once into a uint8
    ``(N, S, S, 3)`` ``.npy`` file under the cache folder, row by row through plain file writes
    (the data set is never held in RAM; readers memory-map the file read-only), with a progress
    bar. Unreadable or truncated images are skipped and listed, not fatal. The file is written
    under a temporary name and ``os.replace``-d into place, together with a small JSON sidecar
    that records which sources were kept and why the others were skipped; a second call
    memory-maps the file and reads the sidecar without decoding anything. :func:`build_array_cache`
    does the same for data sets that are already arrays (HDF5, NPZ), block by block.
    :func:`cache_file` names the file from a hash of the source list, the options that change the
    pixels and :data:`CACHE_VERSION`.

Correlated sampling
    The correlated-factors benchmark of Träuble et al. (2021) and Roth et al. (2023, HFS):
    factor classes are scaled to [0, 1] and every image gets the weight
    ``prod over pairs (i, j) of exp(-(c_i - c_j)^2 / (2 sigma^2))`` (``1 - c_j`` for an inverse
    pair); training draws images with replacement in proportion to the weights
    (``ImageDataset.sample_weights``). See :func:`sampling_probabilities` and :func:`plan_correlation`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
from PIL import Image

from gem.errors import DataError, GemError
from gem.io import to_jsonable, write_json
from gem.recipe import check_ranges
from gem.labels import label_scale
from gem.progress import progress

__all__ = [
    "CACHE_VERSION",
    "CORRELATION_PRESETS",
    "DECODE_ERRORS",
    "DEFAULT_SIGMA",
    "IMAGE_EXTENSIONS",
    "CachedImages",
    "CorrelationPlan",
    "FactorDataOptions",
    "ImageDataOptions",
    "MissingDataError",
    "build_array_cache",
    "build_image_cache",
    "cache_file",
    "cache_info",
    "center_square_box",
    "crop_resize",
    "find_images",
    "open_rgb",
    "plan_correlation",
    "resize_array",
    "sampling_probabilities",
    "scale_classes",
    "shuffled_subset",
    "uniform_rows",
    "validate_correlation_options",
]

#: Bump when the cache layout or any shared preprocessing step changes (old caches are ignored).
CACHE_VERSION = 1

#: Image file extensions picked up by folder loaders (compared in lower case).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

#: What decoding a broken, truncated or missing image can raise; such images are skipped.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError, KeyError,
)

#: Pair width sigma of the correlation presets (Träuble et al. / Roth et al.).
CORRELATION_PRESETS: dict[str, float] = {"weak": 0.4, "medium": 0.1, "strong": 0.04}

#: sigma used when pairs or a confounder are given without a preset or an explicit sigma.
DEFAULT_SIGMA = CORRELATION_PRESETS["medium"]

_RESAMPLE = getattr(Image, "Resampling", Image).LANCZOS
_BLOCK = 256                 # sources decoded per block (bounds what is in flight)
_SKIPPED_IN_INFO = 20        # skipped files listed in ImageDataset.info


class MissingDataError(GemError, FileNotFoundError):
    """A data set is missing or empty; the message lists the files expected and where.

    Parameters
    ----------
    dataset : name of the data set plugin (first word of the message).
    where : the folder or file that was searched.
    expected : what should be there, one entry per line of the message (paths or short notes).
    detail : what went wrong; defaults to "data not found".
    hint : a line after the list, e.g. where to download the data (``docs/datasets.md``).
    fix : the one command that fixes it (:func:`gem.data_download.download_command`), the last
        line as ``fix: <command>``.
    """

    def __init__(self, dataset: str, where: Union[str, Path], expected: Sequence[str] = (),
                 detail: str = "", hint: str = "", fix: str = ""):
        lines = [f"{dataset}: {detail or 'data not found'} (looked in {str(where)!r})"]
        if expected:
            lines.append("expected:")
            lines.extend(f"  - {item}" for item in expected)
        if hint:
            lines.append(hint)
        if fix:
            lines.append(f"fix: {fix}")
        super().__init__("\n".join(lines))
        self.dataset = dataset
        self.where = str(where)
        self.expected = list(expected)


class CachedImages(NamedTuple):
    """What :func:`build_image_cache` returns.

    images : read-only uint8 memmap (K, S, S, 3), one row per kept source, in source order.
    kept : int64 array (K,), the position in ``sources`` of each row.
    skipped : ``(name, reason)`` of every source that could not be read, in source order.
    """

    images: np.ndarray
    kept: np.ndarray
    skipped: list[tuple[str, str]]


# ----------------------------------------------------------------------------------------------
# Image helpers


def open_rgb(source: Union[str, os.PathLike, bytes]) -> Image.Image:
    """Decode a file path or encoded bytes into a fully loaded RGB PIL image.

    The pixels are decoded here (``Image.load``), so a truncated file raises an ``OSError`` now
    rather than later; any of :data:`DECODE_ERRORS` means the image is unreadable.
    """
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    with Image.open(stream) as image:
        image.load()
        return image.convert("RGB")


def center_square_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The largest centred square ``(left, top, right, bottom)`` inside a width x height image."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def crop_resize(image: Image.Image, box: Optional[Sequence[float]], size: int) -> np.ndarray:
    """Crop ``box`` (``(left, top, right, bottom)``, floats allowed; None = whole image) and
    resize to ``size`` x ``size`` with Lanczos filtering; uint8 array (size, size, 3)."""
    image = image.convert("RGB")
    out = image.resize((size, size), _RESAMPLE, box=None if box is None else tuple(float(v) for v in box))
    return np.asarray(out, dtype=np.uint8)


def resize_array(images: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 block (B, H, W, 3) or (B, H, W) to (B, size, size, 3) (Lanczos; gray to RGB)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.shape[1:3] == (size, size):
        return np.ascontiguousarray(images, dtype=np.uint8)
    return np.stack([crop_resize(Image.fromarray(img, "RGB"), None, size) for img in images.astype(np.uint8)])


def find_images(root: Union[str, Path], recursive: bool = True,
                extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under ``root`` (by extension, case-insensitive), sorted by relative path."""
    root = Path(root)
    if not root.is_dir():
        return []
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    pattern = root.rglob("*") if recursive else root.glob("*")
    files = [p for p in pattern if p.suffix.lower() in exts and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def uniform_rows(n_rows: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct rows of ``n_rows`` drawn uniformly with ``default_rng(seed)``, sorted
    (all rows when there are no more)."""
    if size >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=size, replace=False))


def shuffled_subset(total: int, max_images: Optional[int], seed: int) -> np.ndarray:
    """Source row of each cached image: a seeded permutation of ``range(total)``, cut to
    ``max_images`` (a deterministic random subset in random order). Factor data sets are stored
    sorted by factors; the pipeline scores the first images and evaluates on the last ones."""
    order = np.random.default_rng(seed).permutation(int(total))
    return order[:max_images] if max_images is not None else order


# ----------------------------------------------------------------------------------------------
# The cache


def cache_file(cache_dir: Union[str, Path], prefix: str, options: Mapping[str, Any],
               sources: Iterable[Any] = ()) -> Path:
    """Cache path ``<cache_dir>/<prefix>-<hash>.npy``.

    The hash covers :data:`CACHE_VERSION`, ``options`` (everything that changes the pixels:
    root, crop, image size ...) and ``repr`` of every source, in order.
    """
    digest = hashlib.sha1()
    head = {"version": CACHE_VERSION, "prefix": prefix, "options": to_jsonable(dict(options))}
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    for source in sources:
        digest.update(repr(source).encode())
        digest.update(b"\0")
    return Path(cache_dir) / f"{prefix}-{digest.hexdigest()[:16]}.npy"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape})
    return buf.getvalue()


class _RowWriter:
    """A uint8 .npy of ``n`` rows under a temporary name, filled row by row through plain file
    writes, then shortened to the rows actually written and moved into place with ``os.replace``.

    Rows are written with ``seek`` + ``write``, not through a writable memmap: pages of a mapping
    stay in the process's resident set as they are filled, so a memmap writer's RSS grew with the
    whole data set (630 MiB peak for a 20,000-image CelebA stand-in, 398 MiB with file writes;
    benchmarks/run.py --only memory_celeba); written pages now live only in the OS page cache.
    """

    def __init__(self, path: Path, n: int, row_shape: tuple[int, ...]):
        self.path = path
        self.n = int(n)
        self.row_shape = row_shape
        self.row_bytes = int(np.prod(row_shape))
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        header = _npy_header((self.n, *row_shape))
        self.offset = self.data_offset = len(header)
        self.fh: Optional[io.BufferedRandom] = open(self.tmp, "w+b")
        self.fh.write(header)
        self.fh.truncate(self.data_offset + self.n * self.row_bytes)

    def write(self, rows: Sequence[int], images: np.ndarray) -> None:
        """Write ``images[k]`` (uint8, ``row_shape``) into row ``rows[k]``, for every k."""
        images = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(rows), self.row_bytes)
        for row, data in zip(rows, images):
            self.fh.seek(self.data_offset + int(row) * self.row_bytes)
            self.fh.write(data)

    def finish(self, rows: int) -> None:
        n = self.n
        self.fh.close()
        self.fh = None
        if rows < n:
            header = _npy_header((rows, *self.row_shape))
            if len(header) == self.offset:
                # Same header length: rewrite the shape in place and cut the unused rows off.
                with open(self.tmp, "r+b") as fh:
                    fh.write(header)
                    fh.truncate(self.offset + rows * self.row_bytes)
            else:  # the header got one 64-byte block shorter: copy the rows into a fresh file
                short = self.tmp.with_name(self.tmp.name + ".short")
                src = np.load(self.tmp, mmap_mode="r")
                dst = np.lib.format.open_memmap(short, mode="w+", dtype=np.uint8, shape=(rows, *self.row_shape))
                for start in range(0, rows, 4096):
                    stop = min(start + 4096, rows)
                    dst[start:stop] = src[start:stop]
                dst.flush()
                del dst, src
                os.replace(short, self.tmp)
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        for tmp in (self.tmp, self.tmp.with_name(self.tmp.name + ".short")):
            if tmp.exists():
                tmp.unlink()


def _load_existing(path: Path, n_sources: int, image_size: int) -> Optional[CachedImages]:
    """The cache at ``path`` if it and its sidecar are complete and match, else None."""
    meta_path = _sidecar(path)
    if not (path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    skipped_rows = meta.get("skipped", [])
    if (meta.get("version") != CACHE_VERSION or meta.get("n_sources") != n_sources
            or meta.get("image_size") != image_size
            or images.shape != (n_sources - len(skipped_rows), image_size, image_size, 3)):
        return None
    keep = np.ones(n_sources, dtype=bool)
    keep[[int(index) for index, _, _ in skipped_rows]] = False
    return CachedImages(images, np.flatnonzero(keep).astype(np.int64),
                        [(str(name), str(reason)) for _, name, reason in skipped_rows])


def _reason(exc: BaseException) -> str:
    """A short, stable reason for a skipped image."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not a readable image (unknown or damaged format)"
    text = str(exc).strip()
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def build_image_cache(cache_path: Union[str, Path], sources: Sequence[Any],
                      load: Callable[[Any], Optional[np.ndarray]], image_size: int, desc: str = "preprocess",
                      names: Optional[Sequence[str]] = None, workers: int = 1,
                      dataset: str = "data set") -> CachedImages:
    """Decode, crop and resize every source once into a memory-mapped uint8 cache.

    Parameters
    ----------
    cache_path : the ``.npy`` file (see :func:`cache_file`); its JSON sidecar sits beside it.
    sources : what ``load`` takes, one per image (paths, ``(path, box)`` tuples, LMDB keys ...).
    load : ``load(source)`` returns the final uint8 image (image_size, image_size, 3), or None
        when the source has no usable image; raising one of :data:`DECODE_ERRORS` (as PIL does
        for unreadable or truncated files) also skips the source. It must be thread-safe when
        ``workers > 1``.
    image_size : side length S of the cached images.
    desc : label of the progress bar.
    names : display names of the sources for the skipped list (default ``str(source)``).
    workers : threads that decode in parallel (PIL releases the GIL while decoding); 1 = none.
    dataset : plugin name used in error messages.

    Returns
    -------
    CachedImages ``(images, kept, skipped)``: the read-only memmap (K, S, S, 3) of the readable
    images in source order, their positions in ``sources``, and ``(name, reason)`` per skipped
    source. A second call with the same path and source count only memory-maps the file.

    Raises
    ------
    MissingDataError
        When ``sources`` is empty or no source could be read (nothing is cached then).
    """
    path = Path(cache_path)
    n = len(sources)
    if n == 0:
        raise MissingDataError(dataset, path.parent, detail="no images to preprocess")
    cached = _load_existing(path, n, int(image_size))
    if cached is not None:
        return cached
    shape = (int(image_size), int(image_size), 3)

    def safe_load(index: int) -> tuple[Optional[np.ndarray], str]:
        try:
            image = load(sources[index])
        except DECODE_ERRORS as exc:
            return None, _reason(exc)
        if image is None:
            return None, "no image"
        image = np.asarray(image)
        if image.shape != shape or image.dtype != np.uint8:
            raise ValueError(f"{dataset}: the loader returned {image.dtype} {image.shape} for "
                             f"{sources[index]!r}, expected uint8 {shape}")
        return image, ""

    writer = _RowWriter(path, n, shape)
    skipped: list[tuple[int, str, str]] = []
    rows = 0
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        with progress(n, desc, unit="img") as bar:
            for start in range(0, n, _BLOCK):
                block = range(start, min(start + _BLOCK, n))
                results = pool.map(safe_load, block) if pool is not None else map(safe_load, block)
                for index, (image, reason) in zip(block, results):
                    if image is None:
                        name = str(names[index]) if names is not None else str(sources[index])
                        skipped.append((index, name, reason))
                    else:
                        writer.write([rows], image[None])
                        rows += 1
                bar.update(len(block))
                if skipped:
                    bar.set_postfix(skipped=len(skipped), refresh=False)
        if rows == 0:
            first = "; ".join(f"{name}: {reason}" for _, name, reason in skipped[:3])
            raise MissingDataError(dataset, path.parent,
                                   detail=f"none of the {n} images could be read (first: {first})")
        write_json(_sidecar(path), {"version": CACHE_VERSION, "n_sources": n, "image_size": int(image_size),
                                    "rows": rows, "desc": desc, "skipped": skipped})
        writer.finish(rows)
    except BaseException:
        writer.discard()
        raise
    finally:
        if pool is not None:
            pool.shutdown()
    keep = np.ones(n, dtype=bool)
    keep[[index for index, _, _ in skipped]] = False
    return CachedImages(np.load(path, mmap_mode="r"), np.flatnonzero(keep).astype(np.int64),
                        [(name, reason) for _, name, reason in skipped])


def build_array_cache(cache_path: Union[str, Path], n: int,
                      blocks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], image_size: int,
                      desc: str = "preprocess") -> np.ndarray:
    """Copy an array data set (HDF5, NPZ ...) block by block into a memory-mapped uint8 cache.

    Parameters
    ----------
    cache_path : the ``.npy`` file (see :func:`cache_file`).
    n : number of rows of the cache.
    blocks : called only when the cache must be built; yields ``(rows, images)`` with ``rows``
        the int positions (in 0..n-1) of a uint8 block (B, H, W, 3) or (B, H, W) (gray or 0/255
        masks become RGB); blocks of another size are resized to ``image_size``. Every row must
        be written exactly once.
    image_size : side length S.
    desc : label of the progress bar.

    Returns
    -------
    read-only uint8 memmap (n, S, S, 3).
    """
    path = Path(cache_path)
    cached = _load_existing(path, int(n), int(image_size))
    if cached is not None:
        return cached.images
    shape = (int(image_size), int(image_size), 3)
    writer = _RowWriter(path, int(n), shape)
    written = np.zeros(int(n), dtype=bool)
    try:
        with progress(int(n), desc, unit="img") as bar:
            for rows, images in blocks():
                rows = np.asarray(rows, dtype=np.int64)
                if len(rows) == 0:
                    continue
                order = np.argsort(rows, kind="stable")  # ascending writes into the file
                writer.write(rows[order], resize_array(images, int(image_size))[order])
                written[rows] = True
                bar.update(len(rows))
        if not written.all():
            raise DataError(f"{desc}: {int((~written).sum())} of {n} rows were never written; "
                            "the source file is shorter than its labels")
        write_json(_sidecar(path), {"version": CACHE_VERSION, "n_sources": int(n), "image_size": int(image_size),
                                    "rows": int(n), "desc": desc, "skipped": []})
        writer.finish(int(n))
    except BaseException:
        writer.discard()
        raise
    return np.load(path, mmap_mode="r")


def cache_info(path: Union[str, Path], n_sources: int, cached: CachedImages) -> dict[str, Any]:
    """The report facts of a cache: file, image counts and the first skipped files with reasons."""
    return {
        "cache_file": str(path),
        "source_images": int(n_sources),
        "images": int(len(cached.images)),
        "skipped_images": len(cached.skipped),
        "skipped_files": [f"{name}: {reason}" for name, reason in cached.skipped[:_SKIPPED_IN_INFO]],
    }


# ----------------------------------------------------------------------------------------------
# Correlated sampling


def _log_weights(factors01: np.ndarray, pairs: Sequence[Sequence[Any]], sigma: float) -> np.ndarray:
    c = np.asarray(factors01, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"factors01 must be a 2-D (N, K) array, got shape {c.shape}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    log_w = np.zeros(len(c))
    for pair in pairs:
        i, j = int(pair[0]), int(pair[1])
        inverse = len(pair) > 2 and (pair[2] is True or pair[2] == "inverse")
        target = 1.0 - c[:, j] if inverse else c[:, j]
        log_w -= (c[:, i] - target) ** 2 / (2.0 * sigma ** 2)
    return log_w


def sampling_probabilities(factors01: np.ndarray, pairs: Sequence[Sequence[Any]], sigma: float) -> np.ndarray:
    """Per-image sampling probabilities that correlate factor pairs (Träuble et al.; Roth et al., HFS).

    Parameters
    ----------
    factors01 : float array (N, K), every factor scaled to [0, 1] (``class / (levels - 1)``).
    pairs : ``(i, j)`` or ``(i, j, "inverse")`` column indices (an ``inverse`` pair, or a third
        item that is True, ties ``c_i`` to ``1 - c_j``).
    sigma : pair width; smaller is stronger (presets: :data:`CORRELATION_PRESETS`).

    Returns
    -------
    float64 array (N,) summing to 1, proportional to
    ``prod over pairs exp(-(c_i - c_j)^2 / (2 sigma^2))``, computed in log space (no underflow).
    """
    log_w = _log_weights(factors01, pairs, sigma)
    w = np.exp(log_w - log_w.max())
    return w / w.sum()


def check_factor_names(factors: Sequence[str], known: Iterable[str], where: str, hint: str = "") -> None:
    """Raise ValueError unless ``factors`` is a non-empty list of distinct names from ``known``."""
    known = list(known)
    allowed = ", ".join(known)
    if not factors:
        raise ValueError(f"{where}: factors must not be empty; allowed: {allowed}")
    unknown = [f for f in factors if f not in known]
    if unknown:
        raise ValueError(f"{where}: unknown factor(s) {unknown}; allowed: {allowed}{hint}")
    if len(set(factors)) != len(factors):
        raise ValueError(f"{where}: factors listed twice in {list(factors)}")


@dataclass
class ImageDataOptions:
    """Options every image data set read from disk shares (celeba, lsun, image_folder, shapes3d,
    dsprites): subclasses set the default of ``root``, add their own fields, and call
    :meth:`check_sizes` and :meth:`check_root` from ``__post_init__``.

    Attributes
    ----------
    root : where the images are (a folder, or a data file).
    max_images : use at most this many images (None: all).
    image_size : side length of the square images.
    """

    root: str = ""
    max_images: Optional[int] = None
    image_size: int = 64

    def check_sizes(self, where: str, n_images: Optional[int] = None, **bounds: Any) -> None:
        """Range checks (:func:`gem.recipe.check_ranges`, messages starting with ``where``) of
        ``max_images`` (at least 1, and at most ``n_images`` when the data set's size is known),
        ``image_size`` (at least 16) and then of ``bounds``, more fields of the subclass with a lower
        bound or a closed interval ``(low, high)``."""
        check_ranges(self, where=where, bounds={"max_images": 1 if n_images is None else (1, n_images),
                                                "image_size": 16, **bounds})

    def check_root(self, where: str, names: str) -> None:
        """Raise ValueError ``"<where>: root must name <names>"`` when ``root`` is empty."""
        if not self.root:
            raise ValueError(f"{where}: root must name {names}")


@dataclass
class FactorDataOptions(ImageDataOptions):
    """Options every labelled factor data set shares (shapes3d, dsprites): subclasses set the
    defaults of ``root`` and ``factors`` and call :meth:`check` from ``__post_init__``.

    Attributes
    ----------
    root : folder holding the data file (or the path of the file itself).
    max_images : use a seeded random subset of this many images (None: all). The images are
        always put in a seeded random order; the subset is its first max_images.
    image_size : side length; the 64x64 originals are resized when it differs.
    factors : the factors GEM models, one attribute each.
    seed : seed of the order/subset; None uses the recipe seed.
    correlation : correlated-sampling preset: weak (sigma 0.4), medium (0.1), strong (0.04),
        or confounder (one factor tied to all others); None samples uniformly.
    correlated_pairs : ``[factor_a, factor_b]`` or ``[factor_a, factor_b, inverse]``.
    sigma : pair width overriding the preset's.
    confounder : the factor tied to all others with ``correlation: confounder``.
    """

    factors: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    correlation: Optional[Literal["weak", "medium", "strong", "confounder"]] = None
    correlated_pairs: list[list] = field(default_factory=list)
    sigma: Optional[float] = None
    confounder: Optional[str] = None

    def check(self, where: str, levels: Mapping[str, int], n_images: int, file_name: str,
              unknown_hint: str = "") -> None:
        """Validate every field (raises ValueError naming ``where`` and the allowed values)."""
        self.factors = list(self.factors)
        check_factor_names(self.factors, levels, where, unknown_hint)
        self.check_sizes(where, n_images)
        self.check_root(where, f"the folder that holds {file_name}")
        validate_correlation_options(self, list(levels), where)


def validate_correlation_options(options: Any, factor_names: Sequence[str], where: str) -> None:
    """Check the correlated-sampling fields of an options dataclass (raises ValueError).

    The fields: ``correlation`` (None, a preset of :data:`CORRELATION_PRESETS` or
    ``"confounder"``), ``correlated_pairs`` (``[a, b]`` or ``[a, b, "inverse"]`` factor names),
    ``sigma`` (None or > 0) and ``confounder`` (None or a factor name).
    """
    names = list(factor_names)
    allowed = ", ".join(names)
    options.correlated_pairs = [list(pair) for pair in options.correlated_pairs]
    if options.correlation is not None and options.correlation not in (*CORRELATION_PRESETS, "confounder"):
        raise ValueError(f"{where}: correlation must be one of {', '.join((*CORRELATION_PRESETS, 'confounder'))} "
                         f"or null, got {options.correlation!r}")
    if options.sigma is not None and not (isinstance(options.sigma, (int, float)) and options.sigma > 0):
        raise ValueError(f"{where}: sigma must be a number > 0, got {options.sigma!r}")
    seen = set()
    for pair in options.correlated_pairs:
        if len(pair) not in (2, 3) or not all(isinstance(v, str) for v in pair[:2]) \
                or (len(pair) == 3 and pair[2] != "inverse"):
            raise ValueError(f"{where}: correlated pair {pair!r} must be [factor_a, factor_b] or "
                             f"[factor_a, factor_b, inverse]")
        for name in pair[:2]:
            if name not in names:
                raise ValueError(f"{where}: correlated pair {pair!r} names unknown factor {name!r}; "
                                 f"factors: {allowed}")
        if pair[0] == pair[1]:
            raise ValueError(f"{where}: correlated pair {pair!r} pairs a factor with itself")
        key = frozenset(pair[:2])
        if key in seen:
            raise ValueError(f"{where}: factors {pair[0]!r} and {pair[1]!r} are paired twice")
        seen.add(key)
    if options.confounder is not None and options.confounder not in names:
        raise ValueError(f"{where}: unknown confounder {options.confounder!r}; factors: {allowed}")
    if (options.correlation is None and options.sigma is not None and not options.correlated_pairs
            and options.confounder is None):
        raise ValueError(f"{where}: sigma is set but nothing is correlated; set correlation, "
                         f"correlated_pairs or confounder")


@dataclass(frozen=True)
class CorrelationPlan:
    """Which factor pairs are correlated and how strongly (resolved by :func:`plan_correlation`)."""

    pairs: tuple[tuple[int, int, bool], ...]
    sigma: float
    preset: Optional[str]
    confounder: Optional[str]
    factor_names: tuple[str, ...]

    def probabilities(self, classes: np.ndarray, levels: Sequence[int]) -> np.ndarray:
        """Sampling probabilities (N,) of images with factor classes (N, K) of the given levels."""
        return sampling_probabilities(scale_classes(classes, levels), self.pairs, self.sigma)

    def describe(self, classes: np.ndarray, levels: Sequence[int], probabilities: np.ndarray) -> dict[str, Any]:
        """Report facts: preset, sigma, the pairs with their Pearson r under the weights, ESS."""
        c = scale_classes(classes, levels)
        facts = []
        for i, j, inv in self.pairs:
            r = _weighted_pearson(c[:, i], c[:, j], probabilities)
            b = f"1 - {self.factor_names[j]}" if inv else self.factor_names[j]
            facts.append(f"{self.factor_names[i]} ~ {b} (weighted r = {r:.2f})")
        return {
            "correlation": self.preset or "custom",
            "correlation_sigma": self.sigma,
            "correlated_pairs": facts,
            "confounder": self.confounder,
            "effective_sample_size": float(1.0 / np.sum(probabilities ** 2)),
            "correlation_note": "training draws images with replacement in proportion to "
                                "exp(-(c_i - c_j)^2 / (2 sigma^2)) per pair; held-out images are unweighted",
        }


def scale_classes(classes: np.ndarray, levels: Sequence[int]) -> np.ndarray:
    """Factor classes (N, K) scaled to [0, 1]: ``class / label_scale(levels)`` (0 for one-level factors)."""
    return np.asarray(classes, dtype=np.float64) / label_scale(levels)


def _weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    mx, my = np.sum(w * x), np.sum(w * y)
    cov = np.sum(w * (x - mx) * (y - my))
    var = math.sqrt(np.sum(w * (x - mx) ** 2) * np.sum(w * (y - my) ** 2))
    return float(cov / var) if var > 0 else 0.0


def plan_correlation(options: Any, factor_names: Sequence[str],
                     default_pairs: Sequence[Sequence[str]] = ()) -> Optional[CorrelationPlan]:
    """Resolve the correlated-sampling options into pairs of column indices and one sigma.

    * sigma: ``options.sigma`` if set, else the preset's (weak 0.4, medium 0.1, strong 0.04),
      else :data:`DEFAULT_SIGMA` (0.1).
    * pairs: ``options.correlated_pairs``; with a ``confounder`` (or ``correlation:
      confounder``, whose confounder defaults to the first factor) also the confounder paired
      with every other factor; with only a preset, ``default_pairs``.

    Returns None when nothing is correlated (uniform sampling).
    """
    names = list(factor_names)
    preset = options.correlation
    pairs = [list(p) for p in options.correlated_pairs]
    confounder = options.confounder
    if preset == "confounder" and confounder is None:
        confounder = names[0]
    if confounder is not None:
        tied = {frozenset(p[:2]) for p in pairs}
        pairs += [[confounder, other] for other in names
                  if other != confounder and frozenset((confounder, other)) not in tied]
    if not pairs and preset in CORRELATION_PRESETS:
        pairs = [list(p) for p in default_pairs]
    if not pairs:
        return None
    sigma = float(options.sigma if options.sigma is not None else CORRELATION_PRESETS.get(preset, DEFAULT_SIGMA))
    resolved = tuple((names.index(p[0]), names.index(p[1]), len(p) > 2 and p[2] == "inverse") for p in pairs)
    return CorrelationPlan(resolved, sigma, preset, confounder, tuple(names))
