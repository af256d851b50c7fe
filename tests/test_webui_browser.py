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


def require_browser() -> None:
    """Skip (with the reason) where Chromium, playwright or gradio is missing; no gradio analytics calls."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set STYLELORA_CHROMIUM)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
    pytest.importorskip("gradio", reason="gradio is not installed")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on 127.0.0.1:<free port> in this process, with two adapters and one image folder."""
    require_browser()
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
    fresh(page)
    page.get_by_role("tab", name="Library").click()
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


# ---------------------------------------------------------------------------------------------- layout (issue 20)
# Measured in the page: bounding boxes of elements and of their text (a Range over each text node: one client rect
# top per line), computed styles. Each check failed before its fix.
TEXT_BOXES = """(el) => {
  const out = [];
  const walk = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
  for (let n = walk.nextNode(); n; n = walk.nextNode()) {
    if (!n.textContent.trim()) continue;
    const r = document.createRange(); r.selectNodeContents(n);
    for (const q of r.getClientRects()) if (q.width > 0) out.push([q.left, q.top, q.right, q.bottom]);
  }
  return out;
}"""


def text_lines(page, element) -> int:
    """How many lines the text of ``element`` takes (distinct tops of its text boxes)."""
    return len({round(b[1]) for b in element.evaluate(TEXT_BOXES)})


def overlaps(a, b) -> bool:
    return a[0] < b[2] - 1 and b[0] < a[2] - 1 and a[1] < b[3] - 1 and b[1] < a[3] - 1


