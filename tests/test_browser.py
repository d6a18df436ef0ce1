"""The page in a real browser: Debian's headless Chromium driven by Playwright (no browser download)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

from .conftest import TINY
from .test_app import launched, tiny_services

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# Collects every picture the live preview shows, however briefly (polling from the test would miss some).
WATCH_PREVIEW = """prefix => {
    window.previewSources = new Set();
    setInterval(() => {
        const image = document.querySelector(`#${prefix}-preview img`);
        if (image && image.src) window.previewSources.add(image.src);
    }, 20);
}"""

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@contextmanager
def chromium():
    """Headless Chromium from the system package."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install -y chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str) -> Page:
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    # The queue keeps a connection open, so wait for the app itself rather than for network idle.
    page.wait_for_selector("#generate-prompt textarea", timeout=60_000)
    return page


def choose_size(page: Page, prefix: str, label: str) -> None:
    page.click(f"#{prefix}-size input")
    page.get_by_role("option", name=label).click()


def set_slider(page: Page, elem_id: str, value: int) -> None:
    number = page.locator(f"#{elem_id} input[type=number]")
    number.fill(str(value))
    number.press("Enter")
    number.blur()


def wait_for_result(page: Page, prefix: str, timeout: float = 120_000) -> None:
    page.wait_for_selector(f"#{prefix}-gallery img", timeout=timeout)


@pytest.fixture(scope="module")
def url():
    with launched(tiny_services(frame_interval=0.25)) as address:
        yield address


@pytest.fixture(scope="module")
def browser():
    with chromium() as running:
        yield running


@pytest.fixture
def page(browser, url):
    page = open_page(browser, url)
    yield page
    page.close()


def test_generate_shows_a_changing_preview_then_the_result(page, tmp_path):
    choose_size(page, "generate", "128 × 128 (1:1)")  # 64 tokens at 50 steps: several seconds of previews
    page.fill("#generate-prompt textarea", "a red circle on a white background")
    page.evaluate(WATCH_PREVIEW, "generate")
    page.click("#generate-run")
    page.wait_for_function("window.previewSources.size >= 2", timeout=60_000)
    page.screenshot(path=tmp_path / "generate-preview.png")
    wait_for_result(page, "generate")
    page.screenshot(path=tmp_path / "generate-result.png")
    shown = page.evaluate("window.previewSources.size")
    assert shown >= 4, f"the preview changed only {shown - 1} times"
    assert page.locator("#generate-status").inner_text().startswith("Done")
    page.click("text=Parameters of these results")
    assert "a red circle on a white background" in page.locator("#generate-parameters").inner_text()
    page.click("#send-to-edit")
    page.wait_for_selector("#edit-image img", timeout=30_000)
    assert page.get_by_role("tab", name="Edit").get_attribute("aria-selected") == "true"


def test_edit_an_uploaded_image(page, tmp_path):
    page.get_by_role("tab", name="Edit").click()
    page.set_input_files("#edit-image input[type=file]", str(TINY / "input_edit.png"))
    page.wait_for_selector("#edit-image img", timeout=30_000)
    choose_size(page, "edit", "64 × 64 (1:1)")
    set_slider(page, "edit-steps", 4)
    page.fill("#edit-instruction textarea", "Make the circle blue.")
    page.click("#edit-run")
    wait_for_result(page, "edit")
    page.screenshot(path=tmp_path / "edit-result.png")
    assert page.locator("#edit-status").inner_text().startswith("Done")
    uploaded = page.locator("#edit-image img").get_attribute("src")
    page.click("#use-as-input")
    page.wait_for_function(
        "src => document.querySelector('#edit-image img')?.getAttribute('src') !== src", arg=uploaded,
        timeout=30_000,
    )


def held_until_stopped(engine, monkeypatch) -> threading.Event:
    """Make the engine's token loop wait after each token until its text-to-image requests are
    cancelled, so that a generation is certain to be running when Stop lands, whatever the
    machine's speed (edits run as usual). Returns an event set once a held loop is running."""
    running = threading.Event()
    decode = engine.decode

    def held(runs, *hooks):
        for done in decode(runs, *hooks):
            yield done
            running.set()
            for run in runs:
                while not run.request.edit and not run.sink.cancelled:
                    run.sink._cancelled.wait(60)
                    assert run.sink.cancelled, "Stop never reached the request"

    monkeypatch.setattr(engine, "decode", held)
    return running


@pytest.fixture
def held_page(browser, monkeypatch):
    """A page on its own server, whose Generate tab's token loop waits for Stop."""
    services = tiny_services(frame_interval=0.0)
    running = held_until_stopped(services.generator.pipe.engine, monkeypatch)
    with launched(services) as address:
        page = open_page(browser, address)
        yield page, services, running
        page.close()


def test_stop_ends_a_generation(held_page, tmp_path):
    page, services, running = held_page
    choose_size(page, "generate", "64 × 64 (1:1)")
    page.fill("#generate-prompt textarea", "a blue square")
    page.click("#generate-run")
    page.wait_for_function("document.querySelector('#generate-status').innerText.startsWith('Tokens')",
                           timeout=60_000)
    assert running.is_set() and services.generator.busy
    page.click("#generate-stop")
    # The terminal state: written once the cancelled request has left the model.
    page.wait_for_function("document.querySelector('#generate-status').innerText.trim() === 'Stopped.'",
                           timeout=30_000)
    assert not services.generator.busy, "the model is free when Stopped shows"
    page.screenshot(path=tmp_path / "stopped.png")
    # A run of the other tab goes through the same connection after anything the stopped one
    # sent: once it is done, a late frame of the stopped run would have landed already.
    page.get_by_role("tab", name="Edit").click()
    page.set_input_files("#edit-image input[type=file]", str(TINY / "input_edit.png"))
    page.wait_for_selector("#edit-image img", timeout=30_000)
    choose_size(page, "edit", "64 × 64 (1:1)")
    set_slider(page, "edit-steps", 2)
    page.fill("#edit-instruction textarea", "Make the circle blue.")
    page.click("#edit-run")
    wait_for_result(page, "edit")
    page.get_by_role("tab", name="Generate").click()
    assert page.locator("#generate-status").inner_text().strip() == "Stopped."
    assert page.locator("#generate-gallery img").count() == 0, "a result arrived after Stop"
