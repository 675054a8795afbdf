"""Item 5: through real `app.py` servers.

Slider release -> first preview and -> final image (`--profile tiny`): the client uploads a photo
(`/add_photos`), renders once (`/ui_generate`, which also loads the models), then releases the slider at new γ
values (`/ui_release`, the event the γ slider fires) and times each from submit to the first streamed preview and
to the final image.

The studio's own cost (the default profile, `mini` when its files are there): on one server, a Generate clicked on
the page in headless Chromium (Debian's, at 1440x900: the browser drawing the previews shares the cores, as it does
for a user) until the final image has loaded, against the same `/generate` call through gradio_client, round by
round. Without Chromium the page's own event (`/ui_generate`) stands in for the click.
"""
from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import time
from pathlib import Path

from .app_process import REPO, AppServer
from .common import Mode, Section, Target, median, paired_ratio, ratio_spread, seconds, synthetic_photo
from .memory import peak_rss_of

logger = logging.getLogger(__name__)

POLL = 0.01  # seconds between looks at a job's streamed outputs
STEPS, SIZE = 10, 64  # the tiny profile's default steps and image side
CHROMIUM = Path("/usr/bin/chromium")  # Debian's; Playwright drives it (never a downloaded browser)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STUDIO_LIMIT = 1.5  # a Generate on the page may cost at most this many times the same /generate call
EXAMPLE = REPO / "assets" / "examples" / "red-striped-star.png"
PROMPT = "a small, squashed toy on the left, on a sky background, shadowed style"  # mini's words
# The page's Generate is done when the line names a new seed's result and the large image is that PNG, loaded.
PAGE_DONE = """(before) => {
  const line = document.querySelector('#info').innerText.match(/seed (\\d+) · γ [\\d.]+ · strength/);
  if (!line || line[1] === before) return false;
  const image = document.querySelector('#result img');
  return Boolean(image && image.complete && image.src.includes(`-s${line[1]}-`));
}"""
PAGE_SEED = "() => (document.querySelector('#info').innerText.match(/seed (\\d+)/) || [null, ''])[1]"


def release_once(client, form: list) -> tuple[float | None, float]:
    """Seconds from submitting /ui_release to its first streamed preview (None when the final image came
    first: the app drops stale previews) and to its final image."""
    started = time.perf_counter()
    job = client.submit(*form, api_name="/ui_release")
    first = None
    while not job.done():
        if first is None and any("step " in str(output[1]) for output in job.outputs()):
            first = time.perf_counter() - started
        time.sleep(POLL)
    job.result(timeout=600)
    final = time.perf_counter() - started
    if first is None and any("step " in str(output[1]) for output in job.outputs()):
        first = final  # the preview and the image arrived within one poll
    return first, final


def run(mode: Mode) -> tuple[Section, dict]:
    """The section, and the app's memory figures for item 4."""
    section, app = slider_release(mode)
    if not section.skipped:
        studio_vs_api(mode, section)
    return section, app


def slider_release(mode: Mode) -> tuple[Section, dict]:
    section = Section(5, "Through a real server (app.py, gradio_client, headless Chromium): slider release latency, "
                         "the studio's cost over its API")
    if not (REPO / "app.py").is_file():
        section.skipped = "app.py not available"
        return section, {"skipped": section.skipped}
    from gradio_client import Client, handle_file

    from ui.handlers import CONTROLS, MODE_INPUTS, TEXT_MODE
    from ui.state import MAX_PHOTOS

    settings = dict(prompt="a photo of the subject on the beach", negative_prompt="", gate=0.5, strength=1.0, seed=7,
                    num_inference_steps=STEPS, guidance_scale=7.5, width=SIZE, height=SIZE, scheduler="dpmpp_2m",
                    pres_from=0.0, pres_until=1.0, pers_from=0.0, pers_until=1.0)

    def form(gate: float) -> list:  # the UI's settings in layout order, one weight per photo slot, the mode panel
        return ([{**settings, "gate": gate}[name] for name in CONTROLS] + [1.0] * MAX_PHOTOS
                + [TEXT_MODE[name] for name in MODE_INPUTS])

    with tempfile.TemporaryDirectory() as folder:
        photo = Path(folder) / "subject.png"
        synthetic_photo(0).save(photo)
        app = AppServer("--profile", "tiny", log=Path(folder) / "app.log", timeout=180.0)
        try:
            client = Client(app.url, verbose=False)
            client.predict([handle_file(str(photo))], api_name="/add_photos")
            started = time.perf_counter()
            client.predict(True, *form(0.5), 1, api_name="/ui_generate")  # loads the models (or waits for the preload)
            first_render = time.perf_counter() - started
            gates = [round(0.05 + 0.9 * i / max(1, mode.releases), 3) for i in range(mode.releases + 1)]
            release_once(client, form(gates[0]))  # warm-up
            timings = [release_once(client, form(gate)) for gate in gates[1:]]
            peak = peak_rss_of(app.process.pid)
        finally:
            app.stop()
    first, final = [t[0] for t in timings if t[0] is not None], [t[1] for t in timings]
    section.add("page served after start", seconds(app.ready_after))
    section.add("first render after start (includes model load if not yet preloaded)", seconds(first_render))
    section.add(f"slider release -> first preview ({STEPS} steps, {SIZE} px): median of {len(first)}",
                seconds(median(first)) if first else "none streamed: every render finished first")
    section.add(f"slider release -> final image: median of {len(final)}", seconds(median(final)))
    if len(first) < len(final):
        section.notes.append(f"{len(final) - len(first)} of {len(final)} releases finished before a preview reached "
                             "the client (the app drops stale previews)")
    section.data = dict(page_ready=app.ready_after, first_render=first_render, first_preview=first, final=final,
                        steps=STEPS, size=SIZE)
    return section, dict(peak_rss=peak, requests=len(timings) + 2)


