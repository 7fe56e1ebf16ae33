"""5. Local MLLM: images/s of the llava oracle's digit-probability readout (``mode: logits``) vs
text generation (``mode: generate``) on the tiny LLaVA that tests/tiny_llava.py builds offline."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import Figure, Row, ratio
from gem.interfaces import BuildContext
from gem.plugins import Registry, make_plugin_manager

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_llava import build_tiny_llava  # noqa: E402  (shared test infrastructure)

ATTRIBUTES = ["brightness", "redness", "size", "image", "score", "digit"]


def images_per_s(model_dir: Path, mode: str, images: np.ndarray, device: str) -> float:
    """Images/s of ``oracle.score`` for every attribute, after one warm-up batch."""
    reg = Registry(make_plugin_manager()).get("oracle", "llava")
    oracle = reg.build(reg.options(model=str(model_dir), mode=mode, device=device),
                       BuildContext(seed=0, run_dir=Path("."), cache_dir=Path(".")))
    try:
        oracle.score(images[:2], np.arange(2), ATTRIBUTES)  # warm-up
        start = time.perf_counter()
        scores = oracle.score(images, np.arange(len(images)), ATTRIBUTES)
        seconds = time.perf_counter() - start
    finally:
        oracle.close()
    assert scores.shape == (len(images), len(ATTRIBUTES))
    return len(images) / seconds


def bench_llava(quick: bool, device: str = "cpu") -> Row:
    n = 8 if quick else 64
    images = np.random.default_rng(0).integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="gem-bench-llava-") as tmp:
        model_dir = build_tiny_llava(Path(tmp) / "tiny_llava")
        logits = images_per_s(model_dir, "logits", images, device)
        generate = images_per_s(model_dir, "generate", images, device)
    speedup = ratio(logits, generate)
    return Row(
        name="llava" if device == "cpu" else f"llava_{device}",
        title=f"llava oracle on the tiny offline LLaVA, {n} images x {len(ATTRIBUTES)} attributes, on {device}",
        ours=Figure("mode: logits (digit probabilities, one forward pass)", logits, "img/s"),
        reference=Figure("mode: generate (max_new_tokens 8, parse the text)", generate, "img/s"),
        ratio=speedup, ratio_meaning="logits img/s / generate img/s (x faster)", target="ratio only", met=None,
        figures={"logits_img_per_s": logits, "generate_img_per_s": generate, "images": n},
        notes=["tiny random model (hidden 32): the ratio shows the cost of the decoding loop, not of a 7B model"])
