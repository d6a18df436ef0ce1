"""The page in a real browser: Debian's headless Chromium driven by Playwright (no browser download)."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Page, sync_playwright

from nextstep.pnginfo import save_with_parameters

from ..conftest import TINY
from ..pages import held_until_stopped, launched, tiny_services

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# Collects every picture the live preview shows, as the page renders it (polling would miss some).
WATCH_PREVIEW = """prefix => {
    window.previewSources = new Set();
    const panel = document.querySelector(`#${prefix}-preview`);
    new MutationObserver(() => {
        const image = panel.querySelector("img");
        if (image && image.src) window.previewSources.add(image.src);
    }).observe(panel, {subtree: true, childList: true, attributes: true, attributeFilter: ["src"]});
}"""

# Records every "Error" badge that becomes visible on a tab's results (a real failure shows a
# message instead: the status line and a toast).
WATCH_ERRORS = """prefix => {
    window.errorsShown = 0;
    const results = document.querySelector(`#${prefix}-status`).closest(".column") || document.body;
    new MutationObserver(records => {
        for (const record of records) for (const node of record.addedNodes) {
            if (node.nodeType !== 1) continue;
            for (const badge of [node, ...node.querySelectorAll(".error")]) {
                const style = getComputedStyle(badge);
                const shown = style.display !== "none" && style.visibility !== "hidden" && badge.getClientRects().length;
                if (badge.classList && badge.classList.contains("error") && shown) window.errorsShown += 1;
            }
        }
    }).observe(results, {subtree: true, childList: true});
}"""

VIEWPORT = {"width": 1280, "height": 1000}

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
    """The app in a new page of ``browser`` (a Browser, or a BrowserContext made with VIEWPORT)."""
    page = browser.new_page(**({"viewport": VIEWPORT} if hasattr(browser, "new_context") else {}))
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
    # Every frame is sent (no throttle), so what the page shows does not depend on the machine's speed.
    with launched(tiny_services(frame_interval=0.0)) as address:
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
    choose_size(page, "generate", "128 × 128 (1:1)")  # 64 tokens: a preview every 8, 7 before the result
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


def start_an_edit(page: Page, steps: int) -> str:
    """Upload the fixture's input in the Edit tab and start a 64x64 edit; returns the input's src."""
    page.get_by_role("tab", name="Edit").click()
    page.set_input_files("#edit-image input[type=file]", str(TINY / "input_edit.png"))
    page.wait_for_selector("#edit-image img", timeout=30_000)
    uploaded = page.locator("#edit-image img").get_attribute("src")
    choose_size(page, "edit", "64 × 64 (1:1)")
    set_slider(page, "edit-steps", steps)
    page.fill("#edit-instruction textarea", "Make the circle blue.")
    page.click("#edit-run")
    return uploaded


def test_edit_an_uploaded_image(page, tmp_path):
    start_an_edit(page, steps=4)
    wait_for_result(page, "edit")
    page.screenshot(path=tmp_path / "edit-result.png")
    assert page.locator("#edit-status").inner_text().startswith("Done")
    uploaded = page.locator("#edit-image img").get_attribute("src")
    page.click("#use-as-input")
    page.wait_for_function(
        "src => document.querySelector('#edit-image img')?.getAttribute('src') !== src", arg=uploaded,
        timeout=30_000,
    )


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
    page.evaluate(WATCH_ERRORS, "generate")
    page.click("#generate-stop")
    # The terminal state: written once the cancelled request has left the model.
    page.wait_for_function("document.querySelector('#generate-status').innerText.trim() === 'Stopped.'",
                           timeout=30_000)
    assert not services.generator.busy, "the model is free when Stopped shows"
    assert page.evaluate("window.errorsShown") == 0, "no Error badge on the way to Stopped."
    page.screenshot(path=tmp_path / "stopped.png")
    # A run of the other tab goes through the same connection after anything the stopped one
    # sent: once it is done, a late frame of the stopped run would have landed already.
    start_an_edit(page, steps=2)
    wait_for_result(page, "edit")
    page.get_by_role("tab", name="Generate").click()
    assert page.locator("#generate-status").inner_text().strip() == "Stopped."
    assert page.locator("#generate-gallery img").count() == 0, "a result arrived after Stop"


# ---- reuse: history, settings from a PNG, the edit chain -------------------------------------


def run_and_wait(page: Page, prefix: str) -> None:
    """Click the tab's run button and wait until its status says the result is in."""
    done_before = page.locator(f"#{prefix}-status").inner_text()
    page.click(f"#{prefix}-run")
    page.wait_for_function(
        "([id, before]) => { const t = document.querySelector(id).innerText; return t.startsWith('Done') && t !== before; }",
        arg=[f"#{prefix}-status", done_before], timeout=120_000,
    )


