"""The studio's own figures (issue 35, item 3): the real `app.py` server on random weights in the real SD1.5
architecture, measured from outside through gradio_client, as a user's browser would wait.

The random models are written to disk as a user's local copies (a diffusers base folder, the CLIP ViT-H/14 folder,
the two IP-Adapter files, an LCM-LoRA file, a tiny autoencoder in TAESD's architecture for the previews), and each
server is started on a profile file made from the shipped one with those paths (`app.py --profile FILE.json`):
- `sd15` (20 steps, CFG 7.5) and `sd15-fast` (4 steps, the LoRA fused, LCM scheduler, no CFG): slider release ->
  first streamed preview and -> final image (`/ui_release`, the event the γ slider fires when let go), at γ values
  off the slider's ticks (renders the studio may have made already are shown at once, which is not what is timed);
  the servers run with --no-scrub, so no background render of the ticks competes with the releases; "final" is
  when the server's answer names the image (the client does not download the outputs' files);
- `sd15`: a γ sweep of 5 values as one batched `/sweep` call against 5 sequential `/generate` calls;
- `sd15-fast`: fresh renders shown per second during a scripted drag (`drag_renders_per_s`, benchmarks/scrub.py).

gpu_check.py runs it after its in-process figures (sd15); its --smoke run does the same on the tiny models on CPU.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.app_process import AppServer
from flexip_core.loading.profiles import PROFILE_DIR

logger = logging.getLogger("gpu_check")

PROMPT = "a photo of a dog on the beach, watercolor"
PROFILES = {"sd15": 20, "sd15-fast": 4}  # profile -> steps per render (the shipped defaults: 30 and 4)
# γ values of the timed releases, off the slider's ticks (0, 0.1, ..., 1) and never the first render's 0.5
RELEASE_GATES = (0.13, 0.27, 0.41, 0.59, 0.73, 0.87, 0.21, 0.37, 0.63, 0.79, 0.17, 0.83)
SWEEP_GATES = (0.05, 0.25, 0.45, 0.65, 0.85)  # the sweep: one batched call against one call per γ
DRAG_TARGET = 8.0  # renders per second while dragging on sd15-fast (issue 35)


def write_models(folder: Path, *, smoke: bool, dtype: torch.dtype, base: dict, clip, tokenizer, files: dict,
                 lora: Path) -> dict[str, str]:
    """The random models as local copies a profile can name: {profile field: path}."""
    from diffusers import AutoencoderTiny

    from flexip_core.loading.tiny import PREVIEW_VAE, save_base

    folder.mkdir(parents=True, exist_ok=True)
    save_base(folder / "base", unet=base["unet"], vae=base["vae"], text_encoder=base["text_encoder"],
              tokenizer=tokenizer, scheduler=base["scheduler"])
    clip.save_pretrained(folder / "image_encoder", safe_serialization=True)
    torch.manual_seed(0)
    preview = AutoencoderTiny(**(PREVIEW_VAE if smoke else {}))  # diffusers' defaults are TAESD's architecture
    preview.to(dtype).save_pretrained(folder / "preview_vae", safe_serialization=True)
    return {"base": str(folder / "base"), "clip_encoder": str(folder / "image_encoder"),
            "preservation": str(files[("plus", "safetensors")]),
            "personalization": str(files[("plain", "safetensors")]),
            "preview_vae": str(folder / "preview_vae"), "lora": str(lora)}


def write_profile(folder: Path, name: str, models: dict[str, str], size: int) -> Path:
    """The shipped profile `name` with every model replaced by its local random copy (and no inpainting base,
    ControlNet, DINOv2 or motion adapter: the timed path never loads them), at `size` px."""
    data = json.loads((PROFILE_DIR / f"{name}.json").read_text())
    for part in ("inpaint_base", "control", "controlnet", "dino_encoder", "motion"):
        data.pop(part, None)
    data.update({part: path for part, path in models.items() if part != "lora" or data.get("lora")})
    data["description"] = f"{name} with random weights (benchmarks/gpu_server.py)"
    data["defaults"] = {**data.get("defaults", {}), "height": size, "width": size}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def server_flags(smoke: bool) -> list[str]:
    """The device flags; --no-scrub, so that no background render of the slider's ticks competes with what is
    timed; --live-drag on, so that the drag renders whatever the first renders took."""
    device = ["--device", "cpu", "--dtype", "float32"] if smoke else ["--device", "cuda", "--dtype", "float16"]
    return [*device, "--no-scrub", "--live-drag", "on"]


def drag_renders_per_s(client, form) -> float:
    """Fresh renders shown per second during a scripted drag on sd15-fast (issue 35, item 4): positions at 30 Hz for
    3 s, each asking the studio for a render there as the page does while the slider moves (`/ui_drag`, the newest
    position only while one is in flight); the server runs with --live-drag on."""
    from benchmarks.scrub import scripted_drag

    rate, asked = scripted_drag(client, form)
    logger.info("drag: %d positions asked for, %.1f fresh renders shown per second", asked, rate)
    return rate


def start_server(name: str, profile: Path, smoke: bool, log_folder: Path) -> AppServer:
    return AppServer("--profile", str(profile), *server_flags(smoke), log=log_folder / f"app-{name}.log",
                     timeout=180.0 if smoke else 600.0)


def measure_server(name: str, app: AppServer, profile: Path, *, smoke: bool, size: int, photo: Path,
                   releases: int, sweep_rounds: int) -> dict:
    """The server `app` on `profile`: seconds to serve the page and to the first render (the model load included),
    the releases' first previews and finals, and for sd15 the sweep; the server is stopped at the end."""
    from gradio_client import Client, handle_file

    from benchmarks.server import release_once
    from flexip_core.loading.profiles import load_profile
    from ui.handlers import CONTROLS, MODE_INPUTS, TEXT_MODE
    from ui.state import MAX_PHOTOS

    defaults = load_profile(str(profile)).defaults
    steps = PROFILES[name]
    settings = dict(prompt=PROMPT, negative_prompt="", gate=0.5, strength=1.0, seed=7, num_inference_steps=steps,
                    guidance_scale=defaults.guidance_scale, width=size, height=size, scheduler=defaults.scheduler,
                    pres_from=0.0, pres_until=1.0, pers_from=0.0, pers_until=1.0)

    def form(gate: float) -> list:  # the page's inputs in layout order: controls, one weight per photo slot, mode
        return ([{**settings, "gate": gate}[key] for key in CONTROLS] + [1.0] * MAX_PHOTOS
                + [TEXT_MODE[key] for key in MODE_INPUTS])

    out = dict(steps=steps, guidance_scale=defaults.guidance_scale, scheduler=defaults.scheduler, size=size,
               page_ready_s=round(app.ready_after, 2))
    try:
        # the client leaves the outputs' files on the server, as a page does until it shows them: by default
        # gradio_client downloads every file of every output (the history strip's too), ~0.6 s per release here
        client = Client(app.url, verbose=False, download_files=False)
        client.predict([handle_file(str(photo))], api_name="/add_photos")
        started = time.perf_counter()
        client.predict(True, *form(0.5), 1, api_name="/ui_generate")  # waits for the model load (preloading)
        out["first_render_s"] = round(time.perf_counter() - started, 2)
        gates = RELEASE_GATES[:releases + 1]
        if not smoke:  # warm-up: the first release pays for lazy allocations (a smoke run checks the code runs)
            release_once(client, form(gates[0]))
        timed = [release_once(client, form(gate)) for gate in gates[1:]]
        out["first_preview_s"] = [t[0] for t in timed]
        out["final_s"] = [t[1] for t in timed]
        if name == "sd15-fast":
            out["drag_renders_per_s"] = drag_renders_per_s(client, form)
        if sweep_rounds:
            out["sweep"] = sweep_vs_sequential(client, photo, settings, sweep_rounds, warm=not smoke)
    finally:
        app.stop()
    return out


