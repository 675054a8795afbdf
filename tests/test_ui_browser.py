"""Headless Chromium (Debian's, through Playwright) against a real `app.py`. With `--profile tiny`: upload a photo,
type a prompt, generate, drag the γ slider (the nearest render shows while dragging), release it and see a new
result; the page fits 1440x900 without scrolling. With `--profile mini` (the offline default): one click on an
example subject renders a γ sweep in which the oracle finds the subject's identity at γ = 1; Stop shows the stopped
state; a foreign PNG on Restore and a bad sweep value are one message each, with no error badge, and leave the
screen as it was; arrow keys and Enter render the γ they set. The screenshots go into docs/ (screenshot.png,
stopped.png, error.png) when FLEXIP_UPDATE_SCREENSHOT=1 (a plain run leaves the working tree untouched)."""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from tests.ui_fixtures import DREAMBENCH, REPO, AppServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = REPO / "docs" / "screenshot.png"
MINI = REPO / "assets" / "mini" / "flexip_adapter.safetensors"

pytestmark = [
    pytest.mark.browser, pytest.mark.server, pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed at /usr/bin/chromium "
                                                     "(apt-get install -y chromium)"),
    pytest.mark.skipif(not DREAMBENCH.is_dir(), reason=f"DreamBench photos not found at {DREAMBENCH}"),
]


@pytest.fixture(scope="module")
def server():
    app = AppServer("--profile", "tiny", "--live-drag", "on")  # renders while dragging, however busy the machine
    try:
        app.wait_for_log("profile 'tiny' loaded", timeout=240)
        yield app
    finally:
        app.stop()


@contextlib.contextmanager
def open_page(url: str):
    """A 1440x900 headless Chromium page on `url`, once the studio has drawn its Generate button."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=90_000)  # renders on a busy CPU take a while
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.set_default_timeout(90_000)
        page.goto(url)
        page.wait_for_selector("#generate")
        yield page
        browser.close()


@pytest.fixture
def page(server):
    with open_page(server.url) as page:
        yield page


@pytest.fixture(scope="module")
def mini_server():
    if not MINI.is_file():
        pytest.skip("assets/mini is absent; build it with `python -m toyworld.mini.build`")
    app = AppServer("--profile", "mini")
    try:
        app.wait_for_log("profile 'mini' loaded", timeout=240)
        yield app
    finally:
        app.stop()


@pytest.fixture
def mini_page(mini_server):
    """A page on the offline default with the Red star example's sweep rendered; server errors are collected in
    `page.server_errors`."""
    from playwright.sync_api import expect

    from ui.files import EXAMPLES

    with open_page(mini_server.url) as page:
        page.server_errors = []
        page.on("response", lambda response: response.status >= 500 and page.server_errors.append(response.url))
        page.log = []  # what the page logged and any request that failed, for a failure's message
        page.on("console", lambda message: page.log.append(f"{message.type}: {message.text}"))
        page.on("response", lambda response: response.status >= 400 and page.log.append(
            f"HTTP {response.status} {response.url}"))
        page.get_by_role("button", name=EXAMPLES[0].label).click()
        expect(page.locator("#sweep-gallery img")).to_have_count(6)
        expect(page.locator("#info")).to_contain_text("identity score")
        yield page


def screenshot(page, name: str, tmp_path: Path) -> Path:
    """The page's screenshot, into docs/ when FLEXIP_UPDATE_SCREENSHOT=1."""
    path = REPO / "docs" / name if os.environ.get("FLEXIP_UPDATE_SCREENSHOT") == "1" else tmp_path / name
    page.mouse.move(0, 0)
    page.screenshot(path=str(path), animations="disabled")  # a toast still sliding in is shown where it lands
    return path


