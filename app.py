"""NextStep Studio: a Gradio page for NextStep-1 with live previews (Generate and Edit tabs).

UI only: widgets, events and formatting. The settings, their defaults and sizes come from
``nextstep.settings`` / ``nextstep.sizes``; the shared model, progress frames and PNG parameters
from ``nextstep.serving`` (or a Ray Serve application's, ``nextstep.remote``); the bounds a public
page keeps (uploads, disk, readers, endpoints) from ``nextstep.guard``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import logging
import os
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

try:  # Hugging Face's ZeroGPU package, on Spaces; it must be imported before anything touches CUDA.
    import spaces
except ImportError:
    spaces = None

import gradio as gr
import httpx
from gradio.data_classes import ImageData
from PIL import Image

from nextstep import CheckpointMismatchError, ModelNotFoundError
from nextstep.devices import DTYPES, pick_device, pick_dtype, set_threads
from nextstep.guard import (
    CACHE_LIMIT, MAX_FILE_SIZE, MB, CacheBound, PageLimits, ReaderWatch, app_options, client_address,
    uploaded_file,
)
from nextstep.inputs import clean_text, data_url_bytes, load_image, number
from nextstep.memory import NotEnoughMemoryError
from nextstep.quantize import QUANTIZATIONS
from nextstep.sampling import SAMPLERS
from nextstep.scheduler import Busy, GenerationFailed
from nextstep.pnginfo import read_parameters, with_parameters
from nextstep.remote import RemoteService, connect
from nextstep.serving import (
    HistoryEntry, SharedPipeline, add_to_history, examples_for, load_examples, load_pipelines, tile,
)
from nextstep.settings import MAX_DRAWN_SEED, SETTINGS
from nextstep.sizes import Size, closest_size
from nextstep.zerogpu import LARGE_SLICE_BYTES, GpuService, GpuTask, on_zero_gpu

ROOT = Path(__file__).resolve().parent
LOG = logging.getLogger("nextstep.page")  # refused input: one line each (main() shows them)
DEFAULT_MODEL = "assets/shapes-model"
MAX_QUEUE = 16  # requests waiting for the model; more are turned away with a message
MODEL_QUEUE = "model"  # every event that runs a model shares one queue
# Requests in flight at once: the scheduler decodes compatible ones in one token loop, so up to
# a batch of them hand their work to it together instead of one at a time.
MAX_BATCH = 8
PREVIEW_MODES = [("Exact", "vae"), ("Fast", "fast"), ("Off", "none")]
SCHEDULES = [("Constant", "constant"), ("Linear", "linear")]
STOPPED = "Stopped."
UNDO_DEPTH = 20  # edits the chain can step back
# Small images fill the preview box, with crisp pixels rather than a blur.
CSS = ".live-preview img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"
NO_EDIT_MODEL = (
    "No edit-capable model is loaded: this checkpoint takes no input image. "
    "Start the app with `--edit-model` (for example `stepfun-ai/NextStep-1-Large-Edit`) to edit images."
)


@dataclass
class Services:
    """The loaded models as the page uses them; ``editor`` is None without an edit-capable model.
    Each is a ``SharedPipeline`` (the batching scheduler), on ZeroGPU a ``GpuService``, or with
    ``--serve-url`` a ``RemoteService`` (a model of a Ray Serve application)."""

    generator: SharedPipeline | GpuService | RemoteService
    editor: SharedPipeline | GpuService | RemoteService | None
    vae: str | None = None
    examples: dict = field(default_factory=lambda: {"text_to_image": [], "edit": []})
    # Requests the page hands the models at once, and how many more wait in its queue: one
    # scheduler's batch and line here, every replica's together for a Ray Serve application.
    in_flight: int = MAX_BATCH
    waiting: int = MAX_QUEUE


def load_services(
    model: str, edit_model: str | None, vae: str | None, device: str | None, dtype: str | None,
    frame_interval: float = 0.25, *, quantize: str | None = None, edit_device: str | None = None,
    compile: bool = False, zero_gpu: bool | None = None,
) -> Services:
    """Load the page's models; before any weight is read, check that they fit their devices
    together (``NotEnoughMemoryError`` otherwise, naming the need and the options).

    On ZeroGPU (``zero_gpu``; None: detect it as ``spaces`` does) every request runs in one GPU
    task shared by both tabs (``nextstep.zerogpu``) instead of the batching scheduler."""
    zero_gpu = on_zero_gpu() if zero_gpu is None else zero_gpu
    if zero_gpu and compile:
        raise ValueError("ZeroGPU does not support torch.compile: leave --compile off on ZeroGPU hardware")
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    second = edit_model if edit_model and edit_model != model else None
    placed = [(model, device), *([(second, edit_device or device)] if second else [])]
    pipes, plan = load_pipelines(placed, vae, torch_dtype, quantize)
    if compile:
        for pipe in pipes:
            pipe.compile()
    if zero_gpu:
        # Models that need more than the default slice ask for the whole GPU (at twice the quota).
        size = "xlarge" if plan.peak_bytes > LARGE_SLICE_BYTES else None
        task = GpuTask(pipes, frame_interval, spaces.GPU, size=size)
        served = [GpuService(task, index) for index in range(len(pipes))]
    else:
        served = [SharedPipeline(pipe, frame_interval) for pipe in pipes]
    generator = served[0]
    editor = served[1] if second else (generator if pipes[0].supports_images else None)
    examples = {"text_to_image": load_examples(examples_for(model))["text_to_image"],
                "edit": load_examples(examples_for(edit_model or model))["edit"]}
    return Services(generator, editor, vae, examples)


def remote_services(url: str) -> Services:
    """The models of a Ray Serve application (``python -m nextstep.serve``) at ``url``; its
    ``/info`` says which serves which tab and which examples fit them."""
    cluster = connect(url)
    examples = {kind: load_examples(cluster.examples[kind])[kind] for kind in ("text_to_image", "edit")}
    return Services(cluster.generator, cluster.editor, cluster.vae, examples, **cluster.capacity)


# ---- the sampling controls: one table, keyed by request field -------------------------------


@dataclass(frozen=True)
class Control:
    """How one request field is drawn: in which accordion and row, by what widget."""

    section: str  # "Settings" or "Prompts"
    row: int  # controls with the same row number sit side by side
    build: Callable[[TabContext], gr.Component]
    edit_only: bool = False


@dataclass
class TabContext:
    """What a control needs to draw itself for one tab."""

    prefix: str
    defaults: dict  # the engine's defaults for this tab (``NextStepPipeline.defaults``)
    sizes: list[Size]


# Each key is a request field: the control's value reaches the engine under that name.
CONTROLS = {
    "size": Control("Settings", 0, lambda t: CheckedDropdown(
        [(s.label, s.value) for s in t.sizes], value=t.defaults["size"].value, label="Size (width × height)",
        elem_id=f"{t.prefix}-size")),
    "num_images": Control("Settings", 1, lambda t: CheckedSlider(1, 4, value=t.defaults["num_images"], step=1,
                                                                 label="Images")),
    "cfg": Control("Settings", 2, lambda t: CheckedSlider(
        1, 15, value=t.defaults["cfg"], step=0.1, label="Text guidance", info="How strongly the image follows the text",
        elem_id=f"{t.prefix}-cfg")),
    "cfg_img": Control("Settings", 2, lambda t: CheckedSlider(
        1, 10, value=t.defaults["cfg_img"], step=0.1, label="Image guidance",
        info="How strongly the result keeps the input image"), edit_only=True),
    "num_sampling_steps": Control("Settings", 3, lambda t: CheckedSlider(
        1, 100, value=t.defaults["num_sampling_steps"], step=1, label="Sampling steps per token",
        elem_id=f"{t.prefix}-steps")),
    "timesteps_shift": Control("Settings", 3, lambda t: CheckedSlider(
        0.1, 10, value=t.defaults["timesteps_shift"], step=0.1, label="Time shift")),
    "cfg_schedule": Control("Settings", 4, lambda t: CheckedRadio(
        SCHEDULES, value=t.defaults["cfg_schedule"], label="Guidance schedule")),
    "sampler": Control("Settings", 4, lambda t: CheckedDropdown(
        list(SAMPLERS), value=t.defaults["sampler"], label="Sampler",
        info="v1: NextStep-1's; sde, cps, ode: NextStep-1.1's")),
    "use_norm": Control("Settings", 5, lambda t: CheckedCheckbox(
        value=t.defaults["use_norm"], label="Normalise tokens", info="LayerNorm each sampled token (NextStep-1)",
        elem_id=f"{t.prefix}-norm")),
    "seed": Control("Settings", 6, lambda t: CheckedNumber(
        value=0, minimum=0, maximum=MAX_DRAWN_SEED, precision=0, label="Seed", elem_id=f"{t.prefix}-seed")),
    "negative_prompt": Control("Prompts", 0, lambda t: gr.Textbox(
        value=t.defaults["negative_prompt"], label="Negative prompt", placeholder="What the image should avoid",
        elem_id=f"{t.prefix}-negative")),
    "positive_prompt": Control("Prompts", 1, lambda t: gr.Textbox(
        value=t.defaults["positive_prompt"], label="Positive (style) prompt", placeholder="Appended to the prompt",
        elem_id=f"{t.prefix}-positive")),
}


@dataclass
class TabControls:
    """One tab's controls: ``settings`` by request field, plus how the page seeds and previews."""

    settings: dict[str, gr.Component]
    randomize_seed: gr.Checkbox
    preview: gr.Radio
    preview_every: gr.Slider

    def inputs(self) -> dict[str, gr.Component]:
        """The handler's keyword inputs (``inputs_kwargs``)."""
        page = dict(randomize_seed=self.randomize_seed, preview=self.preview, preview_every=self.preview_every)
        return {**self.settings, **page}


