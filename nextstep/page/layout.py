"""The page: the Generate and Edit tabs, the history, the Model panel, their events, and launching
it under the page's bounds. Only what is drawn and wired is here; runs, reuse and the controls
each have a module of their own."""

from __future__ import annotations

import gradio as gr

from ..loading.options import EMBEDDED_MODEL
from ..serving.compose import Services
from ..serving.examples import load_examples
from ..serving.service import Order, Service
from .agents import mcp_lifespan, wire_tools
from .controls import ImageUpload, Page, TabContext, quick_settings, sampling_controls
from .guard import MAX_FILE_SIZE, PageLimits, app_options
from .i18n import Phrases, in_language, text, translations
from .reuse import edit_chain_panel, history_panel, wire_edit_chain, wire_history
from .runs import (
    RunBook,
    Tab,
    last_frame,
    result_panel,
    run_buttons,
    wire_runs,
)
from .visitors import PROBE, SignInButton, has_quota, reservation_note, sign_in_offered, stand_in_image, visitor_of

TITLE = "NextStep Studio"
CSS = (
    # Small images fill the preview box, with crisp pixels rather than a blur.
    ".live-preview img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }\n"
    # The status line says how a run ended itself ("Stopped.", "Failed: …"; a failure also pops up a
    # message). Gradio's badge on it would only add a false "Error": cancelling a run (Stop) marks it
    # failed in the browser for a moment before it is marked complete.
    ".run-status .error { display: none; }"
)
EXAMPLES_PER_PAGE = 6


def generate_tab(service: Service, can_edit: bool) -> tuple[Tab, gr.Column, gr.Button]:
    """The Generate tab's widgets: the tab, a column for its examples, and "Send to Edit"."""
    context = TabContext("generate", service.defaults(edit=False), service.sizes(False))
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label=text("prompt"), lines=3, placeholder=text("prompt.placeholder"),
                                elem_id="generate-prompt")
            run, stop = run_buttons("generate", True)
            quick = quick_settings(context.defaults, context.sizes)
            quick_button = gr.Button(quick_label(service, quick), size="sm", elem_id="generate-quick")
            note = gr.Markdown("", elem_id="generate-reservation", visible=has_quota(service))
            examples = gr.Column()  # filled once the seed widgets exist
            controls = sampling_controls(context, edit=False)
        with gr.Column(scale=3):
            results = result_panel("generate")
            send_to_edit = gr.Button(text("send_to_edit"), elem_id="send-to-edit", interactive=can_edit)
    tab = Tab("generate", prompt, controls, context.sizes, run, stop, results, note=note, quick=(quick_button, quick))
    return tab, examples, send_to_edit


def quick_label(service: Service, quick: dict):
    """The quick preset's button: its size and steps, and on ZeroGPU what it reserves."""
    figures = dict(size=quick["size"].replace("x", "×"), steps=quick["num_sampling_steps"])
    seconds = service.reservation(Order("a picture", settings=quick))
    return Phrases.text("quick" if seconds is None else "quick.reserves", **figures,
                        **({} if seconds is None else {"seconds": seconds}))


def edit_tab(service: Service, available: bool):
    """The Edit tab's widgets (shown for orientation without an edit model, its button disabled):
    the tab, a column for its examples, and the edit chain's widgets."""
    context = TabContext("edit", service.defaults(edit=True), service.sizes(True))
    if not available:
        gr.Markdown(text("no_edit_model"), elem_id="edit-unavailable")
    with gr.Row():
        with gr.Column(scale=2):
            image = ImageUpload(label=text("edit.image"), type="filepath", sources=["upload", "clipboard", "webcam"],
                                height=280, elem_id="edit-image")
            instruction = gr.Textbox(label=text("edit.instruction"), lines=2,
                                     placeholder=text("edit.instruction.placeholder"), elem_id="edit-instruction")
            run, stop = run_buttons("edit", available)
            note = gr.Markdown("", elem_id="edit-reservation", visible=available and has_quota(service))
            examples = gr.Column()
            controls = sampling_controls(context, edit=True)
        with gr.Column(scale=3):
            results = result_panel("edit")
            chain = edit_chain_panel()
    return Tab("edit", instruction, controls, context.sizes, run, stop, results, image, note=note), examples, chain


