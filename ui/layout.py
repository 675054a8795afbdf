"""The studio's one-screen layout (subject | controls | result) and the wiring of its events to ui.handlers.

Handlers return {"result": ..., "session": ...}; Gradio wants {component: value}. `bind` translates, so the
handlers keep names and tests call them without building any component."""
from __future__ import annotations

import functools
import inspect
import logging
import tempfile
import typing
from collections.abc import Callable, Mapping
from pathlib import Path

import gradio as gr

from flexip_core.generation.settings import MAX_SEED

from . import handlers
from .clips import DEFAULT_FPS, DEFAULT_FRAMES, MAX_FPS, MAX_FRAMES, MIN_FPS, MIN_FRAMES, clips_row
from .files import EXAMPLES
from .handlers import API_NAMES, CONTROLS, MODE_INPUTS, MODE_SETTINGS
from .state import Session, Studio

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
CSS = ROOT / "assets" / "css" / "studio.css"
STUDIO_JS = Path(__file__).resolve().parent / "studio.js"
FILES_KEPT_S = 86400  # results and photos older than this are deleted (Gradio's cache and the app's folder)
GPU = dict(concurrency_id="gpu", concurrency_limit=1)  # every event that runs the engine shares one queue
DEFAULT_GATES = "0, 0.25, 0.5, 0.75, 1"
GATE_ENDS = ('<div class="gate-ends"><span>◀ Style: follow the prompt</span>'
             '<span>Identity: keep the subject ▶</span></div>')


def studio_folder() -> Path:
    """A new folder for one run's photos and results inside Gradio's own file cache: Gradio serves the files there
    as they are, where it would copy (and hash) every file from elsewhere each time it is shown."""
    from gradio.utils import get_upload_folder

    cache = Path(get_upload_folder())
    cache.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="flexip-studio-", dir=cache))


def launch_options() -> dict:
    """Keyword arguments for Blocks.launch that style the page (Gradio 6 takes these at launch)."""
    return dict(theme=gr.themes.Soft(primary_hue="indigo", radius_size="sm", text_size="sm"),
                css_paths=[CSS], js=STUDIO_JS.read_text())


def bind(handler: Callable, outputs: Mapping[str, gr.components.Component], *bound, **bound_kw) -> Callable:
    """`handler` with leading arguments bound, translating its returned (or yielded) name-keyed dicts to
    component-keyed ones for `outputs`. The signature Gradio inspects (keyword inputs, gr.Progress) is kept."""
    fn = functools.partial(handler, *bound, **bound_kw) if bound or bound_kw else handler

    def translate(values: Mapping[str, object]) -> dict:
        unknown = set(values) - set(outputs)
        if unknown:
            raise KeyError(f"{handler.__name__} returned outputs that are not wired: {sorted(unknown)}")
        if not values:  # nothing to change: Gradio reads an empty dict as a missing value, so say "skip" instead
            return gr.skip()
        return {outputs[name]: value for name, value in values.items()}

    if inspect.isasyncgenfunction(handler):
        async def wrapper(*args, **kwargs):
            async for values in fn(*args, **kwargs):
                yield translate(values)
    elif inspect.iscoroutinefunction(handler):
        async def wrapper(*args, **kwargs):
            return translate(await fn(*args, **kwargs))
    elif inspect.isgeneratorfunction(handler):
        def wrapper(*args, **kwargs):
            for values in fn(*args, **kwargs):
                yield translate(values)
    else:
        def wrapper(*args, **kwargs):
            return translate(fn(*args, **kwargs))

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    wrapper.__signature__ = inspect.signature(fn)
    try:  # Gradio finds gr.SelectData / gr.Progress parameters through the type hints
        wrapper.__annotations__ = typing.get_type_hints(handler)
    except (NameError, TypeError):
        wrapper.__annotations__ = dict(getattr(handler, "__annotations__", {}))
    return wrapper


def components(outputs: Mapping[str, gr.components.Component], *names: str) -> list:
    """The components for `names`, in order, for an event's `outputs=`."""
    return [outputs[name] for name in names]


