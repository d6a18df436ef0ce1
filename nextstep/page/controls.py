"""The page's input controls: one table of the sampling settings, keyed by request field, and the
widgets that read what a visitor (or an API client) sends.

A control's value reaches the service under its request field's name. Each widget reads its
payload with the engine's readers (``nextstep.engine.inputs.number``, ``settings.read_boolean``)
within the control's own range and choices; a refusal becomes one message naming the control
(``refusal``: on the page, one line in the log, no traceback).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr
import pydantic
from gradio.exceptions import InvalidPathError
from gradio.i18n import I18nData

from ..engine.inputs import clipped_repr, data_url_bytes, number
from ..engine.preview import PREVIEW_MODES
from ..engine.sampling import CFG_SCHEDULES, SAMPLERS
from ..engine.settings import MAX_DRAWN_SEED, read_boolean
from ..engine.sizes import Size
from .guard import LOG, MAX_FILE_SIZE, uploaded_file
from .i18n import LANGUAGE, english_text, language_of, say, shown, text


def refusal(message: str) -> gr.Error:
    """An error about the visitor's own input: shown on the page, one line in the log, no traceback."""
    LOG.info("refused: %s", message)
    return gr.Error(message, print_exception=False)


# ---- widgets that read their payload strictly ------------------------------------------------


def read_number(payload, label: str, minimum, maximum, whole: bool):
    """A control's value as sent (numbers, or numeric text from API clients), strictly: empty, not
    a number, a fraction where a whole number is asked, or out of the control's range is refused
    with a message naming the control and what it takes."""
    def plain(value) -> str:  # 4294967295, 0.1, 15: as the control shows them
        return str(int(value)) if float(value).is_integer() else f"{value:g}"

    allowed = say("msg.whole_between" if whole else "msg.number_between", low=plain(minimum), high=plain(maximum))
    label = shown(label)
    if payload is None:
        raise refusal(say("msg.number_empty", label=label, allowed=allowed))
    try:
        return number(payload, label, minimum=minimum, maximum=maximum, integer=whole)
    except ValueError:
        raise refusal(say("msg.number_bad", label=label, allowed=allowed, shown=clipped_repr(payload))) from None


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
        try:
            return read_boolean(payload, shown(self.label))
        except ValueError as error:
            raise refusal(str(error)) from None


def checked_choice(control: gr.Dropdown | gr.Radio, payload):
    """A choice control's value: empty or unknown gets a message naming it and its choices."""
    values = [value for _label, value in control.choices]
    if payload is None or payload not in values:
        got = say("msg.choice_empty") if payload is None else say("msg.choice_got", value=repr(payload))
        raise refusal(say("msg.choice", label=shown(control.label), choices=", ".join(map(str, values)), got=got))
    return payload


class CheckedDropdown(gr.Dropdown):
    is_template = True  # drawn by the frontend as a plain dropdown

    def preprocess(self, payload):
        return super().preprocess(checked_choice(self, payload))


class CheckedRadio(gr.Radio):
    is_template = True  # drawn by the frontend as plain radio buttons

    def preprocess(self, payload):
        return super().preprocess(checked_choice(self, payload))


def inline_image(url: str) -> bytes:
    """The picture of a ``data:`` URL as its file's bytes, its size checked before anything decodes
    it (the handler charges it to its visitor), or a refusal saying why it cannot be read."""
    try:
        return data_url_bytes(url, MAX_FILE_SIZE)
    except ValueError as error:
        raise refusal(say("msg.unreadable_image", error=error)) from None