def examples_panels(demo: gr.Blocks, services: Services, generate: Tab, edit: Tab, generate_column, edit_column,
                    limits: PageLimits) -> None:
    """The examples that fit the models, each with the seed it was checked with, so it reproduces,
    and a caption in the visitor's language.

    Where the platform asks for cached examples (Spaces sets GRADIO_CACHE_EXAMPLES), each is cached
    at its first click, never all at start-up: on a GPU Space that would spend GPU time (and on
    ZeroGPU, quota) before anyone asked. A cached example shows its result, the settings it does
    not name at their defaults."""
    prompts = load_examples(services.examples["text_to_image"])["text_to_image"]
    edits = load_examples(services.examples["edit"])["edit"]

    async def generate_example(prompt, seed, randomize_seed, request: gr.Request):
        return await last_frame(services.generator, prompt, None, seed=seed, randomize_seed=randomize_seed,
                                visitor=visitor_of(request, limits))

    async def edit_example(image, prompt, seed, randomize_seed, request: gr.Request):
        return await last_frame(services.editor, prompt, image, seed=seed, randomize_seed=randomize_seed,
                                visitor=visitor_of(request, limits))

    blocks = []
    if prompts:
        with generate_column:
            blocks.append((gr.Examples(
                [[e["prompt"], e["seed"], False] for e in prompts],
                inputs=[generate.prompt, generate.seed, generate.controls.randomize_seed], fn=generate_example,
                outputs=generate.results.outputs(generate.seed), cache_mode="lazy", label=text("examples"),
                example_labels=[e["prompt"] for e in prompts], examples_per_page=EXAMPLES_PER_PAGE), prompts))
    if edits:
        available = services.editor is not None
        with edit_column:
            blocks.append((gr.Examples(
                [[e["image"], e["instruction"], e["seed"], False] for e in edits],
                inputs=[edit.image, edit.prompt, edit.seed, edit.controls.randomize_seed],
                fn=edit_example if available else None, outputs=edit.results.outputs(edit.seed) if available else None,
                cache_mode="lazy", label=text("examples"), example_labels=[e["instruction"] for e in edits],
                examples_per_page=EXAMPLES_PER_PAGE), edits))
    for examples, entries in blocks:
        # gr.I18n does not reach an example's caption: each visitor gets them in their language on load.
        demo.load(lambda entries=entries: gr.Dataset(sample_labels=[caption(e) for e in entries]), None,
                  examples.dataset, api_visibility="private", queue=False, show_progress="hidden")


def caption(example: dict) -> str:
    """An example's caption in the visitor's language: its text, or its Chinese caption."""
    english = example.get("prompt") or example["instruction"]
    return in_language((english, example.get("caption_zh", english)))


def model_panel(services: Services) -> None:
    """The Model panel: each tab's checkpoint (family, device, dtype, quantization, parameters),
    the VAE, and with the embedded model how to serve NextStep-1.1 instead."""
    rows = [("model.generate", services.generator.describe())]
    if services.editor is not None and services.editor is not services.generator:
        rows.append(("model.edit", services.editor.describe()))
    with gr.Accordion(text("model"), open=False, elem_id="model-accordion"):
        for key, info in rows:
            figures = " · ".join(info[name] for name in ("family", "device", "dtype", "quantization", "parameters"))
            gr.Markdown(f"{text(key)}: `{info['checkpoint']}` · {figures}", elem_classes=["model-row"])
        if services.editor is services.generator:
            gr.Markdown(text("model.same"))
        if (allowance := services.generator.allowance(PROBE)) is not None and allowance.xlarge:
            gr.Markdown(text("model.xlarge"), elem_id="model-xlarge")
        if services.vae:
            gr.Markdown(f"VAE: `{services.vae}`")
        if any(info["checkpoint"] == EMBEDDED_MODEL.name for _, info in rows):
            gr.Markdown(text("model.embedded"), elem_id="model-embedded")