def sampling_controls(context: TabContext, edit: bool) -> TabControls:
    chosen = {name: control for name, control in CONTROLS.items() if edit or not control.edit_only}
    settings = {}
    for section, opened in (("Settings", True), ("Prompts", edit)):
        with gr.Accordion(section, open=opened):
            in_section = [(name, c) for name, c in chosen.items() if c.section == section]
            for row in sorted({c.row for _, c in in_section}):
                with gr.Row():
                    for name, control in in_section:
                        if control.row == row:
                            settings[name] = control.build(context)
                    if section == "Settings" and row == CONTROLS["seed"].row:
                        randomize_seed = CheckedCheckbox(value=True, label="Randomize seed",
                                                     elem_id=f"{context.prefix}-randomize")
            if section == "Settings":
                with gr.Row():
                    preview = CheckedRadio(PREVIEW_MODES, value="vae", label="Live preview",
                                       info="Exact runs the VAE decoder; Fast is a nearly free colour map")
                    preview_every = CheckedSlider(1, 64, value=8, step=1, label="Preview every N tokens")
    return TabControls(settings, randomize_seed, preview, preview_every)


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


class LivePreview(gr.Image):
    """The live preview: each frame travels inside the stream as a JPEG data URL. Written to the
    cache as files, as ``gr.Image`` does, a request's many frames would fill the disk whether or
    not anyone looks, and a file removed once shown may still be on its way to a slow reader."""

    is_template = True  # drawn by the frontend as a plain image

    def postprocess(self, value):
        if not isinstance(value, Image.Image):
            return super().postprocess(value)
        buffer = io.BytesIO()
        value.convert("RGB").save(buffer, "JPEG", quality=90)
        return ImageData(url="data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode(),
                         orig_name="preview.jpeg", mime_type="image/jpeg")


