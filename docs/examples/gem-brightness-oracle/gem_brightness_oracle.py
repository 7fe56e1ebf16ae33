"""A toy relation oracle for gem: every attribute is scored by how bright the image is.

It answers the same 0-5 score for every attribute, so it knows nothing about the attributes;
it is here to show everything a real oracle plugin needs: an options dataclass (the recipe
keys), a ``RelationOracle`` subclass with a ``cache_key``, missing answers as NaN, ``stats()``
and ``close()``, and the registration hook that the ``gem`` entry point points at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from gem import hookimpl
from gem.interfaces import BuildContext, RelationOracle

#: Bump when the scoring rule changes, so that scores cached by an older version are not reused.
VERSION = 1


@dataclass
class BrightnessOptions:
    """Recipe keys of the ``brightness`` oracle: ``oracle: {plugin: brightness, gain: 1.5}``."""

    gain: float = 1.0
    """Multiplies the brightness on the 0-5 scale (with 1: black scores 0, mid-grey 3, white 5)."""
    skip_blank: bool = True
    """Give no answer (NaN) for an image whose pixels are all the same, as an MLLM might refuse."""

    def __post_init__(self) -> None:
        if not self.gain > 0:
            raise ValueError(f"gain must be positive, got {self.gain}")


class BrightnessOracle(RelationOracle):
    """Scores every attribute 0-5 by the mean luminance of the image (a toy)."""

    def __init__(self, options: BrightnessOptions, context: BuildContext):
        self.gain = options.gain
        self.skip_blank = options.skip_blank
        # Everything that changes the answers goes into the cache key.
        self.cache_key = f"brightness/v{VERSION}/gain={options.gain:g}/skip_blank={options.skip_blank}"
        self._counts = {"images": 0, "blank": 0}

    def score(self, images: np.ndarray, indices: np.ndarray, attributes: Sequence[str]) -> np.ndarray:
        pixels = np.asarray(images, dtype=np.float64)                          # (B, H, W, 3), 0..255
        luminance = pixels @ np.array([0.299, 0.587, 0.114])                   # (B, H, W)
        level = np.clip(np.floor(luminance.mean(axis=(1, 2)) / 255 * 5 * self.gain + 0.5), 0, 5)
        scores = np.repeat(level[:, None], len(attributes), axis=1)            # (B, n)
        if self.skip_blank:
            flat = pixels.reshape(len(pixels), -1)
            blank = flat.min(axis=1) == flat.max(axis=1)
            scores[blank] = np.nan                                             # missing, never 0
            self._counts["blank"] += int(blank.sum())
        self._counts["images"] += len(pixels)
        return scores

    def stats(self) -> dict[str, int]:
        return dict(self._counts)

    def close(self) -> None:
        pass  # nothing to release; a real oracle closes its HTTP client or frees its model here


@hookimpl
def gem_register_oracles(register):
    register("brightness", BrightnessOracle, options=BrightnessOptions,
             description="a toy oracle: every attribute scored by image brightness")