def wire_reservation(demo: gr.Blocks, tab: Tab, service: Service | None, limits: PageLimits) -> None:
    """The note under a tab's buttons on ZeroGPU: what the request as set would reserve, and what
    the visitor may ask for, brought up to date when a setting that changes it changes."""
    if service is None or not has_quota(service):
        return
    watched = [tab.controls.settings[name] for name in ("size", "num_images", "cfg", "num_sampling_steps",
                                                         "cfg_img") if name in tab.controls.settings]

    def note(request: gr.Request, image=None, **settings):
        settings.pop("seed", None)
        if tab.image is not None and image is None:
            image = stand_in_image(settings["size"])
        order = Order("a picture", image, settings, visitor=visitor_of(request, limits))
        return reservation_note(service, order)

    inputs = {name: control for name, control in tab.controls.settings.items()}
    if tab.image is not None:
        inputs["image"] = tab.image
    gr.on([demo.load, *[control.change for control in watched], *([tab.image.change] if tab.image else [])],
          note, [], tab.note, inputs_kwargs=inputs, api_visibility="private", show_progress="hidden", queue=False)


def wire_quick(tab: Tab) -> None:
    """The quick preset: its settings into the tab's controls."""
    settings = tab.controls.settings
    button, quick = tab.quick
    button.click(lambda: [quick["size"], quick["num_sampling_steps"], quick["num_images"]], None,
                 [settings["size"], settings["num_sampling_steps"], settings["num_images"]],
                 api_visibility="private", queue=False)


def build_demo(services: Services, limits: PageLimits | None = None, mcp: bool = False) -> gr.Blocks:
    """The page; ``launch`` serves it under ``limits`` (the default bounds without). ``mcp``: also
    the tools for agents, served by Gradio's MCP server (off, they are a second way in that a demo
    seldom needs)."""
    limits = limits or PageLimits()
    available = services.editor is not None
    book = RunBook()
    with Page(title=TITLE, delete_cache=(1800, 3600)) as demo:
        with gr.Row():
            gr.Markdown(f"# {TITLE}\n{text('header')}", elem_id="header")
            if sign_in_offered(services.generator):
                SignInButton(value=str(text("sign_in")), elem_id="sign-in", scale=0)
        with gr.Tabs() as tabs:
            with gr.Tab(text("tab.generate"), id="generate"):
                generate, generate_examples, send_to_edit = generate_tab(services.generator, available)
            with gr.Tab(text("tab.edit"), id="edit"):
                edit, edit_examples, chain = edit_tab(services.editor or services.generator, available)
        history = history_panel()
        model_panel(services)
        undo_stack = gr.State([])  # earlier inputs of the edit chain, latest last
        examples_panels(demo, services, generate, edit, generate_examples, edit_examples, limits)
        generation = wire_runs(demo, generate, services.generator, book, limits, services.in_flight)
        editing = wire_runs(demo, edit, services.editor, book, limits, services.in_flight)
        wire_quick(generate)
        wire_reservation(demo, generate, services.generator, limits)
        wire_reservation(demo, edit, services.editor, limits)
        if mcp:
            wire_tools(demo, generate, edit, services.generator, services.editor, limits)
        wire_history(history, generate, edit, tabs, generation, editing, undo_stack)
        wire_edit_chain(chain, generate, edit, tabs, send_to_edit, editing, undo_stack)
    demo.queue(max_size=services.waiting)
    demo.page_limits, demo.mcp_tools = limits, mcp
    return demo


def launch(demo: gr.Blocks, host: str, port: int, **options):
    """Launch with the page's styling and the limits ``build_demo`` gave it (an upload's size, the
    uploads per client and in total, a message for an unknown endpoint); returns what
    ``Blocks.launch`` does."""
    offered = [fn.api_name for fn in demo.fns.values() if fn.api_name and fn.api_visibility == "public"]
    app_kwargs = app_options(demo.page_limits, offered)
    if demo.mcp_tools:
        app_kwargs["lifespan"] = mcp_lifespan(demo)
    # Gradio's own run log (the footer's "Runs") is off: the page keeps its own history of results
    # with their parameters, and that log records a streaming run's frames as it sees them, a
    # stopped run as completed and each live preview (sent inside the stream) as a broken picture.
    return demo.launch(server_name=host, server_port=port, max_file_size=MAX_FILE_SIZE, css=CSS,
                       mcp_server=demo.mcp_tools, app_kwargs=app_kwargs, run_history=False, i18n=translations(),
                       **options)