def no_error_badges(page) -> None:
    """Gradio marks the outputs of a failed event with "Error" badges; the studio never lets one fail. A failure
    names the blocks that carry one (their elem_id or label) and what the page logged."""
    found = page.locator("[data-testid=status-tracker] .error, :text-is('Error')")
    badges = found.evaluate_all("""els => els.map(e => {
        const block = e.closest('[id], .block');
        const label = block && (block.querySelector('[data-testid=block-info]') || {}).textContent;
        return (block && (block.id || label || block.className)) || e.outerHTML; })""")
    assert not badges, f"error badges on {badges}; page log: {getattr(page, 'log', [])[-20:]}"


def set_steps(page, steps: int) -> None:
    from playwright.sync_api import expect

    if not page.get_by_label("Steps").is_visible():
        page.get_by_text("Advanced").click()
    box = page.get_by_label("Steps")
    expect(box).to_be_visible()
    box.fill(str(steps))
    box.press("Tab")
    expect(box).to_have_value(str(steps))


def drag_gate(page, start: float, end: float, release: bool = True) -> None:
    """Drag the γ slider's thumb from fraction `start` to `end` of its track with the mouse."""
    box = page.locator("#gate-slider input[type=range]").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * start, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * end, y, steps=8)
    if release:
        page.mouse.up()


def result_src(page) -> str | None:
    image = page.locator("#result img")
    return image.first.get_attribute("src") if image.count() else None


def paste_image(page, path: Path) -> None:
    """Paste an image file onto the page as a browser would from the clipboard."""
    data = list(path.read_bytes())
    page.evaluate("""(bytes) => {
        const file = new File([new Uint8Array(bytes)], "clipboard.jpg", {type: "image/jpeg"});
        const transfer = new DataTransfer();
        transfer.items.add(file);
        document.body.dispatchEvent(new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true}));
    }""", data)


def test_upload_prompt_generate_and_slide(page, server, tmp_path):
    from playwright.sync_api import expect

    kept = kept_in_history(page, server)

    page.set_input_files("#subject-upload input[type=file]", [str(DREAMBENCH / "dog" / "00.jpg"),
                                                              str(DREAMBENCH / "dog" / "01.jpg")])
    expect(page.locator(".slot img")).to_have_count(2)
    paste_image(page, DREAMBENCH / "dog" / "02.jpg")
    expect(page.locator(".slot img")).to_have_count(3)
    page.get_by_label("Prompt", exact=True).fill("a dog on the beach, watercolor")
    page.click("#generate")
    info = page.locator("#info")
    expect(info).to_contain_text("identity score")
    expect(info).to_contain_text("γ 0.50")
    first = result_src(page)
    assert first

    drag_gate(page, 0.5, 0.8, release=False)  # while dragging: a render already made (a tick), or one made now
    expect(info).to_contain_text(re.compile(r"nearest rendered γ 0\.[5-8]0|rendered while dragging"))
    page.mouse.up()  # release: a new render at the new γ with the same seed
    expect(info).to_contain_text("identity score")
    gate = page.locator("#gate-slider input[type=number]").input_value()
    expect(info).to_contain_text(f"γ {float(gate):.2f}")
    assert float(gate) > 0.6 and result_src(page) != first
    expect(page.locator("#history img")).to_have_count(kept + 2)
    assert page.evaluate("document.scrollingElement.scrollHeight") <= 900  # one screen at 1440x900

    page.locator("#history img").nth(1).click()  # the first result: its settings come back
    expect(page.locator("#gate-slider input[type=number]")).to_have_value("0.5")

    png = tmp_path / "result.png"  # the PNG the page shows and downloads carries its settings ...
    png.write_bytes(page.request.get(result_src(page)).body())
    page.locator("#seed input").fill("12345")
    page.set_input_files("#restore-png input[type=file]", str(png))  # ... and dropping it restores them
    expect(info).to_contain_text("settings restored from result.png")
    assert page.locator("#seed input").input_value() != "12345"