def box(element) -> tuple:
    b = element.bounding_box()
    return (b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"])


def test_library_table_fits_a_1024_px_page(page, server):
    _, studio = server
    long = "ink-and-pastel-merged-watercolour"
    studio.merge_adapters({"ink": 0.5, "pastel": 0.5}, long)  # a long name and a long "training" summary
    fresh(page)
    page.set_viewport_size({"width": 1024, "height": 900})
    try:
        page.get_by_role("tab", name="Library").click()
        page.click("#library-refresh")
        wait_text(page, "#library-table", long)
        page.wait_for_timeout(500)
        table = page.locator("#library-table")
        right = box(table)[2]
        shot(page, "library-1024")
        for cell in table.locator("th, td").all():
            b = cell.bounding_box()
            if b and b["width"] > 0:  # no column runs past the table's own box (hash and size were cut off)
                assert b["x"] + b["width"] <= right + 1, (cell.inner_text(), b, right)
        for header in table.locator("th").all():
            name = header.inner_text().strip()
            if name:  # "fami ly", "t r i g g e r" before
                assert text_lines(page, header) == 1, name
        assert page.evaluate("document.documentElement.scrollWidth") <= 1024
    finally:
        page.set_viewport_size({"width": 1400, "height": 1000})
        studio.delete_adapter(long)


def generate_small(page, *, seed: int) -> None:
    """Generate one 64 px picture in 2 steps with ``seed`` and wait until its infotext is shown."""
    for sel, v in (("#steps input[type=number]", 2), ("#width input[type=number]", 64),
                   ("#height input[type=number]", 64), ("#seed input", seed)):
        set_number(page, sel, v)
    page.click("#generate-btn")
    page.wait_for_function(f"document.querySelector('#infotext textarea').value.includes('Seed: {seed}')",
                           timeout=TIMEOUT_MS)


def fresh(page) -> None:
    """A reloaded page: nothing picked or typed by an earlier test."""
    page.reload(wait_until="load")
    page.wait_for_selector("#generate-btn")


def test_error_badge_leaves_the_status_text_readable(page):
    fresh(page)
    page.set_viewport_size({"width": 1024, "height": 900})  # a narrower column: the text reaches the middle
    page.get_by_role("tab", name="Generate").click()
    page.fill("#prompt textarea", "a lighthouse")
    set_number(page, "#steps input[type=number]", 2)
    set_number(page, "#width input[type=number]", 64)
    set_number(page, "#height input[type=number]", 64)
    page.click("#generate-btn")
    wait_text(page, "#gen-status", "image(s), seed", timeout=TIMEOUT_MS)
    page.fill("#prompt textarea", "")
    page.click("#generate-btn")
    badge = page.locator("#gen-status .error").first
    badge.wait_for()
    page.wait_for_timeout(300)
    text = page.locator("#gen-status .prose").first.evaluate(TEXT_BOXES)
    assert text, "the status text is gone"
    for line in text:
        assert not overlaps(line, box(badge)), (line, box(badge))
    for button in page.locator("#gen-status button").all():  # nor does it run under the status's close button
        assert not overlaps(box(button), box(badge)), (box(button), box(badge))
    page.locator("#gen-status").screenshot(path=str(ARTIFACTS / "webui-status-error.png"))
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.reload(wait_until="load")
    page.wait_for_selector("#generate-btn")


def test_grid_is_shown_whole_and_small_pictures_stay_sharp(page):
    fresh(page)
    page.fill("#prompt textarea", "a lighthouse")
    generate_small(page, seed=5)
    img = page.locator("#gallery img").first
    page.wait_for_function("(i => i && i.complete && i.naturalWidth > 0)(document.querySelector('#gallery img'))")
    assert img.evaluate("i => [i.naturalWidth, i.getBoundingClientRect().width > i.naturalWidth]") == [64, True]
    assert img.evaluate("i => getComputedStyle(i).imageRendering") == "pixelated"  # blurred before
    page.click("#xy-grid")
    pick(page, "#x-adapter", "ink")
    page.keyboard.press("Escape")
    page.fill("#x-values textarea", "0, 0.5, 1")
    page.fill("#y-values textarea", "1, 2")
    page.click("#grid-btn")
    wait_text(page, "#gen-status", "X/Y grid of 6 images", timeout=TIMEOUT_MS)
    page.wait_for_function("(i => i && i.complete && i.naturalWidth > 64)(document.querySelector('#gallery img'))")
    page.wait_for_timeout(300)
    shown = img.evaluate("""i => { const b = i.getBoundingClientRect(), s = Math.min(b.width / i.naturalWidth,
        b.height / i.naturalHeight); const w = i.naturalWidth * s, h = i.naturalHeight * s;   // object-fit: contain
        return [getComputedStyle(i).objectFit, b.left + (b.width - w) / 2, b.top + (b.height - h) / 2,
                b.left + (b.width + w) / 2, b.top + (b.height + h) / 2]; }""")
    assert shown[0] == "contain"
    gallery = box(page.locator("#gallery"))
    assert gallery[0] - 1 <= shown[1] and shown[3] <= gallery[2] + 1, (shown, gallery)  # the whole grid is in
    assert gallery[1] - 1 <= shown[2] and shown[4] <= gallery[3] + 1, (shown, gallery)  # the gallery's box
    shot(page, "grid")


def test_train_tab_flow_stop_save_then_generate_with_it(page, server):
    """Recipe -> run -> Stop -> 'Save what was learnt so far' -> the saved adapter is in the Library -> generate
    with it (its trigger words offered in the Generate tab)."""
    import re

    _, studio = server
    fresh(page)
    page.get_by_role("tab", name="Train").click()
    page.fill("#train-name textarea", "flow")
    page.fill("#train-trigger textarea", "flw")
    page.get_by_text("standard:").first.click()  # a recipe other than the default
    wait_text(page, "#train-preset-info", "1200 steps, rank 16")
    page.click("#train-advanced")
    page.wait_for_selector("#train-steps input", state="visible")
    page.wait_for_timeout(300)
    set_number(page, "#train-steps input", 500)  # far more than the test waits for: it is stopped
    set_number(page, "#train-resolution input", 64)
    set_number(page, "#train-sample-every input", 0)
    page.click("#train-start")
    page.wait_for_function("(t => t.includes('flow') && /step [1-9][0-9]*\\/500/.test(t))"
                           "(document.querySelector('#train-status').innerText)", timeout=TIMEOUT_MS)
    assert "recipe: standard" in page.inner_text("#train-status")  # the effective recipe, as the CLI prints it
    page.click("#train-stop")
    wait_text(page, "#train-status", "Stopped", timeout=TIMEOUT_MS)
    step = int(re.search(r"step (\d+)/500", page.inner_text("#train-status")).group(1))
    assert 1 <= step < 500 and "flow" not in studio.adapters()
    page.click("#train-save-partial")
    saved = f"flow-step-{step}"
    page.wait_for_function("([t, name]) => (s => s.includes(name) && s.includes('Finished'))"
                           "(document.querySelector(t).innerText)", arg=["#train-status", saved],
                           timeout=TIMEOUT_MS)
    shot(page, "train-saved")
    page.get_by_role("tab", name="Library").click()
    wait_text(page, "#library-table", saved)
    assert "flw" in page.inner_text("#library-table") and studio.library.info(saved).trigger == "flw"
    assert studio.library.info(saved).training["steps"] == step
    page.get_by_role("tab", name="Generate").click()
    pick(page, "#adapters", saved)
    page.keyboard.press("Escape")
    wait_text(page, "#trigger-words", "flw")
    page.fill("#prompt textarea", "a lighthouse")
    page.click("#insert-triggers")
    page.wait_for_function("document.querySelector('#prompt textarea').value === 'flw, a lighthouse'")
    generate_small(page, seed=7)
    text = page.input_value("#infotext textarea")
    assert text.startswith("flw, a lighthouse") and f"<lora:{saved}:1>" in text, text
    shot(page, "train-flow-generate")


def test_block_preset_reaches_the_infotext_and_the_blend_report_shows_a_table(page, server):
    """Generate: a block preset picked for one adapter is in the picture's lbw= tag. Blend report: two adapters
    give a table per block."""
    _, studio = server
    fresh(page)
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.get_by_role("tab", name="Generate").click()
    pick(page, "#adapters", "ink")
    page.keyboard.press("Escape")
    page.wait_for_selector("#blocks-ink input")
    pick(page, "#blocks-ink", "INS")
    page.keyboard.press("Escape")
    page.fill("#prompt textarea", "a lighthouse")
    generate_small(page, seed=5)
    text = page.input_value("#infotext textarea")
    assert "<lora:ink:1:lbw=INS>" in text, text
    assert studio.blender.blocks["ink"].text() == "INS"
    shot(page, "block-weights")
    page.get_by_role("tab", name="Blend report").click()
    pick(page, "#report-pick", "ink")
    pick(page, "#report-pick", "pastel")
    page.keyboard.press("Escape")
    page.click("#report-btn")
    wait_text(page, "#report-table", "total", timeout=TIMEOUT_MS)
    table = page.inner_text("#report-table")
    assert "ink vs pastel" in table and "unet down" in table, table
    shot(page, "blend-report")
