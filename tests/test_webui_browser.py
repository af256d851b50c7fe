"""End to end in a real headless Chromium: pick two adapters, set weights, generate; train a tiny adapter and see
it in the library; errors show as messages; adapter files are not served. Screenshots go to test-artifacts/.

Needs Debian's ``chromium`` (/usr/bin/chromium, or $STYLELORA_CHROMIUM) and the ``playwright`` package; the
browser is never downloaded (no ``playwright install``).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("STYLELORA_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
TIMEOUT_MS = 300_000  # generous: shared CI machines can be slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on 127.0.0.1:<free port> in this process, with two adapters and one image folder."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set STYLELORA_CHROMIUM)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
    pytest.importorskip("gradio", reason="gradio is not installed")
    from conftest import make_style_images
    from stylelora.models import load_base
    from test_webui_handlers import make_library

    from stylelora.webui import Studio, launch

    root = tmp_path_factory.mktemp("webui-e2e")
    base = load_base("tiny-random")
    make_style_images(root / "datasets" / "stripes")
    studio = Studio(base, make_library(base.pipe, root / "loras"), [root / "datasets"], work_dir=root / "work")
    demo, url, share_url = launch(studio, port=_free_port(), block=False, quiet=True)
    assert url.startswith("http://127.0.0.1:") and share_url is None
    yield url, studio
    demo.close()
    studio.close()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(60_000)
        outside: list[str] = []
        pg.on("request", lambda r: outside.append(r.url) if not r.url.startswith((server[0], "data:", "blob:"))
              else None)
        pg.goto(server[0], wait_until="load")
        pg.wait_for_selector("#generate-btn")
        yield pg
        browser.close()
        assert not outside, f"the page asked for things outside the app: {outside[:5]}"


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"webui-{name}.png"), full_page=True)


def set_number(page, selector: str, value) -> None:
    """Type a value into a number box and leave it (Tab), then check the page kept it."""
    box = page.locator(selector)
    box.fill(str(value))
    box.press("Tab")
    page.wait_for_function("([sel, v]) => Number(document.querySelector(sel)?.value) === v",
                           arg=[selector, float(value)])


def pick(page, dropdown: str, name: str) -> None:
    page.click(f"{dropdown} input")
    page.keyboard.type(name)
    page.locator(f'[role=option][aria-label="{name}"]').first.click()


def wait_text(page, selector: str, text: str, timeout: int = 60_000) -> None:
    """Wait until the visible text of ``selector`` contains ``text``."""
    page.wait_for_function("([sel, text]) => (document.querySelector(sel)?.innerText || '').includes(text)",
                           arg=[selector, text], timeout=timeout)


def png_parameters(data: bytes) -> str:
    from PIL import Image

    return Image.open(io.BytesIO(data)).info.get("parameters", "")


def test_generate_with_two_weighted_adapters(page, server):
    url, studio = server
    pick(page, "#adapters", "ink")
    pick(page, "#adapters", "pastel")
    page.keyboard.press("Escape")
    page.wait_for_selector("#w-pastel input[type=number]")  # both weight rows are rendered
    set_number(page, "#w-ink input[type=number]", 0.6)
    set_number(page, "#w-pastel input[type=number]", 0.3)
    page.fill("#prompt textarea", "a lighthouse at dusk")
    set_number(page, "#steps input[type=number]", 2)
    set_number(page, "#seed input", 11)
    page.click("#generate-btn")
    page.wait_for_selector("#gallery img", timeout=TIMEOUT_MS)
    page.wait_for_function("document.querySelector('#infotext textarea').value.includes('Seed: 11')")
    text = page.input_value("#infotext textarea")
    assert "<lora:ink:0.6>" in text and "<lora:pastel:0.3>" in text and "Steps: 2," in text, text
    link = page.locator("#downloads a[href]").first.get_attribute("href")  # the PNG download keeps its settings
    got = page.request.get(link if link.startswith("http") else url.rstrip("/") + link)
    assert got.ok and png_parameters(got.body()) == text
    src = page.locator("#gallery img").first.get_attribute("src")  # the gallery serves the same PNG
    got = page.request.get(src if src.startswith("http") else url.rstrip("/") + src)
    assert got.ok and png_parameters(got.body()) == text
    shot(page, "generate")
    # adapter files are not served by the web server, whatever the URL says
    adapter = studio.library.root / "ink.safetensors"
    for path in (f"gradio_api/file={adapter}", f"file={adapter}", f"gradio_api/file=../../{adapter.name}"):
        assert page.request.get(url + path).status in (400, 403, 404), path


def test_errors_show_as_messages(page):
    page.fill("#prompt textarea", "")
    page.click("#generate-btn")
    page.get_by_text("write a prompt first").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "webui-error.png"))  # the viewport: the message is a toast on top
    body = page.inner_text("body")
    assert "Traceback" not in body and 'File "' not in body
    assert page.locator("#gallery img").count() >= 1  # the last images stay on screen
    page.reload(wait_until="load")  # a fresh page (and no toast) for the next test
    page.wait_for_selector("#generate-btn")


def test_train_then_find_the_adapter_in_the_library(page, server):
    page.get_by_role("tab", name="Train").click()
    page.fill("#train-name textarea", "stripes")
    page.fill("#train-trigger textarea", "strp")
    page.get_by_text("quick:").first.click()
    page.click("#train-advanced")
    page.wait_for_selector("#train-steps input", state="visible")
    page.wait_for_timeout(300)
    set_number(page, "#train-steps input", 2)
    set_number(page, "#train-sample-every input", 1)
    set_number(page, "#train-sample-steps input", 2)
    page.click("#train-start")
    page.wait_for_function("(t => t.includes('stripes') && ['Finished', 'Failed', 'Stopped'].some(w => t.includes(w)))"
                           "(document.querySelector('#train-status').innerText)", timeout=TIMEOUT_MS)
    status = page.inner_text("#train-status")
    assert "Finished" in status and "step 2/2" in status, status
    page.wait_for_selector("#train-samples img")
    shot(page, "train")
    page.get_by_role("tab", name="Library").click()
    wait_text(page, "#library-table", "stripes")
    assert "strp" in page.inner_text("#library-table")
    pick(page, "#library-pick", "stripes")
    page.wait_for_selector("#library-thumb img")
    wait_text(page, "#library-details", "strp")
    shot(page, "library")
    page.get_by_role("tab", name="Generate").click()  # the generate picker offers it without a restart
    page.click("#adapters input")
    page.keyboard.type("stri")
    page.locator('[role=option][aria-label="stripes"]').first.wait_for()
    page.keyboard.press("Escape")


def test_import_upload_and_refuse_junk(page, server, tmp_path):
    _, studio = server
    page.get_by_role("tab", name="Library").click()
    good = tmp_path / "uploaded.safetensors"
    shutil.copy(studio.library.root / "pastel.safetensors", good)
    page.set_input_files("#import-file input[type=file]", str(good))
    page.wait_for_selector("#import-file a, #import-file .file-name, #import-file table")
    page.click("#import-btn")
    wait_text(page, "#library-table", "uploaded")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    page.set_input_files("#import-file input[type=file]", str(junk))
    page.wait_for_timeout(500)
    page.click("#import-btn")
    page.get_by_text("junk.safetensors was not imported").first.wait_for()
    page.wait_for_timeout(500)  # let the message finish fading in
    shot(page, "import")
    assert "junk" not in studio.adapters()


def test_resize_into_a_new_library_entry(page, server):
    _, studio = server
    page.get_by_role("tab", name="Library").click()
    page.fill("#library-pick input", "")  # an earlier test may have picked another adapter
    pick(page, "#library-pick", "ink")
    page.keyboard.press("Escape")
    page.locator("#resize-rule label").get_by_text("rank", exact=True).click()
    page.wait_for_function("document.querySelector('#resize-value textarea, #resize-value input').value === '8'")
    page.fill("#resize-value textarea", "2")
    page.fill("#resize-name textarea", "ink-small")
    page.click("#resize-btn")
    wait_text(page, "#resize-table", "rank after", timeout=TIMEOUT_MS)
    wait_text(page, "#library-table", "ink-small")
    table = page.inner_text("#resize-table")
    assert "4/4/4" in table and "2/2/2" in table, table  # ink has rank 4 everywhere
    assert studio.library.info("ink-small").rank == 2 and studio.library.info("ink").rank == 4
    shot(page, "resize")
    page.fill("#resize-value textarea", "0")
    page.click("#resize-btn")
    page.get_by_text("rank must be a whole number >= 1").first.wait_for()
    assert "Traceback" not in page.inner_text("body")
    studio.delete_adapter("ink-small")
