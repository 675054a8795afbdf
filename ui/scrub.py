"""Live scrubbing: the slider's ticks rendered in the background after a render, and renders while dragging.

After a single render, the studio renders the same settings at every tick of the slider (γ 0, 0.1, ..., 1) not
rendered yet, in one batched call, in the background and at the lowest priority: any other render (any user's, the
API's included), a photo added or removed, Stop, a history or gallery click, or another mode drops it at its next
step. Dragging then shows a real render at every tick; release renders the exact γ, or keeps the tick's render at
once when it lands on one. A tick's render goes into the gallery and the history only when it is released on.

When single renders are fast (at most FAST_RENDER_S, as a fast profile on a GPU is, or the tiny test profile), the
studio also renders while the slider moves: Gradio runs the newest position as soon as the render before it ends
(trigger_mode="always_last"), so the rate follows what the machine keeps up with and never queues stale positions.

One Scrubber serves the whole studio (a single device): its job is one asyncio task on the server's event loop, so
the session it fills is only ever touched there, as by the handlers."""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

TICKS = tuple(round(i / 10, 1) for i in range(11))  # the γ values rendered in the background
FAST_RENDER_S = 0.75  # a single render at most this long: the studio renders while the slider moves


@dataclass(eq=False)
class Scrubber:
    """The studio's one background job (the ticks of the last render) and the speed of its single renders."""

    enabled: bool = True  # the background ticks; False: none (app.py --no-scrub)
    live_drag: str = "auto"  # renders while dragging: "auto" (where renders are fast), "on" or "off" (--live-drag)
    render_s: float | None = None  # seconds the last single render took, from request to saved image
    task: asyncio.Task | None = None  # the tick job, if one was started
    halted: threading.Event | None = None  # set to drop that job at its next step
    key: tuple | None = None  # what the job renders: (subject, generation without γ)

    @property
    def fast(self) -> bool:
        """Whether the slider renders while it moves: asked for (live_drag "on"), or "auto" and a render per
        position keeps up (the last single render took at most FAST_RENDER_S)."""
        if self.live_drag == "off":
            return False
        return self.live_drag == "on" or (self.render_s is not None and self.render_s <= FAST_RENDER_S)

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def drop(self) -> None:
        """Drop the job in flight (it ends at its next step); what it finished stays."""
        if self.halted is not None and not self.halted.is_set():
            self.halted.set()
            if self.busy:
                logger.info("background slider ticks dropped")

    def start(self, key: tuple, job: Callable[[threading.Event], Awaitable[None]]) -> None:
        """Run `job(halted)` in the background in place of any earlier job (the same `key` still running is left
        alone); called from a handler, on the server's event loop."""
        if not self.enabled or (self.busy and self.key == key and not self.halted.is_set()):
            return
        self.drop()
        self.halted, self.key = threading.Event(), key
        self.task = asyncio.get_running_loop().create_task(job(self.halted))

    async def idle(self, timeout: float = 60.0) -> None:
        """Wait for the job in flight to end (tests, and the server's shutdown)."""
        if self.busy:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