def test_dragging_shows_a_real_render_at_every_tick(page, server):
    """After a render the slider's ticks render in the background; a slow drag then shows a different finished
    render at every tenth of the track (ticks, or renders made while moving: the tiny profile is fast), never a
    preview, and release keeps the one it lands on."""
    from playwright.sync_api import expect

    ticks = server.log.read_text().count("slider ticks rendered")
    page.set_input_files("#subject-upload input[type=file]", [str(DREAMBENCH / "dog" / "00.jpg")])
    expect(page.locator(".slot img")).to_have_count(1)
    page.get_by_label("Prompt", exact=True).fill("a dog in the snow")
    page.click("#generate")
    info = page.locator("#info")
    expect(info).to_contain_text("identity score")
    for _ in range(300):
        if server.log.read_text().count("slider ticks rendered") > ticks:
            break
        page.wait_for_timeout(100)

    config = page.request.get(f"{server.url}config").json()
    drag = next(i for i, d in enumerate(config["dependencies"]) if d.get("api_name") == "ui_drag")
    asked = []  # the page's requests for a render while dragging (the server makes one where renders are fast)
    page.on("request", lambda request: "queue/join" in request.url and (request.post_data_json or {}).get(
        "fn_index") == drag and asked.append(request))
    box = page.locator("#gate-slider input[type=range]").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.5, y)
    page.mouse.down()
    shown, lines = set(), []
    for tenth in range(4, -1, -1):  # 0.4, 0.3, ..., 0: held down all along
        page.mouse.move(box["x"] + box["width"] * tenth / 10, y, steps=4)
        page.wait_for_timeout(400)
        shown.add(result_src(page))
        lines.append(info.inner_text())
    page.mouse.up()
    assert len(shown) >= 4, lines
    assert not any("step" in line for line in lines), lines  # finished renders only, never a step preview
    assert asked  # the page asked for renders while the slider moved ...
    page.locator("#gate-slider input[type=range]").focus()
    page.keyboard.press("ArrowRight")  # ... and not for a key press, which renders on release
    expect(info).to_contain_text("γ 0.01")
    count = len(asked)
    page.wait_for_timeout(500)
    assert len(asked) == count
    expect(info).to_contain_text("identity score")
    no_error_badges(page)


def assert_tiles_whole(page, gallery: str) -> None:
    """Every image of the gallery lies within its panel and below its label (none cut off or covered)."""
    panel = page.locator(gallery).bounding_box()
    label = page.locator(f"{gallery} [data-testid=block-label]").bounding_box()
    for tile in (img.bounding_box() for img in page.locator(f"{gallery} img").all()):
        assert panel["x"] <= tile["x"] and tile["x"] + tile["width"] <= panel["x"] + panel["width"], (panel, tile)
        assert tile["y"] >= label["y"] + label["height"], (label, tile)


