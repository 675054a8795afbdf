"""Handler tests with a fake engine: no model, no server. They call the handlers as Gradio would."""
from __future__ import annotations

import asyncio
import re
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from flexip_core.generation.gate import GateSchedule
from flexip_core.generation.settings import MAX_SEED, Generation
from tests.ui_fixtures import FakeEngine, bad_uploads, odd_mode_uploads, png_bytes
from ui import handlers
from ui.engine import Done, Step, stream_render
from ui.gallery import Gallery
from ui.handlers import API_NAMES, ensure_loaded, parse_prompts, read_form
from ui.layout import bind
from ui.state import Session, Studio, read_png_generation


def collect(agen) -> list[dict]:
    async def run():
        return [values async for values in agen]

    return asyncio.run(run())


def on_screen(update):
    """What an output shows: a gr.update's value, or the value itself."""
    return update["value"] if isinstance(update, dict) and update.get("__type__") == "update" else update


def form(**changes) -> dict:
    """The generation controls' values, keyed as the UI's handlers get them (ui.handlers.CONTROLS)."""
    values = dict(prompt="a toy on the beach", negative_prompt="", gate=0.5, strength=1.0, seed=7,
                  num_inference_steps=3, guidance_scale=7.5, width=64, height=64, scheduler="dpmpp_2m", pres_from=0.0,
                  pres_until=1.0, pers_from=0.0, pers_until=1.0)
    return {**values, **changes}


def refusal(agen, match: str) -> list[dict]:
    """The updates of a UI handler that refuses: one toast (a warning outside a server) and a line saying why,
    never gr.Error (whose badges would cover the controls)."""
    with pytest.warns(UserWarning) as caught:
        updates = collect(agen)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and re.search(match, messages[0]), messages
    assert re.search(f"not rendered: .*{match}", updates[-1]["info"]), updates[-1]
    return updates


def run_api(endpoint, studio: Studio, **arguments) -> dict:
    """An API endpoint's function, called as Gradio would (without a progress bar)."""
    return asyncio.run(endpoint(studio, progress=None, **arguments))


def api_form(**changes) -> dict:
    """The same values under the API's argument names (steps, guidance, identity_early, the rest as named)."""
    return {API_NAMES.get(name, name): value for name, value in form(**changes).items()}


@pytest.fixture
def studio(tmp_path) -> Studio:
    return Studio(engine=FakeEngine(), folder=tmp_path / "app")


@pytest.fixture
def session(studio, photo) -> Session:
    session = Session()
    handlers.add_photos(studio, session=session, files=[photo])
    return session


def save_result(image: Image.Image, parameters: dict, folder: Path) -> str:
    """A PNG with the parameters chunk, as the studio writes one (outside a gallery)."""
    from flexip_core.generation.metadata import save_png

    folder.mkdir(parents=True, exist_ok=True)
    return str(save_png(image, folder / "made.png", parameters))


def chunk(path: str) -> str:
    with Image.open(path) as image:
        return image.info["parameters"]


# --- subject photos -------------------------------------------------------------------------------
def test_add_photos_keeps_good_files_and_warns_about_each_bad_one_by_name(studio, photo, tmp_path):
    session = Session()
    handlers.add_photos(studio, session=session, files=[photo])
    bad = bad_uploads(tmp_path / "bad")
    with pytest.warns(UserWarning) as caught:
        values = handlers.add_photos(studio, session=session, files=[str(path) for path, _ in bad.values()])
    messages = [str(w.message) for w in caught]
    for name, (_, reason) in bad.items():
        assert any(name in m and reason in m for m in messages), (name, messages)
    assert [p.name for p in session.photos] == ["red_toy.png"]  # the earlier upload stays
    assert values["files"] is None and values["slot0"]["visible"] and not values["slot1"]["visible"]


def test_a_flat_photo_is_kept_with_a_warning_in_the_panel_and_the_api(studio, photo, tmp_path):
    from PIL import Image as PILImage

    blank = tmp_path / "transparent.png"
    PILImage.new("RGBA", (64, 64), (255, 0, 0, 0)).save(blank)  # fully transparent: white once composited
    session = Session()
    with pytest.warns(UserWarning, match="transparent.png: the photo is one flat colour, so it shows no subject"):
        handlers.add_photos(studio, session=session, files=[str(blank)])
    assert [p.flat for p in session.photos] == [True]
    handlers.add_photos(studio, session=session, files=[photo])  # a real photo: no warning, not flat
    assert [p.flat for p in session.photos] == [True, False]
    values = run_api(handlers.api_generate, studio, photos=[str(blank), photo], weights="", **api_form())
    assert values["api_parameters"][0]["warnings"] == [
        "transparent.png: the photo is one flat colour, so it shows no subject to keep"]


def test_odd_modes_and_exif_orientation_become_rgb_photos(studio, tmp_path):
    session = Session()
    odd = odd_mode_uploads(tmp_path / "odd")
    with pytest.warns(UserWarning, match="one flat colour") as flat:  # single-colour files: accepted, with a note
        handlers.add_photos(studio, session=session, files=[str(p) for p, _ in list(odd.values())[:4]])
    assert len(session.photos) == 4 and len(flat) == 4
    rotated, size = odd["rotated.jpg"]
    session = Session()
    with pytest.warns(UserWarning, match="rotated.jpg: the photo is one flat colour"):
        handlers.add_photos(studio, session=session, files=[str(rotated)])
    with Image.open(session.photos[0].path) as stored:
        assert stored.mode == "RGB" and stored.size == size
    with Image.open(session.photos[0].view) as view:
        assert view.size == (224, 224)


def test_photo_limit_duplicates_and_remove(studio, photo, tmp_path):
    session = Session()
    paths = []
    for i in range(studio.max_photos + 1):
        path = tmp_path / f"p{i}.png"
        path.write_bytes(png_bytes(colour=(i * 40, 10, 10)))
        paths.append(str(path))
    with pytest.warns(UserWarning, match="at most"):
        handlers.add_photos(studio, session=session, files=paths)
    assert len(session.photos) == studio.max_photos
    with pytest.warns(UserWarning, match="already in the subject"):
        handlers.add_photos(studio, session=session, files=[paths[0]])
    values = handlers.remove_photo(studio, session=session, index=0)
    assert len(session.photos) == studio.max_photos - 1 and not values[f"slot{studio.max_photos - 1}"]["visible"]


def test_weights_are_checked_and_reach_the_engine(studio, session, photo):
    refusal(handlers.generate(studio, session=session, lock_seed=True, **form(weight0=0)), "weight 0")
    collect(handlers.generate(studio, session=session, lock_seed=True, **form(weight0=0.5)))
    assert studio.engine.calls[-1].weights == (0.5,)


