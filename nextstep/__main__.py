"""``python -m nextstep PROMPT --model DIR_OR_HUB_ID``: generate (or, with ``--image``, edit) from
the command line; PNGs carry their parameters like the app's."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from .hub import ModelNotFoundError
from .pipeline import NextStepPipeline
from .sampling import CFG_SCHEDULES, SAMPLERS
from .serving import DTYPES, Size, page_defaults, pick_device, pick_dtype, save_with_parameters
from .weights import CheckpointMismatchError

SETTINGS = {  # flag -> request field; unset flags keep the model's defaults
    "steps": "num_sampling_steps", "cfg": "cfg", "cfg_img": "cfg_img", "shift": "timesteps_shift",
    "schedule": "cfg_schedule", "sampler": "sampler", "negative_prompt": "negative_prompt",
    "positive_prompt": "positive_prompt", "num_images": "num_images", "seed": "seed",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nextstep", description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", help="what to draw, or with --image what to change")
    parser.add_argument("--model", default=os.environ.get("NEXTSTEP_MODEL"), help="directory or Hub id [NEXTSTEP_MODEL]")
    parser.add_argument("--vae", default=os.environ.get("NEXTSTEP_VAE"), help="directory or Hub id [NEXTSTEP_VAE]")
    parser.add_argument("--image", help="input image to edit")
    parser.add_argument("--out", default="nextstep.png", help="output PNG (several images: name-1.png, …)")
    parser.add_argument("--size", help="WIDTHxHEIGHT (default: the model's)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--cfg", type=float, help="text guidance")
    parser.add_argument("--cfg-img", type=float, help="image guidance (editing)")
    parser.add_argument("--shift", type=float, help="time shift")
    parser.add_argument("--schedule", choices=CFG_SCHEDULES)
    parser.add_argument("--sampler", choices=SAMPLERS)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--positive-prompt")
    parser.add_argument("--num-images", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device")
    parser.add_argument("--dtype", choices=list(DTYPES))
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
    threads = args.threads or (1 if device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    try:
        pipe = NextStepPipeline.from_pretrained(args.model, vae=args.vae, device=device, dtype=pick_dtype(args.dtype, device))
        settings = page_defaults(pipe, edit=args.image is not None)
        settings.update({field: getattr(args, flag) for flag, field in SETTINGS.items() if getattr(args, flag) is not None})
        if args.size:
            settings["hw"] = Size.parse(args.size).hw
        start = time.monotonic()
        for event in pipe.stream(args.prompt, args.image, preview="none", **settings):
            rate = event.done / max(time.monotonic() - start, 1e-9)
            print(f"\rtokens {event.done}/{event.total} · {rate:.1f} tokens/s", end="", file=sys.stderr, flush=True)
            result = event.result
    except (ModelNotFoundError, CheckpointMismatchError, ValueError) as error:
        print(f"\npython -m nextstep: error: {error}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    for image, path in zip(result.images, output_paths(args.out, len(result.images))):
        save_with_parameters(image, result.parameters, path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
