"""``python -m nextstep PROMPT``: generate (or, with ``--image``, edit) from the command line, with
the embedded model unless ``--model`` names another; PNGs carry their parameters like the app's."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from .engine.settings import add_setting_flags, given_settings
from .loading.checkpoints import CheckpointMismatchError
from .loading.devices import set_threads
from .loading.hub import ModelNotFoundError
from .loading.options import add_runtime_flags, runtime_options
from .pipeline import NextStepPipeline
from .pnginfo import save_with_parameters


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nextstep", description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", help="what to draw, or with --image what to change")
    parser.add_argument("--image", help="input image to edit")
    parser.add_argument("--out", default="nextstep.png", help="output PNG (several images: name-1.png, …)")
    add_setting_flags(parser)
    add_runtime_flags(parser, edit=False)
    args = parser.parse_args(argv)
    try:
        args.options = runtime_options(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def output_paths(out: str, count: int) -> list[Path]:
    path = Path(out)
    return [path] if count == 1 else [path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = args.options
    set_threads(options.torch_device, options.threads)
    try:
        pipe = NextStepPipeline.from_pretrained(options.model, vae=options.vae, device=options.torch_device,
                                                dtype=options.torch_dtype, quantize=options.quantize)
        pipe.compile(options.step_mode(one_shot=True))
        with tqdm(desc="image tokens", unit="token", file=sys.stderr) as progress:
            for event in pipe.stream(args.prompt, args.image, preview="none", **given_settings(args)):
                progress.total = event.total
                progress.update(event.done - progress.n)
                result = event.result
    except (ModelNotFoundError, CheckpointMismatchError, ValueError) as error:
        print(f"python -m nextstep: error: {error}", file=sys.stderr)
        return 2
    print(f"seed {result.seed}", file=sys.stderr)
    for image, path in zip(result.images, output_paths(args.out, len(result.images))):
        save_with_parameters(image, result.parameters, path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
