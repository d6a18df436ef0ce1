"""Reusing results on the page: the session's history, settings read back from a PNG, and the
edit chain (a result as the next input, back one step, before / after).

The history holds the results of one page session (a browser tab), in Gradio's per-session state:
never shared between users, gone when the tab closes, bounded in pictures and bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
from PIL import Image

from ..engine.inputs import load_image
from ..engine.sizes import Size, closest_size
from ..pnginfo import read_parameters
from .controls import refusal
from .i18n import say, text
from .runs import Tab

UNDO_DEPTH = 20  # edits the chain can step back
HISTORY_ENTRIES = 24
HISTORY_BYTES = 48 * 2**20


@dataclass(frozen=True)
class HistoryEntry:
    """One finished result: which tab made it, the picture (carrying its parameters), and for an
    edit the input it started from."""

    tab: str  # "generate" or "edit"
    image: Image.Image
    parameters: dict
    input_image: str | None = None  # a file path

    @property
    def bytes(self) -> int:
        return self.image.width * self.image.height * len(self.image.getbands())

    @property
    def caption(self) -> str:
        prompt = self.parameters.get("prompt", "")
        short = prompt if len(prompt) <= 40 else prompt[:39] + "…"
        return say("history.caption", tab=say(f"tab.{self.tab}"), seed=self.parameters.get("seed"), prompt=short)


def add_to_history(history: list[HistoryEntry], tab: str, paths: list[str], input_image: str | None = None,
                   max_entries: int = HISTORY_ENTRIES, max_bytes: int = HISTORY_BYTES) -> list[HistoryEntry]:
    """A new history (newest first) with the PNGs at ``paths`` added, the oldest dropped beyond
    ``max_entries`` or ``max_bytes`` of pixels. The pictures are read into memory, so the history
    outlives the cache files they came from."""
    added = []
    for path in paths:
        with Image.open(path) as opened:
            image = opened.copy()
        added.append(HistoryEntry(tab, image, read_parameters(image) or {}, input_image))
    kept, total = [], 0
    for entry in [*reversed(added), *history]:
        total += entry.bytes
        if len(kept) == max_entries or total > max_bytes:
            break
        kept.append(entry)
    return kept


# ---- settings back into a tab -------------------------------------------------------------------


def reuse_components(tab: Tab) -> list:
    """The widgets of a tab a saved result can be turned back into."""
    return [tab.prompt, *tab.controls.settings.values(), tab.controls.randomize_seed,
            *([tab.image] if tab.image is not None else [])]


def filled(tab: Tab, parameters: dict, input_image=None) -> dict:
    """Updates that set a tab's controls to ``parameters`` (a result's), seed included."""
    updates = {tab.prompt: parameters.get("prompt", ""), tab.controls.randomize_seed: False}
    for name, control in tab.controls.settings.items():
        if name not in parameters:
            continue
        value = parameters[name]
        if name == "size" and Size.parse(value) not in tab.sizes:
            gr.Warning(say("msg.size_not_offered", value=value))
            continue
        updates[control] = value
    if tab.image is not None and input_image is not None:
        updates[tab.image] = input_image
    return updates


def settings_from_png(path: str | None, generate: Tab, edit: Tab, tabs: gr.Tabs) -> dict:
    """The controls of the tab that made a PNG, filled with the settings it carries."""
    if path is None:
        return {}
    try:
        parameters = read_parameters(path)
    except ValueError as error:
        raise refusal(say("msg.png_unreadable", error=error)) from None
    except OSError:
        raise refusal(say("msg.not_png")) from None
    if not parameters:
        raise refusal(say("msg.no_settings"))
    tab = edit if parameters.get("edit") else generate
    gr.Info(say("msg.settings_loaded", tab=say(f"tab.{tab.name}")))
    return {**filled(tab, parameters), tabs: gr.Tabs(selected=tab.name)}


# ---- the history panel ----------------------------------------------------------------------------


@dataclass
class HistoryPanel:
    gallery: gr.Gallery
    use_settings: gr.Button
    edit_this: gr.Button
    parameters: gr.JSON  # of the chosen result
    png: gr.UploadButton  # "Load settings from a PNG…"


def history_panel() -> HistoryPanel:
    with gr.Accordion(text("history"), open=True):
        gallery = gr.Gallery(label=text("history.gallery"), columns=8,
                             fit_columns=False, height=200, object_fit="contain", allow_preview=False,
                             interactive=False, elem_id="history-gallery")
        with gr.Row():
            use_settings = gr.Button(text("history.use"), elem_id="history-use", interactive=False)
            edit_this = gr.Button(text("history.edit"), elem_id="history-edit", interactive=False)
        chosen = gr.JSON(label=text("history.parameters"), elem_id="history-parameters")
        png = gr.UploadButton(text("history.png"), file_types=[".png"], type="filepath", size="sm",
                              elem_id="settings-png")
    return HistoryPanel(gallery, use_settings, edit_this, chosen, png)


def history_pictures(history: list[HistoryEntry]) -> list:
    return [(entry.image, entry.caption) for entry in history]


def remembered(history: list[HistoryEntry], tab: str, gallery: list | None, source=None):
    """The history with a run's results added; an edit's input is kept when it is a file."""
    source = source if isinstance(source, str) else None
    entries = add_to_history(history, tab, [path for path, _caption in gallery or []], source)
    return entries, history_pictures(entries)


def choose_entry(history: list[HistoryEntry], event: gr.SelectData):
    entry = history[event.index] if event.index < len(history) else None
    enabled = gr.Button(interactive=entry is not None)
    return entry, entry.parameters if entry else None, enabled, enabled


# ---- the edit chain -----------------------------------------------------------------------------------


def push_undo(stack: list, current) -> list:
    """The undo stack with the current input on top; an input sent inline (bytes) is not kept."""
    return [*stack, current][-UNDO_DEPTH:] if isinstance(current, str) else stack


def undo_edit(stack: list):
    if not stack:
        gr.Info(say("msg.nothing_to_undo"))
        return gr.skip(), stack
    return stack[-1], stack[:-1]


def picked_image(gallery: list | None, index: int):
    """The gallery image picked for reuse (the first when none was clicked)."""
    if not gallery:
        raise refusal(say("msg.nothing_to_reuse"))
    path, _caption = gallery[min(index, len(gallery) - 1)]
    return path


def input_size(path: str | None) -> tuple[int, int] | None:
    """(width, height) of a readable input image, else None (the edit reports the problem)."""
    try:
        return load_image(path).size if path else None
    except ValueError:
        return None


# ---- wiring ---------------------------------------------------------------------------------------------


@dataclass
class EditChain:
    """The Edit tab's reuse widgets."""

    compare: gr.ImageSlider  # before / after
    use_as_input: gr.Button
    undo: gr.Button


