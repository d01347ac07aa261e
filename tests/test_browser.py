"""The app in a real browser (headless Chromium through Playwright), on the offline `tiny-random` model.

Uploads an example clip, fills the prompts, clicks Invert & reconstruct, then Compare, then Edit,
waits for each result video, and saves a full-page screenshot to assets/screenshot.png.
Skipped only when /usr/bin/chromium is missing (CI installs it: `apt-get install -y chromium`).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "examples" / "ball.mp4"
SCREENSHOT = ROOT / "assets" / "screenshot.png"
TIMEOUT_MS = 120_000  # a cold CPU can take a while on the first job

pytestmark = [
    pytest.mark.filterwarnings("ignore"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing; install it with: apt-get install -y chromium"),
]


@pytest.fixture(scope="module")
def url(tmp_path_factory, tiny_parts):
    import app  # conftest.py has set GRADIO_ANALYTICS_ENABLED=False before this
    from stem import Engine, LatentCache

    engine = Engine("tiny-random", cache=LatentCache(tmp_path_factory.mktemp("cache"))).use_parts(tiny_parts)
    demo = app.build_app(engine, defaults=dict(bases=8, iters=2, steps=3, frames=6, size=128, batch_size=3))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    yield demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def page(url):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        page.goto(url)
        yield page
        browser.close()


def test_upload_invert_edit_compare_and_screenshot(page):
    from playwright.sync_api import expect

    expect(page.get_by_text("every output is noise")).to_be_visible()  # the tiny-random note
    page.locator("#input-video input[type=file]").set_input_files(str(CLIP))
    expect(page.locator("#input-video video")).to_be_visible()  # the preview
    page.locator("#source-prompt textarea").fill("a red ball bouncing on a wooden floor")
    page.locator("#target-prompt textarea").fill("a shiny golden ball bouncing on a marble floor")

    page.locator("#invert-button").click()
    expect(page.locator("#reconstruction video")).to_have_attribute("src", re.compile(r"reconstruction\.mp4$"))
    expect(page.locator("#status")).to_contain_text("computed in")

    page.locator("#compare-button").click()
    expect(page.locator("#comparison video")).to_have_attribute("src", re.compile(r"comparison\.mp4$"))
    expect(page.locator("#status")).to_contain_text("Compare")
    expect(page.get_by_test_id("cell-2-0")).to_contain_text("VAE round trip")

    page.locator("#edit-button").click()  # the STEM inversion is cached by now: the status says so
    expect(page.locator("#edited video")).to_have_attribute("src", re.compile(r"edited\.mp4$"))
    expect(page.locator("#status")).to_contain_text("inversion reused from the cache")

    page.get_by_text("Advanced").click()  # show the settings in the screenshot
    expect(page.get_by_label("Bases K (STEM)").first).to_be_visible()
    page.wait_for_timeout(500)  # let the videos paint their first frames
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000
