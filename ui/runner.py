"""Runs a blocking engine render in a worker thread and streams its step previews to an async handler.

Cancelling the consuming task (Gradio's Stop button, `cancels=`, a newer slider release) sets a stop flag that
the next step callback turns into RenderCancelled, so the device is free again within one step."""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .engine import Engine, RenderCancelled, Rendered, RenderRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    step: int  # steps done so far
    total: int  # steps in this render
    previews: list  # cheap preview images, one per γ


@dataclass(frozen=True)
class Done:
    results: list[Rendered]


async def stream_render(engine: Engine, request: RenderRequest) -> AsyncIterator[Step | Done]:
    """Yield Step for each denoising step (stale ones dropped when the consumer is slower), then one Done.
    Errors from the engine (ValueError, RenderCancelled, ...) are re-raised in the consumer."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def post(kind: str, payload) -> None:
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            stop.set()

    def on_step(step: int, total: int, previews: list) -> None:
        if stop.is_set():
            raise RenderCancelled(f"stopped at step {step}/{total}")
        post("step", Step(step, total, list(previews)))

    def work() -> None:
        try:
            post("done", Done(engine.render(request, on_step=on_step)))
        except BaseException as error:  # handed to the consumer, which re-raises it
            post("error", error)

    worker = threading.Thread(target=work, name="flexip-render", daemon=True)
    worker.start()
    try:
        while True:
            kind, payload = await inbox.get()
            while kind == "step" and not inbox.empty():  # keep only the newest preview
                kind, payload = inbox.get_nowait()
            if kind == "error":
                raise payload
            yield payload
            if kind == "done":
                return
    finally:
        if worker.is_alive():
            logger.info("render abandoned by its caller; stopping it at the next step")
        stop.set()
