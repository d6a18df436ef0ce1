"""The page: the Generate and Edit tabs, the history, the Model panel, their events, and launching
it under the page's bounds. Only what is drawn and wired is here; runs, reuse and the controls
each have a module of their own."""

from __future__ import annotations

import gradio as gr

from ..serving.compose import Services
from ..serving.examples import load_examples
from ..serving.service import Service
from .agents import mcp_lifespan, wire_tools
from .controls import ImageUpload, Page, TabContext, sampling_controls
from .guard import MAX_FILE_SIZE, PageLimits, app_options
from .reuse import edit_chain_panel, history_panel, wire_edit_chain, wire_history
from .runs import (
    NO_EDIT_MODEL,
    RunBook,
    Tab,
    last_frame,
    result_panel,
    run_buttons,
    wire_runs,
)

TITLE = "NextStep Studio"
HEADER = ("# NextStep Studio\n"
          "NextStep-1 paints an image one token at a time: watch the preview fill in, row by row.")
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
            prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Describe the image", elem_id="generate-prompt")
            run, stop = run_buttons("generate", "Generate", True)
            examples = gr.Column()  # filled once the seed widgets exist
            controls = sampling_controls(context, edit=False)
        with gr.Column(scale=3):
            results = result_panel("generate")
            send_to_edit = gr.Button("Send to Edit", elem_id="send-to-edit", interactive=can_edit)
    return Tab("generate", prompt, controls, context.sizes, run, stop, results), examples, send_to_edit


def edit_tab(service: Service, available: bool):
    """The Edit tab's widgets (shown for orientation without an edit model, its button disabled):
    the tab, a column for its examples, and the edit chain's widgets."""
    context = TabContext("edit", service.defaults(edit=True), service.sizes(True))
    if not available:
        gr.Markdown(f"**{NO_EDIT_MODEL}**", elem_id="edit-unavailable")
    with gr.Row():
        with gr.Column(scale=2):
            image = ImageUpload(label="Input image", type="filepath", sources=["upload", "clipboard", "webcam"],
                                height=280, elem_id="edit-image")
            instruction = gr.Textbox(label="Instruction", lines=2, placeholder="What to change",
                                     elem_id="edit-instruction")
            run, stop = run_buttons("edit", "Edit", available)
            examples = gr.Column()
            controls = sampling_controls(context, edit=True)
        with gr.Column(scale=3):
            results = result_panel("edit")
            chain = edit_chain_panel()
    return Tab("edit", instruction, controls, context.sizes, run, stop, results, image), examples, chain


def examples_panels(services: Services, generate: Tab, edit: Tab, generate_column, edit_column) -> None:
    """The examples that fit the models, each with the seed it was checked with, so it reproduces.

    Where the platform asks for cached examples (Spaces sets GRADIO_CACHE_EXAMPLES), each is cached
    at its first click, never all at start-up: on a GPU Space that would spend GPU time (and on
    ZeroGPU, quota) before anyone asked. A cached example shows its result, the settings it does
    not name at their defaults."""
    prompts = load_examples(services.examples["text_to_image"])["text_to_image"]
    edits = load_examples(services.examples["edit"])["edit"]

    async def generate_example(prompt, seed, randomize_seed):
        return await last_frame(services.generator, prompt, None, seed=seed, randomize_seed=randomize_seed)

    async def edit_example(image, prompt, seed, randomize_seed):
        return await last_frame(services.editor, prompt, image, seed=seed, randomize_seed=randomize_seed)

    if prompts:
        with generate_column:
            gr.Examples([[e["prompt"], e["seed"], False] for e in prompts],
                        inputs=[generate.prompt, generate.seed, generate.controls.randomize_seed],
                        fn=generate_example, outputs=generate.results.outputs(generate.seed), cache_mode="lazy",
                        example_labels=[e["prompt"] for e in prompts], examples_per_page=EXAMPLES_PER_PAGE)
    if edits:
        available = services.editor is not None
        with edit_column:
            gr.Examples([[e["image"], e["instruction"], e["seed"], False] for e in edits],
                        inputs=[edit.image, edit.prompt, edit.seed, edit.controls.randomize_seed],
                        fn=edit_example if available else None,
                        outputs=edit.results.outputs(edit.seed) if available else None, cache_mode="lazy",
                        example_labels=[e["instruction"] for e in edits], examples_per_page=EXAMPLES_PER_PAGE)


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


def build_demo(services: Services, limits: PageLimits | None = None, mcp: bool = False) -> gr.Blocks:
    """The page; ``launch`` serves it under ``limits`` (the default bounds without). ``mcp``: also
    the tools for agents, served by Gradio's MCP server (off, they are a second way in that a demo
    seldom needs)."""
    limits = limits or PageLimits()
    available = services.editor is not None
    book = RunBook()
    with Page(title=TITLE, delete_cache=(1800, 3600)) as demo:
        gr.Markdown(HEADER)
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                generate, generate_examples, send_to_edit = generate_tab(services.generator, available)
            with gr.Tab("Edit", id="edit"):
                edit, edit_examples, chain = edit_tab(services.editor or services.generator, available)
        history = history_panel()
        model_panel(services)
        undo_stack = gr.State([])  # earlier inputs of the edit chain, latest last
        examples_panels(services, generate, edit, generate_examples, edit_examples)
        generation = wire_runs(demo, generate, services.generator, book, limits, services.in_flight)
        editing = wire_runs(demo, edit, services.editor, book, limits, services.in_flight)
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
                       mcp_server=demo.mcp_tools, app_kwargs=app_kwargs, run_history=False, **options)
