"""``python -m nextstep PROMPT --model DIR_OR_HUB_ID``: generate (or, with ``--image``, edit) from
the command line; PNGs carry their parameters like the app's."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .devices import DTYPES, pick_device, pick_dtype, set_threads
from .hub import ModelNotFoundError
from .pipeline import NextStepPipeline
from .pnginfo import save_with_parameters
from .quantize import QUANTIZATIONS
from .settings import add_setting_flags, given_settings
from .weights import CheckpointMismatchError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nextstep", description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", help="what to draw, or with --image what to change")
    parser.add_argument("--model", default=os.environ.get("NEXTSTEP_MODEL"), help="directory or Hub id [NEXTSTEP_MODEL]")
    parser.add_argument("--vae", default=os.environ.get("NEXTSTEP_VAE"), help="directory or Hub id [NEXTSTEP_VAE]")
    parser.add_argument("--image", help="input image to edit")
    parser.add_argument("--out", default="nextstep.png", help="output PNG (several images: name-1.png, …)")
    add_setting_flags(parser)
    parser.add_argument("--device")
    parser.add_argument("--dtype", choices=list(DTYPES))
    parser.add_argument("--quantize", choices=QUANTIZATIONS, help="weight-only quantization of the backbone")
    parser.add_argument("--compile", action="store_true",
                        help="compile the per-token step (pays for large images; the first compile takes minutes)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: 1 on CPU)")
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("name the model with --model DIR_OR_HUB_ID (or NEXTSTEP_MODEL)")
    return args


def output_paths(out: str, count: int) -> list[Path]:
    path = Path(out)
    return [path] if count == 1 else [path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    set_threads(device, args.threads)
    try:
        pipe = NextStepPipeline.from_pretrained(args.model, vae=args.vae, device=device,
                                                dtype=pick_dtype(args.dtype, device), quantize=args.quantize)
        if args.compile:
            pipe.compile()
        start = time.monotonic()
        for event in pipe.stream(args.prompt, args.image, preview="none", **given_settings(args)):
            rate = event.done / max(time.monotonic() - start, 1e-9)
            print(f"\rtokens {event.done}/{event.total} · {rate:.1f} tokens/s", end="", file=sys.stderr, flush=True)
            result = event.result
    except (ModelNotFoundError, CheckpointMismatchError, ValueError) as error:
        print(f"\npython -m nextstep: error: {error}", file=sys.stderr)
        return 2
    print(f"\nseed {result.seed}", file=sys.stderr)
    for image, path in zip(result.images, output_paths(args.out, len(result.images))):
        save_with_parameters(image, result.parameters, path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