def _subject_panel(out: dict, max_photos: int) -> dict:
    """Left column: photo upload, one slot per photo, examples, settings restore. Returns its buttons."""
    buttons = {}
    gr.Markdown("### Subject photos\nDrop, paste (Ctrl+V) or click to add; several photos of one subject.",
                elem_classes="panel-title")
    out["files"] = gr.File(label="Subject photos", show_label=False, file_count="multiple", type="filepath",
                           height=112, elem_id="subject-upload")
    # How many uploads the server has answered (hidden): the page's script holds a Generate clicked before the answer
    out["uploads_done"] = gr.Textbox("0", elem_id="uploads-done", container=False, interactive=False,
                                     elem_classes="page-only")
    with gr.Row(elem_classes="slots"):
        for i in range(max_photos):
            with gr.Column(visible=False, elem_classes="slot", min_width=120) as out[f"slot{i}"]:
                out[f"thumb{i}"] = gr.Image(label="", type="filepath", interactive=False, height=92,
                                            buttons=[], elem_classes="thumb", container=False)
                with gr.Row(elem_classes="slot-row", equal_height=True):
                    out[f"weight{i}"] = gr.Number(1.0, label="weight", show_label=False, minimum=0, maximum=10,
                                                  step=0.1, min_width=50, scale=3, container=False,
                                                  elem_classes="weight")
                    buttons[f"remove{i}"] = gr.Button("✕", size="sm", min_width=30, scale=1, variant="secondary",
                                                      elem_classes="remove")
    out["slots_hint"] = gr.Markdown("Thumbnails: the centre square the encoders see · number: the photo's weight.",
                                    elem_classes="hint", visible=False)
    gr.Markdown("**Try an example** (one click: subject, prompt and a γ sweep)", elem_classes="hint")
    with gr.Row(elem_classes="examples"):
        for example in EXAMPLES:
            buttons[f"example_{example.name}"] = gr.Button(example.label, size="sm", min_width=60)
    gr.Markdown("**Restore settings:** drop a PNG saved by FlexIP Studio", elem_classes="hint")
    out["restore_file"] = gr.File(label="FlexIP PNG", show_label=False, file_count="single", file_types=[".png"],
                                  type="filepath", height=116, elem_id="restore-png")
    return buttons


def _controls_panel(out: dict, studio: Studio) -> dict:
    """Middle column: prompts, the γ slider, strength, seed, Generate/Stop and the Advanced settings."""
    d = studio.engine.defaults()
    buttons = {}
    # Placeholders in words the model knows: a model of one world (mini) leaves out every other word
    toy = studio.engine.world is not None
    out["prompt"] = gr.Textbox(label="Prompt", lines=2, max_lines=3, placeholder="e.g. " + (
        EXAMPLES[0].prompt if toy else "a photo of the subject on a beach"))
    out["negative_prompt"] = gr.Textbox("", label="Negative prompt", lines=1, max_lines=2,
                                        placeholder="optional: what to leave out, e.g. " + (
                                            "striped" if toy else "blurry"))
    out["gate"] = gr.Slider(0, 1, 0.5, step=0.01, label="Style ↔ identity (γ)", elem_id="gate-slider")
    # Clicked by the page's script while the slider is dragged (hidden): a render at its position where renders are
    # fast (ui.scrub). Its own trigger, so that the slider's own moves never wait for a render.
    buttons["drag"] = gr.Button("render while dragging", elem_id="drag-render", elem_classes="page-only")
    gr.HTML(GATE_ENDS, padding=False)
    with gr.Row(equal_height=True):
        out["strength"] = gr.Slider(0, 2, 1.0, step=0.05, label="Strength", elem_id="strength-slider", scale=3)
        out["seed"] = gr.Number(0, label="Seed", precision=0, minimum=-1, maximum=MAX_SEED, scale=2, min_width=110,
                                elem_id="seed")  # -1: a random one
        out["batch"] = gr.Number(1, label="Images", precision=0, scale=1, min_width=70, elem_id="batch",
                                 info=None)  # per Generate click, consecutive seeds; 1 to 8, checked by the handler
    with gr.Row(equal_height=True):
        out["lock_seed"] = gr.Checkbox(False, label="Lock seed", scale=1, min_width=90, elem_id="lock-seed")
        buttons["dice"] = gr.Button("Random seed", scale=1, min_width=90, size="sm", elem_id="random-seed")
        buttons["generate"] = gr.Button("Generate", variant="primary", scale=2, min_width=100, elem_id="generate")
        buttons["stop"] = gr.Button("Stop", variant="stop", scale=1, min_width=60, elem_id="stop")
    _mode_panel(out)
    with gr.Accordion("Advanced", open=False, elem_id="advanced"):
        with gr.Row():
            out["num_inference_steps"] = gr.Number(d.num_inference_steps, label="Steps", precision=0, minimum=1,
                                                   maximum=500, min_width=70)
            out["guidance_scale"] = gr.Number(d.guidance_scale, label="Guidance", minimum=0, maximum=50, step=0.5,
                                              min_width=70)
            out["width"] = gr.Number(d.width, label="Width", precision=0, minimum=64, maximum=d.max_side, step=8,
                                     min_width=70)
            out["height"] = gr.Number(d.height, label="Height", precision=0, minimum=64, maximum=d.max_side, step=8,
                                      min_width=70)
        with gr.Row(equal_height=True):
            schedulers = list(studio.engine.schedulers)
            out["scheduler"] = gr.Dropdown(schedulers, value=d.scheduler or schedulers[0], label="Scheduler",
                                           min_width=150, scale=2, elem_id="scheduler")
            out["sequential_sweep"] = gr.Checkbox(False, label="Sweeps one γ at a time (less memory)", min_width=90)
        # Generation.windows: the fraction of the steps each branch acts in (from <= progress < until)
        out["window_preset"] = gr.Radio(["whole run", "identity early", "identity late", "custom"], value="whole run",
                                        label="Identity window", elem_id="window-preset")
        with gr.Row(equal_height=True):
            for key, value, label in (("pres_from", 0.0, "Identity from"), ("pres_until", 1.0, "Identity until"),
                                      ("pers_from", 0.0, "Prompt from"), ("pers_until", 1.0, "Prompt until")):
                out[key] = gr.Number(value, label=f"{label} (0–1)", minimum=0.0, maximum=1.0, step=0.05, min_width=90)
    return buttons


