"""``gem explore`` in a real headless Chromium, driven by Playwright: what a person does on the page.

Needs the ``playwright`` Python package (the test extra) and a system Chromium (Debian's
``chromium``; ``GEM_BROWSER`` names another binary). Nothing downloads a browser. Without them the
test is skipped with the reason, unless ``GEM_REQUIRE_BROWSER=1`` (set by .ci/run), where it fails.
Screenshots go to ``$GEM_TEST_ARTIFACTS/explore`` (default: the test's temporary folder).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gem.explore import EDGE_FLOOR, Explorer, make_server
from gem.run_folder import load_run

MOVED = 0.01  # the page outlines a bar whose decoder input moved by more than this
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


#: Screen coordinates of the middle of an SVG path (a point on the curve, not its bounding box's centre).
MIDPOINT = """e => { const p = e.getPointAtLength(e.getTotalLength() / 2), m = e.getScreenCTM();
                    return [p.x * m.a + p.y * m.c + m.e, p.x * m.b + p.y * m.d + m.f]; }"""


def _browser() -> str | None:
    named = os.environ.get("GEM_BROWSER")
    if named:
        return named
    return next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)


def _unavailable() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright; it drives the system browser)"
    if _browser() is None:
        return "no Chromium found (apt install chromium, or set GEM_BROWSER to a Chromium binary)"
    return None


@pytest.fixture(scope="module")
def page_url(trained_gem_run):
    reason = _unavailable()
    if reason:
        if os.environ.get("GEM_REQUIRE_BROWSER") == "1":
            pytest.fail(f"GEM_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    explorer = Explorer(load_run(trained_gem_run))
    server = make_server(explorer, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", explorer
    server.shutdown()
    server.server_close()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("GEM_TEST_ARTIFACTS") or tmp_path) / "explore"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _pixels(page, selector: str) -> np.ndarray:
    src = page.get_attribute(selector, "src")
    assert src and src.startswith("data:image/png;base64,"), src
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))).astype(int)


def _moved_bars(page, mode: str) -> set[int]:
    ids = page.eval_on_selector_all(f".bar.{mode}.moved", "els => els.map(e => e.id)")
    return {int(i.rsplit("-", 1)[1]) for i in ids}


def _wait_for_decode(page, after: int) -> int:
    page.wait_for_function(f"Number(document.body.dataset.decodes || 0) > {after}", timeout=30_000)
    return int(page.evaluate("document.body.dataset.decodes"))


def test_a_person_moves_attributes_and_watches_the_graph(page_url, artifacts):
    from playwright.sync_api import sync_playwright

    url, explorer = page_url
    names, A = explorer.attributes, explorer.adjacency
    n = len(names)
    # The attribute with the most edges out of it: moving it must move other attributes' inputs.
    off = np.abs(A - np.diag(np.diag(A)))
    i = int(np.argmax((off > 0.05).sum(axis=1)))
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_browser(), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 820})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url + "#image=1")
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            decodes = _wait_for_decode(page, 0)

            # The sliders and the graph are there: one slider and one node per attribute, one edge
            # per off-diagonal |A| above the drawing floor.
            assert page.locator("#sliders input[type=range]").count() == n
            assert page.locator("#graph .node").count() == n
            expected_edges = int((off >= EDGE_FLOOR * off.max()).sum())
            assert page.locator("#graph .edge").count() == expected_edges > 0
            assert page.locator("#origin-caption").inner_text() == "held-out image 1"
            page.screenshot(path=str(artifacts / "1-loaded.png"))

            # Moving a slider (keyboard: End takes it to its maximum) changes the decoded pixels,
            # and in relation-aware mode the inputs of the attributes A links it to move too.
            before = _pixels(page, "#out-relation")
            z0 = float(page.input_value(f"#slider-{i}"))
            page.focus(f"#slider-{i}")
            page.keyboard.press("End")
            decodes = _wait_for_decode(page, decodes)
            top = page.eval_on_selector(f"#slider-{i}", "e => Number(e.max)")
            assert float(page.input_value(f"#slider-{i}")) == pytest.approx(top)
            after = _pixels(page, "#out-relation")
            assert np.abs(after - before).sum() > 0, "moving a slider did not change the image"
            delta = top - z0
            related = {j for j in range(n) if abs(delta * A[i, j]) > MOVED}
            assert len(related) >= 2 and i in related
            assert _moved_bars(page, "relation") == related
            out_edges = page.eval_on_selector_all(".edge.active", "els => els.map(e => Number(e.dataset.from))")
            assert out_edges and set(out_edges) == {i}
            page.screenshot(path=str(artifacts / "2-relation-aware.png"))

            # The independent switch: only the moved attribute's own input moves.
            page.click("text=independent")
            decodes = _wait_for_decode(page, decodes)
            assert _moved_bars(page, "independent") == {i}
            assert not page.is_visible("#out-relation") and page.is_visible("#out-independent")
            page.screenshot(path=str(artifacts / "3-independent.png"))

            # Side by side: both decodings, and they differ once A has moved other attributes.
            page.click("text=side by side")
            decodes = _wait_for_decode(page, decodes)
            assert page.is_visible("#out-relation") and page.is_visible("#out-independent")
            assert np.abs(_pixels(page, "#out-relation") - _pixels(page, "#out-independent")).sum() > 0

            # An edge tells its S, interval and learned A.
            x, y = page.eval_on_selector(f".edge[data-from='{i}']", MIDPOINT)
            page.mouse.move(x, y)
            assert page.is_visible("#tooltip") and "oracle S" in page.inner_text("#tooltip")
            page.mouse.click(x, y)
            info = page.inner_text("#edge-info")
            assert f"{names[i]} →" in info and "learned A" in info and "oracle S" in info and "interval" in info
            page.screenshot(path=str(artifacts / "4-side-by-side.png"))

            # Bad requests: a held-out image that does not exist (a link), an unknown attribute.
            page.evaluate("location.hash = '#image=99999'")
            page.wait_for_selector("#banner-error:visible", timeout=30_000)
            assert "held-out image 99999 does not exist" in page.inner_text("#banner-error")
            page.screenshot(path=str(artifacts / "5-bad-image.png"))
            page.evaluate("gemExplore.state.code['no_such_attribute'] = 1; gemExplore.requestDecode()")
            page.wait_for_function("document.getElementById('banner-error').textContent.includes('no_such')")
            assert "unknown attribute 'no_such_attribute'" in page.inner_text("#banner-error")

            # The server is still there: another image loads and the message goes.
            page.click("#thumbs img[data-index='3']")
            page.wait_for_selector("#banner-error", state="hidden", timeout=30_000)
            assert page.inner_text("#origin-caption") == "held-out image 3"
        finally:
            browser.close()
    assert errors == [], f"the page's script failed: {errors}"
