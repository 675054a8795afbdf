"""Live scrubbing with a fake engine: the slider's ticks rendered in the background after a render (dropped by
anything else the user does), kept only when released on, and renders while dragging where renders are fast."""
from __future__ import annotations

import asyncio

from tests.test_ui_handlers import form, on_screen
from tests.ui_fixtures import FakeEngine
from ui import handlers
from ui.scrub import TICKS, Scrubber
from ui.state import Session, Studio


async def run(agen) -> list[dict]:
    return [values async for values in agen]


def scrubbing(tmp_path, photo, engine: FakeEngine | None = None) -> tuple[Studio, Session]:
    studio = Studio(engine=engine or FakeEngine(), folder=tmp_path / "app", scrubber=Scrubber(enabled=True))
    session = Session()
    handlers.add_photos(studio, session=session, files=[photo])
    return studio, session


def test_after_a_render_the_ticks_render_in_one_background_call_and_are_kept_only_when_released_on(tmp_path, photo):
    studio, session = scrubbing(tmp_path, photo)

    async def scenario():
        await run(handlers.generate(studio, session=session, lock_seed=True, **form(gate=0.5)))
        await studio.scrubber.idle()
        ticks = studio.engine.calls[-1]
        assert len(studio.engine.calls) == 2 and ticks.gates == tuple(g for g in TICKS if g != 0.5)
        assert ticks.generation.seed == 7 and ticks.generation.prompt == "a toy on the beach"
        assert studio.gallery.count() == 1 and len(session.history) == 1  # the ticks are not kept yet

        peeked = handlers.peek(studio, session=session, **form(gate=0.31, weight0=1.0))
        assert "nearest rendered γ 0.30" in peeked["info"] and "/ticks/" in on_screen(peeked["result"])
        released = await run(handlers.release(studio, session=session, **form(gate=0.3)))
        assert len(studio.engine.calls) == 2  # shown at once: nothing rendered
        assert studio.gallery.count() == 2 and len(session.history) == 2 and session.current.kept
        assert session.current.path.startswith(str(studio.gallery.folder)) and "γ 0.30" in released[-1]["info"]
        assert session.current.generation.gate == 0.3
        await run(handlers.release(studio, session=session, **form(gate=0.3)))  # kept once, not twice
        assert studio.gallery.count() == 2 and len(session.history) == 2

        await run(handlers.release(studio, session=session, **form(gate=0.33)))  # between ticks: rendered
        assert studio.engine.calls[-1].gates == (0.33,) and studio.gallery.count() == 3
        await studio.scrubber.idle()
        assert len(studio.engine.calls) == 3  # every tick of these settings was rendered already

    asyncio.run(scenario())


def test_anything_the_user_does_drops_the_ticks_at_their_next_step(tmp_path, photo):
    engine = FakeEngine(step_delay=0.02)
    studio, session = scrubbing(tmp_path, photo, engine)

    async def ticks_started():
        for _ in range(500):
            if studio.scrubber.busy and len(engine.calls) == 2:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the ticks never started")

    async def scenario():
        await run(handlers.generate(studio, session=session, lock_seed=True, **form(num_inference_steps=50)))
        await ticks_started()
        # a render of another seed: the ticks stop within a step, then the render runs
        await run(handlers.generate(studio, session=session, lock_seed=True, **form(seed=8, num_inference_steps=2)))
        assert engine.cancelled.is_set() and engine.calls[2].gates == (0.5,) and engine.calls[2].generation.seed == 8
        engine.cancelled.clear()
        await studio.scrubber.idle()  # the new settings' ticks (2 steps each) ran to the end
        assert engine.calls[-1].generation.seed == 8 and not engine.cancelled.is_set()

        await run(handlers.generate(studio, session=session, lock_seed=True, **form(seed=9, num_inference_steps=50)))
        for _ in range(500):
            if studio.scrubber.busy and engine.calls[-1].generation.seed == 9 and len(engine.calls[-1].gates) > 1:
                break
            await asyncio.sleep(0.01)
        handlers.add_photos(studio, session=session, files=[photo])  # a photo added: dropped too
        await studio.scrubber.idle(timeout=5)
        assert engine.cancelled.is_set()
        assert [len(r) for r in session.renders.values()][-1] == 1  # nothing of the dropped ticks was kept

    asyncio.run(scenario())


