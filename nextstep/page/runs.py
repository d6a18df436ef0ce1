"""Runs on the page: a tab's order handed to its service, the service's frames streamed to the
page (live preview, status line, results with their parameters), and how each run ended.

Stop cancels the run's event; Gradio then runs the event's follow-up listener, after the
cancelled stream is gone. That listener (``after_run``) alone writes "Stopped.", once the request
has let go of the model, so no late progress frame can overwrite it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import math
import os
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from gradio.data_classes import ImageData
from gradio.processing_utils import hash_bytes
from gradio.utils import get_upload_folder
from PIL import Image

from ..engine.inputs import clean_text
from ..engine.preview import replay_stages
from ..engine.settings import MAX_DRAWN_SEED
from ..engine.sizes import Size
from ..pnginfo import save_with_parameters
from ..serving.quota import QuotaExceeded
from ..serving.service import Busy, GenerationFailed, Order, Progress, Service, Ticket, Visitor
from .controls import LOG, TabControls, refusal
from .guard import PageLimits, ReaderWatch, charge_inline_image
from .i18n import say, text
from .visitors import quota_message, visitor_of


def clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}:{seconds:02d}"


def status_line(frame: Progress) -> str:
    """The status line under a run's preview: tokens, speed, elapsed time and time left; at the end
    the totals and the seed."""
    if frame.result is not None:
        return say("run.done", total=frame.total, elapsed=clock(frame.elapsed), rate=f"{frame.rate:.1f}",
                   seed=frame.result.seed)
    eta = (frame.total - frame.done) / frame.rate if frame.rate else math.inf
    eta_text = clock(eta) if math.isfinite(eta) else "…"
    return say("run.progress", done=frame.done, total=frame.total, rate=f"{frame.rate:.1f}",
               elapsed=clock(frame.elapsed), eta=eta_text)


def result_files(images: list[Image.Image], parameters: dict) -> list[str]:
    """Each picture as a PNG (both parameter chunks) in the page's cache folder, where Gradio keeps
    a served file: under a folder named by its content, written once under a temporary name and
    moved into place. Handed PIL pictures, Gradio would truncate and rewrite that file for every
    identical result (a shared example, a reused seed) while another visitor may be downloading it;
    handed a file already in place, it serves it as it is."""
    paths = []
    for image in images:
        buffer = io.BytesIO()
        save_with_parameters(image, parameters, buffer)
        data = buffer.getvalue()
        path = Path(get_upload_folder()) / hash_bytes(data) / "image.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{uuid.uuid4().hex}.png")
            partial.write_bytes(data)
            os.replace(partial, path)
        paths.append(str(path))
    return paths


def tile(images: list[Image.Image]) -> Image.Image:
    """Several same-sized pictures side by side in rows of two (one picture stays as it is)."""
    if len(images) == 1:
        return images[0]
    width, height = images[0].size
    columns = 2
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * width, (index // columns) * height))
    return sheet


# ---- what a tab shows of its runs ---------------------------------------------------------------


REPLAY_BELOW = 3  # a run that showed fewer previews than this ends with a replay of its stages
REPLAY_STAGES = 6
REPLAY_STAGE_MS, REPLAY_END_MS = 150, 2000


@dataclass
class Replay:
    """The stages of a finished run, the final picture last, shown once as an animation."""

    frames: list[Image.Image]


def replay_of(images: list[Image.Image], tokens: int) -> Replay:
    """A run too quick for its previews to be seen: its stages (``replay_stages``), tiled."""
    return Replay([tile(stage) for stage in replay_stages(images, tokens, REPLAY_STAGES)])


class LivePreview(gr.Image):
    """The live preview: each frame travels inside the stream as a JPEG data URL (a ``Replay`` as an
    animated WebP that plays once). Written to the cache as files, as ``gr.Image`` does, a request's
    many frames would fill the disk whether or not anyone looks, and a file removed once shown may
    still be on its way to a slow reader."""

    is_template = True  # drawn by the frontend as a plain image

    def postprocess(self, value):
        buffer = io.BytesIO()
        if isinstance(value, Replay):
            first, *rest = [frame.convert("RGB") for frame in value.frames]
            first.save(buffer, "WEBP", save_all=True, append_images=rest, loop=1, quality=90,
                       duration=[REPLAY_STAGE_MS] * len(rest) + [REPLAY_END_MS])
            kind = "webp"
        elif isinstance(value, Image.Image):
            value.convert("RGB").save(buffer, "JPEG", quality=90)
            kind = "jpeg"
        else:
            return super().postprocess(value)
        return ImageData(url=f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode(),
                         orig_name=f"preview.{kind}", mime_type=f"image/{kind}")


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


def result_panel(prefix: str) -> Results:
    preview = LivePreview(label=text("preview"), interactive=False, height=360, elem_id=f"{prefix}-preview",
                          elem_classes=["live-preview"])
    status = gr.Markdown(text("status.ready"), label=text("status"), elem_id=f"{prefix}-status", elem_classes=["run-status"])
    gallery = gr.Gallery(label=text("gallery"), format="png", columns=4, fit_columns=False,
                         height=240, object_fit="contain", interactive=False, elem_id=f"{prefix}-gallery")
    with gr.Accordion(text("parameters.section"), open=False):
        parameters = gr.JSON(label=text("parameters"), elem_id=f"{prefix}-parameters")
    selected = gr.State(0)
    gallery.select(remember_selection, None, selected, api_visibility="private")
    return Results(preview, gallery, status, parameters, selected)


def remember_selection(event: gr.SelectData) -> int:
    return event.index


@dataclass
class Tab:
    """One tab's widgets: its prompt (the instruction, for Edit), controls, buttons and results."""

    name: str  # "generate" or "edit"
    prompt: gr.Textbox
    controls: TabControls
    sizes: list[Size]
    run: gr.Button
    stop: gr.Button
    results: Results
    image: gr.Image | None = None  # the Edit tab's input
    note: gr.Markdown | None = None  # what a request reserves, on ZeroGPU
    quick: tuple | None = None  # the quick preset: (its button, its settings)

    @property
    def seed(self) -> gr.Number:
        return self.controls.settings["seed"]

    def inputs(self) -> dict[str, gr.Component]:
        """The run handler's keyword inputs."""
        image = {"image": self.image} if self.image is not None else {}
        return dict(**image, prompt=self.prompt, **self.controls.inputs())


