"""A procedurally rendered image data set with known factors and a chosen correlation structure.

The offline default of gem. Each image shows a wall, a floor and one object, like 3dshapes,
drawn from up to seven factors. Factors are sampled with a Gaussian copula along the
directed edges of ``correlations`` (parent -> child), so every factor keeps a uniform
marginal while children depend on their parents. Everything is deterministic given the seed.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from scipy.special import ndtr

from gem import hookimpl
from gem.data import check_factor_names
from gem.recipe import check_ranges
from gem.interfaces import BuildContext, ImageDataset
from gem.labels import class_scores, true_impact
from gem.progress import progress

#: Every factor the renderer knows, with its number of classes.
FACTOR_LEVELS: dict[str, int] = {
    "floor_hue": 10,
    "wall_hue": 10,
    "object_hue": 10,
    "scale": 8,
    "orientation": 15,
    "position": 10,
    "shape": 4,
    "window": 2,
}

#: The class a factor takes when it does not vary: its middle class, except the window, which is
#: absent (so scenes without the factor look as they did before it existed).
RESTING_CLASS: dict[str, int] = {**{name: levels // 2 for name, levels in FACTOR_LEVELS.items()}, "window": 0}

#: Names of the ``shape`` classes, in class order.
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")

#: Bump when the pictures change, so stale caches are not reused.
RENDER_VERSION = 2

_HORIZON = 0.6          # floor starts at this fraction of the height
_GROUND = 0.9           # bottom of the (unrotated) object
_SCALE_RANGE = (0.15, 0.40)     # object width as a fraction of the image width
_POSITION_RANGE = (0.2, 0.8)    # horizontal centre as a fraction of the width
_ANGLE_RANGE = (-30.0, 30.0)    # degrees
_CROSS_ARM = 0.4        # half-width of a cross arm relative to its half-length
_WINDOW = (0.10, 0.34, 0.08, 0.36)  # top, bottom, left, right of the window on the wall (fractions)
_WINDOW_COLOR = np.array([250, 250, 235], dtype=np.uint8)
_WINDOW_BARS = np.array([90, 90, 90], dtype=np.uint8)
_BATCH = 512


#: Hues run from red (0) to violet (0.8) without wrapping round to red again, so the classes of a
#: hue factor are ordered in appearance as they are in value (0-5 scores mean "more violet").
_HUE_SPAN = 0.8


def _palette(levels: int, saturation: float, value: float) -> np.ndarray:
    rgb = [colorsys.hsv_to_rgb(_HUE_SPAN * k / (levels - 1), saturation, value) for k in range(levels)]
    return np.round(np.array(rgb) * 255).astype(np.uint8)


# Wall pastel, floor darker, object fully saturated and bright: the object stays visible
# even when it shares a hue with the wall or the floor.
_WALL_COLORS = _palette(FACTOR_LEVELS["wall_hue"], 0.45, 0.95)
_FLOOR_COLORS = _palette(FACTOR_LEVELS["floor_hue"], 0.75, 0.65)
_OBJECT_COLORS = _palette(FACTOR_LEVELS["object_hue"], 1.0, 1.0)


def _default_factors() -> list[str]:
    return ["floor_hue", "wall_hue", "object_hue", "scale", "position", "shape", "window"]


def _default_correlations() -> list[list]:
    # wall_hue -> window is many-to-one (ten hues, two window states): S is clearly asymmetric.
    return [["object_hue", "scale", 0.7], ["floor_hue", "wall_hue", 0.6], ["shape", "position", -0.5],
            ["wall_hue", "window", 0.9]]


@dataclass
class SyntheticOptions:
    """Recipe options of the ``synthetic`` data set.

    Attributes
    ----------
    n_images : number of images.
    image_size : side length in pixels of the square RGB images.
    seed : sampling seed; None uses the run seed.
    factors : factors that vary (one attribute each); the others stay at their middle class.
        Allowed: floor_hue, wall_hue, object_hue, scale, orientation, position, shape, window
        (a window on the wall, absent or present: a two-level factor).
    correlations : edges ``[parent, child, strength]``, strength in (-1, 1); the edges must
        form a DAG and each child's squared strengths must sum to less than 1.
    strength : when set, every edge gets this strength (keeping its sign): 0 makes the factors
        independent, values near 1 nearly deterministic. For sweeping how correlated the data is.
    """

    n_images: int = 20000
    image_size: int = 64
    seed: Optional[int] = None
    factors: list[str] = field(default_factory=_default_factors)
    correlations: list[list] = field(default_factory=_default_correlations)
    strength: Optional[float] = None

    def __post_init__(self) -> None:
        self.factors = list(self.factors)
        self.correlations = [list(edge) for edge in self.correlations]
        _validate(self)

    def edges(self) -> list[list]:
        """The correlation edges with :attr:`strength` applied."""
        if self.strength is None:
            return [list(edge) for edge in self.correlations]
        return [[parent, child, float(np.sign(s)) * self.strength if s else self.strength]
                for parent, child, s in self.correlations]


def _validate(options: SyntheticOptions) -> None:
    check_ranges(options, where="synthetic", bounds={"n_images": 1, "image_size": 16, "strength": (0.0, 0.99)})
    check_factor_names(options.factors, FACTOR_LEVELS, "synthetic")
    seen: set[tuple[str, str]] = set()
    for edge in options.correlations:
        if len(edge) != 3 or not all(isinstance(name, str) for name in edge[:2]):
            raise ValueError(f"synthetic: correlation {edge!r} must be [parent, child, strength]")
        parent, child, strength = edge
        for name in (parent, child):
            if name not in options.factors:
                raise ValueError(f"synthetic: correlation {edge!r} names {name!r}, which is not "
                                 f"among the varying factors {options.factors}")
        if parent == child:
            raise ValueError(f"synthetic: correlation {edge!r} is a self-loop")
        if (parent, child) in seen:
            raise ValueError(f"synthetic: correlation {parent} -> {child} is listed twice")
        seen.add((parent, child))
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not -1 < strength < 1:
            raise ValueError(f"synthetic: strength of {edge!r} must be a number in (-1, 1)")
    _topological_order(options.factors, options.correlations)
    for child in options.factors:
        total = sum(float(s) ** 2 for _, c, s in options.edges() if c == child)
        if total >= 1:
            raise ValueError(f"synthetic: the squared strengths into {child!r} sum to {total:.3g}; "
                             f"they must sum to less than 1")


def _topological_order(factors: Sequence[str], edges: Sequence[Sequence[Any]]) -> list[str]:
    """Kahn's algorithm; ties keep the order of ``factors``. Raises ValueError on a cycle."""
    indegree = {name: 0 for name in factors}
    for _, child, _ in edges:
        indegree[child] += 1
    order: list[str] = []
    ready = [name for name in factors if indegree[name] == 0]
    while ready:
        name = ready.pop(0)
        order.append(name)
        for parent, child, _ in edges:
            if parent == name:
                indegree[child] -= 1
                if indegree[child] == 0:
                    ready.append(child)
    if len(order) != len(factors):
        stuck = [name for name in factors if name not in order]
        raise ValueError(f"synthetic: correlations contain a cycle through {stuck}; "
                         f"the edges must form a directed acyclic graph")
    return order