def result_panel(prefix: str) -> Results:
    preview = LivePreview(label="Live preview", interactive=False, height=360, elem_id=f"{prefix}-preview",
                          elem_classes=["live-preview"])
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


NOT_UPLOADED = ("The input image must be a file uploaded through this page or its API (gradio_client's "
                "handle_file), or a picture sent inline as a base64 data: URL.")


class ImageUpload(gr.Image):
    """``gr.Image`` whose input reaches the handler undecoded, as the path of an uploaded file or
    the bytes of an inline ``data:`` URL, so that unreadable, truncated or oversized pictures get
    ``nextstep.inputs``' clear messages from their headers rather than being decoded by Gradio.

    Only files inside the upload folder are taken: Gradio checks a payload's path only when the
    payload carries its FileData marker, so a bare ``{"path": ...}`` could otherwise name any file
    on the server. Whatever else is sent gets one message, whether or not such a file exists."""

    is_template = True  # drawn by the frontend as a plain image input

    def preprocess(self, payload):
        if payload is None:
            return None
        if (payload.url or "").startswith("data:"):
            try:
                return data_url_bytes(payload.url, MAX_FILE_SIZE)  # charged by the handler
            except ValueError as error:
                raise refusal(f"The input image could not be read: {error}.") from None
        if payload.path and uploaded_file(payload.path):
            return str(payload.path)
        raise refusal(NOT_UPLOADED)


def charged(image, request: gr.Request, limits: PageLimits):
    """An input image that arrived inline (bytes) counts against its visitor's upload budget, as an
    upload through the upload route does; refused beyond it."""
    if isinstance(image, bytes):
        forwarded = request.headers.get("x-forwarded-for") if request.headers else None
        client = client_address(forwarded, request.client.host if request.client else None)
        if (refused := limits.uploads.charge(client, len(image))) is not None:
            raise refusal(refused)
    return image


def refusal(message: str) -> gr.Error:
    """An error about the visitor's own input: shown on the page, one line in the log, no traceback."""
    LOG.info("refused: %s", message)
    return gr.Error(message, print_exception=False)


def read_number(payload, label: str, minimum, maximum, whole: bool):
    """A control's value as sent (numbers, or numeric text from API clients), strictly: empty, not
    a number, a fraction where a whole number is asked, or out of the control's range is refused
    with a message naming the control and what it takes."""
    def plain(value) -> str:  # 4294967295, 0.1, 15: as the control shows them
        return str(int(value)) if float(value).is_integer() else f"{value:g}"

    allowed = f"{'a whole number' if whole else 'a number'} between {plain(minimum)} and {plain(maximum)}"
    if payload is None:
        raise refusal(f"{label} is empty: enter {allowed}")
    try:
        return number(payload, label, minimum=minimum, maximum=maximum, integer=whole)
    except ValueError:
        shown = repr(payload) if len(repr(payload)) <= 40 else repr(payload)[:37] + "..."
        raise refusal(f"{label} must be {allowed}, got {shown}") from None


class CheckedSlider(gr.Slider):
    is_template = True  # drawn by the frontend as a plain slider

    def preprocess(self, payload):
        whole = float(self.step).is_integer() and float(self.minimum).is_integer()
        return read_number(payload, self.label, self.minimum, self.maximum, whole)


class CheckedNumber(gr.Number):
    """A number box that may be left empty (the seed, while Randomize seed is ticked)."""

    is_template = True  # drawn by the frontend as a plain number box

    def preprocess(self, payload):
        if payload is None:
            return None
        return read_number(payload, self.label, self.minimum, self.maximum, self.precision == 0)


class CheckedCheckbox(gr.Checkbox):
    is_template = True  # drawn by the frontend as a plain checkbox

    def preprocess(self, payload):
        """True or False (the text "true" / "false" too); anything else, "false" never read as true."""
        if isinstance(payload, bool):
            return payload
        if isinstance(payload, str) and payload.strip().lower() in ("true", "false"):
            return payload.strip().lower() == "true"
        raise refusal(f"{self.label} must be true or false, got {payload!r}")