def history_count(page: Page) -> int:
    return page.locator("#history-gallery img").count()


def wait_for_history(page: Page, count: int) -> None:
    page.wait_for_function(f"document.querySelectorAll('#history-gallery img').length === {count}", timeout=30_000)


def set_seed(page: Page, prefix: str, seed: int) -> None:
    randomize = page.locator(f"#{prefix}-randomize input")
    if randomize.is_checked():
        randomize.uncheck()
    page.fill(f"#{prefix}-seed input", str(seed))


def test_history_keeps_both_results_and_restores_every_setting(page):
    page.click("text=Prompts")
    for prompt, size, steps, cfg, seed, norm, negative, positive in (
        ("a red circle", "128 × 64 (2:1)", 3, 4.5, 5, False, "blurry", "oil painting"),
        ("a blue square", "64 × 64 (1:1)", 2, 3.0, 9, True, "", ""),
    ):
        choose_size(page, "generate", size)
        set_slider(page, "generate-steps", steps)
        set_slider(page, "generate-cfg", cfg)
        set_seed(page, "generate", seed)
        page.locator("#generate-norm input").set_checked(norm)
        page.fill("#generate-negative textarea", negative)
        page.fill("#generate-positive textarea", positive)
        page.fill("#generate-prompt textarea", prompt)
        run_and_wait(page, "generate")
    wait_for_history(page, 2)

    page.locator("#history-gallery button.thumbnail-item").nth(1).click()  # the older one
    page.wait_for_function("document.querySelector('#history-parameters').innerText.includes('a red circle')",
                           timeout=30_000)
    page.click("#history-use")
    page.wait_for_function("document.querySelector('#generate-prompt textarea').value === 'a red circle'",
                           timeout=30_000)
    assert page.locator("#generate-size input").input_value() == "128 × 64 (2:1)"
    assert page.locator("#generate-steps input[type=number]").input_value() == "3"
    assert page.locator("#generate-seed input").input_value() == "5"
    assert not page.locator("#generate-randomize input").is_checked()
    assert page.locator("#generate-cfg input[type=number]").input_value() == "4.5"
    assert not page.locator("#generate-norm input").is_checked()
    assert page.locator("#generate-negative textarea").input_value() == "blurry"
    assert page.locator("#generate-positive textarea").input_value() == "oil painting"


def upload_settings_png(page: Page, path) -> None:
    with page.expect_file_chooser() as chooser:
        page.click("#settings-png")
    chooser.value.set_files(str(path))


def test_a_result_png_fills_the_controls_and_other_pngs_get_a_message(page, tmp_path):
    made = tmp_path / "made.png"
    save_with_parameters(Image.new("RGB", (64, 64)), dict(
        prompt="a green triangle", negative_prompt="", size="64x128", num_sampling_steps=7, cfg=4.0, seed=11,
        edit=False), made)
    upload_settings_png(page, made)
    page.wait_for_function("document.querySelector('#generate-prompt textarea').value === 'a green triangle'",
                           timeout=30_000)
    assert page.locator("#generate-size input").input_value() == "64 × 128 (1:2)"
    assert page.locator("#generate-steps input[type=number]").input_value() == "7"
    assert page.locator("#generate-seed input").input_value() == "11"
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    upload_settings_png(page, plain)
    page.wait_for_selector("text=carries no NextStep settings", timeout=30_000)


