"""The Animate mode with a fake engine: a clip per render (kept in the gallery beside its first frame, settings in
its metadata), frames and fps checked, sweeps of clips side by side, /animate; no slider ticks of clips."""
from __future__ import annotations

import asyncio
import zipfile
from pathlib import Path

import gradio as gr
import pytest

from flexip_core.generation.video import read_video
from tests.test_ui_handlers import collect, form, on_screen, refusal, run_api
from tests.ui_fixtures import FakeEngine
from ui import handlers
from ui.gallery import Gallery
from ui.scrub import Scrubber
from ui.state import Session, Studio


def animate(**changes) -> dict:
    """The form in the Animate mode: a short clip (the fake engine's frames count themselves in blue)."""
    return {**form(**changes), **handlers.TEXT_MODE, "mode": "animate", "frames": 8, "fps": 6,
            **{k: v for k, v in changes.items() if k in handlers.MODE_INPUTS}}


@pytest.fixture
def studio(tmp_path) -> Studio:
    return Studio(engine=FakeEngine(), folder=tmp_path / "app", scrubber=Scrubber(enabled=True))


@pytest.fixture
def session(studio, photo) -> Session:
    session = Session()
    handlers.add_photos(studio, session=session, files=[photo])
    return session


def test_a_render_in_the_animate_mode_is_a_clip_kept_beside_its_first_frame(studio, session):
    updates = collect(handlers.generate(studio, session=session, lock_seed=True, **animate(seed=4, gate=0.7)))
    call = studio.engine.calls[-1]
    assert call.generation.task == "animate" and (call.generation.num_frames, call.generation.fps) == (8, 6)
    result = session.current
    assert result.clip and Path(result.clip).parent == Path(result.path).parent  # in the gallery, beside its PNG
    assert on_screen(updates[-1]["clip"]) == result.clip and on_screen(updates[-1]["result"]) == result.path
    clip = read_video(result.clip)
    assert clip.frames == 8 and clip.fps == 6 and clip.parameters["seed"] == 4 and clip.parameters["gate"] == 0.7
    entry = studio.gallery.entries()[0]
    assert entry.clip == result.clip and entry.parameters["clip"] == Path(result.clip).name
    assert not list((studio.results_folder / "clips").glob("*"))  # the gallery took the clip: no copy left behind

    # after a restart the history gives the clip back, and a click restores the mode and its settings
    reopened = Studio(engine=FakeEngine(), folder=studio.folder, gallery=Gallery.open(studio.gallery.folder))
    fresh = Session()
    handlers.load_history(reopened, session=fresh)
    assert fresh.history[0].clip == result.clip
    restored = handlers.restore_outputs(fresh.history[0].generation)
    assert (restored["mode"], restored["frames"], restored["fps"]) == ("animate", 8, 6)

    assert studio.gallery.delete(entry.id) and not Path(result.clip).exists()  # deleting a render removes its clip


@pytest.mark.parametrize("frames, fps, message", [
    (0, 8, "frames must be a whole number from 8 to 32"),
    (100000, 8, "frames must be a whole number from 8 to 32"),
    (12.5, 8, "frames must be a whole number from 8 to 32"),
    (16, 0, "fps must be a whole number from 1 to 30"),
    (16, "fast", "fps must be a whole number from 1 to 30"),
])
def test_frames_and_fps_out_of_range_are_refused_by_name(studio, session, frames, fps, message):
    refusal(handlers.generate(studio, session=session, lock_seed=True, **animate(frames=frames, fps=fps)), message)
    assert studio.engine.calls == []
    with pytest.raises(gr.Error, match=message):
        run_api(handlers.api_animate, studio, photos=[session.photos[0].path], frames=frames, fps=fps,
                **{handlers.API_NAMES.get(k, k): v for k, v in form().items()})


def test_a_sweep_of_clips_plays_side_by_side_and_zips_the_clips(studio, session):
    updates = collect(handlers.sweep(studio, session=session, gates_text="0, 0.5, 1", **animate()))
    row = updates[-1]["sweep_clips"]
    assert row.count("<video") == 3 and row.count("autoplay loop muted") == 3
    assert all(f"/gradio_api/file={clip}" in row for clip, _ in session.sweep_clips)
    with zipfile.ZipFile(session.sweep_zip) as archive:
        assert sorted(Path(name).suffix for name in archive.namelist()) == [Path(session.sweep_clips[0][0]).suffix] * 3


def test_clips_have_no_slider_ticks_and_no_renders_while_dragging(studio, session):
    async def scenario():
        await handlers_run(handlers.generate(studio, session=session, lock_seed=True, **animate()))
        assert not studio.scrubber.busy and len(studio.engine.calls) == 1
        studio.scrubber.render_s = 0.01
        values = {k: v for k, v in animate(gate=0.3, weight0=1.0).items() if k not in handlers.MODE_INPUTS[1:]}
        assert await handlers.drag(studio, session=session, **values) == {}

    asyncio.run(scenario())


async def handlers_run(agen) -> list[dict]:
    return [values async for values in agen]


def test_api_animate_returns_the_clip_and_its_settings(studio, session):
    values = run_api(handlers.api_animate, studio, photos=[session.photos[0].path], frames=9, fps=5,
                     **{handlers.API_NAMES.get(k, k): v for k, v in form(seed=12).items()})
    clip, parameters = values["api_video"], values["api_parameters"]
    assert read_video(clip).frames == 9 and parameters["num_frames"] == 9 and parameters["fps"] == 5
    assert parameters["task"] == "animate" and parameters["file"] == Path(clip).name and parameters["seed"] == 12


def test_a_profile_without_a_motion_adapter_says_what_would_animate(studio, session):
    class NoMotion(FakeEngine):
        def modes(self) -> dict:
            return {**super().modes(), "animate": "the mini profile has no motion adapter: use sd15 or tiny"}

    studio = Studio(engine=NoMotion(), folder=studio.folder)
    refusal(handlers.generate(studio, session=session, lock_seed=True, **animate()), "no motion adapter")
    assert "no motion adapter" in handlers.mode_view(studio, mode="animate")["mode_hint"]["value"]


def test_the_slider_finds_the_clips_of_the_animate_mode(studio, session):
    collect(handlers.generate(studio, session=session, lock_seed=True, **animate(gate=0.5)))
    peeked = handlers.peek(studio, session=session, **{k: v for k, v in animate(gate=0.55, weight0=1.0).items()
                                                       if k not in handlers.MODE_INPUTS[1:]})
    assert "nearest rendered γ 0.50" in peeked["info"] and on_screen(peeked["clip"]) == session.current.clip