def checked_choice(control: gr.Dropdown | gr.Radio, payload):
    """A choice control's value: empty or unknown gets a message naming it and its choices."""
    values = [value for _label, value in control.choices]
    if payload is None or payload not in values:
        got = "it is empty" if payload is None else f"got {payload!r}"
        raise refusal(f"{control.label} must be one of {', '.join(map(str, values))}: {got}")
    return payload


class CheckedDropdown(gr.Dropdown):
    is_template = True  # drawn by the frontend as a plain dropdown

    def preprocess(self, payload):
        return super().preprocess(checked_choice(self, payload))


class CheckedRadio(gr.Radio):
    is_template = True  # drawn by the frontend as plain radio buttons

    def preprocess(self, payload):
        return super().preprocess(checked_choice(self, payload))


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


@dataclass
class RunRecord:
    """How one run of a tab ended: "running" until it is "done", "failed" or "stopped"."""

    outcome: str = "running"
    ticket: object | None = None  # its Ticket (or GpuTicket), once submitted


class RunBook:
    """How each browser session's latest run of each tab ended, for the status line after Stop.

    Stop cancels the run's event; Gradio then runs the event's follow-up listener, after the
    cancelled stream is gone. That listener (``after_run``) alone writes "Stopped.", once the
    request has let go of the model, so no late progress frame can overwrite it.
    """

    LIMIT = 1024  # sessions that closed before their follow-up ran are forgotten oldest first

    def __init__(self):
        self._runs: OrderedDict[tuple[str, str], RunRecord] = OrderedDict()

    def start(self, key: tuple[str, str]) -> RunRecord:
        record = RunRecord()
        self._runs[key] = record
        self._runs.move_to_end(key)
        while len(self._runs) > self.LIMIT:
            self._runs.popitem(last=False)
        return record

    def pop(self, key: tuple[str, str]) -> RunRecord | None:
        return self._runs.pop(key, None)


async def stream_to_page(service: SharedPipeline | GpuService, record: RunRecord, prompt: str, image, *,
                         randomize_seed: bool, preview: str, preview_every, limits: PageLimits | None = None,
                         reader: ReaderWatch | None = None, **settings):
    """Yield (preview, gallery, status, parameters, seed) frames for one request; ``settings`` are
    request fields. ``record`` learns how the run ended ("done", "failed", "stopped" or "dropped":
    ``reader`` saw nobody take its frames). With ``limits``, the cache is swept when it ends."""
    watch = None
    try:
        if not clean_text(prompt, "prompt"):
            raise ValueError("Enter a prompt first: describe the picture, or what to change in it.")
        if randomize_seed:
            settings["seed"] = None  # the engine draws one, and the page shows it
        elif settings.get("seed") is None:
            raise ValueError(f"Seed is empty: enter a whole number between 0 and {MAX_DRAWN_SEED}, or tick "
                             "Randomize seed")
        ticket = service.submit(prompt, image, preview=preview, preview_every=preview_every, **settings)
        record.ticket = ticket
        if reader is not None:
            watch = asyncio.create_task(reader.cancel_when_abandoned(ticket))
        seed = ticket.request.seed
        yield None, None, "Waiting for the model…", None, seed
        # Progress frames repeat the values already shown rather than send gr.skip(): Gradio
        # rebuilds a skipped component's whole config (its API schema included), which costs
        # far more than the frame itself and, with many users, slows the model's thread.
        shown_preview = None
        # Closed with this generator (Stop closes it while it waits at a yield), not when collected.
        async with contextlib.aclosing(service.frames(ticket)) as frames:
            async for frame in frames:
                if frame.result is not None:
                    images = frame.result.images
                    record.outcome = "done"
                    yield tile(images), images, frame.status(), frame.result.parameters, seed
                else:
                    shown_preview = tile(frame.preview) if frame.preview else shown_preview
                    yield shown_preview, None, frame.status(), None, seed
        if record.outcome == "running" and watch is not None and watch.done():
            record.outcome = "dropped"
            LOG.info("dropped: nobody read the request's frames for %g s", reader.patience)
    except (ValueError, Busy, GenerationFailed) as error:  # their messages are written for users
        record.outcome = "failed"
        raise refusal(str(error)) from None
    except (asyncio.CancelledError, GeneratorExit):  # Stop, or the page went away
        record.outcome = "stopped"
        raise
    except BaseException:
        record.outcome = "failed"
        raise
    finally:
        if watch is not None:
            watch.cancel()
        if limits is not None:
            limits.cache.poke()  # the result's files are written by now


async def last_frame(service: SharedPipeline | GpuService, prompt: str, image, **settings) -> tuple:
    """The final (preview, gallery, status, parameters, seed) frame of one request, run without previews."""
    frame = None
    async for frame in stream_to_page(service, RunRecord(), prompt, image,
                                      preview="none", preview_every=1, **settings):
        pass
    return frame


async def final_image_of(service: SharedPipeline | GpuService, prompt: str, image, settings: dict,
                         reader: ReaderWatch | None = None):
    """The finished picture of one request (several images side by side), carrying its parameters."""
    _, images, *_ = await last_frame(service, prompt, image, reader=reader, **settings)
    if not images:  # dropped, nobody reading
        raise refusal("The request was dropped: nobody read its result.")
    # One request's images share its parameters: a sheet of several carries them too.
    return images[0] if len(images) == 1 else with_parameters(tile(images), read_parameters(images[0]))