def test_mini_example_subject_renders_a_sweep_that_keeps_it_at_gamma_one(mini_server, tmp_path):
    """The offline default as a first-time user meets it: one click on an example, and the γ sweep shows the toy."""
    from PIL import Image
    from playwright.sync_api import expect

    from toyworld.oracle import identity_score
    from toyworld.world import Subject
    from ui.files import EXAMPLES

    with open_page(mini_server.url) as page:
        example = EXAMPLES[0]
        page.get_by_role("button", name=example.label).click()
        expect(page.locator(".slot img")).to_have_count(1)
        expect(page.get_by_label("Prompt", exact=True)).to_have_value(example.prompt)
        expect(page.locator("#info")).to_contain_text("read by the toy-world oracle")
        expect(page.locator("#status")).to_contain_text("it draws toy shapes, not photos")
        expect(page.get_by_role("tab", name="γ sweep")).to_have_attribute("aria-selected", "true")  # in front
        gallery = page.locator("#sweep-gallery img")
        expect(gallery).to_have_count(6)  # the reference, then γ 0, 0.25, 0.5, 0.75, 1
        assert_tiles_whole(page, "#sweep-gallery")
        captions = page.locator("#sweep-gallery .caption-label")
        expect(captions.nth(1)).to_have_text(re.compile(r"^γ 0\.00 · id [01]\.\d\d$"))
        clipped = captions.evaluate_all("els => els.filter(e => e.scrollWidth > e.clientWidth).length")
        assert clipped == 0  # each γ and its identity score can be read in full
        last = tmp_path / "gamma1.png"
        last.write_bytes(page.request.get(gallery.last.get_attribute("src")).body())
        assert identity_score(Image.open(last).convert("RGB"), Subject(*example.subject)) >= 2 / 3
        history = page.locator("#history img")
        for count in range(history.count() + 1, 7):  # six renders: more than Gradio's 100 px columns hold
            page.locator("#generate").click()
            expect(history).to_have_count(count)
        assert_tiles_whole(page, "#history")
        caption = page.locator("#history .caption-label").first
        expect(caption).to_be_hidden()  # small tiles: the caption shows on hover, not over the image
        page.locator("#history .gallery-item").first.hover()
        expect(caption).to_be_visible()
        expect(caption).to_contain_text("γ")
        page.mouse.move(0, 0)
        shot = SCREENSHOT if os.environ.get("FLEXIP_UPDATE_SCREENSHOT") == "1" else tmp_path / "screenshot.png"
        page.screenshot(path=str(shot))
        assert Image.open(shot).size == (1440, 900)
        page.get_by_role("tab", name="Prompt × γ grid").click()  # two prompts x the sweep's five γ
        page.get_by_label("Prompts, one per line (up to 4)").fill(
            "a large toy on a sand background\na small toy on the right, on a gray background")
        page.get_by_role("button", name="Run grid").click()
        expect(page.locator("#grid-view img")).to_have_count(10, timeout=60_000)
        expect(page.locator("#info")).to_contain_text("row 2: a small toy on the right", timeout=30_000)
        columns = page.locator("#grid-view thead th").all_inner_texts()
        rows = page.locator("#grid-view tbody th").all_inner_texts()
        assert columns == ["prompt", "γ 0.00", "γ 0.25", "γ 0.50", "γ 0.75", "γ 1.00"]
        assert rows == ["1 a large toy on a sand background", "2 a small toy on the right, on a gray background"]
        panel = page.locator("#grid-view").bounding_box()
        for tile in (img.bounding_box() for img in page.locator("#grid-view img").all()):  # none cut off
            assert tile["y"] + tile["height"] <= panel["y"] + panel["height"] + 1, (panel, tile)
        assert page.evaluate("document.scrollingElement.scrollHeight") <= 900


def test_stop_puts_the_last_image_or_sweep_back_and_says_where_it_stopped(mini_page, tmp_path):
    from playwright.sync_api import expect

    page, info = mini_page, mini_page.locator("#info")
    sweep = page.locator("#sweep-gallery img").evaluate_all("els => els.map(e => e.src)")
    page.get_by_role("tab", name="Result").click()
    finished = result_src(page)
    set_steps(page, 300)  # long enough to stop half way on any machine
    page.locator("#generate").click()
    expect(info).to_contain_text(re.compile(r"step ([5-9]|\d\d+) of 300"))  # a few steps in
    page.locator("#stop").click()
    expect(info).to_contain_text(re.compile(r"stopped\s+at step \d+ of 300 · showing the last finished image"))
    expect(page.locator("#result img")).to_have_attribute("src", finished)  # the noisy preview is gone
    page.wait_for_timeout(1000)  # a late message from the cancelled render would land by now
    no_error_badges(page)
    screenshot(page, "stopped.png", tmp_path)

    page.get_by_role("tab", name="γ sweep").click()  # a stopped sweep: the previous sweep and its zip come back
    page.get_by_role("button", name="Run sweep").click()
    expect(info).to_contain_text(re.compile(r"γ sweep · seed \d+ · step \d+ of 300"))
    page.locator("#stop").click()
    expect(info).to_contain_text("the γ sweep tab shows the previous sweep")
    expect(page.locator("#sweep-gallery img")).to_have_count(6)
    assert page.locator("#sweep-gallery img").evaluate_all("els => els.map(e => e.src)") == sweep
    expect(page.get_by_role("button", name="Download all (zip)").first).to_be_enabled()
    page.wait_for_timeout(1000)
    no_error_badges(page)
    assert not page.server_errors