def edit_chain_panel() -> EditChain:
    compare = gr.ImageSlider(label=text("compare"), type="filepath", interactive=False, max_height=360,
                             elem_id="edit-compare")
    with gr.Row():
        use_as_input = gr.Button(text("use_as_input"), elem_id="use-as-input")
        undo = gr.Button(text("undo"), elem_id="edit-undo")
    return EditChain(compare, use_as_input, undo)


def wire_history(panel: HistoryPanel, generate: Tab, edit: Tab, tabs: gr.Tabs, generation, editing,
                 undo_stack: gr.State) -> None:
    """Every finished result of the session in the history, with its settings; a chosen one back
    into its tab, or into the Edit tab as the input; settings from a PNG."""
    history = gr.State([])  # this session's HistoryEntry list, newest first
    chosen = gr.State(None)  # the HistoryEntry picked in the history gallery
    generation.success(lambda gallery, entries: remembered(entries, "generate", gallery),
                       [generate.results.gallery, history], [history, panel.gallery], api_visibility="private")
    editing.success(lambda gallery, entries, source: remembered(entries, "edit", gallery, source),
                    [edit.results.gallery, history, edit.image], [history, panel.gallery], api_visibility="private")
    panel.gallery.select(choose_entry, history, [chosen, panel.parameters, panel.use_settings, panel.edit_this],
                         api_visibility="private")
    all_controls = {*reuse_components(generate), *reuse_components(edit), tabs}

    def use_entry(entry: HistoryEntry | None) -> dict:
        if entry is None:
            raise refusal(say("msg.choose_history"))
        tab = edit if entry.tab == "edit" else generate
        return {**filled(tab, entry.parameters, entry.input_image), tabs: gr.Tabs(selected=tab.name)}

    panel.use_settings.click(use_entry, chosen, all_controls, api_visibility="private")
    panel.edit_this.click(lambda entry, current, stack: (entry.image, push_undo(stack, current), gr.Tabs(selected="edit")),
                          [chosen, edit.image, undo_stack], [edit.image, undo_stack, tabs], api_visibility="private")
    panel.png.upload(lambda path: settings_from_png(path, generate, edit, tabs), panel.png, all_controls,
                     api_visibility="private")


def wire_edit_chain(chain: EditChain, generate: Tab, edit: Tab, tabs: gr.Tabs, send_to_edit: gr.Button, editing,
                    undo_stack: gr.State) -> None:
    """Before / after, a result as the next input (from either tab), back one step, and the output
    size following a new input's aspect ratio."""
    editing.success(lambda source, gallery: (source, gallery[0][0]) if gallery and isinstance(source, str)
                    else gr.skip(), [edit.image, edit.results.gallery], chain.compare, api_visibility="private")
    send_to_edit.click(lambda gallery, index, current, stack: (picked_image(gallery, index),
                                                               push_undo(stack, current), gr.Tabs(selected="edit")),
                       [generate.results.gallery, generate.results.selected, edit.image, undo_stack],
                       [edit.image, undo_stack, tabs], api_visibility="private")
    chain.use_as_input.click(lambda gallery, index, current, stack: (picked_image(gallery, index),
                                                                     push_undo(stack, current)),
                             [edit.results.gallery, edit.results.selected, edit.image, undo_stack],
                             [edit.image, undo_stack], api_visibility="private")
    chain.undo.click(undo_edit, undo_stack, [edit.image, undo_stack], api_visibility="private")
    # A new input image picks the output size nearest to its aspect ratio, near the default area.
    area = Size.parse(edit.controls.settings["size"].value).area

    def size_for_input(path):
        size = input_size(path)
        return closest_size(*size, edit.sizes, area).value if size else gr.skip()

    edit.image.change(size_for_input, edit.image, edit.controls.settings["size"], api_visibility="private")
