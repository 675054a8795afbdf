"""Item 6: eight users at once on one real `app.py --profile tiny` server.

Eight threads, each with its own gradio_client Client, its own seed and prompt, send their `/generate` calls (1 step,
64 px) one after the other, all eight starting together; each call is timed from submit to result. Before the load,
one user alone sends the same number of calls on the same server: the studio renders one request at a time (its
GPU queue), so the figures to read are the latency a user waits behind the others and whether the queue keeps the
throughput of one user alone.
"""
from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .app_process import REPO, AppServer
from .common import Mode, Section, median, seconds, synthetic_photo

logger = logging.getLogger(__name__)

USERS = 8  # clients at once
REQUESTS = 3  # calls per user (quick and full mode; smoke mode sends 1 to stay fast)
STEPS, SIZE = 1, 64  # denoising steps and image side of every call: the studio's overhead, not the model's
REQUEST_TIMEOUT = 120.0  # seconds one call may take, its wait behind the other users included


@contextlib.contextmanager
def tiny_server(*flags: str) -> Iterator[tuple[AppServer, Path]]:
    """A real `app.py --profile tiny` server, its models loaded, and a synthetic subject photo; stopped at the end."""
    with tempfile.TemporaryDirectory() as folder:
        photo = Path(folder) / "subject.png"
        synthetic_photo(0).save(photo)
        app = AppServer("--profile", "tiny", *flags, log=Path(folder) / "app.log", timeout=180.0)
        try:
            app.wait_for_log("profile 'tiny' loaded", timeout=240)
            yield app, photo
        finally:
            app.stop()


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile: the smallest value with at least `share` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def run(mode: Mode) -> Section:
    section = Section(6, f"Load: {USERS} users at once on one real server (app.py --profile tiny, gradio_client, "
                         f"/generate, {STEPS} step, {SIZE} px)")
    if not (REPO / "app.py").is_file():
        section.skipped = "app.py not available"
        return section
    from gradio_client import Client, handle_file

    requests = 1 if mode.arch == "tiny" else REQUESTS
    with tiny_server() as (app, photo):
        def call(client, prompt: str, seed: int) -> float:
            started = time.perf_counter()
            job = client.submit(photos=[handle_file(str(photo))], prompt=prompt, seed=seed, steps=STEPS,
                                width=SIZE, height=SIZE, api_name="/generate")
            _, parameters = job.result(timeout=REQUEST_TIMEOUT)
            if (parameters[0]["prompt"], parameters[0]["seed"]) != (prompt, seed):
                raise RuntimeError(f"asked for {prompt!r}, seed {seed}; got {parameters[0]!r}")
            return time.perf_counter() - started

        alone_client = Client(app.url, verbose=False)
        call(alone_client, "warm-up", 1)  # first calls pay for caches: not timed
        started = time.perf_counter()
        alone = [call(alone_client, f"a dog alone, request {r}", 10 + r) for r in range(requests)]
        alone_wall = time.perf_counter() - started
        logged = len(app.log.read_text())
        latencies, failures, load_wall = under_load(app.url, call, requests)
        errors = app.log.read_text()[logged:].count("Traceback")
    if failures:
        raise RuntimeError(f"{len(failures)} of {USERS * requests} requests failed: {failures[:3]}")

    throughput, alone_throughput = len(latencies) / load_wall, len(alone) / alone_wall
    p50, p95 = percentile(latencies, 0.50), percentile(latencies, 0.95)
    section.add(f"one user alone: latency, median of {len(alone)}", seconds(median(alone)))
    section.add(f"{USERS} users x {requests} request(s) at once: latency p50 / p95 (submit -> result, "
                f"{len(latencies)} requests)", f"{seconds(p50)} / {seconds(p95)}")
    section.add(f"{USERS} users at once: throughput ({len(latencies)} requests in {load_wall:.1f} s)",
                f"{throughput:.2f} requests/s")
    section.add("**throughput at once / one user alone**", f"**{throughput / alone_throughput:.2f}** "
                f"(alone: {alone_throughput:.2f} requests/s)")
    section.add("**p50 latency at once / one user alone**", f"**{p50 / median(alone):.2f}**")
    section.add("tracebacks in the server log during the load", str(errors))
    section.notes.append("the studio renders one request at a time (its GPU queue), so a user waits behind the "
                         "others: latency under load grows with the users, throughput should not fall")
    section.data = dict(users=USERS, requests_per_user=requests, steps=STEPS, size=SIZE, latencies=latencies,
                        alone=alone, load_wall=load_wall, alone_wall=alone_wall, p50=p50, p95=p95,
                        throughput=throughput, alone_throughput=alone_throughput, log_tracebacks=errors)
    return section


def under_load(url: str, call, requests: int) -> tuple[list[float], list[str], float]:
    """Every user's latencies, the failures (as text) and the seconds from the first submit to the last result."""
    from gradio_client import Client

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(USERS + 1, timeout=120)

    def user(number: int) -> None:
        client = Client(url, verbose=False)
        start.wait()  # every client connected before the first call: they really are at once
        for request in range(requests):
            try:
                latency = call(client, f"a dog of user {number}, request {request}", 1000 + 10 * number + request)
            except Exception as error:  # counted and reported by run(), not swallowed
                with lock:
                    failures.append(f"user {number}, request {request}: {type(error).__name__}: {error}")
                continue
            with lock:
                latencies.append(latency)

    threads = [threading.Thread(target=user, args=(number,), daemon=True) for number in range(USERS)]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    deadline = started + requests * REQUEST_TIMEOUT  # every call may wait its whole timeout, one after the other
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.perf_counter()))
    wall = time.perf_counter() - started
    if any(thread.is_alive() for thread in threads):
        failures.append("a user was still waiting when the time ran out")
    return latencies, failures, wall