def test_a_foreign_png_on_restore_is_one_message_and_no_error_badge(mini_page, tmp_path):
    from playwright.sync_api import expect

    from tests.ui_fixtures import png_bytes

    page, info = mini_page, mini_page.locator("#info")
    prompt = page.get_by_label("Prompt", exact=True).input_value()
    foreign = tmp_path / "holiday.png"
    foreign.write_bytes(png_bytes())  # a PNG with no FlexIP settings
    page.set_input_files("#restore-png input[type=file]", str(foreign))
    expect(info).to_contain_text("settings not restored: holiday.png: this PNG carries no FlexIP settings")
    expect(page.locator(".toast-body")).to_have_count(1)
    expect(page.locator(".toast-body")).to_contain_text("holiday.png")
    no_error_badges(page)
    assert page.get_by_label("Prompt", exact=True).input_value() == prompt  # the controls are as they were
    expect(page.locator(".toast-body")).to_be_visible()
    box = page.locator(".toast-body").bounding_box()
    tabs = page.locator("#tabs [role=tablist]").bounding_box()
    assert box["y"] > tabs["y"] + tabs["height"]  # the message does not cover the tabs
    screenshot(page, "error.png", tmp_path)
    page.locator("#generate").click()  # a later render leaves no badge behind either
    expect(info).to_contain_text(re.compile(r"seed \d+ · γ 0.50 · strength"))
    no_error_badges(page)
    assert not page.server_errors


def test_a_bad_sweep_value_keeps_the_previous_sweep(mini_page):
    from playwright.sync_api import expect

    page, info = mini_page, mini_page.locator("#info")
    tiles = page.locator("#sweep-gallery img").evaluate_all("els => els.map(e => e.src)")
    page.get_by_label("γ values (same seed, one batch)").fill("0, 0.5, banana, 2")
    page.get_by_role("button", name="Run sweep").click()
    expect(info).to_contain_text("not rendered: γ value 'banana' is not a number")
    expect(page.locator(".toast-body")).to_have_count(1)
    assert page.locator("#sweep-gallery img").evaluate_all("els => els.map(e => e.src)") == tiles
    no_error_badges(page)
    assert not page.server_errors


def test_arrow_keys_and_enter_render_the_gamma_they_set(mini_page):
    from playwright.sync_api import expect

    page, info = mini_page, mini_page.locator("#info")
    page.get_by_role("tab", name="Result").click()
    number = page.locator("#gate-slider input[type=number]")
    page.locator("#gate-slider input[type=range]").focus()
    for _ in range(3):
        page.keyboard.press("ArrowRight")  # 0.50 -> 0.53; rendered once, after a short pause
    expect(info).to_contain_text(re.compile(r"γ 0.53 · strength .* identity score"))
    assert number.input_value() == "0.53" and "-s" in result_src(page)

    number.fill("0.9")
    number.press("Enter")  # Enter renders (the box keeps the focus)
    expect(info).to_contain_text(re.compile(r"γ 0.90 · strength .* identity score"))
    number.fill("")  # an empty box or an impossible value never reaches the server ...
    number.press("Enter")
    expect(number).to_have_value("0.9")
    number.fill("5")  # ... a number out of range becomes the nearest in range
    number.press("Enter")
    expect(number).to_have_value("1")
    expect(info).to_contain_text(re.compile(r"γ 1.00 · strength .* identity score"))  # made by the sweep: at once
    no_error_badges(page)
    assert not page.server_errors


# --- modes: each once in the browser; their screenshots are the docs' pictures -------------------------------------
def mode_screenshot(page, name: str, tmp_path: Path) -> Path:
    """The studio in a mode, tall enough to show the mode's inputs below the controls."""
    page.set_viewport_size({"width": 1440, "height": 1250})
    for close in page.locator(".toast-close").all():  # the notes were read; the picture shows the studio
        close.click()
    page.evaluate("window.scrollTo(0, 0)")
    try:
        return screenshot(page, name, tmp_path)
    finally:
        page.set_viewport_size({"width": 1440, "height": 900})


