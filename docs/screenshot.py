"""Take the README screenshot: serve the app, generate one image in headless Chromium, save the page.

    python docs/screenshot.py                      # the tiny test checkpoint
    python docs/screenshot.py --model assets/shapes-model
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import app  # noqa: E402
from tests.test_app import free_port  # noqa: E402
from tests.test_browser import chromium, choose_size, open_page, wait_for_result  # noqa: E402

TINY = ROOT.parent / "shared" / "fixtures" / "reference-tiny"
MAX_BYTES = 300_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="default: the tiny test checkpoint")
    parser.add_argument("--vae")
    first_example = app.load_examples(app.SHAPES_EXAMPLES)["text_to_image"][0]
    parser.add_argument("--prompt", default=first_example["prompt"])
    parser.add_argument("--size", default="128 × 128 (1:1)", help="a label of the size menu")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png")
    args = parser.parse_args()

    model, vae = (args.model, args.vae) if args.model else (str(TINY / "model"), str(TINY / "vae"))
    demo = app.build_demo(app.load_services(model, None, vae, None, None))
    _, url, _ = app.serve(demo, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
    try:
        with chromium() as browser:
            page = open_page(browser, url)
            choose_size(page, "generate", args.size)
            page.fill("#generate-prompt textarea", args.prompt)
            page.click("#generate-run")
            wait_for_result(page, "generate", timeout=600_000)
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