MODE_CHOICES = [("Text to image", "text"), ("Start image", "start_image"), ("Inpaint", "inpaint"),
                ("Control", "control"), ("Animate", "animate")]


def _mode_panel(out: dict) -> None:
    """The mode (text to image, start image, inpaint, control) and the inputs each mode adds; only the chosen mode's
    inputs are shown (handlers.mode_view)."""
    out["mode"] = gr.Radio(MODE_CHOICES, value="text", label="Mode", elem_id="mode")
    out["mode_hint"] = gr.Markdown(visible=False, elem_classes="hint", elem_id="mode-hint")
    with gr.Row(equal_height=False):
        out["mode_image"] = gr.Image(label="Picture", type="filepath", sources=["upload", "clipboard"], height=200,
                                     visible=False, elem_id="mode-image")
        out["edge_view"] = gr.Image(label="Edge map (what the ControlNet follows)", type="pil", interactive=False,
                                    height=200, visible=False, elem_id="edge-view", buttons=[])
    out["denoise"] = gr.Slider(0.05, 1.0, 0.6, step=0.05, label="Denoise (how much of the picture is repainted)",
                               visible=False, elem_id="denoise")
    out["scene"] = gr.ImageEditor(label="Scene · paint where the subject goes", type="pil", height=320,
                                  sources=["upload", "clipboard"], layers=False, transforms=[], visible=False,
                                  brush=gr.Brush(colors=["#ff2d87"], default_color="#ff2d87", color_mode="fixed",
                                                 default_size=24), elem_id="scene")  # any colour marks the mask
    out["mask"] = gr.Image(label="…or upload a mask (white: where the subject goes)", type="filepath", height=120,
                           sources=["upload"], visible=False, elem_id="mask-upload")
    with gr.Row(equal_height=True):
        out["control"] = gr.Dropdown(["canny"], value="canny", label="Control", visible=False, min_width=100,
                                     elem_id="control")
        out["control_scale"] = gr.Slider(0.0, 2.0, 1.0, step=0.05, label="Control strength", visible=False, scale=3,
                                         elem_id="control-scale")
    with gr.Row(equal_height=True):  # the Animate mode's clip: checked by the handler (8 to 32 frames, 1 to 30 fps)
        out["frames"] = gr.Slider(MIN_FRAMES, MAX_FRAMES, DEFAULT_FRAMES, step=1, label="Frames", visible=False,
                                  scale=3, elem_id="frames")
        out["fps"] = gr.Slider(MIN_FPS, MAX_FPS, DEFAULT_FPS, step=1, label="FPS", visible=False,
                               scale=2, elem_id="fps")