# --- the studio's own cost: a Generate on the page against the same /generate call, on one server -----------
def studio_vs_api(mode: Mode, section: Section) -> None:
    """Add the page / API rows and the `studio_vs_api` target to `section`."""
    mini = (REPO / "assets" / "mini" / "flexip_adapter.safetensors").is_file() and mode.arch != "tiny"
    profile = "mini" if mini else "tiny"  # the default profile; smoke mode checks the measure runs on tiny
    rounds = max(2, mode.releases)
    with tempfile.TemporaryDirectory() as folder:
        photo = EXAMPLE  # one of mini's own toys
        if not mini:
            photo = Path(folder) / "subject.png"
            synthetic_photo(1).save(photo)
        app = AppServer("--profile", profile, log=Path(folder) / "app.log", timeout=180.0)
        try:
            app.wait_for_log(f"profile '{profile}' loaded", timeout=240)
            with _page_or_event(app.url, photo, profile) as (page_generate, how):
                api_generate = _api(app.url, photo)
                page_generate(), api_generate()  # warm-up: first calls pay for caches and the browser's first paint
                page, api = [], []
                for r in range(rounds):  # interleaved, the order alternating, so both share the machine's noise
                    first, second = (page_generate, api_generate) if r % 2 == 0 else (api_generate, page_generate)
                    a, b = first(), second()
                    page.append(a if r % 2 == 0 else b)
                    api.append(b if r % 2 == 0 else a)
        finally:
            app.stop()
    ratio = paired_ratio(page, api)
    section.add(f"studio ({profile}): Generate on the page ({how}) until its image shows: median of {rounds}",
                seconds(median(page)))
    section.add(f"studio ({profile}): the same `/generate` call through gradio_client: median of {rounds}",
                seconds(median(api)))
    section.add("**studio / API** (per-round spread)", f"**{ratio:.2f}** ({ratio_spread(page, api)})")
    section.targets.append(Target("studio_vs_api", ratio, STUDIO_LIMIT))
    if ratio > STUDIO_LIMIT:
        section.notes.append(f"the page costs {ratio:.2f}x the API: previews, files and the browser's drawing "
                             "(see ui/handlers.py PREVIEW_EVERY_S)")
    section.data["studio_vs_api"] = dict(profile=profile, how=how, page=page, api=api, ratio=ratio)


def _api(url: str, photo: Path):
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)

    def generate() -> float:
        started = time.perf_counter()
        client.predict(photos=[handle_file(str(photo))], weights="1", prompt=PROMPT, gate=0.5, seed=-1,
                       api_name="/generate")
        return time.perf_counter() - started

    return generate


@contextlib.contextmanager
def _page_or_event(url: str, photo: Path, profile: str):
    """A function that runs one Generate as the page does and returns its seconds, and how it is driven."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not CHROMIUM.exists():
        yield _ui_event(url, photo, profile), "its /ui_generate event, no browser here"
        return
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.set_default_timeout(120_000)
            page.goto(url)
            page.wait_for_selector("#generate")
            page.set_input_files("#subject-upload input[type=file]", str(photo))
            page.locator(".slot img").first.wait_for()
            page.get_by_label("Prompt", exact=True).fill(PROMPT)

            def generate() -> float:
                before = page.evaluate(PAGE_SEED)
                started = time.perf_counter()
                page.click("#generate")
                page.wait_for_function(PAGE_DONE, arg=before, polling=10)
                return time.perf_counter() - started

            yield generate, "headless Chromium"
        finally:
            browser.close()


def _ui_event(url: str, photo: Path, profile: str):
    from gradio_client import Client, handle_file

    from flexip_core.loading.profiles import load_profile
    from ui.handlers import CONTROLS, MODE_INPUTS, TEXT_MODE
    from ui.state import MAX_PHOTOS

    client = Client(url, verbose=False)
    client.predict([handle_file(str(photo))], api_name="/add_photos")
    d = load_profile(profile).defaults  # what the page's controls start with
    settings = dict(prompt=PROMPT, negative_prompt="", gate=0.5, strength=1.0, seed=-1,
                    num_inference_steps=d.num_inference_steps, guidance_scale=d.guidance_scale, width=d.width,
                    height=d.height, scheduler=d.scheduler, pres_from=0.0, pres_until=1.0,
                    pers_from=0.0, pers_until=1.0)
    form = [settings[name] for name in CONTROLS] + [1.0] * MAX_PHOTOS + [TEXT_MODE[name] for name in MODE_INPUTS]

    def generate() -> float:
        started = time.perf_counter()
        outputs = client.predict(False, *form, 1, api_name="/ui_generate")
        assert re.search(r"identity score", str(outputs)), outputs
        return time.perf_counter() - started

    return generate
