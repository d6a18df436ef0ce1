"""NextStep Studio: a Gradio page for NextStep-1 with live previews (Generate and Edit tabs).

UI only: widgets, events and formatting. Loading, sizes, the shared-model lock, progress and
PNG parameters live in ``nextstep.serving``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

try:  # On Hugging Face ZeroGPU Spaces; it must be imported before anything touches CUDA.
    import spaces

    on_gpu = spaces.GPU(duration=120)
except ImportError:

    def on_gpu(handler):
        return handler


import gradio as gr
import torch

from nextstep import CheckpointMismatchError, ModelNotFoundError, NextStepPipeline
from nextstep.inputs import clean_text, load_image, number
from nextstep.sampling import SAMPLERS
from nextstep.scheduler import Busy, GenerationFailed
from nextstep.serving import (
    DTYPES,
    MAX_UI_SEED,
    SharedPipeline,
    Size,
    closest_size,
    default_size,
    describe,
    draw_seed,
    load_examples,
    page_defaults,
    pick_device,
    pick_dtype,
    supported_sizes,
    tile,
)

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = "assets/shapes-model"
EXAMPLES = ROOT / "assets" / "examples" / "examples.json"  # prompts and edits checked against that model
MAX_QUEUE = 16  # requests waiting for the model; more are turned away with a message
MODEL_QUEUE = "model"  # every event that runs a model shares one queue
# Requests in flight at once: the scheduler decodes compatible ones in one token loop, so up to
# a batch of them hand their work to it together instead of one at a time.
MAX_BATCH = 8
# Shown when no checked examples ship with the app.
FALLBACK_PROMPTS = [
    {"prompt": "a red circle on a white background", "seed": 0},
    {"prompt": "a blue square and a yellow triangle", "seed": 0},
]
PREVIEW_MODES = [("Exact", "vae"), ("Fast", "fast"), ("Off", "none")]
SCHEDULES = [("Constant", "constant"), ("Linear", "linear")]
# Small images fill the preview box, with crisp pixels rather than a blur.
CSS = ".live-preview img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"
NO_EDIT_MODEL = (
    "No edit-capable model is loaded: this checkpoint takes no input image. "
    "Start the app with `--edit-model` (for example `stepfun-ai/NextStep-1-Large-Edit`) to edit images."
)


@dataclass
class Services:
    """The loaded models as the page uses them; ``editor`` is None without an edit-capable model."""

    generator: SharedPipeline
    editor: SharedPipeline | None
    vae: str | None = None


def load_services(
    model: str, edit_model: str | None, vae: str | None, device: str | None, dtype: str | None,
    frame_interval: float = 0.25,
) -> Services:
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    main = NextStepPipeline.from_pretrained(model, vae=vae, device=device, dtype=torch_dtype)
    generator = SharedPipeline(main, frame_interval)
    if edit_model and edit_model != model:
        editing = NextStepPipeline.from_pretrained(edit_model, vae=vae, device=device, dtype=torch_dtype)
        editor = SharedPipeline(editing, frame_interval)
    else:
        editor = generator if main.supports_images else None
    return Services(generator, editor, vae)


# ---- page pieces shared by both tabs ------------------------------------------------------


@dataclass
class Controls:
    """The sampling widgets of one tab, in the order its handler takes them."""

    negative_prompt: gr.Textbox
    positive_prompt: gr.Textbox
    size: gr.Dropdown
    num_images: gr.Slider
    cfg: gr.Slider
    cfg_img: gr.Slider | None
    steps: gr.Slider
    shift: gr.Slider
    schedule: gr.Radio
    sampler: gr.Dropdown
    seed: gr.Number
    randomize_seed: gr.Checkbox
    preview: gr.Radio
    preview_every: gr.Slider

    def inputs(self) -> list:
        widgets = [
            self.negative_prompt, self.positive_prompt, self.size, self.num_images, self.cfg, self.cfg_img,
            self.steps, self.shift, self.schedule, self.sampler, self.seed, self.randomize_seed, self.preview,
            self.preview_every,
        ]
        return [widget for widget in widgets if widget is not None]


@dataclass
class Results:
    preview: gr.Image
    gallery: gr.Gallery
    status: gr.Markdown
    parameters: gr.JSON
    selected: gr.State  # index of the gallery image picked for "send to Edit" / "use as input"

    def outputs(self, seed: gr.Number) -> list:
        """What a run updates, in the order ``stream_to_page`` yields it."""
        return [self.preview, self.gallery, self.status, self.parameters, seed]


def sampling_controls(prefix: str, defaults: dict, sizes: list[Size], edit: bool) -> Controls:
    choices = [(size.label, size.value) for size in sizes]
    with gr.Accordion("Settings", open=True):
        size = gr.Dropdown(choices, value=default_size(sizes, defaults.get("hw")).value,
                           label="Size (width × height)", elem_id=f"{prefix}-size")
        num_images = CheckedSlider(1, 4, value=1, step=1, label="Images")
        with gr.Row():
            cfg = CheckedSlider(1, 15, value=defaults["cfg"], step=0.1, label="Text guidance",
                            info="How strongly the image follows the text")
            cfg_img = CheckedSlider(1, 10, value=defaults["cfg_img"], step=0.1, label="Image guidance",
                                info="How strongly the result keeps the input image") if edit else None
        with gr.Row():
            steps = CheckedSlider(1, 100, value=defaults["num_sampling_steps"], step=1,
                              label="Sampling steps per token", elem_id=f"{prefix}-steps")
            shift = CheckedSlider(0.1, 10, value=defaults["timesteps_shift"], step=0.1, label="Time shift")
        with gr.Row():
            schedule = gr.Radio(SCHEDULES, value=defaults["cfg_schedule"], label="Guidance schedule")
            sampler = gr.Dropdown(list(SAMPLERS), value=defaults["sampler"], label="Sampler",
                                  info="v1: NextStep-1's; sde, cps, ode: NextStep-1.1's")
        with gr.Row():
            seed = CheckedNumber(value=0, minimum=0, maximum=MAX_UI_SEED, precision=0, label="Seed")
            randomize_seed = gr.Checkbox(value=True, label="Randomize seed")
        with gr.Row():
            preview = gr.Radio(PREVIEW_MODES, value="vae", label="Live preview",
                               info="Exact runs the VAE decoder; Fast is a nearly free colour map")
            preview_every = CheckedSlider(1, 64, value=8, step=1, label="Preview every N tokens")
    with gr.Accordion("Prompts", open=edit):
        negative_prompt = gr.Textbox(value=defaults["negative_prompt"], label="Negative prompt",
                                     placeholder="What the image should avoid")
        positive_prompt = gr.Textbox("", label="Positive (style) prompt", placeholder="Appended to the prompt")
    return Controls(negative_prompt, positive_prompt, size, num_images, cfg, cfg_img, steps, shift, schedule,
                    sampler, seed, randomize_seed, preview, preview_every)


def result_panel(prefix: str) -> Results:
    preview = gr.Image(label="Live preview", format="jpeg", interactive=False, height=360,
                       elem_id=f"{prefix}-preview", elem_classes=["live-preview"])
    status = gr.Markdown("Ready.", label="Status", elem_id=f"{prefix}-status")
    gallery = gr.Gallery(label="Results (PNG with parameters)", format="png", columns=4, fit_columns=False,
                         height=240, object_fit="contain", interactive=False, elem_id=f"{prefix}-gallery")
    with gr.Accordion("Parameters of these results", open=False):
        parameters = gr.JSON(label="Parameters", elem_id=f"{prefix}-parameters")
    selected = gr.State(0)
    gallery.select(remember_selection, None, selected, api_visibility="private")
    return Results(preview, gallery, status, parameters, selected)


def remember_selection(event: gr.SelectData) -> int:
    return event.index


class ImageUpload(gr.Image):
    """``gr.Image`` whose uploads reach the handler as undecoded file paths, so that unreadable,
    truncated or oversized files get ``nextstep.inputs``' clear messages rather than failing
    inside Gradio's own decoding."""

    is_template = True  # drawn by the frontend as a plain image input

    def preprocess(self, payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return str(payload.path)
        return super().preprocess(payload)


def checked_number(payload, label: str | None):
    """An API caller's value for a numeric input: numeric text is read, anything else that is
    not a finite number gets a readable message (Gradio's own check would fail with a crash)."""
    if payload is None:
        return None
    try:
        return number(payload, label or "value")
    except ValueError as error:
        raise gr.Error(str(error)) from None


class CheckedSlider(gr.Slider):
    is_template = True  # drawn by the frontend as a plain slider

    def preprocess(self, payload):
        return super().preprocess(checked_number(payload, self.label))


class CheckedNumber(gr.Number):
    is_template = True  # drawn by the frontend as a plain number box

    def preprocess(self, payload):
        return super().preprocess(checked_number(payload, self.label))


def input_size(path: str | None) -> tuple[int, int] | None:
    """(width, height) of a readable input image, else None (the edit reports the problem)."""
    try:
        return load_image(path).size if path else None
    except ValueError:
        return None


def run_buttons(prefix: str, label: str, enabled: bool) -> tuple[gr.Button, gr.Button]:
    with gr.Row():
        run = gr.Button(label, variant="primary", interactive=enabled, elem_id=f"{prefix}-run")
        stop = gr.Button("Stop", variant="stop", elem_id=f"{prefix}-stop")
    return run, stop


def stream_to_page(service: SharedPipeline, defaults: dict, prompt: str, image, *, size: str, num_images: float,
                   cfg: float, steps: float, shift: float, schedule: str, sampler: str, seed: float,
                   randomize_seed: bool, preview: str, preview_every: float, negative_prompt: str,
                   positive_prompt: str, cfg_img: float | None = None):
    """Yield (preview, gallery, status, parameters, seed) frames for one request; settings the
    page does not show (use_norm, …) come from ``defaults``."""
    seed = draw_seed() if randomize_seed else int(seed)
    settings = dict(
        defaults, hw=Size.parse(size).hw, num_images=int(num_images), cfg=cfg, num_sampling_steps=int(steps),
        timesteps_shift=shift, cfg_schedule=schedule, sampler=sampler, seed=seed,
        negative_prompt=negative_prompt or None, positive_prompt=positive_prompt or None,
    )
    if cfg_img is not None:
        settings["cfg_img"] = cfg_img
    try:
        if not clean_text(prompt, "prompt"):
            raise ValueError("Enter a prompt first: describe the picture, or what to change in it.")
        frames = service.stream(prompt, image, preview=preview, preview_every=int(preview_every), **settings)
        yield None, None, "Waiting for the model…", None, seed
        # Progress frames repeat the values already shown rather than send gr.skip(): Gradio
        # rebuilds a skipped component's whole config (its API schema included), which costs
        # far more than the frame itself and, with many users, slows the model's thread.
        shown_preview = None
        for frame in frames:
            if frame.result is not None:
                images = frame.result.images
                yield tile(images), images, frame.status(), frame.result.parameters, seed
            else:
                shown_preview = tile(frame.preview) if frame.preview else shown_preview
                yield shown_preview, None, frame.status(), None, seed
    except (ValueError, Busy, GenerationFailed) as error:  # their messages are written for users
        raise gr.Error(str(error)) from None


def picked_image(gallery: list | None, index: int):
    """The gallery image picked for reuse (the first when none was clicked)."""
    if not gallery:
        raise gr.Error("Nothing to reuse yet: generate an image first.")
    path, _caption = gallery[min(index, len(gallery) - 1)]
    return path


def model_panel(services: Services) -> None:
    rows = [("Generate", services.generator.pipe)]
    if services.editor is not None and services.editor is not services.generator:
        rows.append(("Edit", services.editor.pipe))
    lines = ["| Tab | Checkpoint | Family | Device | dtype | Parameters |", "|---|---|---|---|---|---|"]
    for tab, pipe in rows:
        info = describe(pipe)
        lines.append(f"| {tab} | `{info['checkpoint']}` | {info['family']} | {info['device']} | {info['dtype']} "
                     f"| {info['parameters']} |")
    if services.editor is services.generator:
        lines.append("\nThe Edit tab uses the same model.")
    if services.vae:
        lines.append(f"\nVAE: `{services.vae}`")
    with gr.Accordion("Model", open=False):
        gr.Markdown("\n".join(lines), elem_id="model-panel")


# ---- the page -----------------------------------------------------------------------------


def build_demo(services: Services) -> gr.Blocks:
    generator, editor = services.generator, services.editor
    # Without an edit model the Edit tab still shows its controls (its button disabled) for orientation.
    edit_pipe = (editor or generator).pipe
    generate_defaults, edit_defaults = page_defaults(generator.pipe, edit=False), page_defaults(edit_pipe, edit=True)
    edit_sizes = supported_sizes(edit_pipe, input_images=1)
    examples = load_examples(EXAMPLES)
    with gr.Blocks(title="NextStep Studio", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(
            "# NextStep Studio\n"
            "NextStep-1 paints an image one token at a time: watch the preview fill in, row by row."
        )
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=2):
                        prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Describe the image",
                                            elem_id="generate-prompt")
                        generate_button, generate_stop = run_buttons("generate", "Generate", True)
                        generate_examples = gr.Column()  # filled below, once the seed widgets exist
                        generate_controls = sampling_controls("generate", generate_defaults,
                                                              supported_sizes(generator.pipe), edit=False)
                    with gr.Column(scale=3):
                        generate_results = result_panel("generate")
                        send_to_edit = gr.Button("Send to Edit", elem_id="send-to-edit", interactive=editor is not None)
            with gr.Tab("Edit", id="edit"):
                if editor is None:
                    gr.Markdown(f"**{NO_EDIT_MODEL}**", elem_id="edit-unavailable")
                with gr.Row():
                    with gr.Column(scale=2):
                        input_image = ImageUpload(label="Input image", type="filepath",
                                               sources=["upload", "clipboard", "webcam"], height=280,
                                               elem_id="edit-image")
                        instruction = gr.Textbox(label="Instruction", lines=2, placeholder="What to change",
                                                 elem_id="edit-instruction")
                        edit_button, edit_stop = run_buttons("edit", "Edit", editor is not None)
                        edit_examples = gr.Column()
                        edit_controls = sampling_controls("edit", edit_defaults, edit_sizes, edit=True)
                    with gr.Column(scale=3):
                        edit_results = result_panel("edit")
                        use_as_input = gr.Button("Use result as input", elem_id="use-as-input")
        model_panel(services)
        # Examples set the seed they were checked with, so they reproduce.
        with generate_examples:
            prompts = examples["text_to_image"] or FALLBACK_PROMPTS
            gr.Examples([[e["prompt"], e["seed"], False] for e in prompts],
                        inputs=[prompt, generate_controls.seed, generate_controls.randomize_seed],
                        example_labels=[e["prompt"] for e in prompts], examples_per_page=6, cache_examples=False)
        if examples["edit"]:
            with edit_examples:
                gr.Examples([[e["image"], e["instruction"], e["seed"], False] for e in examples["edit"]],
                            inputs=[input_image, instruction, edit_controls.seed, edit_controls.randomize_seed],
                            example_labels=[e["instruction"] for e in examples["edit"]], examples_per_page=6,
                            cache_examples=False)

        @on_gpu
        def generate(prompt, negative_prompt, positive_prompt, size, num_images, cfg, steps, shift, schedule,
                     sampler, seed, randomize_seed, preview, preview_every):
            yield from stream_to_page(
                generator, generate_defaults, prompt, None, negative_prompt=negative_prompt,
                positive_prompt=positive_prompt, size=size, num_images=num_images, cfg=cfg, steps=steps, shift=shift,
                schedule=schedule, sampler=sampler, seed=seed, randomize_seed=randomize_seed, preview=preview,
                preview_every=preview_every,
            )

        @on_gpu
        def edit(image, instruction, negative_prompt, positive_prompt, size, num_images, cfg, cfg_img, steps,
                 shift, schedule, sampler, seed, randomize_seed, preview, preview_every):
            if editor is None:
                raise gr.Error(NO_EDIT_MODEL)
            if image is None:
                raise gr.Error("Add an input image first (upload, paste or take a photo).")
            yield from stream_to_page(
                editor, edit_defaults, instruction, image, negative_prompt=negative_prompt,
                positive_prompt=positive_prompt, size=size, num_images=num_images, cfg=cfg, cfg_img=cfg_img,
                steps=steps, shift=shift, schedule=schedule, sampler=sampler, seed=seed,
                randomize_seed=randomize_seed, preview=preview, preview_every=preview_every,
            )

        generation = gr.on(
            [generate_button.click, prompt.submit], generate, [prompt, *generate_controls.inputs()],
            generate_results.outputs(generate_controls.seed), api_name="generate", concurrency_id=MODEL_QUEUE,
            concurrency_limit=MAX_BATCH, show_progress="minimal", show_progress_on=[generate_results.status],
        )
        editing = gr.on(
            [edit_button.click, instruction.submit], edit, [input_image, instruction, *edit_controls.inputs()],
            edit_results.outputs(edit_controls.seed), api_name="edit", concurrency_id=MODEL_QUEUE,
            concurrency_limit=MAX_BATCH, show_progress="minimal", show_progress_on=[edit_results.status],
        )
        for stop, event, results in ((generate_stop, generation, generate_results),
                                     (edit_stop, editing, edit_results)):
            stop.click(lambda: "Stopped.", None, results.status, cancels=[event], queue=False,
                       api_visibility="private")

        send_to_edit.click(lambda gallery, index: (picked_image(gallery, index), gr.Tabs(selected="edit")),
                           [generate_results.gallery, generate_results.selected], [input_image, tabs],
                           api_visibility="private")
        use_as_input.click(picked_image, [edit_results.gallery, edit_results.selected], input_image,
                           api_visibility="private")
        # A new input image picks the output size nearest to its aspect ratio, near the default area.
        edit_area = default_size(edit_sizes, edit_defaults.get("hw")).area
        def size_for_input(path):
            size = input_size(path)
            return closest_size(*size, edit_sizes, edit_area).value if size else gr.skip()

        input_image.change(size_for_input, input_image, edit_controls.size, api_visibility="private")
    demo.queue(max_size=MAX_QUEUE)
    return demo