def run_buttons(prefix: str, enabled: bool) -> tuple[gr.Button, gr.Button]:
    with gr.Row():
        run = gr.Button(text(f"run.{prefix}"), variant="primary", interactive=enabled, elem_id=f"{prefix}-run")
        stop = gr.Button(text("run.stop"), variant="stop", elem_id=f"{prefix}-stop")
    return run, stop


# ---- how runs end ---------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """How one run of a tab ended: "running" until it is "done", "failed" (with the message the
    visitor was shown), "stopped" or "dropped"."""

    outcome: str = "running"
    ticket: Ticket | None = None  # once submitted
    message: str = ""


class RunBook:
    """How each browser session's latest run of each tab ended, for the status line after Stop."""

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


def after_run(book: RunBook, tab: str) -> Callable:
    """The follow-up listener of a tab's runs: "Stopped." once a stopped request has left the
    model, the message of a failed one, else nothing."""

    async def status_after(request: gr.Request):
        record = book.pop((request.session_hash, tab))
        if record is not None and record.outcome == "failed":
            return say("run.failed", message=record.message) if record.message else say("run.failed_plain")
        if record is None or record.outcome != "stopped":
            return gr.skip()
        if record.ticket is not None:
            await asyncio.to_thread(record.ticket.wait_left, 60)
        return say("run.stopped")

    return status_after


# ---- streaming a run ------------------------------------------------------------------------------


def page_order(prompt, image, randomize_seed: bool, preview: str, preview_every: int, settings: dict,
               visitor: Visitor | None = None) -> Order:
    """The order a tab's controls make: ``settings`` by request field, the seed among them."""
    if not clean_text(prompt, "prompt"):
        raise ValueError(say("msg.empty_prompt"))
    settings = dict(settings)
    seed = settings.pop("seed", None)
    if randomize_seed:
        seed = None  # the service draws one, and the page shows it
    elif seed is None:
        raise ValueError(say("msg.empty_seed", maximum=MAX_DRAWN_SEED))
    return Order(prompt, image, settings, seed, preview, preview_every, visitor)


async def stream_to_page(service: Service, record: RunRecord, prompt: str, image, *, randomize_seed: bool,
                         preview: str, preview_every, limits: PageLimits | None = None,
                         reader: ReaderWatch | None = None, visitor: Visitor | None = None, **settings):
    """Yield (preview, gallery, status, parameters, seed) frames for one request; ``settings`` are
    request fields. ``record`` learns how the run ended ("done", "failed", "stopped" or "dropped":
    ``reader`` saw nobody take its frames). With ``limits``, the cache is swept when it ends.
    ``visitor``: whose quota the request is charged to, where one applies."""
    watch = None
    try:
        order = page_order(prompt, image, randomize_seed, preview, preview_every, settings, visitor)
        ticket = service.submit(order)
        record.ticket = ticket
        if reader is not None:
            watch = asyncio.create_task(reader.cancel_when_abandoned(ticket))
        yield None, None, waiting_line(ticket), None, ticket.seed
        # Progress frames repeat the values already shown rather than send gr.skip(): Gradio
        # rebuilds a skipped component's whole config (its API schema included), which costs
        # far more than the frame itself and, with many users, slows the model's thread.
        shown_preview, shown = None, 0
        # Closed with this generator (Stop closes it while it waits at a yield), not when collected.
        async with contextlib.aclosing(service.frames(ticket)) as frames:
            async for frame in frames:
                if frame.result is not None:
                    result = frame.result
                    record.outcome = "done"
                    # A run too quick to show its stages replays them, from the final picture, once.
                    picture = (replay_of(result.images, frame.total)
                               if preview != "none" and shown < REPLAY_BELOW else tile(result.images))
                    yield (picture, result_files(result.images, result.parameters), status_line(frame),
                           result.parameters, ticket.seed)
                else:
                    shown += bool(frame.preview)
                    shown_preview = tile(frame.preview) if frame.preview else shown_preview
                    yield shown_preview, None, status_line(frame), None, ticket.seed
        if record.outcome == "running" and watch is not None and watch.done():
            record.outcome = "dropped"
            LOG.info("dropped: nobody read the request's frames for %g s", reader.patience)
    except QuotaExceeded as error:  # the page's refusal, or ZeroGPU's, in the visitor's words
        record.outcome, record.message = "failed", quota_message(error, bool(visitor and visitor.signed_in))
        raise refusal(record.message) from None
    except (ValueError, Busy, GenerationFailed) as error:  # their messages are written for users
        record.outcome, record.message = "failed", str(error)
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