# What the tools' parameters mean, for agents (MCP lists these; the sliders add their ranges).
PAGE_PARAMETERS = {
    "prompt": "what the image should show, or for an edit what to change",
    "image": "the picture to edit (a file)",
    "randomize_seed": "draw a fresh seed (true) or use the given seed (false)",
}


def tool_description(summary: str, names: list[str]) -> str:
    """A docstring in the layout Gradio reads tool and parameter descriptions from."""
    lines = [f"    {name}: {PAGE_PARAMETERS.get(name) or SETTINGS[name].help}" for name in names]
    return summary + "\n\nArgs:\n" + "\n".join(lines)


def hidden_from_mcp(handler: Callable) -> None:
    """Gradio offers every public endpoint as an MCP tool unless its function is marked as
    something else (the attribute its ``gr.mcp`` decorators set). The page's streaming handlers
    answer with frames an agent cannot use; ``generate_image`` and ``edit_image`` serve agents."""
    handler._mcp_type = "page"


def after_run(book: RunBook, tab: str) -> Callable:
    """The follow-up listener of a tab's runs: "Stopped." once a stopped request has left the
    model, else nothing."""

    async def status_after(request: gr.Request):
        record = book.pop((request.session_hash, tab))
        if record is None or record.outcome != "stopped":
            return gr.skip()
        if record.ticket is not None:
            await asyncio.to_thread(record.ticket.wait_left, 60)
        return STOPPED

    return status_after


def picked_image(gallery: list | None, index: int):
    """The gallery image picked for reuse (the first when none was clicked)."""
    if not gallery:
        raise refusal("Nothing to reuse yet: generate an image first.")
    path, _caption = gallery[min(index, len(gallery) - 1)]
    return path


def model_panel(services: Services) -> None:
    rows = [("Generate", services.generator)]
    if services.editor is not None and services.editor is not services.generator:
        rows.append(("Edit", services.editor))
    lines = ["| Tab | Checkpoint | Family | Device | dtype | Quantization | Parameters |",
             "|---|---|---|---|---|---|---|"]
    for tab, service in rows:
        info = service.describe()
        lines.append(f"| {tab} | `{info['checkpoint']}` | {info['family']} | {info['device']} | {info['dtype']} "
                     f"| {info['quantization']} | {info['parameters']} |")
    if services.editor is services.generator:
        lines.append("\nThe Edit tab uses the same model.")
    if services.vae:
        lines.append(f"\nVAE: `{services.vae}`")
    with gr.Accordion("Model", open=False):
        gr.Markdown("\n".join(lines), elem_id="model-panel")


# ---- reuse: the history, settings from a PNG, the edit chain ---------------------------------


@dataclass
class Tab:
    """One tab's widgets that a saved result can be turned back into."""

    name: str  # "generate" or "edit"
    prompt: gr.Textbox
    controls: TabControls
    sizes: list[Size]
    image: gr.Image | None = None  # the Edit tab's input

    def components(self) -> list:
        return [self.prompt, *self.controls.settings.values(), self.controls.randomize_seed,
                *([self.image] if self.image is not None else [])]

    def filled(self, parameters: dict, input_image=None) -> dict:
        """Updates that set this tab's controls to ``parameters`` (a result's), seed included."""
        updates = {self.prompt: parameters.get("prompt", ""), self.controls.randomize_seed: False}
        for name, control in self.controls.settings.items():
            if name not in parameters:
                continue
            value = parameters[name]
            if name == "size" and Size.parse(value) not in self.sizes:
                gr.Warning(f"This model does not offer the size {value}; the size was left as it is.")
                continue
            updates[control] = value
        if self.image is not None and input_image is not None:
            updates[self.image] = input_image
        return updates


def settings_from_png(path: str | None, generate_tab: Tab, edit_tab: Tab) -> dict:
    """The controls of the tab that made a PNG, filled with the settings it carries."""
    if path is None:
        return {}
    try:
        parameters = read_parameters(path)
    except ValueError as error:
        raise refusal(f"That PNG's settings could not be read: {error}") from None
    except OSError:
        raise refusal("That file could not be read as a PNG.") from None
    if not parameters:
        raise refusal("That picture carries no NextStep settings: only PNGs made by this app or its "
                       "command line do (or ones with AUTOMATIC1111-style parameters).")
    tab = edit_tab if parameters.get("edit") else generate_tab
    gr.Info(f"Settings loaded into the {tab.name.capitalize()} tab.")
    return {**tab.filled(parameters), TABS_KEY: gr.Tabs(selected=tab.name)}


TABS_KEY = "tabs"  # stands for the page's gr.Tabs in update dicts until the page exists