class ImageUpload(gr.Image):
    """``gr.Image`` whose input reaches the handler undecoded, as the path of an uploaded file or
    the bytes of an inline ``data:`` URL, so that unreadable, truncated or oversized pictures get
    ``nextstep.engine.inputs``' clear messages from their headers rather than being decoded by Gradio.

    Only files inside the upload folder are taken: Gradio checks a payload's path only when the
    payload carries its FileData marker, so a bare ``{"path": ...}`` could otherwise name any file
    on the server. Whatever else is sent gets one message, whether or not such a file exists."""

    is_template = True  # drawn by the frontend as a plain image input

    def preprocess(self, payload):
        if payload is None:
            return None
        if (payload.url or "").startswith("data:"):
            return inline_image(payload.url)
        if payload.path and uploaded_file(payload.path):
            return str(payload.path)
        raise refusal(say("msg.not_uploaded"))


class Page(gr.Blocks):
    """The page's Blocks: a call whose values cannot be read (too few of them, or a value of the
    wrong shape for its control: an image given as text, a file that was not uploaded) gets one
    message and one log line, as any refused input does, instead of a traceback and an empty error.
    Every call runs in its visitor's language (``i18n``), read from the request's Accept-Language."""

    async def process_api(self, block_fn, inputs, state=None, request=None, *args, **kwargs):
        first = request[0] if isinstance(request, list) and request else request
        headers = getattr(first, "headers", None)
        LANGUAGE.set(language_of(headers.get("accept-language") if headers is not None else None))
        return await super().process_api(block_fn, inputs, state, request, *args, **kwargs)

    def get_api_info(self, all_endpoints: bool = False, page: str | None = None):
        """The API's description, each label in English (the page's labels are i18n keys)."""
        info = super().get_api_info(all_endpoints, page)
        for endpoint in [*info.get("named_endpoints", {}).values(), *info.get("unnamed_endpoints", {}).values()]:
            for item in [*endpoint.get("parameters", []), *endpoint.get("returns", [])]:
                if isinstance(item.get("label"), I18nData):
                    item["label"] = english_text(item["label"].key)
        return info

    async def preprocess_data(self, block_fn, inputs, state, explicit_call: bool = False):
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except gr.Error:
            raise
        except (ValueError, TypeError, pydantic.ValidationError, InvalidPathError):
            raise refusal(unreadable(block_fn, inputs)) from None


def unreadable(block_fn, inputs: list) -> str:
    """What is wrong with a call's values, naming the controls."""
    labels = [shown(getattr(block, "label", None) or type(block).__name__) for block in block_fn.inputs]
    if len(inputs) < len(block_fn.inputs):
        return (f"This call gave {len(inputs)} of the {len(labels)} values {block_fn.api_name or 'it'} takes: "
                f"{', '.join(labels)}.")
    for block, label, value in zip(block_fn.inputs, labels, inputs):
        if isinstance(block, ImageUpload) and value is not None:
            if not isinstance(value, dict) or not (value.get("path") or value.get("url")):
                return say("msg.not_uploaded")
            if not str(value.get("url") or "").startswith("data:") and not uploaded_file(value.get("path") or ""):
                return say("msg.not_uploaded")
        elif getattr(block, "data_model", None) is not None and value is not None:
            try:
                block.data_model.model_validate(value)
            except pydantic.ValidationError:
                return f"{label} could not be read from {clipped_repr(value)}."
    return "This call's values could not be read."


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
    defaults: dict  # the service's defaults for this tab (``NextStepPipeline.defaults``)
    sizes: list[Size]


def labelled(choices: dict[str, str], prefix: str) -> list[tuple]:
    """A ``{value: label}`` vocabulary as a choice control's (label, value) pairs, each label the
    catalogue's ``prefix.value``."""
    return [(text(f"{prefix}.{value}"), value) for value in choices]