def waiting_line(ticket: Ticket) -> str:
    """The status line while a request waits: on ZeroGPU, what it reserves."""
    if ticket.reservation is None:
        return say("run.waiting")
    return say("run.waiting_gpu", seconds=ticket.reservation)


async def last_frame(service: Service, prompt: str, image, **settings) -> tuple:
    """The final (preview, gallery, status, parameters, seed) frame of one request, run without previews."""
    frame = None
    async for frame in stream_to_page(service, RunRecord(), prompt, image,
                                      preview="none", preview_every=1, **settings):
        pass
    return frame


async def final_image_of(service: Service, prompt: str, image, settings: dict,
                         reader: ReaderWatch | None = None, visitor: Visitor | None = None) -> tuple[str, dict]:
    """The finished picture of one request as a PNG file (several images side by side), and its
    parameters."""
    _, files, _, parameters, _ = await last_frame(service, prompt, image, reader=reader, visitor=visitor,
                                                  **settings)
    if not files:  # dropped, nobody reading
        raise refusal(say("msg.dropped"))
    if len(files) == 1:
        return files[0], parameters
    # One request's images share its parameters: a sheet of several carries them too.
    return result_files([tile([Image.open(path) for path in files])], parameters)[0], parameters


# ---- wiring a tab's runs --------------------------------------------------------------------------

MODEL_QUEUE = "model"  # every event that runs a model shares one queue


def input_image(image, request: gr.Request, limits: PageLimits, missing: str | None = None):
    """An edit's input image as it may be used: present, and within its visitor's upload budget
    when it came inline."""
    if image is None:
        raise refusal(missing or say("msg.add_image"))
    if (refused := charge_inline_image(image, request, limits)) is not None:
        raise refusal(refused)
    return image


def run_handler(demo: gr.Blocks, tab: Tab, service: Service | None, book: RunBook, limits: PageLimits) -> Callable:
    """The handler of a tab's runs: the order its controls make, streamed to the page."""

    def reader_of(request: gr.Request) -> ReaderWatch:
        return ReaderWatch(demo, request.session_hash, limits.reader_patience)

    if tab.image is None:
        async def generate(prompt, request: gr.Request, **settings):
            """Generate images from a text prompt with NextStep-1.

            Args:
                prompt: what the picture should show
            """
            record = book.start((request.session_hash, tab.name))
            async for frame in stream_to_page(service, record, prompt, None, limits=limits, reader=reader_of(request),
                                              visitor=visitor_of(request, limits), **settings):
                yield frame

        return generate

    async def edit(image, prompt, request: gr.Request, **settings):
        """Edit an image by an instruction with NextStep-1.

        Args:
            image: the picture to edit
            prompt: the instruction: what to change
        """
        record = book.start((request.session_hash, tab.name))
        if service is None:
            raise refusal(say("no_edit_model"))
        image = input_image(image, request, limits)
        async for frame in stream_to_page(service, record, prompt, image, limits=limits, reader=reader_of(request),
                                          visitor=visitor_of(request, limits), **settings):
            yield frame

    return edit


def hidden_from_mcp(handler: Callable) -> None:
    """Gradio offers every public endpoint as an MCP tool unless its function is marked as
    something else (the attribute its ``gr.mcp`` decorators set). The page's streaming handlers
    answer with frames an agent cannot use; ``generate_image`` and ``edit_image`` serve agents."""
    handler._mcp_type = "page"


def wire_runs(demo: gr.Blocks, tab: Tab, service: Service | None, book: RunBook, limits: PageLimits,
              in_flight: int):
    """A tab's run event (its button and Enter in its prompt, ``/generate`` or ``/edit`` in the
    API), its Stop, and the follow-up that writes "Stopped."; returns the run event."""
    handler = run_handler(demo, tab, service, book, limits)
    hidden_from_mcp(handler)
    event = gr.on([tab.run.click, tab.prompt.submit], handler, [], tab.results.outputs(tab.seed),
                  inputs_kwargs=tab.inputs(), api_name=tab.name, concurrency_id=MODEL_QUEUE,
                  concurrency_limit=in_flight, show_progress="minimal",
                  show_progress_on=[tab.results.status])
    tab.stop.click(None, None, None, cancels=[event], queue=False, api_visibility="private")
    event.then(after_run(book, tab.name), None, tab.results.status, queue=False, api_visibility="private")
    return event