def sample_factors(options: SyntheticOptions, seed: int) -> np.ndarray:
    """Draw the factor classes with the Gaussian copula of ``options.correlations``.

    Parameters
    ----------
    options : the data set options (``n_images``, ``factors``, ``correlations``).
    seed : seed of the numpy Generator.

    Returns
    -------
    int64 array (n_images, len(factors)); column k holds classes 0 .. levels-1 of factor k,
    each uniformly distributed.
    """
    names = list(options.factors)
    index = {name: k for k, name in enumerate(names)}
    edges = options.edges()
    eps = np.random.default_rng(seed).standard_normal((int(options.n_images), len(names)))
    latent = np.zeros_like(eps)
    cov = np.eye(len(names))  # covariance of the standard-normal latents
    for name in _topological_order(names, edges):
        c = index[name]
        parents = [index[p] for p, child, _ in edges if child == name]
        weights = np.array([float(s) for _, child, s in edges if child == name])
        if not parents:
            latent[:, c] = eps[:, c]
            continue
        noise = np.sqrt(1.0 - np.sum(weights ** 2))
        # Parents sharing ancestors are correlated: rescale so the latent stays N(0, 1).
        std = np.sqrt(weights @ cov[np.ix_(parents, parents)] @ weights + noise ** 2)
        latent[:, c] = (latent[:, parents] @ weights + noise * eps[:, c]) / std
        cov[c, :] = cov[:, c] = weights @ cov[parents, :] / std
        cov[c, c] = 1.0
    levels = np.array([FACTOR_LEVELS[name] for name in names])
    classes = np.floor(ndtr(latent) * levels).astype(np.int64)
    return np.minimum(classes, levels - 1)


