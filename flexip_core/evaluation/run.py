"""DreamBench evaluation of the gate: CLIP-I, DINO-I and CLIP-T across gamma, with an IP-Adapter scale baseline.

The command is `python -m flexip_core.evaluate` (flexip_core/evaluate.py). For every subject, prompt and seed,
one batched call generates the whole gamma sweep from the same noise; the IP-Adapter baseline sweeps its single
scale s (branch weights (s, 0)) on the same seeds.
"""
from __future__ import annotations

import csv
import json
import logging
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from flexip_core.generation.settings import Generation
from flexip_core.training.manifest import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

LIVE_CLASSES = frozenset({"cat", "dog"})  # DreamBench's live subjects get the "live" prompt list
METRICS = ("clip_i", "dino_i", "clip_t")
IDENTITY_METRICS = ("clip_i", "dino_i")
COLUMNS = ("method", "subject", "class", "prompt_index", "prompt", "seed", "setting", "gate", "scale", "w_pres",
           "w_pers", *METRICS, "image")


# --- the benchmark ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Benchmark:
    """Subject classes and prompt templates ({0}: unique token, {1}: class word), as DreamBench lists them."""

    classes: dict  # subject folder name -> class word
    object_prompts: tuple[str, ...]  # templates for objects
    live_prompts: tuple[str, ...]  # templates for live subjects (cats and dogs)

    def class_of(self, subject: str) -> str:
        return self.classes.get(subject, subject.replace("_", " "))

    def templates_for(self, subject: str) -> tuple[str, ...]:
        live = self.class_of(subject) in LIVE_CLASSES
        return self.live_prompts if live and self.live_prompts else self.object_prompts


def read_prompts(path: str | Path) -> Benchmark:
    """DreamBench's prompts_and_classes.txt, or a plain file with one template per line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if "prompt_list" not in text:
        templates = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
        if not templates:
            raise ValueError(f"{path.name}: no prompt found")
        return Benchmark({}, templates, ())
    classes = dict(re.findall(r"^([\w-]+),([^,\n]+)$", text.split("Prompts")[0], flags=re.MULTILINE))
    classes.pop("subject_name", None)
    lists = [tuple(re.findall(r"'([^']*)'\.format", block)) for block in text.split("prompt_list")[1:]]
    sections = re.findall(r"^(\w[\w ]*) Prompts\s*$", text, flags=re.MULTILINE)  # e.g. "Object", "Live Subject"
    by_name = dict(zip((s.lower() for s in sections), lists))
    objects = by_name.get("object", lists[0])
    live = by_name.get("live subject", lists[1] if len(lists) > 1 else ())
    if not objects:
        raise ValueError(f"{path.name}: no prompt templates found")
    return Benchmark({k: v.strip() for k, v in classes.items()}, objects, live)


def prompt_text(template: str, token: str, cls: str) -> str:
    return " ".join(template.format(token, cls).split())


def find_subjects(folder: str | Path) -> list[tuple[str, list[Path]]]:
    """(name, photos) of every sub-folder that holds images, by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"subjects folder not found: {folder}")
    found = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        photos = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if photos:
            found.append((sub.name, photos))
    if not found:
        raise ValueError(f"{folder}: no sub-folder with images (expected DreamBench's layout: one folder per subject)")
    return found


# --- the run ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSettings:
    gates: tuple[float, ...]  # gamma values of the FlexIP sweep
    baseline_scales: tuple[float, ...]  # IP-Adapter scales of the baseline sweep
    seeds: tuple[int, ...]  # seeds shared by both sweeps
    token: str = ""  # DreamBench's unique token ({0}); encoder-based methods use none
    condition_images: int = 1  # photos of the subject the adapters see (metrics use all of them)
    generation: Generation | None = None  # strength, steps, guidance, size, scheduler, windows (None: the profile's)
    save_images: bool = True  # write every image (PNG with its parameters) under OUT/images/