def test_an_example_sets_the_subject_and_prompt(studio, session):
    from ui.files import EXAMPLES

    updates = collect(handlers.example(studio, session=session, name=EXAMPLES[0].name, gates_text="0, 1",
                                       **form(prompt="other", weight0=0.3)))
    assert [p.name for p in session.photos] == [f"{EXAMPLES[0].name}.png"] and session.photos[0].weight == 1.0
    assert updates[0]["prompt"] == EXAMPLES[0].prompt and updates[0]["tabs"]["selected"] == "sweep"
    call = studio.engine.calls[-1]  # its sweep renders with its prompt, in the sweep tab brought to the front
    assert call.generation.prompt == EXAMPLES[0].prompt and call.gates == (0.0, 1.0)
    assert [caption for _, caption in updates[-1]["sweep_gallery"]][0] == "reference"


# --- generation -----------------------------------------------------------------------------------
def test_generate_streams_previews_then_a_png_with_its_settings(studio, session):
    studio.engine.step_delay = 0.2  # time to read each preview; an instant render goes straight to its final image
    updates = collect(handlers.generate(studio, session=session, lock_seed=True, **form(gate=0.3)))
    previews = [u for u in updates if isinstance(on_screen(u.get("result")), Image.Image)]
    assert previews  # at most four a second, the newest step each time
    assert all(re.search(r"step [123] of 3", p["info"]) for p in previews)
    final = updates[-1]
    made, params = read_png_generation(on_screen(final["result"]))  # the PNG carries the Generation that made it
    assert made == session.history[0].generation == read_form(form(gate=0.3)) and params["profile"] == "fake"
    assert (made.seed, made.gate, made.num_inference_steps, made.prompt) == (7, 0.3, 3, "a toy on the beach")
    assert final["compare"] == (session.photos[0].view, on_screen(final["result"]))
    assert final["history"][0][1].startswith("γ 0.30 · seed 7 · id 0.62")
    assert "identity score **0.620** (CLIP cosine with the subject)" in final["info"]
    assert len(studio.engine.calls) == 1 and studio.engine.calls[0].gates == (0.3,)


def test_a_prompt_cut_off_by_the_text_encoder_is_said_in_the_info_line_and_the_api(studio, session, photo):
    long = "a toy " * 40  # 80 words: over the fake's 77
    with pytest.warns(UserWarning, match="so the end was cut off"):  # gr.Warning, outside a server: also a toast
        final = collect(handlers.generate(studio, session=session, lock_seed=True, **form(prompt=long)))[-1]
    assert "⚠ prompt is 80 tokens; the text encoder takes 77, so the end was cut off" in final["info"]
    assert session.history[0].warnings  # still said when the result is shown again from the history
    assert "cut off" in handlers.describe(session.history[0])
    short = collect(handlers.generate(studio, session=session, lock_seed=True, **form()))[-1]
    assert "⚠" not in short["info"]
    values = run_api(handlers.api_generate, studio, photos=[photo], weights="", **api_form(prompt=long))
    assert values["api_parameters"][0]["warnings"] == [  # the API says it in the result, with no toast
        "prompt is 80 tokens; the text encoder takes 77, so the end was cut off"]