def _shape_gauge(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """<= 1 inside the shape; u, v are object coordinates in units of its half-size."""
    if shape == 0:  # square
        return np.maximum(np.abs(u), np.abs(v))
    if shape == 1:  # circle
        return np.sqrt(u * u + v * v)
    if shape == 2:  # equilateral triangle, apex up, spanning v in [-1, 1]
        v = v - 1.0 / 3.0
        half = np.sqrt(3.0) / 2.0
        edges = np.maximum(np.maximum(v, half * u - 0.5 * v), -half * u - 0.5 * v)
        return edges / (2.0 / 3.0)
    # cross: union of a horizontal and a vertical bar
    au, av = np.abs(u), np.abs(v)
    return np.minimum(np.maximum(au, av / _CROSS_ARM), np.maximum(au / _CROSS_ARM, av))


def _render_batch(classes: dict[str, np.ndarray], size: int) -> np.ndarray:
    n = len(classes["shape"])
    grid = (np.arange(size) + 0.5) / size
    y, x = grid[None, :, None], grid[None, None, :]

    def frac(name: str, low: float, high: float) -> np.ndarray:
        return low + (high - low) * classes[name] / (FACTOR_LEVELS[name] - 1)

    half = frac("scale", *_SCALE_RANGE)[:, None, None] / 2
    cx = frac("position", *_POSITION_RANGE)[:, None, None]
    cy = _GROUND - half
    angle = np.deg2rad(frac("orientation", *_ANGLE_RANGE))[:, None, None]
    dx, dy = (x - cx) / half, (y - cy) / half
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, cos * dy - sin * dx

    inside = np.zeros((n, size, size), dtype=bool)
    for shape in range(len(SHAPES)):
        rows = np.flatnonzero(classes["shape"] == shape)
        if len(rows):
            inside[rows] = _shape_gauge(shape, u[rows], v[rows]) <= 1.0

    floor = np.broadcast_to((grid >= _HORIZON)[None, :, None, None], (n, size, 1, 1))
    background = np.where(floor, _FLOOR_COLORS[classes["floor_hue"]][:, None, None, :],
                          _WALL_COLORS[classes["wall_hue"]][:, None, None, :])
    if classes["window"].any():  # a light pane with a cross of bars, drawn on the wall
        top, bottom, left, right = _WINDOW
        pane = (y >= top) & (y < bottom) & (x >= left) & (x < right)
        bars = pane & ((np.abs(y - (top + bottom) / 2) < 0.6 / size + 0.01) |
                       (np.abs(x - (left + right) / 2) < 0.6 / size + 0.01))
        shown = (classes["window"] == 1)[:, None, None]
        colour = np.where(bars[..., None], _WINDOW_BARS, _WINDOW_COLOR)
        background = np.where((shown & pane)[..., None], colour, background)
    return np.where(inside[..., None], _OBJECT_COLORS[classes["object_hue"]][:, None, None, :],
                    background).astype(np.uint8)


def render(factor_classes: np.ndarray, factor_names: Sequence[str], image_size: int = 64) -> np.ndarray:
    """Draw images from factor classes.

    Parameters
    ----------
    factor_classes : int array (N, K), or (K,) for one image; classes 0 .. levels-1.
    factor_names : the K factor names of the columns; factors not named take their middle class.
    image_size : side length in pixels.

    Returns
    -------
    uint8 array (N, image_size, image_size, 3), or (image_size, image_size, 3) for a 1-D input.
    """
    classes = np.asarray(factor_classes)
    single = classes.ndim == 1
    classes = np.atleast_2d(classes).astype(np.int64)
    names = list(factor_names)
    unknown = [name for name in names if name not in FACTOR_LEVELS]
    if unknown:
        raise ValueError(f"unknown factor(s) {unknown}; allowed factors: {', '.join(FACTOR_LEVELS)}")
    if classes.shape[1] != len(names):
        raise ValueError(f"factor_classes has {classes.shape[1]} columns for {len(names)} factor names")
    out = np.empty((len(classes), image_size, image_size, 3), dtype=np.uint8)
    for start in range(0, len(classes), _BATCH):
        chunk = classes[start:start + _BATCH]
        full = {name: np.full(len(chunk), RESTING_CLASS[name], dtype=np.int64) for name in FACTOR_LEVELS}
        for k, name in enumerate(names):
            full[name] = np.clip(chunk[:, k], 0, FACTOR_LEVELS[name] - 1)
        out[start:start + _BATCH] = _render_batch(full, image_size)
    return out[0] if single else out


def attribute_scores(factors: np.ndarray, factor_names: Sequence[str]) -> np.ndarray:
    """What a perfect oracle says (:func:`gem.labels.class_scores`), int (N, K) in 0..5."""
    return class_scores(factors, [FACTOR_LEVELS[name] for name in factor_names])


def _cache_path(options: SyntheticOptions, seed: int, cache_dir: Path) -> Path:
    key = dict(asdict(options), seed=seed, render_version=RENDER_VERSION)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"synthetic-{digest}.npy"


def _render_to_cache(factors: np.ndarray, names: list[str], size: int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                           shape=(len(factors), size, size, 3))
        with progress(len(factors), "render synthetic", unit="img") as bar:
            for start in range(0, len(factors), _BATCH):
                chunk = factors[start:start + _BATCH]
                images[start:start + len(chunk)] = render(chunk, names, size)
                bar.update(len(chunk))
        images.flush()
        del images
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def build_synthetic(options: SyntheticOptions, context: BuildContext) -> ImageDataset:
    """Build (or load from the cache) the synthetic data set.

    Parameters
    ----------
    options : the data set options.
    context : the build context; ``seed`` is used when ``options.seed`` is None and the
        images are cached under ``cache_dir``.

    Returns
    -------
    ImageDataset with read-only memmapped images, factors, oracle scores and the
    Somers' D ground-truth impact matrix.
    """
    _validate(options)
    seed = int(context.seed if options.seed is None else options.seed)
    names = list(options.factors)
    factors = sample_factors(options, seed)
    path = _cache_path(options, seed, Path(context.cache_dir))
    if not path.exists():
        _render_to_cache(factors, names, int(options.image_size), path)
    images = np.load(path, mmap_mode="r")
    scores = attribute_scores(factors, names)
    dataset = ImageDataset(
        images=images,
        attributes=names,
        factors=factors,
        factor_names=names,
        factor_levels=[FACTOR_LEVELS[name] for name in names],
        attribute_scores=scores,
        true_impact=true_impact(scores),
        info={
            "description": "Procedurally rendered wall/floor/object scenes whose factors are "
                           "sampled with a Gaussian copula along the configured parent -> child edges.",
            "correlations": [{"parent": p, "child": c, "strength": float(s)}
                             for p, c, s in options.edges()],
            "factor_levels": {name: FACTOR_LEVELS[name] for name in names},
            "fixed_factors": {name: RESTING_CLASS[name] for name in FACTOR_LEVELS if name not in names},
            "shapes": list(SHAPES),
            "seed": seed,
            "cache_file": str(path),
        },
    )
    dataset.independent_sample = lambda n, eval_seed: (
        _independent_set(options, seed, eval_seed, n, Path(context.cache_dir)), np.arange(n))
    return dataset


def _independent_set(options: SyntheticOptions, seed: int, eval_seed: int, n: int, cache_dir: Path) -> ImageDataset:
    """``n`` freshly rendered images of the same factors with every correlation off (cached), drawn
    with a seed of their own so that no image repeats a training one by construction."""
    independent = replace(options, n_images=int(n), correlations=[], strength=None)
    own_seed = int(np.random.SeedSequence([seed, eval_seed, 0x1D]).generate_state(1)[0])
    names = list(independent.factors)
    factors = sample_factors(independent, own_seed)
    path = _cache_path(independent, own_seed, cache_dir)
    if not path.exists():
        _render_to_cache(factors, names, int(independent.image_size), path)
    scores = attribute_scores(factors, names)
    return ImageDataset(images=np.load(path, mmap_mode="r"), attributes=names, factors=factors, factor_names=names,
                        factor_levels=[FACTOR_LEVELS[name] for name in names], attribute_scores=scores,
                        true_impact=true_impact(scores), info={"seed": own_seed, "cache_file": str(path)})


@hookimpl
def gem_register_datasets(register):
    register("synthetic", build_synthetic, options=SyntheticOptions,
             description="Procedural wall/floor/object images with known, correlated factors (offline)")
