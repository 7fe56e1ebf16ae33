"""Screenshot a running ``gem explore`` page after moving one attribute (the README's picture).

    gem explore runs/synthetic-... --port 8765 &
    python scripts/explore_screenshot.py http://127.0.0.1:8765/ docs/explore.png --attribute floor_hue --value 2.5

Needs the playwright package and a system Chromium (Debian: apt install chromium); nothing is
downloaded. The page is shown side by side, with the moved attribute's strongest outgoing edge selected.
"""

from __future__ import annotations

import argparse
import shutil

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--image", type=int, default=0, help="held-out image (0)")
    parser.add_argument("--attribute", required=True, help="the attribute to move")
    parser.add_argument("--value", type=float, required=True, help="its slider value")
    parser.add_argument("--mode", default="both", choices=("relation", "independent", "both"))
    parser.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args()

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SystemExit("this script needs the playwright package: pip install playwright "
                         "(it drives the system Chromium; apt install chromium)") from None
    if not args.browser:
        raise SystemExit("no Chromium found: apt install chromium, or pass --browser PATH")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.browser, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 760})
        page.goto(f"{args.url.rstrip('/')}/#image={args.image}")
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        page.click(f"label:has(input[name=mode][value={args.mode}])")
        index = page.evaluate(f"gemExplore.state.info.attributes.indexOf({args.attribute!r})")
        if index < 0:
            raise SystemExit(f"no attribute {args.attribute!r} in this run")
        done = int(page.evaluate("document.body.dataset.decodes || 0"))
        page.eval_on_selector(f"#slider-{index}", f"e => {{ e.value = {args.value}; e.dispatchEvent(new Event('input')); }}")
        page.wait_for_function(f"Number(document.body.dataset.decodes) > {done}", timeout=60_000)
        page.eval_on_selector_all(f".edge[data-from='{index}']", """edges => {
            const widest = edges.sort((a, b) => b.getAttribute('stroke-width') - a.getAttribute('stroke-width'))[0];
            if (widest) widest.dispatchEvent(new MouseEvent('click')); }""")
        page.wait_for_timeout(300)
        page.screenshot(path=args.out)
        browser.close()
    print(args.out)


if __name__ == "__main__":
    main()
