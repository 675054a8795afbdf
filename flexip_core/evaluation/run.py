"""DreamBench evaluation of the gate: CLIP-I, DINO-I and CLIP-T across gamma, with an IP-Adapter scale baseline.

The command is `python -m flexip_core.evaluate` (flexip_core/evaluate.py). For every subject, prompt and seed,
one batched call generates the whole gamma sweep from the same noise; the IP-Adapter baseline sweeps its single
scale s (branch weights (s, 0)) on the same seeds. Processes started by torchrun or `accelerate launch` split the
(subject, prompt, seed) jobs (accelerate's `PartialState`) and the main process writes the same scores.csv as one.
The summary adds Spearman's rank correlation of the setting with each score and the spread of the DINO distances
between neighbouring settings (the smoothness figure).
"""
from __future__ import annotations

import csv
import json
import logging
import os
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
           "w_pers", *METRICS, "dino_step", "image")  # dino_step: DINO distance to the sweep's next lower setting


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


def select_subjects(folder: str | Path, names: list[str] | None = None, limit: int | None = None
                    ) -> list[tuple[str, list[Path]]]:
    """find_subjects(folder), narrowed to `names` (each must exist there) and to the first `limit`."""
    subjects = find_subjects(folder)
    if names:
        unknown = sorted(set(names) - {name for name, _ in subjects})
        if unknown:
            raise ValueError(f"unknown subject(s) {', '.join(unknown)} in {folder}")
        subjects = [s for s in subjects if s[0] in names]
    return subjects[:limit] if limit else subjects


# --- the run ------------------------------------------------------------------------------------
DEFAULT_SEEDS = (0, 1, 2, 3)  # four images per prompt and setting, as DreamBench papers draw


@dataclass(frozen=True)
class EvalSettings:
    gates: tuple[float, ...]  # gamma values of the FlexIP sweep
    baseline_scales: tuple[float, ...]  # IP-Adapter scales of the baseline sweep
    seeds: tuple[int, ...] = DEFAULT_SEEDS  # seeds shared by both sweeps
    token: str = ""  # DreamBench's unique token ({0}); encoder-based methods use none
    condition_images: int = 1  # photos of the subject the adapters see (the first ones, by name)
    exclude_reference: bool = False  # score identity only against the photos the adapters did not see
    generation: Generation | None = None  # strength, steps, guidance, size, scheduler, windows (None: the profile's)
    save_images: bool = True  # write every image (PNG with its parameters) under OUT/images/


@dataclass(frozen=True)
class Job:
    """One unit of work, the unit the processes split: every sweep of one subject, prompt and seed."""

    subject: str
    photos: tuple[Path, ...]  # all the subject's photos; the first `condition_images` go to the adapters
    prompt_index: int
    seed: int


def identity_photos(name: str, photos, settings: EvalSettings) -> list[Path]:
    """The photos identity is scored against: all of the subject's, or with `exclude_reference` the ones the
    adapters did not see."""
    if not settings.exclude_reference:
        return list(photos)
    rest = list(photos[settings.condition_images:])
    if not rest:
        raise ValueError(f"subject {name} has {len(photos)} photo(s) and --condition-images "
                         f"{settings.condition_images} gives them all to the adapters, so --exclude-reference leaves "
                         f"none to score identity against; lower --condition-images or drop --exclude-reference")
    return rest


def plan(benchmark: Benchmark, subjects: list[tuple[str, list[Path]]], prompts_per_subject: int | None,
         settings: EvalSettings) -> list[Job]:
    """Every (subject, prompt, seed) in a fixed order (subject, then prompt, then seed); refuses, before anything
    is drawn, a subject that would be left without a photo to score against."""
    jobs = []
    for name, photos in subjects:
        identity_photos(name, photos, settings)
        prompts = min(prompts_per_subject or 10**9, len(benchmark.templates_for(name)))
        jobs += [Job(name, tuple(photos), i, seed) for i in range(prompts) for seed in settings.seeds]
    return jobs


def process_state():
    """accelerate's view of the processes that torchrun or `accelerate launch` started (one without either).
    Without CUDA, accelerate only forms a (gloo) process group when told to use the CPU."""
    import torch
    from accelerate import PartialState

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return PartialState(cpu=not torch.cuda.is_available() and world > 1)


def _profile_generation(pipe) -> Generation:
    d = pipe.defaults
    return Generation(num_inference_steps=d.num_inference_steps, guidance_scale=d.guidance_scale, height=d.height,
                      width=d.width, scheduler=d.scheduler)


def is_ip_adapter(pipe) -> bool:
    """Whether the pipeline's preservation branch is an IP-Adapter (so (s, 0) is IP-Adapter at scale s)."""
    return pipe.adapter.config.preservation.kind in ("ip_adapter", "ip_adapter_plus")


