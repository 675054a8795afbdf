"""A real `python app.py --profile tiny` server driven through gradio_client: API results and metadata, every
bad input answered with its error while the server keeps serving, two clients at once, cancellation."""
from __future__ import annotations

import re
import threading
import time
import urllib.error
import urllib.request
import zipfile

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from flexip_core.generation.metadata import read_generation
from flexip_core.generation.settings import MAX_SEED, Generation
from flexip_core.generation.video import read_frames, read_video
from flexip_core.loading.profiles import load_profile
from tests.ui_fixtures import DREAMBENCH, AppServer, bad_uploads, ui_form
from ui.handlers import MODE_INPUTS

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def server():
    if not DREAMBENCH.is_dir():
        pytest.skip(f"DreamBench photos not found at {DREAMBENCH}")
    app = AppServer("--profile", "tiny", "--live-drag", "on")  # renders while dragging, however busy the machine
    try:
        app.wait_for_log("profile 'tiny' loaded", timeout=240)
        yield app
    finally:
        app.stop()


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server.url, verbose=False)


@pytest.fixture(scope="module")
def photos() -> list:
    return [handle_file(str(DREAMBENCH / "dog" / name)) for name in ("00.jpg", "01.jpg")]


def chunk(path: str) -> str:
    with Image.open(path) as image:
        return image.info["parameters"]


def profile_notes() -> list[str]:
    """The note the tiny profile adds to every result (its images are noise by design), if it has one."""
    notice = getattr(load_profile("tiny"), "notice", None)
    return [notice] if notice else []


def quick_generate(client: Client, photos, **changes):
    values = dict(photos=photos[:1], prompt="a dog", seed=3, steps=2, gate=0.5, width=64, height=64)
    return client.predict(**{**values, **changes}, api_name="/generate")


def test_generate_returns_one_png_with_its_settings(client, photos):
    images, parameters = client.predict(photos=photos, weights="1, 0.5", prompt="a dog in the snow", gate=0.7,
                                        seed=42, steps=3, api_name="/generate")
    assert len(images) == 1 and len(parameters) == 1
    text = chunk(images[0])
    assert text.startswith("a dog in the snow\n") and "Seed: 42" in text and "FlexIP gate: 0.7" in text
    assert "Model: tiny" in text and "Steps: 3" in text
    assert parameters[0]["gate"] == 0.7 and parameters[0]["profile"] == "tiny"
    assert -1.0 <= parameters[0]["identity_score"] <= 1.0
    assert parameters[0]["warnings"] == profile_notes()
    assert parameters[0]["file"] == images[0].rsplit("/", 1)[-1]
    with Image.open(images[0]) as image:  # the JSON and the PNG chunk carry the same Generation
        assert read_generation(image)[0] == Generation.from_parameters(parameters[0])


def test_the_api_takes_steps_guidance_and_identity_early_and_answers_with_the_generation_names(client, photos):
    _, parameters = quick_generate(client, photos, steps=3, guidance=4.5, identity_early=0.5, seed=-1)
    made = Generation.from_parameters(parameters[0])
    assert (made.num_inference_steps, made.guidance_scale, made.windows.pres_until) == (3, 4.5, 0.5)
    assert 0 <= made.seed <= MAX_SEED  # -1: a random seed, written into the result
    assert {"identity_score", "file", "warnings"} <= set(parameters[0])


def test_a_prompt_longer_than_the_text_encoder_takes_comes_back_with_a_warning(client, photos):
    _, parameters = quick_generate(client, photos, prompt="a dog in the snow " * 30)
    warnings = [warning for warning in parameters[0]["warnings"] if warning not in profile_notes()]
    assert len(warnings) == 1
    assert re.fullmatch(r"prompt is \d+ tokens; the text encoder takes 77, so the end was cut off", warnings[0])


def test_sweep_returns_one_png_per_gate_and_a_zip(client, photos):
    images, parameters, archive = client.predict(photos=photos[:1], prompt="a dog", seed=5, steps=2,
                                                 gates="0, 0.5, 1", api_name="/sweep")
    assert len(images) == 3 and [p["gate"] for p in parameters] == [0.0, 0.5, 1.0]
    assert {p["seed"] for p in parameters} == {5}
    for path, gate in zip(images, ("0.0", "0.5", "1.0"), strict=True):
        assert f"FlexIP gate: {gate}," in chunk(path)
    with zipfile.ZipFile(archive) as bundle:
        assert len(bundle.namelist()) == 3


def test_each_bad_upload_gets_its_error_and_the_server_keeps_serving(client, photos, tmp_path):
    for name, (path, reason) in bad_uploads(tmp_path).items():
        with pytest.raises(Exception) as caught:
            quick_generate(client, [handle_file(str(path))])
        assert name in str(caught.value) and reason in str(caught.value), (name, str(caught.value))
        images, _ = quick_generate(client, photos)
        assert len(images) == 1