def history_panel() -> tuple:
    with gr.Accordion("History of this session", open=True):
        gallery = gr.Gallery(label="Your results, newest first (this browser tab only)", columns=8,
                             fit_columns=False, height=200, object_fit="contain", allow_preview=False,
                             interactive=False, elem_id="history-gallery")
        with gr.Row():
            use_settings = gr.Button("Use these settings", elem_id="history-use", interactive=False)
            edit_this = gr.Button("Edit this", elem_id="history-edit", interactive=False)
        chosen = gr.JSON(label="Settings of the chosen result", elem_id="history-parameters")
        png = gr.UploadButton("Load settings from a PNG…", file_types=[".png"], type="filepath", size="sm",
                              elem_id="settings-png")
    return gallery, use_settings, edit_this, chosen, png


def history_pictures(history: list[HistoryEntry]) -> list:
    return [(entry.image, entry.caption) for entry in history]


def push_undo(stack: list, current) -> list:
    """The undo stack with the current input on top; an input sent inline (bytes) is not kept."""
    return [*stack, current][-UNDO_DEPTH:] if isinstance(current, str) else stack


# ---- the page -----------------------------------------------------------------------------


def build_demo(services: Services, limits: PageLimits | None = None) -> gr.Blocks:
    """The page; ``serve`` launches it under ``limits`` (the default bounds without)."""
    limits = limits or PageLimits()
    generator, editor = services.generator, services.editor
    # Without an edit model the Edit tab still shows its controls (its button disabled) for orientation.
    edit_service = editor or generator
    generate_context = TabContext("generate", generator.defaults(edit=False), generator.sizes(False))
    edit_context = TabContext("edit", edit_service.defaults(edit=True), edit_service.sizes(True))
    examples = services.examples
    book = RunBook()
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
                        generate_controls = sampling_controls(generate_context, edit=False)
                    with gr.Column(scale=3):
                        generate_results = result_panel("generate")
                        send_to_edit = gr.Button("Send to Edit", elem_id="send-to-edit",
                                                 interactive=editor is not None)
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
                        edit_controls = sampling_controls(edit_context, edit=True)
                    with gr.Column(scale=3):
                        edit_results = result_panel("edit")
                        compare = gr.ImageSlider(label="Before / after", type="filepath", interactive=False,
                                                 max_height=360, elem_id="edit-compare")
                        with gr.Row():
                            use_as_input = gr.Button("Use result as input", elem_id="use-as-input")
                            undo = gr.Button("Undo last edit", elem_id="edit-undo")
        history_gallery, use_settings, edit_this, chosen_parameters, settings_png = history_panel()
        model_panel(services)
        history = gr.State([])  # this session's HistoryEntry list, newest first
        chosen = gr.State(None)  # the HistoryEntry picked in the history gallery
        undo_stack = gr.State([])  # earlier inputs of the edit chain, latest last
        generate_tab = Tab("generate", prompt, generate_controls, generate_context.sizes)
        edit_tab = Tab("edit", instruction, edit_controls, edit_context.sizes, input_image)
        # Examples set the seed they were checked with, so they reproduce.
        generate_seed, edit_seed = generate_controls.settings["seed"], edit_controls.settings["seed"]
        # Where the platform asks for cached examples (Spaces sets GRADIO_CACHE_EXAMPLES), each is
        # cached at its first click, never all at start-up: on a GPU Space that would spend GPU time
        # (and on ZeroGPU, quota) before anyone asked. A cached example shows its result, the
        # settings it does not name at their defaults.
        async def generate_example(prompt, seed, randomize_seed):
            return await last_frame(generator, prompt, None, seed=seed, randomize_seed=randomize_seed)

        async def edit_example(image, prompt, seed, randomize_seed):
            return await last_frame(editor, prompt, image, seed=seed, randomize_seed=randomize_seed)

        if examples["text_to_image"]:
            with generate_examples:
                gr.Examples([[e["prompt"], e["seed"], False] for e in examples["text_to_image"]],
                            inputs=[prompt, generate_seed, generate_controls.randomize_seed],
                            fn=generate_example,
                            outputs=generate_results.outputs(generate_seed), cache_mode="lazy",
                            example_labels=[e["prompt"] for e in examples["text_to_image"]], examples_per_page=6)
        if examples["edit"]:
            with edit_examples:
                gr.Examples([[e["image"], e["instruction"], e["seed"], False] for e in examples["edit"]],
                            inputs=[input_image, instruction, edit_seed, edit_controls.randomize_seed],
                            fn=edit_example if editor else None,
                            outputs=edit_results.outputs(edit_seed) if editor else None, cache_mode="lazy",
                            example_labels=[e["instruction"] for e in examples["edit"]], examples_per_page=6)

        async def generate(prompt, request: gr.Request, **settings):
            """Generate images from a text prompt with NextStep-1.

            Args:
                prompt: what the picture should show
            """
            record = book.start((request.session_hash, "generate"))
            async for frame in stream_to_page(generator, record, prompt, None, limits=limits,
                                              reader=reader_of(request), **settings):
                yield frame

        async def edit(image, prompt, request: gr.Request, **settings):
            """Edit an image by an instruction with NextStep-1.

            Args:
                image: the picture to edit
                prompt: the instruction: what to change
            """
            record = book.start((request.session_hash, "edit"))
            if editor is None:
                raise refusal(NO_EDIT_MODEL)
            if image is None:
                raise refusal("Add an input image first (upload, paste or take a photo).")
            async for frame in stream_to_page(editor, record, prompt, charged(image, request, limits), limits=limits,
                                              reader=reader_of(request), **settings):
                yield frame

        async def generate_image(prompt, request: gr.Request, **settings):
            return await final_image_of(generator, prompt, None, settings, reader_of(request))

        async def edit_image(image, prompt, request: gr.Request, **settings):
            if editor is None:
                raise refusal(NO_EDIT_MODEL)
            if image is None:
                raise refusal("Give an input image to edit.")
            return await final_image_of(editor, prompt, charged(image, request, limits), settings, reader_of(request))

        def reader_of(request: gr.Request) -> ReaderWatch:
            return ReaderWatch(demo, request.session_hash, limits.reader_patience)

        generate_image.__doc__ = tool_description("Generate an image from a text prompt with NextStep-1.",
                                                  ["prompt", *generate_controls.settings, "randomize_seed"])
        edit_image.__doc__ = tool_description("Edit an image by an instruction with NextStep-1.",
                                              ["image", "prompt", *edit_controls.settings, "randomize_seed"])
        for page_handler in (generate, edit):
            hidden_from_mcp(page_handler)

        generation = gr.on(
            [generate_button.click, prompt.submit], generate, [],
            generate_results.outputs(generate_seed), inputs_kwargs=dict(prompt=prompt, **generate_controls.inputs()),
            api_name="generate", concurrency_id=MODEL_QUEUE, concurrency_limit=services.in_flight, show_progress="minimal",
            show_progress_on=[generate_results.status],
        )
        editing = gr.on(
            [edit_button.click, instruction.submit], edit, [], edit_results.outputs(edit_seed),
            inputs_kwargs=dict(image=input_image, prompt=instruction, **edit_controls.inputs()),
            api_name="edit", concurrency_id=MODEL_QUEUE, concurrency_limit=services.in_flight, show_progress="minimal",
            show_progress_on=[edit_results.status],
        )
        # For agents (MCP, and API clients that want one answer): the same requests, the final image only.
        final_image = gr.Image(visible=False, format="png")
        gr.on([], generate_image, [], final_image, api_name="generate_image", concurrency_id=MODEL_QUEUE,
              inputs_kwargs=dict(prompt=prompt, **generate_controls.settings,
                                 randomize_seed=generate_controls.randomize_seed))
        gr.on([], edit_image, [], final_image, api_name="edit_image", concurrency_id=MODEL_QUEUE,
              inputs_kwargs=dict(image=input_image, prompt=instruction, **edit_controls.settings,
                                 randomize_seed=edit_controls.randomize_seed))
        for tab, stop, event, results in (("generate", generate_stop, generation, generate_results),
                                          ("edit", edit_stop, editing, edit_results)):
            stop.click(None, None, None, cancels=[event], queue=False, api_visibility="private")
            event.then(after_run(book, tab), None, results.status, queue=False, api_visibility="private")

        # The history: every finished result of this session, with its settings.
        generation.success(lambda gallery, entries: remembered(entries, "generate", gallery),
                           [generate_results.gallery, history], [history, history_gallery], api_visibility="private")
        editing.success(lambda gallery, entries, source: remembered(entries, "edit", gallery, source),
                        [edit_results.gallery, history, input_image], [history, history_gallery],
                        api_visibility="private")
        history_gallery.select(choose_entry, history, [chosen, chosen_parameters, use_settings, edit_this],
                               api_visibility="private")
        all_controls = {*generate_tab.components(), *edit_tab.components(), tabs}

        def use_entry(entry: HistoryEntry | None) -> dict:
            if entry is None:
                raise refusal("Choose a result in the history first.")
            tab = edit_tab if entry.tab == "edit" else generate_tab
            return {**tab.filled(entry.parameters, entry.input_image), tabs: gr.Tabs(selected=tab.name)}

        use_settings.click(use_entry, chosen, all_controls, api_visibility="private")
        edit_this.click(lambda entry, current, stack: (entry.image, push_undo(stack, current), gr.Tabs(selected="edit")),
                        [chosen, input_image, undo_stack], [input_image, undo_stack, tabs], api_visibility="private")

        def load_png(path):
            updates = settings_from_png(path, generate_tab, edit_tab)
            if TABS_KEY in updates:
                updates[tabs] = updates.pop(TABS_KEY)
            return updates

        settings_png.upload(load_png, settings_png, all_controls, api_visibility="private")

        # The edit chain: before / after, a result as the next input, and back one step.
        editing.success(lambda source, gallery: (source, gallery[0][0]) if gallery and isinstance(source, str)
                        else gr.skip(),
                        [input_image, edit_results.gallery], compare, api_visibility="private")
        send_to_edit.click(lambda gallery, index, current, stack: (picked_image(gallery, index),
                                                                   push_undo(stack, current), gr.Tabs(selected="edit")),
                           [generate_results.gallery, generate_results.selected, input_image, undo_stack],
                           [input_image, undo_stack, tabs], api_visibility="private")
        use_as_input.click(lambda gallery, index, current, stack: (picked_image(gallery, index),
                                                                   push_undo(stack, current)),
                           [edit_results.gallery, edit_results.selected, input_image, undo_stack],
                           [input_image, undo_stack], api_visibility="private")
        undo.click(undo_edit, undo_stack, [input_image, undo_stack], api_visibility="private")
        # A new input image picks the output size nearest to its aspect ratio, near the default area.
        edit_area = edit_context.defaults["size"].area

        def size_for_input(path):
            size = input_size(path)
            return closest_size(*size, edit_context.sizes, edit_area).value if size else gr.skip()

        input_image.change(size_for_input, input_image, edit_controls.settings["size"], api_visibility="private")
    demo.queue(max_size=services.waiting)
    demo.page_limits = limits
    return demo


