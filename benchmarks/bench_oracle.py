"""4. Oracle: requests per scored image in each prompt mode, and the wall time to score 1,500
images against the local fake server answering after 200 ms, at the default concurrency.

``oracle_tail``: the same with 5 % of the replies taking 30 s (hedged requests keep the tail
short); ``oracle_concurrency``: ``max_concurrency`` 32 against 8 on a server that answers at most
8 requests at once and 429s the rest (the adaptive limit keeps 32 from being slower)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import Figure, Row
from gem.interfaces import BuildContext, ImageDataset
from gem.scoring import score_images
from gem.plugins import Registry, make_plugin_manager
from gem.recipe import ScoringOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fake_openai import FakeOpenAI  # noqa: E402  (shared test infrastructure)

ATTRIBUTES = ["Bangs", "Bald", "Gender", "Beard", "Blond", "Makeup"]
DELAY_S = 0.2
TARGET_S = 60.0


def score_against_fake(n_images: int, prompt_mode: str, *, tail_fraction: float = 0.0, tail_seconds: float = 30.0,
                       capacity: int | None = None, adaptive: bool = True, **options: Any) -> dict[str, Any]:
    """Score n random 64x64 images through ``gem.scoring.score_images`` (no score cache)."""
    images = np.random.default_rng(0).integers(0, 256, size=(n_images, 64, 64, 3), dtype=np.uint8)
    dataset = ImageDataset(images=images, attributes=list(ATTRIBUTES))
    registry = Registry(make_plugin_manager())
    reg = registry.get("oracle", "openai")
    with FakeOpenAI(ATTRIBUTES) as server:
        server.default, server.slow_seconds = "tail", DELAY_S  # every answer after 200 ms, some much later
        server.tail_fraction, server.tail_seconds = tail_fraction, tail_seconds
        server.capacity, server.retry_after = capacity, "1"
        options = reg.options(model="fake-vision", base_url=server.base_url, api_key_env=None,
                              prompt_mode=prompt_mode, **options)
        oracle = reg.build(options, BuildContext(seed=0, run_dir=Path("."), cache_dir=Path(".")))
        if not adaptive:
            oracle._concurrency.on_overload = lambda *args, **kwargs: None
        start = time.perf_counter()
        try:
            scores, _ = score_images(oracle, dataset, np.arange(n_images), ScoringOptions().batch_size,
                                     cache=None, show_progress=False)
        finally:
            oracle.close()
        seconds = time.perf_counter() - start
        requests, in_flight = len(server.requests), server.max_in_flight
    return {"seconds": seconds, "requests": requests, "requests_per_image": requests / n_images,
            "missing": int(np.isnan(scores).sum()), "max_in_flight": in_flight,
            "concurrency": options.max_concurrency, **oracle.stats()}


def bench_oracle(quick: bool) -> Row:
    n_full = 64 if quick else 1500
    n_attr = 16 if quick else 160
    per_image = score_against_fake(n_full, "per_image")
    per_attribute = score_against_fake(n_attr, "per_attribute")
    scale = 1500 / n_full
    projected = per_image["seconds"] * scale
    met = per_image["seconds"] < TARGET_S and per_image["missing"] == 0 if n_full == 1500 else projected < TARGET_S
    per_attr_1500 = per_attribute["seconds"] * 1500 / n_attr
    return Row(
        name="oracle", title=f"openai oracle vs a fake server answering after {DELAY_S * 1000:.0f} ms, "
                             f"{len(ATTRIBUTES)} attributes, default concurrency {per_image['concurrency']}",
        ours=Figure(f"per_image mode (default), {n_full} images", per_image["seconds"], "s"),
        reference=None, ratio=per_attribute["requests_per_image"] / per_image["requests_per_image"],
        ratio_meaning="requests per image, per_attribute / per_image mode (x fewer in the default mode)",
        target=f"1,500 images in < {TARGET_S:.0f} s (per_image mode)", met=met,
        figures={"per_image_requests_per_image": per_image["requests_per_image"],
                 "per_attribute_requests_per_image": per_attribute["requests_per_image"],
                 "per_image_seconds": per_image["seconds"], "per_image_seconds_for_1500": projected,
                 "per_attribute_seconds": per_attribute["seconds"],
                 "per_attribute_seconds_for_1500": per_attr_1500,
                 "per_image_missing": per_image["missing"], "per_attribute_missing": per_attribute["missing"],
                 "max_in_flight": per_image["max_in_flight"]},
        notes=[f"per_image: {per_image['requests_per_image']:.2f} requests/image, {per_image['seconds']:.1f} s for "
               f"{n_full} images ({projected:.1f} s for 1,500"
               + (", extrapolated)" if n_full != 1500 else ")") + f", at most {per_image['max_in_flight']} in flight",
               f"per_attribute: {per_attribute['requests_per_image']:.2f} requests/image; {n_attr} images took "
               f"{per_attribute['seconds']:.1f} s, {per_attr_1500:.0f} s for 1,500 extrapolated (no target)",
               f"lower bound at this concurrency: 1,500 x {DELAY_S} s / {per_image['concurrency']} = "
               f"{1500 * DELAY_S / per_image['concurrency']:.1f} s (per_image)"])


def bench_oracle_tail(quick: bool) -> Row:
    n = 64 if quick else 1500
    tail_s = 8.0 if quick else 30.0
    plain = score_against_fake(n, "per_image")
    tail = score_against_fake(n, "per_image", tail_fraction=0.05, tail_seconds=tail_s)
    unhedged = score_against_fake(min(n, 300), "per_image", tail_fraction=0.05, tail_seconds=tail_s, hedge_factor=None)
    limit = 1.3 * plain["seconds"] + 30.0
    return Row(
        name="oracle_tail", title=f"openai oracle, {n} images at {DELAY_S * 1000:.0f} ms with 5 % of replies taking "
                                  f"{tail_s:.0f} s (hedged after 4x the median, at least 1 s)",
        ours=Figure("with the slow tail", tail["seconds"], "s"),
        reference=Figure("no slow replies", plain["seconds"], "s"),
        ratio=tail["seconds"] / plain["seconds"], ratio_meaning="wall time with the tail / without it",
        target="with the tail < 1.3 x without + 30 s", met=tail["seconds"] < limit and tail["missing"] == 0,
        figures={"tail_seconds": tail["seconds"], "plain_seconds": plain["seconds"], "limit_seconds": limit,
                 "hedged": tail["hedged"], "requests_per_image": tail["requests_per_image"],
                 "unhedged_seconds": unhedged["seconds"], "unhedged_images": min(n, 300)},
        notes=[f"{tail['hedged']} requests were sent again ({tail['requests_per_image']:.3f} requests per image)",
               f"without hedging (hedge_factor: null) {min(n, 300)} images took {unhedged['seconds']:.1f} s"])


def bench_oracle_concurrency(quick: bool) -> Row:
    n = 48 if quick else 300
    low = score_against_fake(n, "per_image", capacity=8, max_concurrency=8)
    high = score_against_fake(n, "per_image", capacity=8, max_concurrency=32)
    fixed = score_against_fake(n, "per_image", capacity=8, max_concurrency=32, adaptive=False)
    return Row(
        name="oracle_concurrency", title=f"openai oracle, {n} images, a server that answers 8 requests at once "
                                         f"(429 with Retry-After: 1 s beyond), max_concurrency 32 vs 8",
        ours=Figure("max_concurrency 32", high["seconds"], "s"),
        reference=Figure("max_concurrency 8", low["seconds"], "s"),
        ratio=low["seconds"] / high["seconds"], ratio_meaning="time at 8 / time at 32 (>= 1: 32 is not slower)",
        target="32 within 15 % of 8, and faster than 32 without the adaptive limit",
        met=high["seconds"] <= 1.15 * low["seconds"] and high["seconds"] < fixed["seconds"],
        figures={"seconds_32": high["seconds"], "seconds_8": low["seconds"], "seconds_32_fixed": fixed["seconds"],
                 "rate_limited_32": high["rate_limited"], "rate_limited_32_fixed": fixed["rate_limited"]},
        notes=[f"32 without the adaptive limit: {fixed['seconds']:.1f} s, {fixed['rate_limited']} answers 429",
               f"32 adaptive: {high['rate_limited']} answers 429"])