@pytest.mark.parametrize("changes, words", [  # range checks of Gradio's own components, then the core's and ours
    (dict(gate=1.5), "1.5 is greater than maximum"), (dict(steps=0), "0 is less than minimum"),
    (dict(width=65), "width must be a multiple of 8"), (dict(scheduler="nope"), "nope"),
    (dict(prompt=""), "prompt is empty"), (dict(weights="1, 1"), "2 weights given for 1 photos"),
    (dict(guidance=80), "80 is greater than maximum"),
])
def test_bad_settings_get_their_error_and_the_server_keeps_serving(client, photos, changes, words):
    with pytest.raises(Exception, match=words):
        quick_generate(client, photos, **changes)
    images, _ = quick_generate(client, photos)
    assert len(images) == 1


def test_uploads_over_the_server_limit_are_refused(client, photos, tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8\xff" + b"\0" * (26 * 2**20))
    with pytest.raises(Exception):
        quick_generate(client, [handle_file(str(big))])
    images, _ = quick_generate(client, photos)
    assert len(images) == 1


def test_files_outside_the_app_are_not_served(server, client, photos):
    images, _ = quick_generate(client, photos)
    kept = server.outputs / "images"
    assert images and any(kept.rglob("*.png"))  # a render is kept; its folder is served, nothing else of the outputs
    for target in ("app.py", "/etc/passwd", str(DREAMBENCH / "dog" / "00.jpg"), str(server.outputs / "gallery.sqlite"),
                   f"{kept}/../gallery.sqlite"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{server.url}gradio_api/file={target}", timeout=10)
        assert caught.value.code in (403, 404)
    served = next(kept.rglob("*.png"))
    with urllib.request.urlopen(f"{server.url}gradio_api/file={served}", timeout=10) as response:
        assert response.status == 200


def test_two_clients_at_once_each_get_their_own_result(server, photos):
    results = {}

    def run(seed):
        client = Client(server.url, verbose=False)
        results[seed] = quick_generate(client, photos, seed=seed, steps=3)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (101, 202)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == [101, 202]
    for seed, (images, parameters) in results.items():
        assert parameters[0]["seed"] == seed and f"Seed: {seed}" in chunk(images[0])


def test_ui_session_generate_release_and_cancel(server, photos):
    client = Client(server.url, verbose=False)
    client.predict([photos[0]], api_name="/add_photos")
    first = client.predict(True, *ui_form(seed=9, gate=0.2, num_inference_steps=3), 1, api_name="/ui_generate")
    assert "seed 9" in first[1] and "γ 0.20" in first[1]
    stranger = Client(server.url, verbose=False)  # another user's session holds none of these photos
    refused = stranger.predict(True, *ui_form(), 1, api_name="/ui_generate")  # said on the line, not as an error
    assert "not rendered: add at least one photo" in refused[1]

    # Release the slider: same seed, new γ, previews streamed before the final image.
    job = client.submit(*ui_form(seed=9, gate=0.65, num_inference_steps=3), api_name="/ui_release")  # not a tick
    job.result(timeout=120)
    infos = [output[1] for output in job.outputs()]
    assert any("step 1 of 3" in info for info in infos) and "γ 0.65" in infos[-1] and "identity score" in infos[-1]

    # A long run, cancelled after its first preview, leaves the server ready for the next request.
    job = client.submit(True, *ui_form(seed=10, num_inference_steps=400), 1, api_name="/ui_generate")
    deadline = time.time() + 120
    while not any("step" in str(output[1]) for output in job.outputs()) and time.time() < deadline:
        time.sleep(0.1)
    job.cancel()
    started = time.perf_counter()
    images, _ = quick_generate(client, photos, seed=11)
    assert len(images) == 1 and time.perf_counter() - started < 60  # not behind 400 steps
    server.wait_for_log("stopping it at the next step", timeout=30)


def test_the_slider_ticks_render_in_the_background_and_release_keeps_one_at_once(server, photos):
    client = Client(server.url, verbose=False)
    client.predict([photos[0]], api_name="/add_photos")
    ticks_before = server.log.read_text().count("slider ticks rendered")
    kept_before = len(client.predict(api_name="/history")[0] or [])
    client.predict(True, *ui_form(seed=21, gate=0.5, num_inference_steps=3), 1, api_name="/ui_generate")
    deadline = time.time() + 60
    while server.log.read_text().count("slider ticks rendered") == ticks_before and time.time() < deadline:
        time.sleep(0.1)
    job = client.submit(*ui_form(seed=21, gate=0.2, num_inference_steps=3), api_name="/ui_release")
    job.result(timeout=60)
    infos = [output[1] for output in job.outputs()]
    assert len(infos) == 1 and "γ 0.20" in infos[0] and "identity score" in infos[0]  # no steps: rendered already
    assert len(client.predict(api_name="/history")[0]) == kept_before + 2  # the render and the tick released on

    # the slider also renders while it moves (--live-drag on; "auto" where a render takes under 0.75 s), kept only
    # on release
    dragged = ui_form(seed=21, gate=0.47, num_inference_steps=3)[:-len(MODE_INPUTS) + 1]  # its last input: the mode
    image, _, _, info = client.predict(*dragged, api_name="/ui_drag")  # result, compare, clip, info
    assert "γ 0.47, rendered while dragging" in info and image
    assert len(client.predict(api_name="/history")[0]) == kept_before + 2


def test_animate_returns_a_playable_clip_and_refuses_bad_frames_by_name(client, photos):
    values = dict(photos=photos[:1], prompt="a dog running", seed=5, steps=2, width=64, height=64, fps=8)
    video, parameters = client.predict(**values, frames=8, api_name="/animate")
    assert read_frames(video).shape == (8, 64, 64, 3)  # decoded whole: a playable file of 8 frames
    clip = read_video(video)
    assert clip.frames == 8 and clip.fps == 8 and clip.parameters["seed"] == 5 and clip.parameters["task"] == "animate"
    assert parameters["num_frames"] == 8 and parameters["file"] == video.rsplit("/", 1)[-1]
    for frames in (0, 100000):
        with pytest.raises(Exception, match="frames must be a whole number from 8 to 32"):
            client.predict(**values, frames=frames, api_name="/animate")
    images, _ = quick_generate(client, photos)  # the server goes on
    assert len(images) == 1


# --- modes: /start_image, /inpaint, /control on the tiny profile's inpainting model and ControlNet -----------------
@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("modes")
    picture = Image.new("RGB", (96, 64), (40, 90, 160))
    picture.paste((230, 230, 230), (10, 10, 50, 40))
    picture.save(folder / "scene.png")
    mask = Image.new("L", (48, 32), 0)  # half the scene's size: resized, with a note
    mask.paste(255, (15, 10, 35, 25))
    mask.save(folder / "mask.png")
    Image.new("L", (96, 64), 0).save(folder / "empty.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return {name: handle_file(str(folder / f"{name}.png")) for name in ("scene", "mask", "empty", "broken")}


MODE_CALLS = {
    "/start_image": dict(denoise=0.5),
    "/inpaint": dict(mask="mask"),
    "/control": dict(control="canny", control_scale=0.8),
}


def mode_call(client: Client, photos, scene: dict, api_name: str, **changes):
    values = dict(photos=photos[:1], image=scene["scene"], prompt="a dog", seed=3, steps=2, width=96, height=64)
    extra = {key: scene[value] if key == "mask" else value for key, value in MODE_CALLS[api_name].items()}
    return client.predict(**{**values, **extra, **changes}, api_name=api_name)


@pytest.mark.parametrize("api_name, task", [("/start_image", "image-to-image"), ("/inpaint", "inpainting"),
                                            ("/control", "controlnet")])
def test_each_mode_endpoint_renders_and_records_its_mode(client, photos, scene, api_name, task):
    images, parameters = mode_call(client, photos, scene, api_name)
    [entry] = parameters
    assert entry["task"] == task and len(entry["task_inputs"]["image"]) == 12
    with Image.open(images[0]) as image:
        assert image.size == (96, 64)
        made = read_generation(image)[0]
    assert made.task == task and made == Generation.from_parameters(entry)
    if api_name == "/inpaint":
        assert any("mask" in note and "resized" in note for note in entry["warnings"])


@pytest.mark.parametrize("api_name, changes, words", [
    ("/start_image", dict(denoise=0), "denoise must be a number in (0, 1]"),
    ("/start_image", dict(denoise=1.5), "denoise must be a number in (0, 1]"),
    ("/start_image", dict(image="broken"), "start image: "),
    ("/inpaint", dict(mask="empty"), "mask: the mask is empty"),
    ("/inpaint", dict(image=None), "scene: no image given"),
    ("/control", dict(control="depth"), "control must be one of canny"),
    ("/control", dict(control_scale=5), "control_scale must be a number in [0, 2]"),
])
def test_each_bad_mode_input_is_named_and_the_server_keeps_serving(client, photos, scene, api_name, changes, words):
    changes = {key: scene[value] if value in scene else value for key, value in changes.items()}
    with pytest.raises(Exception, match=re.escape(words)):
        mode_call(client, photos, scene, api_name, **changes)
    assert len(mode_call(client, photos, scene, "/start_image")[0]) == 1  # still serving


def test_generate_takes_a_batch_of_consecutive_seeds(client, photos):
    images, parameters = quick_generate(client, photos, seed=40, batch=3)
    assert len(images) == 3 and [p["seed"] for p in parameters] == [40, 41, 42]
    with pytest.raises(Exception, match="images per click must be a whole number from 1 to 8"):
        quick_generate(client, photos, batch=9)