def test_renders_while_dragging_where_single_renders_are_fast(tmp_path, photo):
    studio, session = scrubbing(tmp_path, photo)

    async def scenario():
        await run(handlers.generate(studio, session=session, lock_seed=True, **form(gate=0.5)))
        await studio.scrubber.idle()
        assert studio.scrubber.fast  # the fake engine's render takes milliseconds
        calls = len(studio.engine.calls)
        dragged = await handlers.drag(studio, session=session, **form(gate=0.43, weight0=1.0), mode="text")
        assert studio.engine.calls[-1].gates == (0.43,) and len(studio.engine.calls) == calls + 1
        assert studio.engine.calls[-1].decode == "fast" and studio.engine.calls[0].decode == "full"
        assert "γ 0.43, rendered while dragging" in dragged["info"] and "/ticks/" in on_screen(dragged["result"])
        assert studio.gallery.count() == 1  # not kept while dragging ...
        assert await handlers.drag(studio, session=session, **form(gate=0.4, weight0=1.0)) == {}  # a tick: peek
        await run(handlers.release(studio, session=session, **form(gate=0.43)))
        assert len(studio.engine.calls) == calls + 1 and studio.gallery.count() == 2  # ... kept on release

        studio.scrubber.render_s = 5.0  # slow renders: dragging computes nothing (peek shows the ticks)
        assert await handlers.drag(studio, session=session, **form(gate=0.47, weight0=1.0)) == {}
        assert len(studio.engine.calls) == calls + 1

    asyncio.run(scenario())


def test_scrubbing_off_renders_nothing_in_the_background(tmp_path, photo):
    studio = Studio(engine=FakeEngine(), folder=tmp_path / "app")  # as handler tests have it: both off
    session = Session()
    handlers.add_photos(studio, session=session, files=[photo])

    async def scenario():
        await run(handlers.generate(studio, session=session, lock_seed=True, **form()))
        assert not studio.scrubber.busy and not studio.scrubber.fast
        assert await handlers.drag(studio, session=session, **form(gate=0.43, weight0=1.0)) == {}
        assert len(studio.engine.calls) == 1

    asyncio.run(scenario())


def test_live_drag_can_be_forced_on_or_off_whatever_the_speed():
    assert Scrubber(live_drag="on").fast and not Scrubber(live_drag="off", render_s=0.01).fast
    assert Scrubber(render_s=0.5).fast and not Scrubber(render_s=2.0).fast and not Scrubber().fast
    assert Scrubber(enabled=False, live_drag="on").fast  # no ticks (--no-scrub), and still renders while dragging


class OutOfMemoryInBatches(FakeEngine):
    """Runs out of device memory for more than one γ at once (a small card)."""

    def render(self, references, weights, generation, gates, *args, **kwargs):
        if len(gates) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().render(references, weights, generation, gates, *args, **kwargs)


def test_ticks_render_one_at_a_time_when_one_batch_does_not_fit(tmp_path, photo):
    studio, session = scrubbing(tmp_path, photo, OutOfMemoryInBatches())

    async def scenario():
        await run(handlers.generate(studio, session=session, lock_seed=True, **form(gate=0.5)))
        await studio.scrubber.idle()
        assert [call.gates for call in studio.engine.calls[1:]] == [(g,) for g in TICKS if g != 0.5]
        assert handlers.peek(studio, session=session, **form(gate=0.9, weight0=1.0))["info"].startswith(
            "showing the nearest rendered γ 0.90")

    asyncio.run(scenario())