def _chunks(values, size):
    return [values[i:i + size] for i in range(0, len(values), size)]


def neighbour_distances(settings: list[float], features) -> list[float | str]:
    """Cosine distance of each image's features (N, D) to those of the image at the next lower setting of its
    sweep ("" for the lowest): the steps the smoothness figure measures."""
    vectors = np.asarray(features, dtype=np.float64)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    order = sorted(range(len(settings)), key=lambda k: settings[k])
    distances: list[float | str] = [""] * len(settings)
    for lower, upper in zip(order, order[1:]):
        distances[upper] = float(1.0 - vectors[lower] @ vectors[upper])
    return distances


def evaluate(pipe, metrics, benchmark: Benchmark, subjects: list[tuple[str, list[Path]]],
             prompts_per_subject: int | None, settings: EvalSettings, out_dir: str | Path,
             baseline_pipe=None) -> dict | None:
    """Generate and score every (subject, prompt, seed); returns the summary also written to OUT/summary.json.

    Under torchrun or `accelerate launch` every process takes a contiguous share of the (subject, prompt, seed)
    jobs, streams its rows to OUT/scores.partN.csv and saves its images; the main process gathers the rows and
    writes scores.csv in the order of a one-process run (each call is seeded, so the scores are the same), then
    the summaries and the plot, and returns the summary (the other processes return None).

    Args:
        pipe: the FlexIP pipeline whose gamma sweep is measured.
        metrics: `MetricModels` (CLIP and DINO).
        benchmark: subject classes and prompt templates (`read_prompts`).
        subjects: (name, photos) of each subject (`find_subjects`).
        prompts_per_subject: the first N prompts of each subject (None: all).
        settings: sweeps, seeds, references and generation settings.
        out_dir: folder for scores.csv, summary.csv/json, tradeoff.png and images/.
        baseline_pipe: a pipeline whose preservation branch is an IP-Adapter, swept over its scale (None: no
            baseline).
    """
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from flexip_core.generation.images import load_reference_image
    from flexip_core.generation.metadata import save_png
    from flexip_core.generation.settings import MAX_BATCH

    state = process_state()
    jobs = plan(benchmark, subjects, prompts_per_subject, settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = [("flexip", pipe, [dict(gate=g) for g in settings.gates])]
    if baseline_pipe is not None:
        methods.append(("ip_adapter", baseline_pipe, [dict(scale=s) for s in settings.baseline_scales]))
    with state.split_between_processes(list(enumerate(jobs))) as share:
        mine = list(share)  # contiguous, so a subject's photos are embedded once per process
    calls_per_job = sum(len(_chunks(sweep, MAX_BATCH)) for _, _, sweep in methods)
    base_generation = settings.generation or _profile_generation(pipe)
    rows, images_made, generating = [], 0, 0.0  # rows: (job index, row)
    started = time.perf_counter()
    progress = tqdm(total=calls_per_job * len(mine), desc="evaluate", unit="call", disable=not state.is_main_process)
    part = out_dir / ("scores.csv" if state.num_processes == 1 else f"scores.part{state.process_index}.csv")
    with part.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        current, references, embedded = None, None, {}
        for index, job in mine:
            name = job.subject
            if name != current:  # photos are decoded and embedded once per subject
                current = name
                loaded = {p: load_reference_image(p) for p in job.photos}
                references = metrics.references([loaded[p] for p in identity_photos(name, job.photos, settings)])
                condition = [loaded[p] for p in job.photos[:settings.condition_images]]
                embedded = {id(p): p.encode_subject(condition) for _, p, _ in methods}
            cls = benchmark.class_of(name)
            template = benchmark.templates_for(name)[job.prompt_index]
            prompt = prompt_text(template, settings.token, cls)
            scored_prompt = prompt_text(template, "", cls)  # CLIP-T ignores the unique token
            generation = replace(base_generation, prompt=prompt, seed=job.seed)
            for method, method_pipe, sweep in methods:
                drawn = []  # (point, image, parameters, scores, DINO features) of the whole sweep
                for chunk in _chunks(sweep, MAX_BATCH):
                    tic = time.perf_counter()
                    if method == "flexip":
                        out = method_pipe(subject=embedded[id(method_pipe)], generation=generation,
                                          gate=[c["gate"] for c in chunk])
                    else:
                        out = method_pipe(subject=embedded[id(method_pipe)], generation=generation,
                                          branch_weights=[(c["scale"], 0.0) for c in chunk])
                    generating += time.perf_counter() - tic
                    images_made += len(out.images)
                    features = metrics.embed(out.images)
                    scores = metrics.score_embedded(features, references, scored_prompt)
                    drawn += [(point, image, params, {m: scores[m][k] for m in METRICS}, features.dino[k])
                              for k, (point, image, params) in enumerate(zip(chunk, out.images, out.parameters))]
                    progress.update(1)
                values = [point.get("gate", point.get("scale")) for point, *_ in drawn]
                steps = neighbour_distances(values, [d[-1].numpy() for d in drawn])
                for (point, image, params, scores, _), setting, step in zip(drawn, values, steps):
                    path = ""
                    if settings.save_images:
                        file = f"p{job.prompt_index:02d}_s{job.seed}_{setting:.3f}.png"
                        relative = Path("images") / method / name / file
                        save_png(image, out_dir / relative, params)
                        path = relative.as_posix()
                    row = dict(method=method, subject=name, prompt_index=job.prompt_index, prompt=prompt, seed=job.seed,
                               setting=setting, gate=point.get("gate", ""), scale=point.get("scale", ""),
                               w_pres=params["w_pres"], w_pers=params["w_pers"], image=path, dino_step=step,
                               **{"class": cls}, **scores)
                    writer.writerow(row)
                    rows.append((index, row))
                handle.flush()
    progress.close()
    counts = [(images_made, generating)]
    if state.num_processes > 1:
        rows, counts = gather_object(rows), gather_object(counts)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    rows = [row for _, row in sorted(rows, key=lambda pair: pair[0])]  # stable: a job's rows keep their order
    if state.num_processes > 1:
        with (out_dir / "scores.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        for rank in range(state.num_processes):
            (out_dir / f"scores.part{rank}.csv").unlink(missing_ok=True)
    elapsed = time.perf_counter() - started
    images_made = sum(n for n, _ in counts)
    summary = summarize(rows)
    result = {
        "summary": summary,
        "curves": {method: curve_quality([s for s in summary if s["method"] == method]) for method, _, _ in methods},
        "spearman": rank_correlations(rows),
        "smoothness": smoothness(rows),
        "images": images_made,
        "seconds": round(elapsed, 3),
        "images_per_second": images_made / elapsed if elapsed else None,
        "generation_images_per_second": sum(n / s for n, s in counts if s) or None,
        "processes": state.num_processes,
        "seeds": list(settings.seeds),
        "exclude_reference": settings.exclude_reference,
        "baseline": "ip_adapter" if baseline_pipe is not None else None,
    }
    write_summary(summary, out_dir / "summary.csv")
    (out_dir / "summary.json").write_text(json.dumps(result, indent=2))
    plot_tradeoff(summary, out_dir / "tradeoff.png")
    logger.info("%d images in %.1f s on %d process(es) (%.2f images/s overall, %.2f images/s generating); results "
                "in %s", images_made, elapsed, state.num_processes, result["images_per_second"] or 0.0,
                result["generation_images_per_second"] or 0.0, out_dir)
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


def spearman(x, y) -> float | None:
    """Spearman's rank correlation: Pearson's correlation of the ranks, tied values sharing their mean rank
    (as scipy.stats.spearmanr); None when either side is constant."""
    rx, ry = _ranks(x), _ranks(y)
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values) -> np.ndarray:
    """1-based ranks, ties averaged."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, tie, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(tie, weights=ranks) / counts)[tie]


def rank_correlations(rows: list[dict]) -> dict:
    """Per method and metric: Spearman's correlation of the setting (gamma or s) with the score over every image
    (identity should correlate positively, CLIP-T negatively)."""
    out = {}
    for method in dict.fromkeys(row["method"] for row in rows):
        members = [row for row in rows if row["method"] == method]
        settings = [float(row["setting"]) for row in members]
        out[method] = {metric: spearman(settings, [float(row[metric]) for row in members]) for metric in METRICS}
    return out


def smoothness(rows: list[dict]) -> dict:
    """Per method: how evenly the images move along each sweep (one subject, prompt and seed), from the DINO
    distances between neighbouring settings (`dino_step`): the mean step, the largest step over the sweep's mean
    step (1 = even; the mean over sweeps and the worst), and the coefficient of variation of the steps (0 = even;
    the mean over sweeps)."""
    sweeps: dict[tuple, list[float]] = {}
    for row in rows:
        if row["dino_step"] != "":
            key = (row["method"], row["subject"], row["prompt_index"], row["seed"])
            sweeps.setdefault(key, []).append(float(row["dino_step"]))
    out = {}
    for method in dict.fromkeys(row["method"] for row in rows):
        steps = [np.array(v) for k, v in sweeps.items() if k[0] == method]
        spread = [(s.max() / s.mean(), s.std() / s.mean()) for s in steps if s.mean() > 0]
        out[method] = {
            "sweeps": len(steps),
            "mean_step": float(np.concatenate(steps).mean()) if steps else None,
            "max_step_over_mean": float(np.mean([m for m, _ in spread])) if spread else None,
            "worst_max_step_over_mean": float(max(m for m, _ in spread)) if spread else None,
            "step_cv": float(np.mean([c for _, c in spread])) if spread else None,
        }
    return out


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
