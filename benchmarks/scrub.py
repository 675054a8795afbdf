"""Item 7: live scrubbing on one real `app.py --profile tiny` server, through gradio_client as the page drives it.

1. After a render, the slider's 11 ticks render in the background in one batched call: seconds until they are ready,
   next to one render of the same settings (the batch is worth it when ticks / one render is well under 11).
2. A release on a tick (shown and kept at once) next to a release between ticks (a render).
3. A scripted drag: positions at DRAG_HZ for DRAG_S seconds, asked for as the page asks (`/ui_drag`, only the newest
   position while one is in flight: Gradio's always_last); fresh renders shown per second. `scripted_drag` is what
   the GPU check's `drag_renders_per_s` runs too.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from .app_process import REPO, AppServer
from .common import Mode, Section, median, seconds
from .load import tiny_server

logger = logging.getLogger(__name__)

DRAG_HZ = 30.0  # slider positions per second a mouse drag gives (the page asks for one render per position)
DRAG_S = 3.0  # seconds of the scripted drag
TICKS_READY = r"slider ticks rendered: γ [^\n]* in ([0-9.]+) s"  # the server's line when the background ticks are in
RENDERED = r"rendered γ [0-9.]+ in ([0-9.]+) s"  # its line when a single render is shown


def ui_values(steps: int, size: int, gate: float, seed: int = 5, prompt: str = "a dog on the beach") -> dict:
    """The studio's form for the UI's endpoints (ui.handlers.CONTROLS, one weight per photo slot, the mode panel)."""
    from ui.handlers import CONTROLS, MODE_INPUTS, TEXT_MODE
    from ui.state import MAX_PHOTOS

    values = dict(prompt=prompt, negative_prompt="", gate=gate, strength=1.0, seed=seed, num_inference_steps=steps,
                  guidance_scale=7.5, width=size, height=size, scheduler="dpmpp_2m", pres_from=0.0, pres_until=1.0,
                  pers_from=0.0, pers_until=1.0, **TEXT_MODE)
    return {"controls": [values[name] for name in CONTROLS], "weights": [1.0] * MAX_PHOTOS,
            "mode": [values[name] for name in MODE_INPUTS]}


def form(steps: int, size: int, gate: float, **changes) -> list:
    """Positional inputs of /ui_release (and of /ui_generate after its lock_seed)."""
    values = ui_values(steps, size, gate, **changes)
    return values["controls"] + values["weights"] + values["mode"]


def scripted_drag(client, form: Callable[[float], list], start: float = 0.05, end: float = 0.95,
                  hz: float = DRAG_HZ, duration: float = DRAG_S) -> tuple[float, int]:
    """Drag from `start` to `end` over `duration` seconds, one position every 1/hz s; each position asks the server
    for a render there (/ui_drag) unless one is in flight, in which case only the newest waits for it (the page's
    always_last). `form(gate)` gives the page's inputs at a γ (/ui_release's). Returns the fresh renders shown per
    second and how many positions were asked for; after the drag, the last request ends."""
    from ui.handlers import MODE_INPUTS

    shown, asked, job, waiting = 0, 0, None, None
    began = time.perf_counter()
    while (now := time.perf_counter() - began) < duration or job is not None:
        if now < duration:
            gate = round(start + (end - start) * now / duration, 2)
            waiting = form(gate)[:1 - len(MODE_INPUTS)]  # the drag sends the mode, not the mode's pictures
        if job is not None and job.done():
            info = job.result()[-1]  # the line under the result
            shown += "rendered while dragging" in (info or "")
            job = None
        if job is None and waiting is not None:
            job, waiting, asked = client.submit(*waiting, api_name="/ui_drag"), None, asked + 1
        time.sleep(1.0 / hz)
    return shown / duration, asked


def logged_seconds(app: AppServer, pattern: str, before: int, timeout: float = 120.0) -> float:
    """The seconds of the server's next log line matching `pattern` (one group: the seconds) after its first
    `before` such lines, once it is there."""
    started = time.perf_counter()
    while len(found := re.findall(pattern, app.log.read_text())) <= before:
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"no log line {pattern!r} within {timeout:.0f} s")
        time.sleep(0.02)
    return float(found[before])


def run(mode: Mode) -> Section:
    section = Section(7, "Live scrubbing on a real server (app.py --profile tiny, gradio_client, 64 px)")
    if not (REPO / "app.py").is_file():
        section.skipped = "app.py not available"
        return section
    from gradio_client import Client, handle_file

    steps, size, rounds = 4, 64, 1 if mode.arch == "tiny" else 3
    with tiny_server() as (app, photo):
        client = Client(app.url, verbose=False, download_files=False)  # as a page: no history strip downloads
        client.predict([handle_file(str(photo))], api_name="/add_photos")
        renders, ticks, on_tick, off_tick = [], [], [], []
        for round_ in range(rounds + 1):  # the first round warms the caches up: not counted
            seed = 100 + round_
            log = app.log.read_text()
            ticks_before, renders_before = len(re.findall(TICKS_READY, log)), len(re.findall(RENDERED, log))
            client.predict(True, *form(steps, size, 0.55, seed=seed), 1, api_name="/ui_generate")
            render = logged_seconds(app, RENDERED, renders_before)  # the server's own seconds, both
            ready = logged_seconds(app, TICKS_READY, ticks_before)
            started = time.perf_counter()
            client.predict(*form(steps, size, 0.3, seed=seed), api_name="/ui_release")
            tick = time.perf_counter() - started
            started = time.perf_counter()
            client.predict(*form(steps, size, 0.35, seed=seed), api_name="/ui_release")
            between = time.perf_counter() - started
            if round_:
                for figures, value in ((renders, render), (ticks, ready), (on_tick, tick), (off_tick, between)):
                    figures.append(value)
        rate, asked = scripted_drag(client, lambda gate: form(steps, size, gate, seed=999))
    section.add(f"one render ({steps} steps, as the server logs it): median of {len(renders)}",
                seconds(median(renders)))
    section.add("the 10 other ticks, one background batch (as the server logs it)", seconds(median(ticks)))
    section.add("**ticks ready / one render** (10 renders one after the other would be 10)",
                f"**{median(ticks) / median(renders):.2f}**")
    section.add("release on a tick (shown and kept) / release between ticks (a render)",
                f"{seconds(median(on_tick))} / {seconds(median(off_tick))} = "
                f"{median(on_tick) / median(off_tick):.2f}")
    section.add(f"scripted drag ({DRAG_S:.0f} s at {DRAG_HZ:.0f} positions/s, {asked} asked for): fresh renders shown",
                f"{rate:.1f} per second")
    section.notes.append("the tiny profile's renders are milliseconds of model and mostly the server's own overhead; "
                         "the GPU check measures the same on sd15-fast (drag_renders_per_s)")
    section.data = dict(steps=steps, size=size, render=renders, ticks_ready=ticks, release_on_tick=on_tick,
                        release_between_ticks=off_tick, drag_renders_per_s=rate, drag_requests=asked)
    return section