def add_example_subject(page) -> None:
    from playwright.sync_api import expect

    from ui.files import EXAMPLES, ensure_examples, example_path

    ensure_examples()
    page.set_input_files("#subject-upload input[type=file]", str(example_path(EXAMPLES[0])))
    expect(page.locator(".slot img")).to_have_count(1)
    page.get_by_label("Prompt", exact=True).fill(EXAMPLES[0].prompt)


def shown_parameters(page, tmp_path: Path) -> str:
    """The `parameters` chunk of the PNG the Result tab shows (the file Download gives)."""
    png = tmp_path / "shown.png"
    png.write_bytes(page.request.get(result_src(page)).body())
    with Image.open(png) as image:
        return image.info["parameters"]


def render_in_mode(page) -> None:
    from playwright.sync_api import expect

    newest = page.locator("#history img").first
    before = newest.get_attribute("src") if page.locator("#history img").count() else None
    page.click("#generate")
    if before is None:  # this render, finished: the newest in the history (the strip keeps the last 24)
        expect(page.locator("#history img")).to_have_count(1)
    else:
        expect(newest).not_to_have_attribute("src", before)
    expect(page.locator("#info")).to_contain_text("identity score")
    assert result_src(page) or page.locator("#clip video").count()  # an image, or (Animate) a clip in its place
    no_error_badges(page)


def test_start_image_on_the_offline_default_and_what_its_other_modes_need(mini_server, tmp_path):
    """The offline default draws over a start picture; its base has no inpainting or ControlNet model, and those
    modes say so."""
    from playwright.sync_api import expect

    from ui.files import EXAMPLES, example_path

    with open_page(mini_server.url) as page:
        kept_in_history(page, mini_server)
        add_example_subject(page)
        page.get_by_label("Start image").check()
        expect(page.locator("#denoise")).to_be_visible()
        page.set_input_files("#mode-image input[type=file]", str(example_path(EXAMPLES[2])))
        expect(page.locator("#mode-image img")).to_have_count(1)
        render_in_mode(page)
        assert "FlexIP task: image-to-image" in shown_parameters(page, tmp_path)  # the mode is in the PNG
        mode_screenshot(page, "mode-start-image.png", tmp_path)
        for mode in ("Inpaint", "Control"):
            page.get_by_label(mode, exact=True).check()
            expect(page.locator("#mode-hint")).to_contain_text("needs real weights")


def dog_in_mode(page, server, mode: str, prompt: str) -> None:
    """A fresh page on the tiny server: the dog as the subject, a prompt, and `mode` chosen."""
    from playwright.sync_api import expect

    kept_in_history(page, server)
    page.set_input_files("#subject-upload input[type=file]", str(DREAMBENCH / "dog" / "00.jpg"))
    expect(page.locator(".slot img")).to_have_count(1)
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label(mode, exact=True).check()


def test_inpaint_into_a_scene_with_a_mask_drawn_in_the_browser(page, server, tmp_path):
    from playwright.sync_api import expect

    dog_in_mode(page, server, "Inpaint", "a dog on the lawn")
    expect(page.locator("#mode-image")).to_be_hidden()
    page.set_input_files("#scene input[type=file]", str(DREAMBENCH / "dog" / "03.jpg"))
    page.locator("#scene button[aria-label=Brush]").click()
    box = page.locator("#scene canvas").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.35, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.65, box["y"] + box["height"] * 0.5, steps=10)
    page.mouse.up()
    render_in_mode(page)
    assert "FlexIP task: inpainting" in shown_parameters(page, tmp_path)  # the mode is in the PNG
    mode_screenshot(page, "mode-inpaint.png", tmp_path)


def test_control_shows_the_edge_map_and_renders(page, server, tmp_path):
    from playwright.sync_api import expect

    dog_in_mode(page, server, "Control", "a dog")
    page.set_input_files("#mode-image input[type=file]", str(DREAMBENCH / "dog" / "01.jpg"))
    expect(page.locator("#edge-view img")).to_have_count(1)  # computed here, shown beside the picture
    render_in_mode(page)
    assert "FlexIP task: controlnet" in shown_parameters(page, tmp_path)
    mode_screenshot(page, "mode-control.png", tmp_path)


