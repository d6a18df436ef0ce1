"""The page a Space serves when its model cannot be loaded: why, and how to fix it, in the
visitor's language. A Space whose app exits is restarted into the same failure, over and over,
and its visitors see only "Runtime error"."""

from __future__ import annotations

import gradio as gr

from .controls import Page
from .i18n import text, translations

TITLE = "NextStep Studio"


def unavailable_page(reason: str) -> gr.Blocks:
    """A page that says the model could not be loaded, ``reason`` as the loader wrote it, and how to fix it."""
    with Page(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}")
        gr.Markdown(text("unavailable"), elem_id="unavailable")
        gr.Markdown(f"```\n{reason}\n```", elem_id="unavailable-reason")
        gr.Markdown(text("unavailable.fix"), elem_id="unavailable-fix")
    return demo


def serve_unavailable(reason: str, host: str, port: int, **options):
    """Serve ``unavailable_page`` until the process is stopped; returns what ``Blocks.launch`` does."""
    return unavailable_page(reason).launch(server_name=host, server_port=port, i18n=translations(), **options)