def serve(demo: gr.Blocks, host: str, port: int, **options):
    """Launch with the page's styling and upload limit; returns what ``Blocks.launch`` does."""
    return demo.launch(server_name=host, server_port=port, max_file_size="20mb", css=CSS, **options)


# ---- command line -------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Serve NextStep Studio, a Gradio page for NextStep-1.")
    parser.add_argument("--model", default=env("NEXTSTEP_MODEL"),
                        help=f"model directory or Hub id [env NEXTSTEP_MODEL; default {DEFAULT_MODEL}]")
    parser.add_argument("--edit-model", default=env("NEXTSTEP_EDIT_MODEL"),
                        help="model for the Edit tab [env NEXTSTEP_EDIT_MODEL; default: --model if it takes images]")
    parser.add_argument("--vae", default=env("NEXTSTEP_VAE"),
                        help="VAE directory or Hub id [env NEXTSTEP_VAE; default: the model's own]")
    parser.add_argument("--device", default=env("NEXTSTEP_DEVICE"),
                        help="cuda, cpu, cuda:1, … [env NEXTSTEP_DEVICE; default: cuda when available]")
    parser.add_argument("--dtype", default=env("NEXTSTEP_DTYPE"), choices=list(DTYPES),
                        help="[env NEXTSTEP_DTYPE; default: bfloat16 on GPU, float32 on CPU]")
    parser.add_argument("--threads", type=int, default=int(env("NEXTSTEP_THREADS", "0")) or None,
                        help="CPU threads for torch [env NEXTSTEP_THREADS; default: 1 on CPU, where small "
                             "models are bound by per-operation overhead and share the cores with the server]")
    parser.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="[env GRADIO_SERVER_NAME; default 127.0.0.1]")
    parser.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")),
                        help="[env GRADIO_SERVER_PORT; default 7860]")
    args = parser.parse_args(argv)
    if args.model is None:
        default = ROOT / DEFAULT_MODEL
        if not default.is_dir():
            parser.error(
                f"the default model {DEFAULT_MODEL} is not in this checkout; "
                "pass --model PATH_OR_HUB_ID (and --vae if the model names none), or set NEXTSTEP_MODEL"
            )
        args.model = str(default)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = args.threads or (1 if pick_device(args.device) == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    try:
        services = load_services(args.model, args.edit_model, args.vae, args.device, args.dtype)
    except (ModelNotFoundError, CheckpointMismatchError, ValueError) as error:
        sys.exit(f"app.py: error: {error}\n(choose the checkpoint with --model, --edit-model and --vae)")
    serve(build_demo(services), args.host, args.port)


if __name__ == "__main__":
    main()