def test_an_edit_shows_before_and_after_and_undo_steps_back(page):
    original = start_an_edit(page, steps=2)
    wait_for_result(page, "edit")
    page.wait_for_function("document.querySelectorAll('#edit-compare img').length === 2", timeout=30_000)
    page.click("#use-as-input")
    page.wait_for_function("src => document.querySelector('#edit-image img')?.getAttribute('src') !== src",
                           arg=original, timeout=30_000)
    page.click("#edit-undo")
    page.wait_for_function("src => document.querySelector('#edit-image img')?.getAttribute('src') === src",
                           arg=original, timeout=30_000)


def test_two_browser_sessions_never_see_each_others_history(browser, url):
    first, second = (open_page(browser.new_context(viewport=VIEWPORT), url) for _ in range(2))  # two sessions
    try:
        for page, prompt in ((first, "a red circle"), (second, "a blue square")):
            choose_size(page, "generate", "64 × 64 (1:1)")
            set_slider(page, "generate-steps", 2)
            page.fill("#generate-prompt textarea", prompt)
        run_and_wait(first, "generate")
        wait_for_history(first, 1)
        run_and_wait(second, "generate")
        wait_for_history(second, 1)
        assert history_count(first) == 1
        second.locator("#history-gallery button.thumbnail-item").first.click()
        second.wait_for_function("document.querySelector('#history-parameters').innerText.includes('a blue square')",
                                 timeout=30_000)
    finally:
        first.context.close()
        second.context.close()


def test_an_empty_seed_box_gets_a_message(page):
    set_seed(page, "generate", 0)
    page.fill("#generate-seed input", "")
    page.fill("#generate-prompt textarea", "a red circle")
    page.click("#generate-run")
    page.wait_for_selector("text=Seed is empty", timeout=30_000)


# ---- the browser's language -------------------------------------------------------------------

LANGUAGES = {
    "zh-CN": dict(run="生成", prompt="提示词", ready="就绪。", settings="设置", done="完成", tab="编辑",
                  empty="请先输入提示词"),
    "en-US": dict(run="Generate", prompt="Prompt", ready="Ready.", settings="Settings", done="Done", tab="Edit",
                  empty="Enter a prompt first"),
}


@pytest.mark.parametrize("locale", list(LANGUAGES))
def test_the_page_speaks_the_browsers_language_and_generates(browser, url, locale):
    words = LANGUAGES[locale]
    context = browser.new_context(locale=locale, viewport=VIEWPORT)
    try:
        page = open_page(context, url)
        assert page.locator("#generate-run").inner_text().strip() == words["run"]
        assert page.locator("#generate-status").inner_text().strip() == words["ready"]
        assert page.get_by_role("tab", name=words["tab"]).count() == 1
        assert page.get_by_text(words["settings"], exact=True).count() >= 1
        assert page.locator("#generate-prompt").get_by_text(words["prompt"], exact=True).count() == 1
        page.click("#generate-run")  # no prompt yet: the page's own message, in the same language
        page.wait_for_selector(f"text={words['empty']}", timeout=30_000)
        choose_size(page, "generate", "64 × 64 (1:1)")
        set_slider(page, "generate-steps", 2)
        page.fill("#generate-prompt textarea", "a red circle")
        page.click("#generate-run")
        page.wait_for_function("word => document.querySelector('#generate-status').innerText.startsWith(word)",
                               arg=words["done"], timeout=120_000)
        wait_for_result(page, "generate")
    finally:
        context.close()


def test_quick_look_sets_its_preset(page, url):
    label = page.locator("#generate-quick").inner_text()  # "Quick look (256×256, 25 steps)" on the tiny model
    size, steps = re.search(r"\((\d+)×(\d+), (\d+) steps", label).group(1, 3)
    set_slider(page, "generate-steps", 3)
    page.click("#generate-quick")
    page.wait_for_function("steps => document.querySelector('#generate-steps input[type=number]').value === steps",
                           arg=steps, timeout=30_000)
    assert page.locator("#generate-size input").input_value().startswith(f"{size} × {size}")
