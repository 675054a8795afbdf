"""Load and faults through a real `python app.py --profile tiny` server (issue 33, item 5): eight users at once, each
served its own results and all of them kept; a hundred bad uploads in a row, each refused by name, with the server
still serving and its memory flat. Loopback only; every loop is bounded in count and in time."""
from __future__ import annotations

import logging
import random
import threading
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from flexip_core.generation.images import load_reference_image
from flexip_core.generation.metadata import read_generation
from tests.ui_fixtures import AppServer, png_bytes

pytestmark = [pytest.mark.server, pytest.mark.slow]

logger = logging.getLogger(__name__)

USERS, REQUESTS = 8, 3  # users at once, requests each (one after the other, as a user clicks)
REQUEST_TIMEOUT = 120.0  # seconds one request may take, waiting in the queue behind the other users' included
BAD_UPLOADS, WARM_UP = 100, 10  # bad uploads in a row; RSS is read after the first WARM_UP and after all of them
RSS_GROWTH = 0.10  # resident memory may grow by at most this share between the two readings


@pytest.fixture(scope="module")
def server():
    app = AppServer("--profile", "tiny")
    try:
        app.wait_for_log("profile 'tiny' loaded", timeout=240)  # no warm-up render: /history holds only the tests'
        yield app
    finally:
        app.stop()


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("subject") / "subject.png"
    path.write_bytes(png_bytes((128, 128)))
    return path


def generate(client: Client, photo: Path, prompt: str, seed: int) -> tuple[list[str], list[dict]]:
    job = client.submit(photos=[handle_file(str(photo))], prompt=prompt, seed=seed, steps=1, width=64, height=64,
                        api_name="/generate")
    return job.result(timeout=REQUEST_TIMEOUT)


def resident_bytes(pid: int) -> int:
    """VmRSS (resident set now, not the peak) of a running process, in bytes."""
    with open(f"/proc/{pid}/status") as handle:
        line = next(line for line in handle if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@pytest.mark.timeout(240)
def test_eight_users_at_once_each_get_their_own_results_and_all_are_kept(server, photo):
    served: dict[tuple[int, int], tuple[list[str], list[dict]]] = {}
    failed: dict[tuple[int, int], BaseException] = {}
    start = threading.Barrier(USERS, timeout=60)
    logged = len(server.log.read_text())

    def user(number: int) -> None:
        client = Client(server.url, verbose=False)
        start.wait()  # all eight clients connected before the first request: they really are at once
        for request in range(REQUESTS):
            key = (number, request)
            try:
                served[key] = generate(client, photo, f"a dog of user {number}, request {request}",
                                       seed=1000 + 10 * number + request)
            except Exception as error:  # noqa: BLE001 (collected and asserted below, with the request named)
                failed[key] = error

    threads = [threading.Thread(target=user, args=(number,), daemon=True) for number in range(USERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=REQUESTS * REQUEST_TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a user is still waiting"
    assert not failed, {key: f"{type(error).__name__}: {error}" for key, error in failed.items()}
    assert len(served) == USERS * REQUESTS

    files = set()
    for (number, request), (images, parameters) in served.items():
        prompt, seed = f"a dog of user {number}, request {request}", 1000 + 10 * number + request
        assert len(images) == 1 and len(parameters) == 1
        assert (parameters[0]["prompt"], parameters[0]["seed"]) == (prompt, seed)
        with Image.open(images[0]) as image:  # the PNG's own parameters chunk names the same request
            made = read_generation(image)[0]
        assert (made.prompt, made.seed) == (prompt, seed)
        files.add(parameters[0]["file"])
    assert len(files) == USERS * REQUESTS  # no two requests share a file

    # Only this test's renders: the other test's render on the same server has other words.
    _, kept = Client(server.url, verbose=False).predict(query="of user", limit=100, api_name="/history")
    assert sorted((entry["prompt"], entry["seed"]) for entry in kept) == sorted(
        (f"a dog of user {n}, request {r}", 1000 + 10 * n + r) for n in range(USERS) for r in range(REQUESTS))
    assert {entry["file"] for entry in kept} == files
    assert "Traceback" not in server.log.read_text()[logged:]  # nothing went wrong in the server under the load


def bad_upload(folder: Path, number: int, rng: random.Random) -> Path:
    """The number-th bad upload: in turn random bytes named .png, an empty file and a text file."""
    kind = number % 3
    if kind == 0:
        path = folder / f"noise-{number:03d}.png"
        path.write_bytes(rng.randbytes(rng.randint(16, 4096)))
    elif kind == 1:
        path = folder / f"empty-{number:03d}.png"
        path.write_bytes(b"")
    else:
        path = folder / f"notes-{number:03d}.txt"
        path.write_text(f"shopping list {number}: bread, milk, a photo of the dog\n" * rng.randint(1, 50))
    return path


def refusal(path: Path) -> str:
    """What the core's photo check says about the file (it must refuse it): the message the server must answer."""
    with pytest.raises(ValueError) as caught:
        load_reference_image(path, name=path.name)
    return str(caught.value)


@pytest.mark.timeout(240)
def test_a_hundred_bad_uploads_are_each_refused_and_the_server_keeps_serving_with_flat_memory(server, photo,
                                                                                             tmp_path):
    client = Client(server.url, verbose=False)
    rng = random.Random(5)
    warmed = None
    for number in range(BAD_UPLOADS):
        path = bad_upload(tmp_path, number, rng)
        expected = refusal(path)
        job = client.submit(photos=[handle_file(str(path))], prompt="a dog", seed=number, steps=1, width=64,
                            height=64, api_name="/generate")
        with pytest.raises(AppError) as caught:  # the studio's gr.Error; a timeout or a broken connection fails
            job.result(timeout=REQUEST_TIMEOUT)
        assert expected.startswith(path.name) and expected in str(caught.value), (expected, str(caught.value))
        if number + 1 == WARM_UP:
            warmed = resident_bytes(server.process.pid)
    after = resident_bytes(server.process.pid)
    logger.info("server RSS after %d bad uploads: %.1f MiB; after %d: %.1f MiB", WARM_UP, warmed / 2**20,
                BAD_UPLOADS, after / 2**20)
    assert after <= warmed * (1 + RSS_GROWTH), f"RSS grew from {warmed / 2**20:.0f} MiB to {after / 2**20:.0f} MiB"

    images, parameters = generate(client, photo, "a dog after the bad uploads", seed=77)
    assert len(images) == 1 and parameters[0]["seed"] == 77
