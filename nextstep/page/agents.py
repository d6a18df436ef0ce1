"""Tools for agents, with ``--mcp``: ``generate_image`` and ``edit_image``, the same requests as the
tabs', served by Gradio's MCP server and answering with the final PNG and its parameters.

Every parameter is described (Gradio reads a tool's parameters from its function's signature and
docstring); the picture to edit arrives as a data: URL, read like any inline image; the answer's
image is the PNG file itself, both parameter chunks included, and no line of it names a path on
the server.
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path

import gradio as gr
from gradio_client.utils import is_file_obj_with_meta

from ..engine.settings import SETTINGS
from ..serving.service import Service
from .controls import inline_image, refusal
from .guard import PageLimits, ReaderWatch
from .i18n import say
from .runs import MODEL_QUEUE, Tab, final_image_of, input_image
from .visitors import visitor_of

# What the tools' parameters mean, for agents (the settings' own help besides these).
TOOL_PARAMETERS = {
    "prompt": "what the image should show, or for an edit what to change",
    "image": "the picture to edit, as a base64 data: URL (data:image/png;base64,...); web addresses are not fetched",
    "randomize_seed": "draw a fresh seed (true) or use the given seed (false)",
}


def tool(name: str, summary: str, parameters: list[str], run: Callable) -> Callable:
    """An endpoint function for agents whose signature names each of ``parameters``: Gradio's MCP
    server describes a tool's parameters from its function's signature and docstring."""

    async def handler(request: gr.Request, **values):
        return await run(request, values)

    listed = [inspect.Parameter(parameter, inspect.Parameter.KEYWORD_ONLY) for parameter in parameters]
    handler.__signature__ = inspect.Signature(
        [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request), *listed])
    handler.__name__ = handler.__qualname__ = name
    described = [f"    {p}: {TOOL_PARAMETERS.get(p) or SETTINGS[p].help}" for p in parameters]
    handler.__doc__ = summary + "\n\nArgs:\n" + "\n".join(described) + "\n\nReturns:\n    the image, and its parameters as JSON"
    return handler


def wire_tools(demo: gr.Blocks, generate: Tab, edit: Tab, generator: Service, editor: Service | None,
               limits: PageLimits) -> None:
    """For agents: ``generate_image`` and ``edit_image``, the same requests as the tabs', answering
    with the final PNG and its parameters. The picture to edit arrives as a data: URL, read like
    any inline image (its header checked before anything decodes it, charged to the visitor's
    upload budget)."""

    async def final(service: Service, request: gr.Request, values: dict, image=None):
        prompt = values.pop("prompt")
        picture, parameters = await final_image_of(service, prompt, image, values,
                                                   ReaderWatch(demo, request.session_hash, limits.reader_patience),
                                                   visitor_of(request, limits))
        return picture, json.dumps(parameters, sort_keys=True)

    async def generate_image(request: gr.Request, values: dict):
        return await final(generator, request, values)

    async def edit_image(request: gr.Request, values: dict):
        if editor is None:
            raise refusal(say("no_edit_model"))
        url = values.pop("image")
        if not isinstance(url, str) or not url.startswith("data:"):
            raise refusal("Give the picture to edit as a base64 data: URL (data:image/png;base64,...).")
        return await final(editor, request, values, input_image(inline_image(url), request, limits))

    image_url = gr.Textbox(visible=False)  # the picture to edit, as a data: URL
    outputs = [gr.Image(visible=False, format="png", type="filepath"), gr.Textbox(visible=False)]
    for tab, summary, run, image in (
        (generate, "Generate an image from a text prompt with NextStep.", generate_image, {}),
        (edit, "Edit an image by an instruction with NextStep.", edit_image, {"image": image_url}),
    ):
        inputs = dict(**image, prompt=tab.prompt, **tab.controls.settings, randomize_seed=tab.controls.randomize_seed)
        handler = tool(f"{tab.name}_image", summary, list(inputs), run)
        gr.on([], handler, [], outputs, api_name=handler.__name__, concurrency_id=MODEL_QUEUE, inputs_kwargs=inputs)


def answered_with_files(server) -> None:
    """Make Gradio's MCP server (``server``) answer with our PNGs as they are: it re-encodes an image
    without its text chunks and adds a line with the file's URL, which holds its path on the server."""
    postprocess = server.postprocess_output_data

    def contents(data, root_url: str) -> list:
        answer = []
        # A tool of several outputs arrives as one tuple (without a progress token) or a list.
        outputs = [item for entry in data for item in (entry if isinstance(entry, tuple) else [entry])]
        for output in outputs:
            if is_file_obj_with_meta(output) and str(output.get("path", "")).endswith(".png"):
                png = base64.b64encode(Path(output["path"]).read_bytes()).decode()
                answer.append(server.types.ImageContent(type="image", data=png, mimeType="image/png"))
            else:
                answer.extend(postprocess([output], root_url))
        return answer

    server.postprocess_output_data = contents


def mcp_lifespan(demo: gr.Blocks) -> Callable:
    """A lifespan for the page's app (``app_kwargs``) that adapts its MCP server once Gradio made it."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if demo.mcp_server_obj is not None:
            answered_with_files(demo.mcp_server_obj)
        yield

    return lifespan