def _result_panel(out: dict) -> dict:
    """Right column: result / comparison / sweep / grid tabs, and the history strip."""
    buttons = {}
    with gr.Tabs(elem_id="tabs") as out["tabs"]:
        with gr.Tab("Result", id="result"):
            out["result"] = gr.Image(label="Result", type="filepath", interactive=False, height=430,
                                     elem_id="result", buttons=["download", "fullscreen"])
            out["clip"] = gr.Video(label="Clip", interactive=False, height=430, autoplay=True, loop=True,
                                   visible=False, elem_id="clip")  # the Animate mode's result, in place of the image
            out["download"] = gr.DownloadButton("Download PNG (with settings)", interactive=False, size="sm")
        with gr.Tab("Compare with reference", id="compare"):
            out["compare"] = gr.ImageSlider(label="reference | result", type="filepath", max_height=470)
        with gr.Tab("γ sweep", id="sweep"):
            with gr.Row(equal_height=True):
                out["gates_text"] = gr.Textbox(DEFAULT_GATES, label="γ values (same seed, one batch)", scale=3)
                buttons["sweep"] = gr.Button("Run sweep", variant="primary", scale=1, elem_id="run-sweep")
            out["sweep_gallery"] = gr.Gallery(label="reference, then each γ", columns=6, height=300,
                                              object_fit="contain", elem_id="sweep-gallery", interactive=False,
                                              fit_columns=False)
            out["sweep_clips"] = gr.HTML(clips_row([]), visible=False, elem_id="sweep-clips")  # Animate
            out["sweep_zip"] = gr.DownloadButton("Download all (zip)", interactive=False, size="sm")
        with gr.Tab("Gallery", id="gallery") as out["gallery_tab"]:
            with gr.Row(equal_height=True):
                out["gallery_query"] = gr.Textbox(label="Search prompts", scale=3, elem_id="gallery-query")
                out["gallery_sort"] = gr.Dropdown(list(handlers.GALLERY_SORTS), value="newest", label="Sort",
                                                  scale=1, min_width=90)
                out["gallery_gate_min"] = gr.Number(0.0, label="γ from", minimum=0, maximum=1, step=0.05,
                                                    min_width=70)
                out["gallery_gate_max"] = gr.Number(1.0, label="γ to", minimum=0, maximum=1, step=0.05, min_width=70)
            with gr.Row(equal_height=True):
                out["gallery_since"] = gr.Dropdown(list(handlers.GALLERY_SINCE), value="any time", label="Made",
                                                   scale=1, min_width=110, elem_id="gallery-since")
                out["gallery_this_subject"] = gr.Checkbox(False, label="only the current subject", scale=2)
            out["gallery_grid"] = gr.Gallery(label="kept renders (newest first)", columns=6, height=300,
                                             allow_preview=False, object_fit="cover", elem_id="gallery-grid",
                                             interactive=False, fit_columns=False)
            with gr.Row():
                buttons["gallery_subject"] = gr.Button("Use its subject", size="sm", elem_id="gallery-subject")
                buttons["gallery_delete"] = gr.Button("Delete", size="sm", variant="stop", elem_id="gallery-delete")
            out["gallery_info"] = gr.Markdown(elem_id="gallery-info")
        with gr.Tab("Prompt × γ grid", id="grid"):
            with gr.Row(equal_height=True):
                out["prompts_text"] = gr.Textbox(label="Prompts, one per line (up to 4)", lines=3, scale=3)
                buttons["grid"] = gr.Button("Run grid", variant="primary", scale=1, elem_id="run-grid")
            out["grid_view"] = gr.HTML(handlers.grid_table([]), elem_id="grid-view")  # rows: prompts, columns: γ
            out["grid_zip"] = gr.DownloadButton("Download all (zip)", interactive=False, size="sm")
    out["info"] = gr.Markdown("Release the γ slider to render; drag it to see renders already made.",
                              elem_id="info")
    out["history"] = gr.Gallery(label="History · click one to restore its settings", columns=10, height=118,
                                allow_preview=False, object_fit="cover", elem_id="history",
                                interactive=False, fit_columns=False)
    return buttons