def sweep_vs_sequential(client, photo: Path, settings: dict, rounds: int, warm: bool = True) -> dict:
    """Seconds of a 5-γ sweep as one `/sweep` call and as 5 `/generate` calls, `rounds` times each, interleaved
    (after one of each unmeasured when `warm`)."""
    from gradio_client import handle_file

    common = dict(photos=[handle_file(str(photo))], weights="1", prompt=settings["prompt"], seed=settings["seed"],
                  steps=settings["num_inference_steps"], guidance=settings["guidance_scale"], width=settings["width"],
                  height=settings["height"], scheduler=settings["scheduler"])

    def batched() -> float:
        started = time.perf_counter()
        client.predict(**common, gates=", ".join(f"{g:g}" for g in SWEEP_GATES), api_name="/sweep")
        return time.perf_counter() - started

    def sequential() -> float:
        started = time.perf_counter()
        for gate in SWEEP_GATES:
            client.predict(**common, gate=gate, api_name="/generate")
        return time.perf_counter() - started

    if warm:
        batched(), sequential()  # warm-up: the subject's encoding, the batch's first allocations
    times = {"batched": [], "sequential": []}
    for r in range(rounds):  # alternating order, so that both share the machine's drift
        for kind in (("batched", "sequential") if r % 2 == 0 else ("sequential", "batched")):
            times[kind].append(batched() if kind == "batched" else sequential())
    return {"gates": list(SWEEP_GATES), "batched_s": times["batched"], "sequential_s": times["sequential"]}