def remembered(history: list[HistoryEntry], tab: str, gallery: list | None, source=None):
    """The history with a run's results added; an edit's input is kept when it is a file."""
    source = source if isinstance(source, str) else None
    entries = add_to_history(history, tab, [path for path, _caption in gallery or []], source)
    return entries, history_pictures(entries)


def choose_entry(history: list[HistoryEntry], event: gr.SelectData):
    entry = history[event.index] if event.index < len(history) else None
    enabled = gr.Button(interactive=entry is not None)
    return entry, entry.parameters if entry else None, enabled, enabled


def undo_edit(stack: list):
    if not stack:
        gr.Info("Nothing to undo: the input is where the edit chain started.")
        return gr.skip(), stack
    return stack[-1], stack[:-1]


def serve(demo: gr.Blocks, host: str, port: int, **options):
    """Launch with the page's styling and the limits ``build_demo`` gave it (an upload's size, the
    uploads per client and in total, a message for an unknown endpoint); returns what
    ``Blocks.launch`` does."""
    offered = [fn.api_name for fn in demo.fns.values() if fn.api_name and fn.api_visibility == "public"]
    return demo.launch(server_name=host, server_port=port, max_file_size=MAX_FILE_SIZE, css=CSS,
                       app_kwargs=app_options(demo.page_limits, offered), **options)


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
    parser.add_argument("--edit-device", default=env("NEXTSTEP_EDIT_DEVICE"),
                        help="device for --edit-model, such as cuda:1 [env NEXTSTEP_EDIT_DEVICE; default: --device]")
    parser.add_argument("--quantize", default=env("NEXTSTEP_QUANTIZE"), choices=QUANTIZATIONS,
                        help="weight-only quantization of the backbone: int8 (any device), fp8 (GPUs of compute "
                             "capability 8.9+) [env NEXTSTEP_QUANTIZE; default: none]")
    parser.add_argument("--dtype", default=env("NEXTSTEP_DTYPE"), choices=list(DTYPES),
                        help="[env NEXTSTEP_DTYPE; default: bfloat16 on GPU, float32 on CPU]")
    parser.add_argument("--threads", type=int, default=int(env("NEXTSTEP_THREADS", "0")) or None,
                        help="CPU threads for torch [env NEXTSTEP_THREADS; default: 1 on CPU, where small "
                             "models are bound by per-operation overhead and share the cores with the server]")
    parser.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="[env GRADIO_SERVER_NAME; default 127.0.0.1]")
    parser.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")),
                        help="[env GRADIO_SERVER_PORT; default 7860]")
    parser.add_argument("--compile", action="store_true", default=env("NEXTSTEP_COMPILE") == "1",
                        help="compile the per-token step (and capture it as a CUDA graph on CUDA): each batch "
                             "shape compiles on first use, then runs faster [env NEXTSTEP_COMPILE=1; default: off]")
    parser.add_argument("--cache-limit", type=int, default=int(env("NEXTSTEP_CACHE_MB", str(CACHE_LIMIT // MB))),
                        help="MB the page's cache (uploads and results, in GRADIO_TEMP_DIR) may hold; the oldest "
                             f"files go first [env NEXTSTEP_CACHE_MB; default {CACHE_LIMIT // MB}]")
    parser.add_argument("--serve-url", default=env("NEXTSTEP_SERVE_URL"),
                        help="send requests to the Ray Serve application at this address (python -m "
                             "nextstep.serve) instead of loading a model here; the model flags then belong "
                             "to that command [env NEXTSTEP_SERVE_URL]")
    parser.add_argument("--mcp", action="store_true", default=env("NEXTSTEP_MCP") == "1",
                        help="also serve /generate and /edit as MCP tools for agents, at /gradio_api/mcp/ "
                             "[env NEXTSTEP_MCP=1; default: off]")
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
    # The page's own log lines (refused input) on stderr; other libraries' logging is left alone.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    if args.serve_url:
        try:
            services = remote_services(args.serve_url)
        except httpx.HTTPError as error:
            sys.exit(f"app.py: error: no NextStep application answers at {args.serve_url} ({error})")
    else:
        set_threads(pick_device(args.device), args.threads)
        try:
            services = load_services(args.model, args.edit_model, args.vae, args.device, args.dtype,
                                     quantize=args.quantize, edit_device=args.edit_device, compile=args.compile)
        except NotEnoughMemoryError as error:
            sys.exit(f"app.py: error: {error}")
        except (ModelNotFoundError, CheckpointMismatchError, ValueError) as error:
            sys.exit(f"app.py: error: {error}\n(choose the checkpoint with --model, --edit-model and --vae)")
    limits = PageLimits(cache=CacheBound(limit=args.cache_limit * MB))
    serve(build_demo(services, limits), args.host, args.port, mcp_server=args.mcp)


if __name__ == "__main__":
    main()
