"""The gallery through a real server: /history, a kill -9 in the middle of a render and a restart on the same
outputs folder, and an outputs folder that cannot be written refused at start."""
from __future__ import annotations

import time

import pytest
from gradio_client import Client, handle_file
from PIL import Image

import app
from tests.ui_fixtures import DREAMBENCH, AppServer
from ui.gallery import Gallery

pytestmark = [pytest.mark.server, pytest.mark.slow]


def generate(client: Client, seed: int, steps: int = 1):
    return client.predict(photos=[handle_file(str(DREAMBENCH / "dog" / "00.jpg"))], prompt=f"a dog number {seed}",
                          seed=seed, steps=steps, api_name="/generate")


def test_a_kill_in_the_middle_of_a_render_loses_only_that_render(tmp_path):
    outputs = tmp_path / "outputs"
    server = AppServer("--profile", "tiny", "--outputs", str(outputs))
    try:
        client = Client(server.url, verbose=False)
        finished = [generate(client, seed)[1][0]["file"] for seed in (1, 2)]
        job = client.submit(photos=[handle_file(str(DREAMBENCH / "dog" / "00.jpg"))], prompt="cut short", seed=3,
                            steps=500, width=256, height=256, api_name="/generate")  # a minute or more on 2 cores
        deadline = time.monotonic() + 60
        while job.status().code.name not in ("PROCESSING", "PROGRESS") and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2.0)  # well inside the render
        assert not job.done()
        server.process.kill()  # SIGKILL: no atexit, no cleanup
        server.process.wait()
    finally:
        server.stop()
    again = AppServer("--profile", "tiny", "--outputs", str(outputs))
    try:
        images, parameters = Client(again.url, verbose=False).predict(query="", limit=10, api_name="/history")
        assert [p["file"] for p in parameters] == finished[::-1]  # newest first, the cut render absent
        for path in images:
            with Image.open(path) as image:
                image.load()  # whole files only
        assert not [p for p in outputs.rglob("*") if ".gallery-tmp" in p.name]
        with Gallery.open(outputs) as gallery:
            assert gallery.integrity() == "ok" and gallery.count() == 2
    finally:
        again.stop()


def test_history_searches_and_refuses_a_bad_limit(tmp_path):
    server = AppServer("--profile", "tiny", "--outputs", str(tmp_path / "outputs"))
    try:
        client = Client(server.url, verbose=False)
        for seed in (7, 8):
            generate(client, seed)
        _, parameters = client.predict(query="number 7", limit=5, api_name="/history")
        assert [p["seed"] for p in parameters] == [7]
        with pytest.raises(Exception, match="limit must be"):
            client.predict(query="", limit=0, api_name="/history")
        assert len(client.predict(query="", limit=5, api_name="/history")[1]) == 2  # still serving
    finally:
        server.stop()


def test_an_outputs_folder_that_cannot_be_written_is_refused_at_start(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the outputs folder should be")
    with pytest.raises(SystemExit, match="not-a-folder"):
        app.main(["--profile", "tiny", "--no-preload", "--outputs", str(blocker)])