def measure(folder: Path, report: dict, *, smoke: bool, dtype: torch.dtype, size: int, base: dict, clip, tokenizer,
            files: dict, lora: Path, photo) -> None:
    """Write the models, run a server per profile, and fill `report` (the JSON fields of issue 35)."""
    started = time.perf_counter()
    server_folder = folder / "server"
    models = write_models(server_folder / "models", smoke=smoke, dtype=dtype, base=base, clip=clip,
                          tokenizer=tokenizer, files=files, lora=lora)
    photo_path = server_folder / "subject.png"
    photo.save(photo_path)
    report["server_models_written_s"] = round(time.perf_counter() - started, 1)
    releases, rounds = (1, 1) if smoke else (8, 2)
    servers = {}
    threads = os.environ.get("OMP_NUM_THREADS")
    if smoke:  # one thread, as gpu_check's own smoke run: the tiny models on busy shared cores wait on each other
        os.environ["OMP_NUM_THREADS"] = "1"
    profiles = {name: write_profile(server_folder, name, models, size) for name in PROFILES}
    apps: dict[str, AppServer] = {}
    try:
        if smoke:  # both servers start at once (a smoke run times nothing; on a card each runs alone)
            with ThreadPoolExecutor(len(profiles)) as pool:
                starting = {name: pool.submit(start_server, name, path, smoke, server_folder)
                            for name, path in profiles.items()}
            failed = [future.exception() for future in starting.values() if future.exception() is not None]
            apps = {name: future.result() for name, future in starting.items() if future.exception() is None}
            if failed:
                raise failed[0]  # the servers that did start are stopped below
        for name, path in profiles.items():
            app = apps.get(name) or start_server(name, path, smoke, server_folder)
            apps[name] = app
            servers[name] = measure_server(name, app, path, smoke=smoke, size=size, photo=photo_path,
                                           releases=releases, sweep_rounds=rounds if name == "sd15" else 0)
    finally:
        for app in apps.values():
            app.stop()  # those measured are stopped already; a second stop does nothing
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = threads
    report["server"] = servers
    sd15, fast = servers["sd15"], servers["sd15-fast"]
    previews = [t for t in sd15["first_preview_s"] if t is not None]
    report["server_release_to_final_s"] = round(median(sd15["final_s"]), 3)
    report["fast_release_to_final_s"] = round(median(fast["final_s"]), 3)
    report["first_preview_ms"] = round(median(previews) * 1000, 1) if previews else None
    report["drag_renders_per_s"] = fast.get("drag_renders_per_s")
    sweep = sd15["sweep"]
    report["sweep_batched_s"] = round(median(sweep["batched_s"]), 3)
    report["sweep_sequential_s"] = round(median(sweep["sequential_s"]), 3)
    report["server_s"] = round(time.perf_counter() - started, 1)


def print_report(r: dict) -> None:
    """The server's lines of gpu_check's report."""
    for name, s in r["server"].items():
        previews = [t for t in s["first_preview_s"] if t is not None]
        first = f"{median(previews) * 1000:.0f} ms" if previews else "none (each render finished first)"
        print(f"server {name} ({s['steps']} steps, {s['size']} px): page {s['page_ready_s']} s, first render "
              f"{s['first_render_s']} s; release -> first preview {first}, -> final "
              f"{median(s['final_s']):.3f} s (median of {len(s['final_s'])})")
    print(f"server sd15 sweep of {len(SWEEP_GATES)} γ: batched {r['sweep_batched_s']:.3f} s, sequential "
          f"{r['sweep_sequential_s']:.3f} s ({r['sweep_sequential_s'] / r['sweep_batched_s']:.2f}x)")
    print(f"renders per second while dragging (sd15-fast, scripted 30 Hz drag): {r['drag_renders_per_s']:.1f}")