def _api_panel(out: dict) -> dict:
    """Hidden inputs and outputs of the `/generate` and `/sweep` API endpoints."""
    with gr.Column(visible=False):
        out["photos"] = gr.File(label="photos", file_count="multiple", type="filepath")
        out["weights"] = gr.Textbox("", label="weights")
        out["gates"] = gr.Textbox(DEFAULT_GATES, label="gates")
        out["api_images"] = gr.File(label="images", file_count="multiple")
        out["api_parameters"] = gr.JSON(label="parameters")
        out["api_zip"] = gr.File(label="zip")
        out["api_image"] = gr.File(label="image", type="filepath")
        out["api_mask"] = gr.File(label="mask", type="filepath")
        out["api_denoise"] = gr.Number(0.6, label="denoise")
        out["api_control"] = gr.Textbox("canny", label="control")
        out["api_control_scale"] = gr.Number(1.0, label="control_scale")
        out["api_batch"] = gr.Number(1, label="batch")  # unbounded here: the handler's check names it
        out["api_frames"] = gr.Number(DEFAULT_FRAMES, label="frames")  # likewise
        out["api_fps"] = gr.Number(DEFAULT_FPS, label="fps")
        out["api_video"] = gr.File(label="video")
        out["api_query"] = gr.Textbox("", label="query")
        out["api_limit"] = gr.Number(50, label="limit")
        return {name: gr.Button(name) for name in ("api_generate", "api_sweep", "api_start_image", "api_inpaint",
                                                   "api_control", "api_animate", "api_history")}


def build_studio(studio: Studio) -> gr.Blocks:
    """The whole app for `studio` (its engine is loaded lazily, on the first render)."""
    out: dict = {}
    with gr.Blocks(title="FlexIP Studio", fill_width=True, delete_cache=(3600, FILES_KEPT_S),
                   analytics_enabled=False) as demo:
        out["session"] = gr.State(Session())
        out["status"] = gr.Markdown(elem_id="status")
        out["timer"] = gr.Timer(2.0)
        with gr.Row(elem_id="studio", equal_height=False):
            with gr.Column(scale=3, min_width=280, elem_classes="panel"):
                buttons = _subject_panel(out, studio.max_photos)
            with gr.Column(scale=5, min_width=420, elem_classes="panel"):
                buttons |= _controls_panel(out, studio)
            with gr.Column(scale=6, min_width=480, elem_classes="panel"):
                buttons |= _result_panel(out)
        buttons |= _api_panel(out)
        _wire(studio, demo, out, buttons)
    demo.queue(max_size=64, default_concurrency_limit=8)
    return demo