def _profile_generation(pipe) -> Generation:
    d = pipe.defaults
    return Generation(num_inference_steps=d.num_inference_steps, guidance_scale=d.guidance_scale, height=d.height,
                      width=d.width, scheduler=d.scheduler)


def is_ip_adapter(pipe) -> bool:
    """Whether the pipeline's preservation branch is an IP-Adapter (so (s, 0) is IP-Adapter at scale s)."""
    return pipe.adapter.config.preservation.kind in ("ip_adapter", "ip_adapter_plus")


def _chunks(values, size):
    return [values[i:i + size] for i in range(0, len(values), size)]


def evaluate(pipe, metrics, benchmark: Benchmark, subjects: list[tuple[str, list[Path]]],
             prompts_per_subject: int | None, settings: EvalSettings, out_dir: str | Path, baseline_pipe=None) -> dict:
    """Generate and score every (subject, prompt, seed); returns the summary also written to OUT/summary.json."""
    from tqdm.auto import tqdm

    from flexip_core.generation.images import load_reference_image
    from flexip_core.generation.metadata import save_png
    from flexip_core.generation.settings import MAX_BATCH

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = [("flexip", pipe, [dict(gate=g) for g in settings.gates])]
    if baseline_pipe is not None:
        methods.append(("ip_adapter", baseline_pipe, [dict(scale=s) for s in settings.baseline_scales]))
    jobs = [(name, photos, i) for name, photos in subjects
            for i in range(min(prompts_per_subject or 10**9, len(benchmark.templates_for(name))))]
    total_calls = sum(len(_chunks(sweep, MAX_BATCH)) for _, _, sweep in methods) * len(jobs) * len(settings.seeds)
    base_generation = settings.generation or _profile_generation(pipe)
    rows, images_made, generating = [], 0, 0.0
    started = time.perf_counter()
    progress = tqdm(total=total_calls, desc="evaluate", unit="call")
    with (out_dir / "scores.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        current, references, embedded = None, None, {}
        for name, photos, prompt_index in jobs:
            if name != current:  # photos are decoded and embedded once per subject
                current = name
                loaded = [load_reference_image(p) for p in photos]
                references = metrics.references(loaded)
                embedded = {id(p): p.encode_subject(loaded[:settings.condition_images]) for _, p, _ in methods}
            cls = benchmark.class_of(name)
            template = benchmark.templates_for(name)[prompt_index]
            prompt = prompt_text(template, settings.token, cls)
            scored_prompt = prompt_text(template, "", cls)  # CLIP-T ignores the unique token
            for seed in settings.seeds:
                for method, method_pipe, sweep in methods:
                    for chunk in _chunks(sweep, MAX_BATCH):
                        tic = time.perf_counter()
                        generation = replace(base_generation, prompt=prompt, seed=seed)
                        if method == "flexip":
                            out = method_pipe(subject=embedded[id(method_pipe)], generation=generation,
                                              gate=[c["gate"] for c in chunk])
                        else:
                            out = method_pipe(subject=embedded[id(method_pipe)], generation=generation,
                                              branch_weights=[(c["scale"], 0.0) for c in chunk])
                        generating += time.perf_counter() - tic
                        images_made += len(out.images)
                        scores = metrics.score(out.images, references, scored_prompt)
                        for k, (image, params, point) in enumerate(zip(out.images, out.parameters, chunk)):
                            setting = point.get("gate", point.get("scale"))
                            path = ""
                            if settings.save_images:
                                file = f"p{prompt_index:02d}_s{seed}_{setting:.3f}.png"
                                relative = Path("images") / method / name / file
                                save_png(image, out_dir / relative, params)
                                path = relative.as_posix()
                            row = dict(method=method, subject=name, prompt_index=prompt_index, prompt=prompt, seed=seed,
                                       setting=setting, gate=point.get("gate", ""), scale=point.get("scale", ""),
                                       w_pres=params["w_pres"], w_pers=params["w_pers"], image=path,
                                       **{"class": cls}, **{m: scores[m][k] for m in METRICS})
                            writer.writerow(row)
                            rows.append(row)
                        handle.flush()
                        progress.update(1)
    progress.close()
    elapsed = time.perf_counter() - started
    summary = summarize(rows)
    result = {
        "summary": summary,
        "curves": {method: curve_quality([s for s in summary if s["method"] == method]) for method, _, _ in methods},
        "images": images_made,
        "seconds": round(elapsed, 3),
        "images_per_second": images_made / elapsed if elapsed else None,
        "generation_images_per_second": images_made / generating if generating else None,
        "baseline": "ip_adapter" if baseline_pipe is not None else None,
    }
    write_summary(summary, out_dir / "summary.csv")
    (out_dir / "summary.json").write_text(json.dumps(result, indent=2))
    plot_tradeoff(summary, out_dir / "tradeoff.png")
    logger.info("%d images in %.1f s (%.2f images/s overall, %.2f images/s generating); results in %s",
                images_made, elapsed, result["images_per_second"] or 0.0, result["generation_images_per_second"] or 0.0,
                out_dir)
    return result


# --- summaries and the plot --------------------------------------------------------------------
def summarize(rows: list[dict]) -> list[dict]:
    """Mean (and standard error) of each metric per method and setting, settings in increasing order."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], float(row["setting"])), []).append(row)
    out = []
    for (method, setting), members in sorted(groups.items()):
        entry = {"method": method, "setting": setting, "n": len(members)}
        for metric in METRICS:
            values = np.array([float(m[metric]) for m in members])
            entry[metric] = float(values.mean())
            entry[f"{metric}_sem"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def curve_quality(points: list[dict]) -> dict:
    """Per metric: monotonic in the expected direction? largest neighbour step over the mean step (1 = even)."""
    quality = {}
    for metric in METRICS:
        values = np.array([p[metric] for p in sorted(points, key=lambda p: p["setting"])])
        steps = np.diff(values)
        expected = 1 if metric in IDENTITY_METRICS else -1  # identity rises with gamma, prompt fidelity falls
        mean_step = float(np.abs(steps).mean()) if len(steps) else 0.0
        quality[metric] = {
            "monotonic": bool(np.all(expected * steps >= 0)) if len(steps) else True,
            "range": float(values.max() - values.min()) if len(values) else 0.0,
            "max_step_over_mean": float(np.abs(steps).max() / mean_step) if mean_step > 0 else None,
        }
    return quality


def write_summary(summary: list[dict], path: Path) -> None:
    if not summary:
        return
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)


def plot_tradeoff(summary: list[dict], path: Path) -> Path:
    """Identity (CLIP-I, DINO-I) against prompt fidelity (CLIP-T), one curve per method, points labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"flexip": ("FlexIP (gate \u03b3)", "\u03b3", "tab:blue", "o"),
              "ip_adapter": ("IP-Adapter (scale s)", "s", "tab:orange", "s")}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, metric, label in zip(axes, IDENTITY_METRICS, ("CLIP-I", "DINO-I")):
        for method in dict.fromkeys(s["method"] for s in summary):
            points = sorted((s for s in summary if s["method"] == method), key=lambda s: s["setting"])
            name, symbol, colour, marker = styles.get(method, (method, "x", None, "^"))
            xs, ys = [p["clip_t"] for p in points], [p[metric] for p in points]
            axis.plot(xs, ys, marker=marker, color=colour, label=name)
            for p, x, y in zip(points, xs, ys):
                axis.annotate(f"{symbol}={p['setting']:g}", (x, y), textcoords="offset points", xytext=(4, 4),
                              fontsize=8)
        axis.set_xlabel("CLIP-T (prompt fidelity)")
        axis.set_ylabel(f"{label} (identity)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("Identity against prompt fidelity across the gate")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