def test_a_warning_every_render_repeats_is_a_toast_once_per_subject_and_stays_in_the_line(studio, session, tmp_path):
    import warnings

    long = "a toy " * 40
    with pytest.warns(UserWarning, match="cut off"):
        collect(handlers.generate(studio, session=session, lock_seed=True, **form(prompt=long)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second toast would raise here
        again = collect(handlers.release(studio, session=session, **form(prompt=long, gate=0.9)))
        grid = collect(handlers.grid(studio, session=session, prompts_text=f"{long}\n{'a cat ' * 40}",
                                     gates_text="0, 1", **form()))
    assert "cut off" in again[-1]["info"] and "row 2" in grid[-1]["info"]
    other = tmp_path / "blue.png"
    other.write_bytes(png_bytes(colour=(20, 20, 200)))
    handlers.add_photos(studio, session=session, files=[str(other)])  # another subject: told once more
    with pytest.warns(UserWarning, match="cut off"):
        collect(handlers.generate(studio, session=session, lock_seed=True, **form(prompt=long)))


def test_unlocked_seed_is_new_each_run_and_shown(studio, session):
    first = collect(handlers.generate(studio, session=session, lock_seed=False, **form()))
    second = collect(handlers.generate(studio, session=session, lock_seed=False, **form()))
    seeds = [first[0]["seed"], second[0]["seed"]]
    assert seeds[0] != seeds[1]
    assert [c.generation.seed for c in studio.engine.calls] == seeds
    assert f"seed {seeds[1]}" in second[-1]["info"]


def test_errors_are_a_toast_and_the_line_and_leave_the_screen_and_the_session(studio, session):
    first = collect(handlers.generate(studio, session=session, lock_seed=True, **form()))[-1]
    for changes, words in ((dict(num_inference_steps=0), "num_inference_steps"), (dict(prompt="  "), "prompt is empty"),
                           (dict(guidance_scale=None), "enter a number"), (dict(width=100), "multiple of 8")):
        updates = refusal(handlers.generate(studio, session=session, lock_seed=True, **form(**changes)), words)
        shown = {name for update in updates for name in update}
        assert shown <= {"seed", "info", "result", "compare", "clip"}, shown  # nothing else is touched
        kept = on_screen(first["result"])
        assert on_screen(updates[-1].get("result", kept)) == kept  # the last image stays (or goes back)
        assert updates[-1]["info"].endswith("showing **seed 7** · γ 0.50")
    refusal(handlers.generate(studio, session=Session(), lock_seed=True, **form()), "add at least one photo")
    assert len(session.history) == 1 and len(session.photos) == 1


def test_a_render_that_fails_half_way_puts_the_last_image_back(studio, session):
    collect(handlers.generate(studio, session=session, lock_seed=True, **form(gate=0.2)))
    before = session.current.path
    studio.engine.step_delay = 0.3
    original = studio.engine.render

    def fails_after_a_step(*args, on_step=None, **kwargs):
        def step(done, *values):
            on_step(done, *values)
            if done == 2:
                raise RuntimeError("out of device memory")
        return original(*args, on_step=step, **kwargs)

    studio.engine.render = fails_after_a_step
    updates = refusal(handlers.generate(studio, session=session, lock_seed=True, **form(gate=0.9)),
                      "RuntimeError: out of device memory")
    assert isinstance(on_screen(updates[1]["result"]), Image.Image)  # a preview was on screen ...
    assert on_screen(updates[-1]["result"]) == before and session.current.path == before  # ... and the last is back


def test_old_files_are_pruned_and_reused_photos_kept(studio, session, photo):
    import os
    import time

    from ui.files import prune

    old = time.time() - 2 * 86400
    for path in (session.photos[0].path, session.photos[0].view):
        os.utime(path, (old, old))
    handlers.add_photos(studio, session=Session(), files=[photo])  # the same photo again: its files are renewed
    assert prune(studio.folder, 86400) == 0
    for path in (session.photos[0].path, session.photos[0].view):
        os.utime(path, (old, old))
    assert prune(studio.folder, 86400) == 2
    refusal(handlers.generate(studio, session=session, lock_seed=True, **form()), "red_toy.png: this photo has expired")


def test_models_load_once_even_when_asked_concurrently(studio):
    async def twice():
        await asyncio.gather(ensure_loaded(studio), ensure_loaded(studio))

    asyncio.run(twice())
    asyncio.run(ensure_loaded(studio))
    assert studio.engine.loads == 1


def test_header_says_what_the_profile_draws_before_and_after_loading(studio):
    before = handlers.status(studio)
    assert "models loading" in before["status"] and before["timer"].active
    asyncio.run(ensure_loaded(studio))
    after = handlers.status(studio)
    assert after["status"].endswith(f"models ready · *{studio.engine.description()}*")
    assert not after["timer"].active


def test_a_failed_load_is_said_in_the_header_which_stops_polling_and_a_later_render_retries(studio, session):
    studio.engine.load_error = "base: the folder /x does not hold a StableDiffusionPipeline"
    updates = refusal(handlers.generate(studio, session=session, lock_seed=True, **form()),
                      "could not be loaded: base: the folder /x")
    assert "loading the fake models (first run only)" in updates[0]["info"]  # the line says what it waits for
    with pytest.raises(handlers.NotLoaded, match="could not be loaded"):
        asyncio.run(ensure_loaded(studio))
    failed = handlers.status(studio)
    assert "models could not be loaded: base: the folder /x" in failed["status"] and not failed["timer"].active
    studio.engine.load_error = None  # say the file appeared (a download finished): the next render loads
    asyncio.run(ensure_loaded(studio))
    assert "models ready" in handlers.status(studio)["status"]


def test_the_core_engine_keeps_why_its_models_did_not_load(tmp_path):
    from ui.engine import CoreEngine

    engine = CoreEngine("tiny", {"base": str(tmp_path)})  # a folder without a model
    assert engine.failure() is None
    with pytest.raises(ValueError):
        engine.load()
    assert "does not hold a StableDiffusionPipeline" in engine.failure() and not engine.ready()
    assert "could not be loaded: base: the folder" in handlers.status(Studio(engine, tmp_path / "app"))["status"]


def test_the_offline_default_says_it_draws_toys_without_loading_its_models():
    from ui.engine import CoreEngine

    engine = CoreEngine("mini")
    assert "it draws toy shapes, not photos" in engine.description() and not engine.ready()


# --- the live slider ------------------------------------------------------------------------------
def test_peek_shows_the_nearest_render_without_computing(studio, session):
    collect(handlers.sweep(studio, session=session, gates_text="0, 0.5, 1", **form()))
    requests = len(studio.engine.calls)
    values = handlers.peek(studio, session=session, **form(gate=0.62, weight0=1.0))
    assert "nearest rendered γ 0.50" in values["info"] and on_screen(values["result"]).endswith(".png")
    assert "FlexIP gate: 0.5," in chunk(on_screen(values["result"]))
    assert on_screen(handlers.peek(studio, session=session, **form(gate=0.9))["result"]) == session.exact(
        read_form(form(gate=1.0))).path
    for other in (dict(seed=8), dict(prompt="other")):  # nothing rendered with these: the last image, said so
        values = handlers.peek(studio, session=session, **form(gate=0.6, **other))
        assert on_screen(values["result"]) == session.current.path and values["info"] == (
            "let go of the slider to render γ 0.60 · showing **seed 7** · γ 0.50 (other settings)")
    assert handlers.peek(studio, session=session, **form(gate=None)) == {}  # an empty box: nothing to show yet
    assert len(studio.engine.calls) == requests


def test_a_slider_move_to_another_gamma_ends_the_render_in_flight_quietly(studio, session):
    """Moving the slider halts an image render at another γ at its next step, without a stopped message (what the move
    shows stays); a move to the γ being rendered (a late event of the same gesture) leaves it alone."""
    studio.engine.step_delay = 0.05

    async def scenario():
        updates = []

        async def consume():
            async for values in handlers.release(studio, session=session, **form(gate=0.8, num_inference_steps=60)):
                updates.append(values)

        task = asyncio.create_task(consume())
        while session.run is None or "step" not in session.run.progress:
            await asyncio.sleep(0.01)
        handlers.peek(studio, session=session, **form(gate=0.8, weight0=1.0))
        await asyncio.sleep(0.2)
        assert not studio.engine.cancelled.is_set() and not task.done()
        handlers.peek(studio, session=session, **form(gate=0.3, weight0=1.0))
        await asyncio.wait_for(task, 5)
        return updates

    updates = asyncio.run(scenario())
    assert studio.engine.cancelled.is_set() and session.run is None and not session.history
    assert not any("stopped" in values.get("info", "") for values in updates)


def test_release_renders_with_the_same_seed_or_reuses_an_exact_render(studio, session):
    collect(handlers.generate(studio, session=session, lock_seed=True, **form(seed=11, gate=0.5)))
    collect(handlers.release(studio, session=session, **form(seed=11, gate=0.8)))
    assert [(c.generation.seed, c.gates) for c in studio.engine.calls] == [(11, (0.5,)), (11, (0.8,))]
    updates = collect(handlers.release(studio, session=session, **form(seed=11, gate=0.5)))
    assert len(studio.engine.calls) == 2 and len(updates) == 1 and "0.50" in updates[0]["info"]


def past_step(run, step: int = 3) -> bool:
    """Whether the render in flight is at `step` or later (previews come at most four a second, so a given step
    may pass between two of them)."""
    done = re.search(r"step (\d+) of", run.progress)
    return done is not None and int(done.group(1)) >= step


async def stop_half_way(handler, studio: Studio, session: Session, when=past_step, **arguments):
    """Run a UI handler as Gradio does and press Stop once `when(run)` holds: Stop halts the render, which ends at
    its next step with the stopped state as the handler's own last answer; Stop itself answers nothing. Returns the
    handler's updates before that answer, and the answer."""
    updates: list[dict] = []
    reached = asyncio.Event()

    async def consume():
        async for values in handler(studio, session=session, **arguments):
            updates.append(values)
            if session.run is not None and when(session.run):
                reached.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(reached.wait(), 30)
    assert await handlers.stop(studio, session=session) == {}  # the render's handler answers
    await asyncio.wait_for(task, 5)  # it ended by itself, not by a cancel
    assert session.run is None and session.cancelled is None
    return updates[:-1], updates[-1]


def test_stop_puts_the_last_image_back_and_says_where_the_render_stopped(studio, session):
    first = collect(handlers.generate(studio, session=session, lock_seed=True, **form(gate=0.2)))[-1]
    studio.engine.step_delay = 0.1
    updates, shown = asyncio.run(stop_half_way(handlers.generate, studio, session, lock_seed=True,
                                               **form(gate=0.8, num_inference_steps=50)))
    assert any(isinstance(on_screen(update.get("result")), Image.Image) for update in updates)  # previews were shown
    assert studio.engine.cancelled.wait(2.0)  # the engine stopped within a step
    assert on_screen(shown["result"]) == on_screen(first["result"]) and shown["compare"] == first["compare"]
    assert re.match(r"\*\*seed 7\*\* · γ 0.80 · \*\*stopped\*\* at step \d+ of 50 · showing the last finished image: "
                    r"\*\*seed 7\*\* · γ 0.20", shown["info"]), shown["info"]
    assert len(session.history) == 1 and session.current.generation.gate == 0.2
    nothing = asyncio.run(handlers.stop(studio, session=session))  # Stop with nothing rendering says so
    assert nothing == {"info": "**stopped** · no render was under way · showing **seed 7** · γ 0.20"}


def test_a_stopped_sweep_puts_the_previous_sweep_and_its_zip_back(studio, session):
    before = collect(handlers.sweep(studio, session=session, gates_text="0, 1", **form()))[-1]
    studio.engine.step_delay = 0.1
    updates, shown = asyncio.run(stop_half_way(handlers.sweep, studio, session, gates_text="0, 0.5, 1",
                                               **form(num_inference_steps=50)))
    assert [caption for _, caption in updates[-1]["sweep_gallery"]] == ["γ 0.00", "γ 0.50", "γ 1.00"]  # previews
    assert shown["sweep_gallery"] == before["sweep_gallery"] and shown["sweep_zip"]["interactive"]
    assert shown["sweep_zip"]["value"] == before["sweep_zip"]["value"]
    assert re.match(r"γ sweep · \*\*seed 7\*\* · \*\*stopped\*\* at step \d+ of 50 · the γ sweep tab shows the "
                    "previous sweep", shown["info"])


def test_a_stopped_grid_keeps_its_finished_rows_with_their_zip(studio, session):
    studio.engine.step_delay = 0.05
    updates, shown = asyncio.run(stop_half_way(handlers.grid, studio, session, when=lambda _: session.grid_rows,
                                               prompts_text="a dog\na cat\na fox", gates_text="0, 1",
                                               **form(num_inference_steps=20)))
    assert shown["grid_view"].count("<img") == 2 * len(session.grid_rows) and shown["grid_zip"]["interactive"]
    with zipfile.ZipFile(shown["grid_zip"]["value"]) as archive:
        assert len(archive.namelist()) == 2 * len(session.grid_rows)
    assert re.search(r"\*\*stopped\*\* at prompt 2 of 3 · step \d+ of 20 · the grid shows its 1 row finished",
                     shown["info"])


def test_a_history_click_during_a_render_shows_that_result_after_the_render_has_ended(studio, session):
    collect(handlers.generate(studio, session=session, lock_seed=True, **form(gate=0.2)))
    studio.engine.step_delay = 0.1
    updates: list[dict] = []

    async def click_during_a_render():
        async def consume():
            async for values in handlers.release(studio, session=session, **form(gate=0.92, num_inference_steps=50)):
                updates.append(values)

        task = asyncio.create_task(consume())
        while not any(isinstance(on_screen(update.get("result")), Image.Image) for update in updates):
            await asyncio.sleep(0.02)
        click = asyncio.create_task(handlers.select_history(
            studio, gr.SelectData(None, {"index": 0, "value": None}), session=session))
        await asyncio.sleep(0.05)
        task.cancel()  # the click cancels the render (layout: cancels=...)
        return await click

    picked = asyncio.run(click_during_a_render())
    assert picked["gate"] == 0.2 and on_screen(picked["result"]) == session.history[0].path and session.run is None
    assert picked["info"].startswith("**seed 7** · γ 0.20")


def test_previews_reach_the_page_at_most_four_times_a_second_and_the_line_counts_every_step():
    engine = FakeEngine(step_delay=0.01)
    photo = [Image.new("RGB", (32, 32))]
    seen: list[int] = []

    async def run():
        stream = stream_render(engine, photo, [1.0], Generation(prompt="x", num_inference_steps=60), [0.5],
                               preview_every=handlers.PREVIEW_EVERY_S, on_step=lambda step: seen.append(step.step))
        started = asyncio.get_running_loop().time()
        events = [event async for event in stream]
        return events, asyncio.get_running_loop().time() - started

    events, seconds = asyncio.run(run())
    previews = [event for event in events if isinstance(event, Step)]
    assert isinstance(events[-1], Done) and 1 <= len(previews) <= seconds / handlers.PREVIEW_EVERY_S + 1
    assert seen[-1] == 60 and len(seen) > len(previews)


def test_a_photo_is_decoded_once_while_it_is_used(studio, session):
    from ui.state import open_photo

    collect(handlers.generate(studio, session=session, lock_seed=True, **form()))
    first = studio.engine.calls[-1].references[0]
    collect(handlers.generate(studio, session=session, lock_seed=True, **form(gate=0.7)))
    assert studio.engine.calls[-1].references[0] is first is open_photo(studio, session.photos[0])


def test_the_slot_hint_shows_only_with_photos(studio, photo):
    session = Session()
    assert not handlers.remove_photo(studio, session=session, index=0)["slots_hint"]["visible"]
    assert handlers.add_photos(studio, session=session, files=[photo])["slots_hint"]["visible"]
    assert not handlers.remove_photo(studio, session=session, index=0)["slots_hint"]["visible"]


def test_cancelling_the_consumer_stops_the_render_within_a_step():
    engine = FakeEngine(step_delay=0.05)
    photo = [Image.new("RGB", (32, 32))]

    async def consume_two_steps():
        stream = stream_render(engine, photo, [1.0], Generation(prompt="x", num_inference_steps=200), [0.5])
        events = [await anext(stream), await anext(stream)]
        await stream.aclose()
        return events

    events = asyncio.run(consume_two_steps())
    assert all(isinstance(e, Step) for e in events)
    assert engine.cancelled.wait(2.0)


def test_stream_render_reports_engine_errors_and_results():
    engine = FakeEngine()
    photo = [Image.new("RGB", (32, 32))]

    async def run(generation, gates):
        return [event async for event in stream_render(engine, photo, [1.0], generation, gates)]

    events = asyncio.run(run(Generation(prompt="x", num_inference_steps=2), [0.2, 0.9]))
    assert isinstance(events[-1], Done) and [r.generation.gate for r in events[-1].results] == [0.2, 0.9]
    assert [r.parameters["gate"] for r in events[-1].results] == [0.2, 0.9]
    with pytest.raises(ValueError, match="gate"):
        asyncio.run(run(Generation(prompt="x"), [2.0]))


# --- sweep, grid, export --------------------------------------------------------------------------
def test_sweep_is_one_batched_call_with_a_zip_of_pngs(studio, session):
    updates = collect(handlers.sweep(studio, session=session, gates_text="0, .25, .5, .75, 1", **form(gate=0.7)))
    assert [r.gates for r in studio.engine.calls] == [(0.0, 0.25, 0.5, 0.75, 1.0)]
    final = updates[-1]
    captions = [caption for _, caption in final["sweep_gallery"]]
    assert captions[:3] == ["reference", "γ 0.00 · id 0.50", "γ 0.25 · id 0.60"] and len(captions) == 6
    assert "γ 0.75" in final["info"]  # the large result is the render nearest the slider
    with zipfile.ZipFile(final["sweep_zip"]["value"]) as archive:
        names = archive.namelist()
        assert len(names) == 5 and all(n.endswith(".png") for n in names)
        assert b"FlexIP gate: 0.25" in archive.read(names[1])


def test_a_sequential_sweep_renders_one_image_at_a_time(studio, session):
    collect(handlers.sweep(studio, session=session, gates_text="0, 0.5, 1", sequential_sweep=True, **form()))
    assert [r.gates for r in studio.engine.calls] == [(0.0,), (0.5,), (1.0,)]


def test_grid_renders_each_prompt_as_one_batch(studio, session):
    updates = collect(handlers.grid(studio, session=session, prompts_text="a dog\n\na cat in snow",
                                      gates_text="0, 1", **form()))
    rows = [(c.generation.prompt, c.gates) for c in studio.engine.calls]
    assert rows == [("a dog", (0.0, 1.0)), ("a cat in snow", (0.0, 1.0))]
    tables = [u["grid_view"] for u in updates if "grid_view" in u]
    assert len(tables) == 3 and tables[0].count("<img") == 2 and tables[-1].count("<img") == 4  # each row at once
    table = tables[-1]  # labelled: γ on top, prompts down the left, each tile with its identity score
    assert re.findall(r"<th>(γ [\d.]+)</th>", table) == ["γ 0.00", "γ 1.00"]
    assert re.findall(r'<th scope="row"><b>(\d)</b> ([^<]+)</th>', table) == [("1", "a dog"), ("2", "a cat in snow")]
    assert re.findall(r"<span>(id [\d.]+)</span>", table) == ["id 0.50", "id 0.90"] * 2
    assert "--rows: 2" in table and updates[-1]["grid_zip"]["interactive"]
    assert updates[-1]["info"].endswith("row 1: *a dog* · row 2: *a cat in snow*")
    before = len(studio.engine.calls)
    updates = refusal(handlers.grid(studio, session=session, prompts_text="a", gates_text="0, 3", **form()),
                      "outside 0")
    assert "grid_view" not in updates[-1] and len(studio.engine.calls) == before  # the grid on screen stays
    refusal(handlers.grid(studio, session=session, prompts_text="a\nb", gates_text="0", **form(width=7)), "width")


def test_a_prompt_in_the_grid_is_shown_as_text():
    from ui.state import Result

    path = save_result(Image.new("RGB", (8, 8)), {"gate": 0.0}, Path(__import__("tempfile").mkdtemp()))
    cell = Result(path=path, generation=Generation(prompt="x"), identity=None, subject="s")
    table = handlers.grid_table([("<b>bold</b> & co", [cell])])
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in table and "<span></span>" in table


def test_history_click_and_png_drop_restore_the_settings(studio, session):
    collect(handlers.generate(studio, session=session, lock_seed=True, **form(seed=21, gate=0.25,
                                                                               num_inference_steps=2)))
    collect(handlers.generate(studio, session=session, lock_seed=True, **form(seed=22, gate=0.75)))
    picked = asyncio.run(handlers.select_history(studio, gr.SelectData(None, {"index": 1, "value": None}),
                                                 session=session))
    assert (picked["seed"], picked["gate"], picked["num_inference_steps"]) == (21, 0.25, 2)
    assert "lock_seed" not in picked  # the history restores settings and leaves the lock as it is ...
    assert picked["info"].endswith("its settings are back in the controls")
    png = session.history[1].path
    restored = handlers.restore_png(studio, file=png)  # ... a dropped PNG locks the seed, and says so
    assert (restored["seed"], restored["gate"], restored["num_inference_steps"], restored["lock_seed"]) == (
        21, 0.25, 2, True)
    assert "seed 21 (locked)" in restored["info"]
    studio.engine.profile = "sd15"  # a PNG from another profile restores too, with a warning
    with pytest.warns(UserWarning, match="made with profile 'fake'"):
        handlers.restore_png(studio, file=png)


def test_png_without_settings_is_refused_by_name(studio, tmp_path):
    plain = tmp_path / "plain.png"
    plain.write_bytes(png_bytes())
    text = tmp_path / "notes.png"
    text.write_bytes(b"hello")
    for path, words in ((plain, "plain.png: this PNG carries no FlexIP settings"), (text, "notes.png")):
        with pytest.warns(UserWarning) as caught:  # one toast, and the line; the controls are left alone
            values = handlers.restore_png(studio, file=str(path))
        assert len(caught) == 1 and str(caught[0].message).startswith(words)
        assert values == {"restore_file": None, "info": f"✕ settings not restored: {caught[0].message}"}


def test_a_generation_survives_the_png_round_trip_into_the_controls(studio, tmp_path):
    """The value the controls make is the one the PNG carries and the one a dropped PNG puts back."""
    made = Generation(prompt="a, b", negative_prompt="blur", gate=0.35, strength=1.2, seed=99,
                      num_inference_steps=12, guidance_scale=5.5, width=96, height=64, scheduler="euler_a",
                      windows=GateSchedule(pres_until=0.4))
    path = save_result(Image.new("RGB", (96, 64)), made.to_parameters(), tmp_path)
    assert read_png_generation(path)[0] == made
    restored = handlers.restore_png(studio, file=path)
    controls = {name: value for name, value in restored.items() if name in handlers.CONTROLS}
    assert controls == {**form(), **dict(prompt="a, b", negative_prompt="blur", gate=0.35, strength=1.2, seed=99,
                                         num_inference_steps=12, guidance_scale=5.5, width=96, height=64,
                                         scheduler="euler_a", pres_until=0.4)}
    assert read_form(controls) == made  # identity_early is the window's pres_until, end to end


def test_a_png_of_another_mode_restores_the_mode_and_asks_for_its_picture(studio, tmp_path):
    made = Generation(prompt="a toy", windows=GateSchedule(pers_from=0.2), task="image-to-image",
                      task_inputs=(("image", "abc"), ("strength", 0.35)), height=None, width=None)
    path = save_result(Image.new("RGB", (64, 64)), made.to_parameters(), tmp_path)
    with pytest.warns(UserWarning, match="made in the start image mode, whose picture is not in the PNG"):
        restored = handlers.restore_png(studio, file=path)
    assert restored["prompt"] == "a toy" and restored["pers_from"] == 0.2  # every branch window has its control
    assert restored["mode"] == "start_image" and restored["denoise"] == 0.35


# --- modes: start image, inpaint, control ----------------------------------------------------------------
def scene_png(tmp_path, size=(96, 64)) -> str:
    path = tmp_path / "scene.png"
    image = Image.new("RGB", size, (40, 90, 160))
    image.paste((230, 230, 230), (10, 10, 50, 40))  # something with edges
    image.save(path)
    return str(path)


def mask_png(tmp_path, size=(96, 64), box=(30, 20, 70, 50), name="mask.png") -> str:
    path = tmp_path / name
    mask = Image.new("L", size, 0)
    if box is not None:
        mask.paste(255, box)
    mask.save(path)
    return str(path)


def mode_form(mode: str, **values) -> dict:
    return {**form(), **handlers.TEXT_MODE, "mode": mode, **values}


def test_each_mode_renders_with_its_inputs_and_records_them(studio, session, tmp_path):
    scene = scene_png(tmp_path)
    cases = {"start_image": dict(mode_image=scene, denoise=0.4), "inpaint": dict(scene=scene, mask=mask_png(tmp_path)),
             "control": dict(mode_image=scene, control_scale=0.7)}
    for mode, values in cases.items():
        collect(handlers.generate(studio, session=session, lock_seed=True, **mode_form(mode, width=96, **values)))
        call = studio.engine.calls[-1]
        assert call.task.mode == mode and call.generation.task == call.task.task
        inputs = dict(call.generation.task_inputs)
        assert len(inputs["image"]) == 12  # the picture's digest: renders of other pictures are told apart
        assert {"start_image": inputs.get("strength") == 0.4, "inpaint": "mask_image" in inputs,
                "control": inputs.get("controlnet_conditioning_scale") == 0.7 and inputs["control"] == "canny"}[mode]
        assert "parameters" in Image.open(session.current.path).info  # saved with its settings
    sizes = {c.task.mode: (c.generation.width, c.generation.height) for c in studio.engine.calls}
    assert sizes == {"start_image": (None, None), "inpaint": (96, 64), "control": (96, 64)}  # fitted to the longer side
    for mode, values in cases.items():  # a history click puts the mode and its settings back
        index = next(i for i, r in enumerate(session.history) if r.generation.task == handlers.MODES[mode])
        restored = asyncio.run(handlers.select_history(studio, gr.SelectData(None, {"index": index, "value": None}),
                                                       session=session))
        assert restored["mode"] == mode


def test_the_sweep_and_the_grid_run_in_a_mode(studio, session, tmp_path):
    values = mode_form("control", mode_image=scene_png(tmp_path), control_scale=0.4)
    collect(handlers.sweep(studio, session=session, gates_text="0, 1", **values))
    collect(handlers.grid(studio, session=session, prompts_text="a toy\na toy at night", gates_text="0, 1", **values))
    calls = studio.engine.calls
    assert [c.gates for c in calls] == [(0.0, 1.0)] * 3 and all(c.task.mode == "control" for c in calls)
    assert {dict(c.generation.task_inputs)["controlnet_conditioning_scale"] for c in calls} == {0.4}


def test_a_new_picture_is_never_taken_for_the_last_one(studio, session, tmp_path):
    scene = scene_png(tmp_path)
    other = tmp_path / "other.png"
    Image.new("RGB", (96, 64), (200, 10, 10)).save(other)
    collect(handlers.release(studio, session=session, **mode_form("start_image", mode_image=scene)))
    collect(handlers.release(studio, session=session, **mode_form("start_image", mode_image=scene)))
    assert len(studio.engine.calls) == 1  # the same picture and settings: the render is reused
    collect(handlers.release(studio, session=session, **mode_form("start_image", mode_image=str(other))))
    assert len(studio.engine.calls) == 2
    peeked = handlers.peek(studio, session=session, **{**form(gate=0.52), "mode": "start_image"})
    assert "nearest rendered γ 0.50" in peeked["info"]  # the slider finds that mode's renders without the picture


@pytest.mark.parametrize("mode, values, message", [
    ("start_image", dict(mode_image=None), "start image: no image given"),
    ("start_image", dict(denoise=0), "denoise must be a number in (0, 1]"),
    ("start_image", dict(denoise=1.5), "denoise must be a number in (0, 1]"),
    ("inpaint", dict(mask="EMPTY"), "mask: the mask is empty"),
    ("control", dict(control="depth"), "control must be one of canny"),
    ("control", dict(control_scale=3), "control_scale must be a number in [0, 2]"),
    ("sketch", dict(), "unknown mode 'sketch'"),
])
def test_bad_mode_input_is_refused_naming_it_and_nothing_renders(studio, session, tmp_path, mode, values, message):
    scene = scene_png(tmp_path)
    if values.get("mask") == "EMPTY":
        values = dict(mask=mask_png(tmp_path, box=None, name="empty.png"))
    defaults = dict(mode_image=scene, scene=scene, mask=mask_png(tmp_path))
    updates = refusal(handlers.generate(studio, session=session, lock_seed=True,
                                        **mode_form(mode, **{**defaults, **values})), re.escape(message))
    assert "not rendered" in updates[-1]["info"] and not studio.engine.calls


def test_a_mode_the_profile_cannot_run_says_why(studio, session, tmp_path):
    studio.engine.control_missing = "the mini profile names no ControlNet: the Control mode needs real weights"
    view = handlers.mode_view(studio, mode="control")
    assert "needs real weights" in view["mode_hint"]["value"] and view["edge_view"]["visible"]
    refusal(handlers.generate(studio, session=session, lock_seed=True,
                              **mode_form("control", mode_image=scene_png(tmp_path))), "needs real weights")
    assert not studio.engine.calls
    assert not handlers.mode_view(studio, mode="text")["scene"]["visible"]


def test_the_edge_map_is_shown_for_the_control_mode_only(studio, tmp_path):
    scene = scene_png(tmp_path)
    shown = handlers.edge_preview(studio, mode="control", mode_image=scene, control="canny", width=96, height=64)
    edges = np.asarray(shown["edge_view"])
    assert edges.shape[:2] == (64, 96) and edges.any() and not edges.all()
    assert handlers.edge_preview(studio, mode="start_image", mode_image=scene, control="canny", width=64,
                                 height=64)["edge_view"] is None


def test_the_api_modes_take_files_and_name_a_bad_input(studio, photo, tmp_path):
    scene, mask = scene_png(tmp_path), mask_png(tmp_path, size=(48, 32), box=(10, 10, 30, 25))
    out = run_api(handlers.api_inpaint, studio, photos=[photo], image=scene, mask=mask, **api_form())
    [parameters] = out["api_parameters"]
    assert parameters["task"] == "inpainting" and any("mask" in w and "resized" in w for w in parameters["warnings"])
    out = run_api(handlers.api_start_image, studio, photos=[photo], image=scene, denoise=0.3, **api_form())
    assert out["api_parameters"][0]["task_inputs"]["strength"] == 0.3
    out = run_api(handlers.api_control, studio, photos=[photo], image=scene, control="canny", control_scale=0.5,
                  **api_form())
    assert out["api_parameters"][0]["task_inputs"]["controlnet_conditioning_scale"] == 0.5
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(gr.Error, match="start image: "):
        run_api(handlers.api_start_image, studio, photos=[photo], image=str(broken), **api_form())
    with pytest.raises(gr.Error, match="mask: no image given|mask: "):
        run_api(handlers.api_inpaint, studio, photos=[photo], image=scene, mask=None, **api_form())


def test_branch_windows_come_from_the_controls_and_their_presets(studio, session):
    """Identity early / late / custom in Advanced settings: the windows reach the Generation (and the PNG)."""
    assert handlers.window_preset(preset="identity late") == {"pres_from": 0.5, "pres_until": 1.0}
    assert handlers.window_preset(preset="custom") == {}
    generation = read_form(form(pres_from=0.5, pres_until=1.0, pers_from=0.0, pers_until=0.8))
    assert generation.windows == GateSchedule(0.5, 1.0, 0.0, 0.8)
    updates = refusal(handlers.generate(studio, session=session, lock_seed=True, **form(pres_from=0.6, pres_until=0.6)),
                      "pres_from \\(0.6\\) must be below pres_until")
    assert [set(update) for update in updates] == [{"info"}]


def test_gate_and_prompt_lists_are_checked(studio, session):
    collect(handlers.sweep(studio, session=session, gates_text="0, .25;0.5 1", **form()))
    assert studio.engine.calls[-1].gates == (0.0, 0.25, 0.5, 1.0)
    for text, words in (("", "empty"), ("0, 0.5, banana, 2", "'banana' is not a number"), ("1.5", "outside"),
                        (",".join("0" * 10), "at most 9")):
        updates = refusal(handlers.sweep(studio, session=session, gates_text=text, **form()), words)
        assert [set(update) for update in updates] == [{"info"}]  # the previous sweep stays on screen
    assert len(studio.engine.calls) == 1
    with pytest.raises(ValueError, match="at most 4"):
        parse_prompts("a\nb\nc\nd\ne")


def test_a_negative_or_empty_seed_draws_one_in_the_one_seed_range():
    seeds = {read_form(form(seed=seed)).seed for seed in (-1, None, "", -1, -1)}
    assert len(seeds) > 1 and all(0 <= seed <= MAX_SEED for seed in seeds)
    assert read_form(form(seed=42)).seed == 42


def test_a_bad_setting_is_refused_before_the_models_load(studio, session):
    refusal(handlers.generate(studio, session=session, lock_seed=True, **form(height=1024)),
            "height must be a multiple of 8 from 64 to 512, got 1024")
    refusal(handlers.generate(studio, session=session, lock_seed=True, **form(pres_until=0)),
            "branch windows: pres_from \\(0\\) must be below pres_until \\(0\\)")
    assert studio.engine.loads == 0


# --- API handlers ----------------------------------------------------------------------------------
def test_api_generate_returns_pngs_and_parameters(studio, photo):
    values = run_api(handlers.api_generate, studio, photos=[photo], weights="", **api_form(gate=0.9))
    assert len(values["api_images"]) == 1 and values["api_parameters"][0]["gate"] == 0.9
    assert values["api_parameters"][0]["identity_score"] == pytest.approx(0.86)
    assert "FlexIP gate: 0.9" in chunk(values["api_images"][0])


def test_the_api_keeps_its_argument_names_and_answers_in_the_generation_names(studio, photo):
    """steps, guidance and identity_early (the API's public names) go straight into the Generation; each result's
    parameters are Generation.to_parameters() plus identity_score, file and warnings."""
    values = run_api(handlers.api_sweep, studio, photos=[photo], gates="0, 1",
                     **api_form(steps=2, guidance=3.5, identity_early=0.4))
    call = studio.engine.calls[-1]
    assert (call.gates, call.generation.num_inference_steps, call.generation.guidance_scale,
            call.generation.windows.pres_until) == ((0.0, 1.0), 2, 3.5, 0.4)
    first = values["api_parameters"][0]
    assert first == {**call.generation.at(0.0).to_parameters(), "identity_metric": "clip", "profile": "fake",
                     "identity_score": 0.5, "file": Path(values["api_images"][0]).name, "warnings": []}
    assert (first["num_inference_steps"], first["guidance_scale"], first["pres_until"]) == (2, 3.5, 0.4)
    with zipfile.ZipFile(values["api_zip"]) as archive:
        assert len(archive.namelist()) == 2


def test_api_rejects_bad_photos_and_weights_by_name(studio, photo, tmp_path):
    bad = bad_uploads(tmp_path / "bad")
    with pytest.raises(gr.Error, match="vector.svg: SVG"):
        run_api(handlers.api_generate, studio, photos=[photo, str(bad["vector.svg"][0])], **api_form())
    with pytest.raises(gr.Error, match="2 weights given for 1 photos"):
        run_api(handlers.api_generate, studio, photos=[photo], weights="1, 2", **api_form())
    with pytest.raises(gr.Error, match="no subject photos"):
        run_api(handlers.api_sweep, studio, photos=[], **api_form())


# --- wiring ---------------------------------------------------------------------------------------
def test_bind_translates_names_and_refuses_unwired_outputs():
    box = gr.Textbox(render=False)
    assert bind(lambda: {"a": 1}, {"a": box})() == {box: 1}
    with pytest.raises(KeyError, match="not wired"):
        bind(lambda: {"b": 1}, {"a": box})()
    assert bind(lambda: {}, {"a": box, "c": box})() == gr.skip()  # nothing to change: every output skipped


def test_the_prompt_placeholders_use_words_the_model_knows(studio):
    from ui.files import EXAMPLES
    from ui.layout import build_studio

    def placeholders(world):
        studio.engine.world = world
        boxes = {block.label: block for block in build_studio(studio).blocks.values()
                 if isinstance(block, gr.Textbox)}
        return boxes["Prompt"].placeholder, boxes["Negative prompt"].placeholder

    toy = placeholders("toyworld.plugin")
    assert toy == (f"e.g. {EXAMPLES[0].prompt}", "optional: what to leave out, e.g. striped")
    assert placeholders(None) == ("e.g. a photo of the subject on a beach", "optional: what to leave out, e.g. blurry")


def test_the_app_builds_with_named_api_endpoints(studio):
    from ui.layout import build_studio

    demo = build_studio(studio)
    names = {fn.api_name for fn in demo.fns.values()}
    assert {"generate", "sweep", "ui_generate", "ui_release", "add_photos"} <= names
    endpoints = demo.get_api_info()["named_endpoints"]
    arguments = ["photos", "weights", "prompt", "negative_prompt", "gate", "strength", "seed", "steps", "guidance",
                 "width", "height", "scheduler", "pres_from", "identity_early", "pers_from", "pers_until"]
    names_of = lambda endpoint: [p["parameter_name"] for p in endpoints[endpoint]["parameters"]]  # noqa: E731
    assert names_of("/generate") == [*arguments, "batch"]  # added last: positional callers keep working
    assert names_of("/sweep") == [*arguments, "gates"]
    assert names_of("/start_image") == [*arguments, "image", "denoise"]
    assert names_of("/inpaint") == [*arguments, "image", "mask"]
    assert names_of("/control") == [*arguments, "image", "control", "control_scale"]
    assert names_of("/history") == ["query", "limit"]


def test_app_model_flags_are_the_cores_and_low_vram_is_the_cores_low_vram():
    import app
    from flexip_core.cli import MODEL_FLAGS, model_options

    args = app.parse_args(["--low-vram", "--base", "/models/base", "--dtype", "float16", "--attention", "sdpa",
                           "--profile", "tiny", "--port", "8000"])
    assert model_options(args) == {"base": "/models/base", "dtype": "float16", "attention": "sdpa",
                                   "low_vram": True}
    assert model_options(app.parse_args([])) == {}
    assert all(hasattr(app.parse_args([]), name) for name in MODEL_FLAGS)  # flags from flexip_core.cli


@pytest.mark.parametrize("argv, message", [
    (["--port", "99999"], "a port is a whole number from 1 to 65535"),
    (["--log-level", "loud"], "invalid choice: 'LOUD'"),
    (["--profile", "nosuch"], "unknown profile 'nosuch'; available: mini"),
    (["--device", "tpu"], "device 'tpu' unknown; use cuda, cuda:N, mps or cpu"),
    (["--dtype", "float8"], "dtype 'float8' unknown"),
])
def test_app_refuses_bad_flags_before_serving(argv, message, capsys):
    import app

    with pytest.raises(SystemExit) as stop:
        app.main(argv)
    assert message in str(stop.value.code) + capsys.readouterr().err


def test_the_studio_refuses_a_profile_of_another_task_at_start():
    import app

    with pytest.raises(SystemExit, match="profile 'sd15-inpaint' is for one task .* the other tasks as its modes"):
        app.main(["--profile", "sd15-inpaint", "--no-preload"])


# --- the gallery: renders kept on disk, across restarts -----------------------------------------------------------
def test_renders_are_kept_and_a_restarted_studio_shows_them(studio, session, tmp_path):
    collect(handlers.generate(studio, session=session, lock_seed=True, **form(seed=5, prompt="a toy in the snow")))
    collect(handlers.sweep(studio, session=session, gates_text="0, 1", **form(seed=6)))
    assert studio.gallery.count() == 3 and all(studio.gallery.contains(r.path) for r in session.history)
    again = Studio(engine=FakeEngine(), folder=tmp_path / "second-run", gallery=Gallery.open(studio.gallery.folder))
    fresh = Session()
    shown = handlers.load_history(again, session=fresh)
    assert [caption for _, caption in shown["history"]][0].startswith("γ 1.00 · seed 6")  # newest first
    assert len(shown["history"]) == 3 and fresh.history[-1].generation.prompt == "a toy in the snow"


def test_the_gallery_tab_searches_opens_deletes_and_gives_the_subject_back(studio, session, tmp_path):
    for seed, prompt, gate in ((1, "a toy on the beach", 0.2), (2, "a toy in the snow", 0.9)):
        collect(handlers.generate(studio, session=session, lock_seed=True, **form(seed=seed, prompt=prompt, gate=gate)))
    view = handlers.gallery_view(studio, session=session, query="SNOW")
    assert len(view["gallery_grid"]) == 1 and "1 kept render" in view["gallery_info"]
    assert len(handlers.gallery_view(studio, session=session, gate_min=0.5)["gallery_grid"]) == 1
    assert len(handlers.gallery_view(studio, session=session, since="today")["gallery_grid"]) == 2
    import datetime

    ten_days_ago = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)).isoformat(
        timespec="microseconds")
    with studio.gallery._lock:  # made ten days ago: out of "today" and "this week", in "this month"
        studio.gallery._db.execute("UPDATE renders SET created = ? WHERE seed = 1", (ten_days_ago,))
    assert [len(handlers.gallery_view(studio, session=session, since=when)["gallery_grid"])
            for when in ("today", "this week", "this month", "any time")] == [1, 1, 2, 2]
    assert len(handlers.gallery_view(studio, session=session, sort="gate")["gallery_grid"]) == 2
    handlers.gallery_view(studio, session=session)  # newest first: the click opens what it shows
    opened = handlers.select_gallery(studio, gr.SelectData(None, {"index": 0, "value": None}), session=session)
    assert opened["seed"] == 2 and opened["prompt"] == "a toy in the snow"  # its settings are back
    session.photos = []
    back = handlers.reuse_subject(studio, session=session)
    assert [p.name for p in session.photos] == ["red_toy.png"] and back["slot0"]["visible"]
    handlers.gallery_view(studio, session=session, query="snow")
    handlers.select_gallery(studio, gr.SelectData(None, {"index": 0, "value": None}), session=session)
    after = handlers.delete_from_gallery(studio, session=session, query="")
    assert len(after["gallery_grid"]) == 1 and studio.gallery.count() == 1
    assert all("snow" not in r.generation.prompt for r in session.history)


