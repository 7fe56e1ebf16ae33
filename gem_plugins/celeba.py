"""The ``celeba`` data set: CelebA's aligned faces (Liu et al., 2015) with their 40 attributes.

The official layout under ``root``::

    img_align_celeba/                   000001.jpg ... 202599.jpg (178x218 aligned faces)
    list_attr_celeba.txt                count, the 40 attribute names, then one row per image (1 / -1)
    list_landmarks_align_celeba.txt     count, the 10 column names, then eyes, nose, mouth corners
    list_eval_partition.txt             one row per image: 0 train, 1 valid, 2 test

Faces are cropped with the landmarks before resizing (the GEM paper's pre-processing), see
:func:`face_box`. Attributes are chosen by the names the attribute file spells (``Male``,
``Heavy_Makeup``), by the aliases of the paper's six (Bangs, Bald, Gender, Beard, Blond,
Makeup), and negated with a ``not `` or ``~`` prefix (Beard = not No_Beard). The 0/1 labels are
the factors; the oracle scale's endpoints (present 5, absent 0) are the attribute scores the
``labels`` oracle answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from gem import hookimpl
from gem.data import (ImageDataOptions, MissingDataError, build_image_cache, cache_file, cache_info,
                      center_square_box, crop_resize, open_rgb)
from gem.data_download import download_command
from gem.errors import DataError
from gem.interfaces import BuildContext, ImageDataset
from gem.labels import true_impact

#: The 40 attributes, as list_attr_celeba.txt spells them, in file order.
ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby",
    "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male",
    "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin",
    "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
    "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young",
)

#: The GEM paper's six attributes and the CelebA column each stands for.
ALIASES: dict[str, str] = {
    "Bangs": "Bangs", "Bald": "Bald", "Gender": "Male", "Beard": "not No_Beard",
    "Blond": "Blond_Hair", "Makeup": "Heavy_Makeup",
}

SPLITS: dict[str, int] = {"train": 0, "valid": 1, "test": 2}

IMAGE_DIR = "img_align_celeba"
ATTR_FILE = "list_attr_celeba.txt"
LANDMARK_FILE = "list_landmarks_align_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"


def _paper_attributes() -> list[str]:
    return list(ALIASES)


def resolve_attribute(name: str) -> tuple[str, bool]:
    """``(column, negated)`` for an attribute name: a CelebA column (case and spaces forgiven),
    an alias of :data:`ALIASES`, either with any number of ``not `` / ``~`` prefixes."""
    text, negated = name.strip(), False
    while True:
        if text.startswith("~"):
            text, negated = text[1:].strip(), not negated
        elif text.lower().startswith("not "):
            text, negated = text[4:].strip(), not negated
        else:
            break
    aliases = {k.lower(): v for k, v in ALIASES.items()}
    if text.lower() in aliases and aliases[text.lower()] != text:
        column, inner = resolve_attribute(aliases[text.lower()])
        return column, negated != inner
    columns = {c.lower(): c for c in ATTRIBUTES}
    key = text.replace(" ", "_").lower()
    if key not in columns:
        raise ValueError(f"celeba: unknown attribute {name!r}; use a CelebA name ({', '.join(ATTRIBUTES)}), "
                         f"an alias ({', '.join(ALIASES)}), optionally prefixed with 'not ' or '~'")
    return columns[key], negated


@dataclass
class CelebAOptions(ImageDataOptions):
    """Recipe options of the ``celeba`` data set (besides those of :class:`gem.data.ImageDataOptions`).

    Attributes
    ----------
    root : folder with img_align_celeba/ and the three text files (see docs/datasets.md).
    max_images : use the first N images of the split (None: all).
    split : train, valid, test (list_eval_partition.txt) or all (every image, file order: the
        last images, which the pipeline holds out for evaluation, are then test images).
    attributes : the attributes GEM models, one latent each (default: the paper's six).
    crop : landmarks (the paper's face crop, :func:`face_box`), center (largest centred square)
        or none (squash the whole image).
    crop_scale : side of the landmark box in units of the landmark spread.
    workers : decoding threads while the cache is built.
    """

    root: str = "data/celeba"
    split: Literal["train", "valid", "test", "all"] = "all"
    attributes: list[str] = field(default_factory=_paper_attributes)
    crop: Literal["landmarks", "center", "none"] = "landmarks"
    crop_scale: float = 3.0
    workers: int = 4

    def __post_init__(self) -> None:
        self.attributes = list(self.attributes)
        if not self.attributes:
            raise ValueError("celeba: attributes must not be empty")
        for name in self.attributes:
            resolve_attribute(name)
        if len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"celeba: attributes listed twice in {self.attributes}")
        self.check_sizes("celeba", crop_scale=(0.5, 10), workers=1)
        self.check_root("celeba", "the CelebA folder")


def face_box(landmarks: Sequence[float], width: int, height: int, scale: float = 3.0) -> tuple[float, float, float, float]:
    """The square face crop ``(left, top, right, bottom)`` from CelebA's five landmarks.

    With the eyes e_l, e_r and the mouth corners m_l, m_r (the nose is not used):
    centre ``c = (e_l + e_r + m_l + m_r) / 4``, spread
    ``d = max(|e_l - e_r|, |(e_l + e_r)/2 - (m_l + m_r)/2|)`` (eye distance or eye-to-mouth
    distance), side ``s = min(scale * d, width, height)``. The box is then shifted (not shrunk)
    to lie inside the image. On an aligned 178x218 CelebA face, d is about 40 px, so the default
    scale 3 gives a box of about 120 px from the hairline to below the chin.

    Parameters
    ----------
    landmarks : the 10 numbers of a landmark row: lefteye x y, righteye x y, nose x y,
        leftmouth x y, rightmouth x y.
    width, height : the image size.
    scale : side of the box in units of the spread d.
    """
    p = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    eyes, mouth = (p[0] + p[1]) / 2, (p[3] + p[4]) / 2
    centre = (eyes + mouth) / 2
    spread = max(np.linalg.norm(p[0] - p[1]), np.linalg.norm(eyes - mouth), 1.0)
    side = min(scale * spread, width, height)
    left = float(np.clip(centre[0] - side / 2, 0, width - side))
    top = float(np.clip(centre[1] - side / 2, 0, height - side))
    return (left, top, left + side, top + side)


def _rows(path: Path, skip: int) -> list[list[str]]:
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    return [line.split() for line in lines[skip:] if line.strip()]


def read_attribute_table(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """``(column names, file names, labels)`` of list_attr_celeba.txt; labels int8 (N, 40), 1 / -1."""
    with open(path, encoding="utf-8") as fh:
        fh.readline()  # the image count
        names = fh.readline().split()
    rows = _rows(path, 2)
    bad = next((r for r in rows if len(r) != len(names) + 1), None)
    if bad is not None:
        raise DataError(f"celeba: {path}: row {bad[:1]} has {len(bad) - 1} values for {len(names)} attributes")
    files = [r[0] for r in rows]
    labels = np.array([r[1:] for r in rows], dtype=np.int8).reshape(len(rows), len(names))
    return names, files, labels


def read_landmarks(path: Path) -> dict[str, tuple[int, ...]]:
    """File name -> the 10 landmark coordinates of list_landmarks_align_celeba.txt."""
    return {r[0]: tuple(int(v) for v in r[1:11]) for r in _rows(path, 2) if len(r) >= 11}


def read_partition(path: Path) -> dict[str, int]:
    """File name -> partition (0 train, 1 valid, 2 test) of list_eval_partition.txt."""
    return {r[0]: int(r[1]) for r in _rows(path, 0) if len(r) >= 2}


def _expected(root: Path, image_dir: Path, needed: dict[str, bool]) -> list[str]:
    notes = {
        IMAGE_DIR: f"{image_dir}/  (the aligned JPEGs 000001.jpg ... 202599.jpg)",
        ATTR_FILE: f"{root / ATTR_FILE}  (the 40 attribute labels)",
        LANDMARK_FILE: f"{root / LANDMARK_FILE}  (landmarks for the face crop; needed when crop=landmarks)",
        PARTITION_FILE: f"{root / PARTITION_FILE}  (train/valid/test split; needed when split is not 'all')",
    }
    return [notes[name] + ("" if ok else "  <- missing") for name, ok in needed.items()]


def build_celeba(options: CelebAOptions, context: BuildContext) -> ImageDataset:
    """Load CelebA (through the cache): face crops, chosen attributes as factors and scores."""
    root = Path(options.root).expanduser()
    image_dir = root / IMAGE_DIR
    if (image_dir / IMAGE_DIR).is_dir():  # the Kaggle zip nests the folder
        image_dir = image_dir / IMAGE_DIR
    needed = {IMAGE_DIR: image_dir.is_dir(), ATTR_FILE: (root / ATTR_FILE).is_file()}
    if options.crop == "landmarks":
        needed[LANDMARK_FILE] = (root / LANDMARK_FILE).is_file()
    if options.split != "all":
        needed[PARTITION_FILE] = (root / PARTITION_FILE).is_file()
    if not all(needed.values()):
        raise MissingDataError("celeba", root, _expected(root, image_dir, needed),
                               detail="CelebA files are missing",
                               hint=f"download the aligned images and the annotation files from {URL} "
                                    f"(see docs/datasets.md)", fix=download_command("celeba", options.root))
    names, files, labels = read_attribute_table(root / ATTR_FILE)
    columns = [resolve_attribute(a) for a in options.attributes]
    absent = [c for c, _ in columns if c not in names]
    if absent:
        raise DataError(f"celeba: {root / ATTR_FILE} has no column {absent}; its columns: {', '.join(names)}")
    rows = np.arange(len(files))
    if options.split != "all":
        partition = read_partition(root / PARTITION_FILE)
        wanted = SPLITS[options.split]
        rows = np.array([i for i, f in enumerate(files) if partition.get(f) == wanted], dtype=np.int64)
    if options.max_images is not None:
        rows = rows[:options.max_images]
    if len(rows) == 0:
        raise MissingDataError("celeba", root, _expected(root, image_dir, needed),
                               detail=f"no images listed for split {options.split!r}")
    landmarks = read_landmarks(root / LANDMARK_FILE) if options.crop == "landmarks" else {}
    sources = [(files[i], landmarks.get(files[i])) for i in rows]
    size = int(options.image_size)

    def load(source: tuple[str, Optional[tuple[int, ...]]]) -> np.ndarray:
        name, points = source
        if options.crop == "landmarks" and points is None:
            raise KeyError(f"no landmarks for {name} in {LANDMARK_FILE}")
        image = open_rgb(image_dir / name)
        if options.crop == "landmarks":
            box = face_box(points, image.width, image.height, options.crop_scale)
        elif options.crop == "center":
            box = center_square_box(image.width, image.height)
        else:
            box = None
        return crop_resize(image, box, size)

    cache = cache_file(context.cache_dir, "celeba",
                       {"images": str(image_dir.resolve()), "crop": options.crop,
                        "crop_scale": options.crop_scale, "image_size": size}, sources)
    cached = build_image_cache(cache, sources, load, size, desc="preprocess celeba",
                               names=[s[0] for s in sources], workers=options.workers, dataset="celeba")
    kept_rows = rows[cached.kept]
    factors = np.empty((len(kept_rows), len(columns)), dtype=np.int64)
    for k, (column, negated) in enumerate(columns):
        present = labels[kept_rows, names.index(column)] > 0
        factors[:, k] = present != negated
    scores = factors * 5
    return ImageDataset(
        images=cached.images,
        attributes=list(options.attributes),
        factors=factors,
        factor_names=list(options.attributes),
        factor_levels=[2] * len(columns),
        attribute_scores=scores,
        true_impact=true_impact(scores),
        info={
            "description": "CelebA aligned faces, cropped with the landmarks and resized",
            "root": str(root),
            "split": options.split,
            "attribute_columns": {a: ("not " if neg else "") + c for a, (c, neg) in zip(options.attributes, columns)},
            "positive_rate": {a: round(float(factors[:, k].mean()), 4) for k, a in enumerate(options.attributes)},
            "crop": (f"landmarks: square of side {options.crop_scale} x max(eye distance, eye-to-mouth "
                     f"distance) centred on the eyes and mouth" if options.crop == "landmarks" else options.crop),
            **cache_info(cache, len(sources), cached),
        },
    )


@hookimpl
def gem_register_datasets(register):
    register("celeba", build_celeba, options=CelebAOptions,
             description="CelebA aligned faces (official layout), landmark face crop, 40 attribute labels")
