"""Take the README screenshot: serve the app, generate one image in headless Chromium, save the page.

    python docs/screenshot.py                      # the embedded model, as the app serves it
    python docs/screenshot.py --model DIR_OR_HUB_ID
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nextstep.loading.options import EMBEDDED_MODEL, RuntimeOptions  # noqa: E402
from nextstep.page.layout import build_demo, launch  # noqa: E402
from nextstep.serving.compose import load_services  # noqa: E402
from nextstep.serving.examples import SHAPES_EXAMPLES, load_examples  # noqa: E402
from tests.page.test_browser import chromium, choose_size, open_page, wait_for_result  # noqa: E402
from tests.pages import free_port  # noqa: E402

MAX_BYTES = 300_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(EMBEDDED_MODEL), help="default: the embedded model")
    parser.add_argument("--vae")
    first_example = load_examples(SHAPES_EXAMPLES)["text_to_image"][0]
    parser.add_argument("--prompt", default=first_example["prompt"])
    parser.add_argument("--size", default="128 × 128 (1:1)", help="a label of the size menu")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png")
    args = parser.parse_args()

    demo = build_demo(load_services(RuntimeOptions(model=args.model, vae=args.vae)))
    _, url, _ = launch(demo, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
    try:
        with chromium() as browser:
            page = open_page(browser, url)
            choose_size(page, "generate", args.size)
            page.fill("#generate-prompt textarea", args.prompt)
            page.click("#generate-run")
            wait_for_result(page, "generate", timeout=600_000)
            page.wait_for_timeout(1500)  # a quick run's replay of its stages plays out (about a second)
            page.evaluate("window.scrollTo(0, 0)")
            shot = page.screenshot()
    finally:
        demo.close()
    # A palette PNG keeps the page sharp at a fraction of the size.
    picture = Image.open(io.BytesIO(shot)).convert("RGB").quantize(colors=128)
    picture.save(args.out, optimize=True)
    size = args.out.stat().st_size
    print(f"saved {args.out} ({size // 1000} KB)")
    if size > MAX_BYTES:
        sys.exit(f"the screenshot is over {MAX_BYTES // 1000} KB")


if __name__ == "__main__":
    main()