def test_the_history_endpoint_lists_kept_renders(studio, photo):
    for seed in (3, 4):
        run_api(handlers.api_generate, studio, photos=[photo], **api_form(seed=seed, prompt=f"toy {seed}"))
    out = handlers.api_history(studio, query="", limit=10)
    assert [p["seed"] for p in out["api_parameters"]] == [4, 3] and len(out["api_images"]) == 2
    assert handlers.api_history(studio, query="toy 3", limit=5)["api_parameters"][0]["seed"] == 3
    for limit in (0, 2.5, "many"):
        with pytest.raises(gr.Error, match="limit"):
            handlers.api_history(studio, limit=limit)


def test_a_full_disk_fails_that_render_clearly_and_the_next_one_works(studio, session, monkeypatch):
    import errno
    import os

    real = os.replace
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    updates = refusal(handlers.generate(studio, session=session, lock_seed=True, **form()), "No space left")
    assert "not rendered" in updates[-1]["info"] and studio.gallery.count() == 0
    monkeypatch.setattr(os, "replace", real)
    collect(handlers.generate(studio, session=session, lock_seed=True, **form()))
    assert studio.gallery.count() == 1


def test_a_batch_renders_consecutive_seeds_in_one_call(studio, session):
    updates = collect(handlers.generate(studio, session=session, lock_seed=True, batch=3, **form(seed=20)))
    [call] = studio.engine.calls
    assert call.gates == (0.5,) and [r.generation.seed for r in session.history] == [20, 21, 22]
    assert "a batch of 3 (seeds 20–22), all in the history" in updates[-1]["info"]
    assert session.current.generation.seed == 20 and studio.gallery.count() == 3
    for bad in (0, 9, 2.5, "lots"):
        refusal(handlers.generate(studio, session=session, lock_seed=True, batch=bad, **form()), "images per click")
    assert len(studio.engine.calls) == 1