def _wire(studio: Studio, demo: gr.Blocks, out: dict, buttons: dict) -> None:
    max_photos = studio.max_photos
    slots = components(out, *handlers.slot_names(max_photos))
    controls = {name: out[name] for name in CONTROLS}
    weights = {f"weight{i}": out[f"weight{i}"] for i in range(max_photos)}
    form = {**controls, **weights, **{name: out[name] for name in MODE_INPUTS}}  # what a render reads
    shown = components(out, "seed", "info", "result", "compare", "clip", "download", "history", "session")
    restored = components(out, *CONTROLS, *MODE_SETTINGS)
    # A render says how far it got in the line under the result; Gradio's own progress overlays (timers over each
    # output, redrawn many times a second) would hide what is on screen and cost the browser more than the line.
    quiet = dict(show_progress="hidden")

    # API first, so that /generate and /sweep get exactly these names
    api_inputs = {"photos": out["photos"], "weights": out["weights"],
                  **{API_NAMES.get(name, name): control for name, control in controls.items()}}
    out["window_preset"].change(bind(handlers.window_preset, out), inputs_kwargs={"preset": out["window_preset"]},
                                outputs=components(out, "pres_from", "pres_until"), queue=False,
                                api_visibility="private")
    buttons["api_generate"].click(bind(handlers.api_generate, out, studio),
                                  inputs_kwargs={**api_inputs, "batch": out["api_batch"]},
                                  outputs=components(out, "api_images", "api_parameters"), api_name="generate", **GPU)
    buttons["api_sweep"].click(bind(handlers.api_sweep, out, studio),
                               inputs_kwargs={**api_inputs, "gates": out["gates"]},
                               outputs=components(out, "api_images", "api_parameters", "api_zip"), api_name="sweep",
                               **GPU)
    modes = {"start_image": {"denoise": out["api_denoise"]}, "inpaint": {"mask": out["api_mask"]},
             "control": {"control": out["api_control"], "control_scale": out["api_control_scale"]}}
    for mode, extra in modes.items():
        buttons[f"api_{mode}"].click(bind(getattr(handlers, f"api_{mode}"), out, studio),
                                     inputs_kwargs={**api_inputs, "image": out["api_image"], **extra},
                                     outputs=components(out, "api_images", "api_parameters"), api_name=mode, **GPU)

    buttons["api_animate"].click(bind(handlers.api_animate, out, studio),
                                 inputs_kwargs={**api_inputs, "frames": out["api_frames"], "fps": out["api_fps"]},
                                 outputs=components(out, "api_video", "api_parameters"), api_name="animate", **GPU)
    buttons["api_history"].click(bind(handlers.api_history, out, studio),
                                 inputs_kwargs={"query": out["api_query"], "limit": out["api_limit"]},
                                 outputs=components(out, "api_images", "api_parameters"), api_name="history",
                                 concurrency_limit=4)

    # The gallery: the history strip starts from it; its tab searches, opens, deletes and gives back subjects
    demo.load(bind(handlers.load_history, out, studio), inputs_kwargs={"session": out["session"]},
              outputs=components(out, "history", "session"), api_visibility="private", queue=False)
    view = {"session": out["session"], "query": out["gallery_query"], "sort": out["gallery_sort"],
            "gate_min": out["gallery_gate_min"], "gate_max": out["gallery_gate_max"],
            "this_subject": out["gallery_this_subject"], "since": out["gallery_since"]}
    view_outputs = components(out, "gallery_grid", "gallery_info", "session")
    for trigger in (out["gallery_tab"].select, out["gallery_query"].submit, out["gallery_sort"].change,
                    out["gallery_gate_min"].submit, out["gallery_gate_max"].submit, out["gallery_this_subject"].change,
                    out["gallery_since"].change):
        trigger(bind(handlers.gallery_view, out, studio), inputs_kwargs=view, outputs=view_outputs,
                api_visibility="private", queue=False, show_progress="hidden")
    out["gallery_grid"].select(bind(handlers.select_gallery, out, studio), inputs_kwargs={"session": out["session"]},
                               outputs=[*shown, *restored], api_visibility="private", queue=False)
    buttons["gallery_delete"].click(bind(handlers.delete_from_gallery, out, studio), inputs_kwargs=view,
                                    outputs=[*view_outputs, out["history"]], api_visibility="private", queue=False)
    buttons["gallery_subject"].click(bind(handlers.reuse_subject, out, studio),
                                     inputs_kwargs={"session": out["session"]},
                                     outputs=[out["info"], out["session"], *slots],
                                     api_visibility="private", queue=False)

    # The mode panel: the chosen mode's inputs, and the edge map the Control mode follows
    out["mode"].change(bind(handlers.mode_view, out, studio), inputs_kwargs={"mode": out["mode"]},
                       outputs=components(out, *handlers.MODE_VIEWS, *handlers.STILL_VIEWS, "mode_hint"), queue=False,
                       api_visibility="private")
    for trigger in (out["mode_image"].change, out["control"].change, out["mode"].change):
        trigger(bind(handlers.edge_preview, out, studio), inputs_kwargs={
            name: out[name] for name in ("mode", "mode_image", "control", "width", "height")},
            outputs=[out["edge_view"]], api_visibility="private", concurrency_limit=2)

    status = dict(outputs=components(out, "status", "timer"), queue=False, api_visibility="private")
    demo.load(bind(handlers.status, out, studio), api_name="status_on_load", **status)
    out["timer"].tick(bind(handlers.status, out, studio), api_name="status_on_timer", **status)

    # Subject panel
    out["files"].upload(bind(handlers.add_photos, out, studio), inputs_kwargs={"session": out["session"],
                        "files": out["files"]}, outputs=[out["session"], out["files"], out["uploads_done"], *slots],
                        api_visibility="undocumented", api_name="add_photos", concurrency_limit=4)
    for i in range(max_photos):
        buttons[f"remove{i}"].click(bind(handlers.remove_photo, out, studio, index=i),
                                    inputs_kwargs={"session": out["session"]}, outputs=[out["session"], *slots],
                                    api_visibility="private")
    out["restore_file"].upload(bind(handlers.restore_png, out, studio), inputs_kwargs={"file": out["restore_file"]},
                               outputs=[*restored, out["lock_seed"], out["restore_file"], out["info"]],
                               api_visibility="private", **quiet)

    # Generation
    generate_kwargs = dict(inputs_kwargs={"session": out["session"], "lock_seed": out["lock_seed"], **form,
                                          "batch": out["batch"]},  # last: the events' positional order is kept
                           outputs=shown, api_visibility="undocumented", **quiet, **GPU)
    buttons["generate"].click(bind(handlers.generate, out, studio), api_name="ui_generate", **generate_kwargs)
    out["prompt"].submit(bind(handlers.generate, out, studio), api_name="ui_generate_submit", **generate_kwargs)
    sweep_inputs = {"session": out["session"], "gates_text": out["gates_text"],
                    "sequential_sweep": out["sequential_sweep"], **form}
    sweep_outputs = components(out, "sweep_gallery", "sweep_clips", "sweep_zip", "result", "compare", "clip", "info",
                               "session")
    buttons["sweep"].click(bind(handlers.sweep, out, studio), api_name="ui_sweep", inputs_kwargs=sweep_inputs,
                           outputs=sweep_outputs, api_visibility="undocumented", **quiet, **GPU)
    buttons["grid"].click(
        bind(handlers.grid, out, studio), api_name="ui_grid", api_visibility="undocumented", **quiet, **GPU,
        inputs_kwargs={"session": out["session"], "prompts_text": out["prompts_text"],
                       "gates_text": out["gates_text"], "sequential_sweep": out["sequential_sweep"], **form},
        outputs=components(out, "grid_view", "grid_zip", "info", "session"))
    for example in EXAMPLES:
        buttons[f"example_{example.name}"].click(
            bind(handlers.example, out, studio, name=example.name), inputs_kwargs=sweep_inputs,
            outputs=[*sweep_outputs, out["prompt"], out["tabs"], out["mode"], *slots],
            api_name=f"ui_example_{example.name}", api_visibility="undocumented", **quiet, **GPU)

    # The live slider: moving it shows renders already made and ends a render in flight at another γ at its next step
    # (handlers.supersede); release renders. The page's script (ui/studio.js) also releases it after arrow keys and
    # on Enter in its number box.
    out["gate"].release(bind(handlers.release, out, studio), inputs_kwargs={"session": out["session"], **form},
                        outputs=shown, api_name="ui_release", api_visibility="undocumented",
                        trigger_mode="always_last", **quiet, **GPU)
    dragged = {"session": out["session"], **controls, **weights, "mode": out["mode"]}  # no pictures: the mode's last
    out["gate"].input(bind(handlers.peek, out, studio), inputs_kwargs=dragged,
                      outputs=components(out, "result", "compare", "clip", "info"), queue=False, show_progress="hidden",
                      api_visibility="private")
    # Where single renders are fast, the slider also renders while it moves (ui.scrub; the page's script clicks the
    # hidden button as it moves): the newest position runs when the render before it ends.
    buttons["drag"].click(bind(handlers.drag, out, studio), inputs_kwargs=dragged,
                          outputs=components(out, "result", "compare", "clip", "info"), trigger_mode="always_last",
                          api_name="ui_drag", api_visibility="undocumented", **quiet, **GPU)
    # Stop halts the render in flight, which ends at its next step with the stopped state as its own last answer (no
    # Gradio cancel: a cancelled event can end in an error badge). These handlers run beside the render's queue.
    beside = dict(api_visibility="private", concurrency_id="beside_renders", concurrency_limit=None, **quiet)
    buttons["stop"].click(bind(handlers.stop, out, studio), inputs_kwargs={"session": out["session"]},
                          outputs=components(out, "result", "compare", "clip", "download", "info", "history",
                                             "session", "sweep_gallery", "sweep_clips", "sweep_zip", "grid_view",
                                             "grid_zip"), **beside)

    # History (a click halts a render in flight, then shows the result it names), seed
    out["history"].select(bind(handlers.select_history, out, studio), inputs_kwargs={"session": out["session"]},
                          outputs=[*shown, *restored], **beside)
    buttons["dice"].click(bind(handlers.new_seed, out), outputs=[out["seed"]], queue=False, api_visibility="private")