def test_animate_plays_the_clip_and_a_sweep_of_clips_side_by_side(page, server, tmp_path):
    from playwright.sync_api import expect

    dog_in_mode(page, server, "Animate", "a dog running")
    expect(page.locator("#frames")).to_be_visible()
    frames = page.locator("#frames input[type=number]")
    frames.fill("8")
    frames.press("Tab")
    render_in_mode(page)
    video = page.locator("#clip video")
    expect(video).to_have_count(1)
    expect(page.locator("#result")).to_be_hidden()  # the clip plays in the image's place (the previews showed there)
    page.wait_for_function("() => document.querySelector('#clip video').readyState >= 2")  # the browser decoded it
    assert page.evaluate("document.querySelector('#clip video').duration") > 0
    mode_screenshot(page, "mode-animate.png", tmp_path)

    page.get_by_role("tab", name="γ sweep").click()
    page.get_by_label("γ values (same seed, one batch)").fill("0, 1")
    page.click("#run-sweep")
    expect(page.locator("#sweep-clips video")).to_have_count(2)
    page.wait_for_function("() => [...document.querySelectorAll('#sweep-clips video')].every(v => v.readyState >= 2)")
    expect(page.locator("#sweep-gallery")).to_be_hidden()
    no_error_badges(page)


def test_the_gallery_tab_and_history_after_a_restart(tmp_path):
    """Renders of an earlier run are in the history strip and the Gallery tab of a new one on the same outputs."""
    from gradio_client import Client, handle_file
    from playwright.sync_api import expect

    outputs = ["--profile", "tiny", "--outputs", str(tmp_path / "outputs")]
    first = AppServer(*outputs)
    try:
        Client(first.url, verbose=False).predict(photos=[handle_file(str(DREAMBENCH / "dog" / "00.jpg"))],
                                                 prompt="a dog kept for later", seed=11, steps=1, api_name="/generate")
    finally:
        first.stop()
    second = AppServer(*outputs)
    try:
        with open_page(second.url) as page:
            expect(page.locator("#history img")).to_have_count(1)
            page.get_by_role("tab", name="Gallery").click()
            expect(page.locator("#gallery-grid img")).to_have_count(1)
            expect(page.locator("#gallery-info")).to_contain_text("1 kept render")
            page.locator("#gallery-grid img").first.click()
            expect(page.locator("#info")).to_contain_text("from the gallery")
            assert page.get_by_label("Prompt", exact=True).input_value() == "a dog kept for later"
            no_error_badges(page)
    finally:
        second.stop()


def kept_in_history(page, server) -> int:
    """How many renders the history strip shows once the page has loaded it from the server's gallery (earlier
    tests on the same server leave theirs there)."""
    from gradio_client import Client
    from playwright.sync_api import expect

    from ui.state import MAX_HISTORY

    kept = len(Client(server.url, verbose=False).predict(query="", limit=MAX_HISTORY, api_name="/history")[1])
    expect(page.locator("#history img")).to_have_count(kept)
    return kept


def test_generate_clicked_right_after_a_drop_waits_for_the_photo(page, server):
    """The upload race: a photo dropped and Generate clicked at once renders that photo (three times over: the race
    lost two of three tries before)."""
    from playwright.sync_api import expect

    from ui.state import MAX_HISTORY

    kept = kept_in_history(page, server)
    page.get_by_label("Prompt", exact=True).fill("a dog")
    for round_ in range(3):
        page.set_input_files("#subject-upload input[type=file]", str(DREAMBENCH / "dog" / f"0{round_}.jpg"))
        page.click("#generate")  # no wait for the thumbnail
        expect(page.locator("#history img")).to_have_count(min(kept + round_ + 1, MAX_HISTORY))
        expect(page.locator("#info")).not_to_contain_text("add at least one photo")
        page.locator(".slot button.remove").first.click()  # the next round starts from no photo again
        expect(page.locator(".slot img")).to_have_count(0)
    no_error_badges(page)
