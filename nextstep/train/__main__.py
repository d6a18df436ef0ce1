"""Train the embedded shapes model from scratch: ``python -m nextstep.train --out assets``.

Stages: tokenizer, VAE, encoding a pool of training scenes, NextStep, then choosing the
sampling defaults on the validation split. Checkpoints are written as training goes, so an
interrupted run still leaves a loadable model. All randomness comes from ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..engine.prompts import PromptBuilder
from ..engine.vocab import build_tokenizer
from ..loading.checkpoints import load_vae, save_model
from ..models.model import NextStepModel
from ..pipeline import NextStepPipeline
from .evaluate import tune_defaults
from .examples import write_examples
from .model_training import build_pool, model_config, train_model
from .sampling_defaults import read_defaults, write_defaults
from .vae_training import finetune_decoder, train_vae
from .world import vocabulary

MODEL_DIR = "shapes-model"
VAE_DIR = "shapes-vae"
TRAINING_RECORD = "training.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the shapes-world NextStep and its VAE from scratch.")
    parser.add_argument("--out", type=Path, default=Path("assets"), help="where shapes-model/ and shapes-vae/ go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1600)
    parser.add_argument("--decoder-steps", type=int, default=2400, help="decoder-only steps after the VAE")
    parser.add_argument("--reuse-vae", action="store_true", help="take the VAE already in OUT instead of training one")
    parser.add_argument("--scenes", type=int, default=12000, help="training scenes encoded for the model")
    parser.add_argument("--model-steps", type=int, default=24000)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--tune", type=int, nargs=3, default=(16, 8, 30), metavar=("SINGLES", "PAIRS", "EDITS"),
                        help="validation prompts per candidate setting (0 0 0 keeps the base settings)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (one per core is fastest on a quiet machine)")
    parser.add_argument("--finish-only", action="store_true",
                        help="only choose the sampling defaults and write the examples, for the model already in OUT")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir, vae_dir = args.out / MODEL_DIR, args.out / VAE_DIR
    record = {"command": "python -m nextstep.train " + " ".join(sys.argv[1:] if argv is None else argv), "seed": args.seed}
    started = time.perf_counter()

    def stage_done(name: str) -> None:
        record[f"{name}_done_after_s"] = round(time.perf_counter() - started, 1)
        print(f"[{name}] done after {record[f'{name}_done_after_s']:.0f} s", flush=True)

    if not args.finish_only:
        train(args, model_dir, vae_dir, record, stage_done)
        if args.model_steps == 0:  # the VAE alone
            return
    finish(args, model_dir, stage_done)
    record_file = model_dir / TRAINING_RECORD
    if args.finish_only and record_file.is_file():  # keep the training stages' figures
        record = dict(json.loads(record_file.read_text()), finish_command=record["command"], **{
            k: v for k, v in record.items() if k.endswith("_done_after_s")})
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


def train(args, model_dir: Path, vae_dir: Path, record: dict, stage_done) -> None:
    tokenizer = build_tokenizer(vocabulary())
    if args.reuse_vae:
        vae = load_vae(vae_dir)
    else:
        vae = train_vae(vae_dir, args.vae_steps, seed=args.seed)
        # The encoder is frozen from here on, so the latents below do not depend on this stage.
        finetune_decoder(vae, vae_dir, args.decoder_steps, seed=args.seed + 10)
        stage_done("vae")
    if args.model_steps == 0:
        return
    pool = build_pool(vae, args.scenes, seed=args.seed + 1)
    record["pool"] = {"scenes": len(pool.scenes), "edits": len(pool.edits)}
    stage_done("encode")

    config = model_config(tokenizer)
    # The pipeline finds the VAE through this path, relative to the model directory.
    config.vae_name_or_path = f"../{VAE_DIR}"
    torch.manual_seed(args.seed + 2)
    model = NextStepModel(config)

    def save(network: NextStepModel) -> None:
        save_model(network, model_dir)
        tokenizer.save_pretrained(str(model_dir))
        write_defaults(model_dir, {}, {}, "base settings, not tuned yet")  # holds where edits take the image

    losses = train_model(
        model, pool, PromptBuilder(tokenizer, config.boi), args.model_steps, args.batch_size, seed=args.seed + 3, save=save
    )
    record["final_loss_avg100"] = sum(losses[-100:]) / len(losses[-100:])
    record["vae_steps"], record["model_steps"], record["batch_size"] = args.vae_steps, args.model_steps, args.batch_size
    stage_done("model")


def finish(args, model_dir: Path, stage_done) -> None:
    pipe = NextStepPipeline.from_pretrained(model_dir)
    singles, pairs, edits = args.tune
    if singles or pairs or edits:
        text_to_image, edit, note = tune_defaults(pipe, singles, pairs, edits)
    else:
        text_to_image, edit, note = {}, {}, "base settings, not tuned"
    write_defaults(model_dir, text_to_image, edit, note)
    stage_done("tune")
    write_examples(pipe, read_defaults(model_dir), args.out / "examples")
    stage_done("examples")


if __name__ == "__main__":
    main()
