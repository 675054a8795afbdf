"""Item 5: slider release -> first preview and -> final image through a real `app.py --profile tiny` server.

The client uploads a photo (`/add_photos`), renders once (`/ui_generate`, which also loads the models), then
releases the slider at new γ values (`/ui_release`, the event the γ slider fires) and times each from submit
to the first streamed preview and to the final image.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from .app_process import REPO, AppServer
from .common import Mode, Section, median, seconds, synthetic_photo
from .memory import peak_rss_of

logger = logging.getLogger(__name__)

POLL = 0.01  # seconds between looks at a job's streamed outputs
STEPS, SIZE = 10, 64  # the tiny profile's default steps and image side


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
    section = Section(5, "Through a real server (app.py --profile tiny, gradio_client): slider release latency")
    if not (REPO / "app.py").is_file():
        section.skipped = "app.py not available"
        return section, {"skipped": section.skipped}
    from gradio_client import Client, handle_file

    from ui.handlers import CONTROLS
    from ui.state import MAX_PHOTOS

    settings = dict(prompt="a photo of the subject on the beach", negative_prompt="", gate=0.5, strength=1.0, seed=7,
                    num_inference_steps=STEPS, guidance_scale=7.5, width=SIZE, height=SIZE, scheduler="dpmpp_2m",
                    pres_until=1.0)

    def form(gate: float) -> list:  # the UI's settings in layout order, then one weight per photo slot
        return [{**settings, "gate": gate}[name] for name in CONTROLS] + [1.0] * MAX_PHOTOS

    with tempfile.TemporaryDirectory() as folder:
        photo = Path(folder) / "subject.png"
        synthetic_photo(0).save(photo)
        app = AppServer("--profile", "tiny", log=Path(folder) / "app.log", timeout=180.0)
        try:
            client = Client(app.url, verbose=False)
            client.predict([handle_file(str(photo))], api_name="/add_photos")
            started = time.perf_counter()
            client.predict(True, *form(0.5), api_name="/ui_generate")  # loads the models (or waits for the preload)
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