# Each key is a request field: the control's value reaches the engine under that name.
CONTROLS = {
    "size": Control("Settings", 0, lambda t: CheckedDropdown(
        [(s.label, s.value) for s in t.sizes], value=t.defaults["size"].value, label=text("size"),
        elem_id=f"{t.prefix}-size")),
    "num_images": Control("Settings", 1, lambda t: CheckedSlider(1, 4, value=t.defaults["num_images"], step=1,
                                                                 label=text("num_images"),
                                                                 elem_id=f"{t.prefix}-images")),
    "cfg": Control("Settings", 2, lambda t: CheckedSlider(
        1, 15, value=t.defaults["cfg"], step=0.1, label=text("cfg"), info=text("cfg.info"),
        elem_id=f"{t.prefix}-cfg")),
    "cfg_img": Control("Settings", 2, lambda t: CheckedSlider(
        1, 10, value=t.defaults["cfg_img"], step=0.1, label=text("cfg_img"), info=text("cfg_img.info")),
        edit_only=True),
    "num_sampling_steps": Control("Settings", 3, lambda t: CheckedSlider(
        1, 100, value=t.defaults["num_sampling_steps"], step=1, label=text("num_sampling_steps"),
        elem_id=f"{t.prefix}-steps")),
    "timesteps_shift": Control("Settings", 3, lambda t: CheckedSlider(
        0.1, 10, value=t.defaults["timesteps_shift"], step=0.1, label=text("timesteps_shift"))),
    "cfg_schedule": Control("Settings", 4, lambda t: CheckedRadio(
        labelled(CFG_SCHEDULES, "cfg_schedule"), value=t.defaults["cfg_schedule"], label=text("cfg_schedule"))),
    "sampler": Control("Settings", 4, lambda t: CheckedDropdown(
        list(SAMPLERS), value=t.defaults["sampler"], label=text("sampler"), info=text("sampler.info"))),
    "use_norm": Control("Settings", 5, lambda t: CheckedCheckbox(
        value=t.defaults["use_norm"], label=text("use_norm"), info=text("use_norm.info"),
        elem_id=f"{t.prefix}-norm")),
    "seed": Control("Settings", 6, lambda t: CheckedNumber(
        value=0, minimum=0, maximum=MAX_DRAWN_SEED, precision=0, label=text("seed"), elem_id=f"{t.prefix}-seed")),
    "negative_prompt": Control("Prompts", 0, lambda t: gr.Textbox(
        value=t.defaults["negative_prompt"], label=text("negative_prompt"),
        placeholder=text("negative_prompt.placeholder"), elem_id=f"{t.prefix}-negative")),
    "positive_prompt": Control("Prompts", 1, lambda t: gr.Textbox(
        value=t.defaults["positive_prompt"], label=text("positive_prompt"),
        placeholder=text("positive_prompt.placeholder"), elem_id=f"{t.prefix}-positive")),
}
SECTIONS = {"Settings": "section.settings", "Prompts": "section.prompts"}


QUICK_AREA = 256 * 256  # the quick preset's size: the square size nearest this area


def quick_settings(defaults: dict, sizes: list[Size]) -> dict:
    """A first look, quicker than the defaults: the square size nearest 256x256 (any size where no
    square is offered), half the default sampling steps, one image."""
    squares = [size for size in sizes if size.width == size.height] or sizes
    size = min(squares, key=lambda size: abs(size.area - QUICK_AREA))
    return {"size": size.value, "num_sampling_steps": max(1, round(defaults["num_sampling_steps"] / 2)),
            "num_images": 1}


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
        with gr.Accordion(text(SECTIONS[section]), open=opened):
            in_section = [(name, c) for name, c in chosen.items() if c.section == section]
            for row in sorted({c.row for _, c in in_section}):
                with gr.Row():
                    for name, control in in_section:
                        if control.row == row:
                            settings[name] = control.build(context)
                    if section == "Settings" and row == CONTROLS["seed"].row:
                        randomize_seed = CheckedCheckbox(value=True, label=text("randomize_seed"),
                                                         elem_id=f"{context.prefix}-randomize")
            if section == "Settings":
                with gr.Row():
                    preview = CheckedRadio(labelled(PREVIEW_MODES, "preview"), value="vae", label=text("preview"),
                                           info=text("preview.info"), elem_id=f"{context.prefix}-preview-mode")
                    preview_every = CheckedSlider(1, 64, value=8, step=1, label=text("preview_every"))
    return TabControls(settings, randomize_seed, preview, preview_every)
