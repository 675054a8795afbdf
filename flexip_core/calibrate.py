"""Calibrate a profile's slider on your own subjects and write a copy of the profile with the calibrated gate curve.

    python -m flexip_core.calibrate --profile sd15 --subjects my-subjects --prompts prompts.txt --out sd15-mine.json

Renders every subject with every prompt and seed at a fine grid of positions t along a straight path through the
branch weights, by default from the profile's γ = 0 weights to its γ = 1 weights (w_pres = t, w_pers = 1 - t on
a linear curve; one batched call per subject, prompt and seed, from the same noise), scores identity
(CLIP-I and DINO-I; a profile world's own score, such as the toy world's oracle on mini) and prompt following
(CLIP-T; the world's own score), finds where the scores saturate at both ends, and writes OUT.json: the profile
with a gate curve on which equal steps of γ move the trade-off by equal shares between those ends, and a
`calibration` entry recording what was measured. It loads as any profile: `--profile OUT.json`,
`FlexIPPipeline.from_profile("OUT.json")`. The algorithm: flexip_core/evaluation/calibration.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from flexip_core.cli import MODEL_FLAGS, add_model_flags, comma_ints, comma_numbers, output_file, whole_number

logger = logging.getLogger(__name__)


def grid_points(text: str) -> tuple[float, ...] | int:
    """argparse type for --gates: a whole number N (N positions, denser toward both ends) or comma-separated
    positions in [0, 1] (0 and 1 are added)."""
    if text.strip().isdigit():
        value = int(text)
        if value < 3:
            raise argparse.ArgumentTypeError(f"measure at least 3 points along the path, got {value}")
        return value
    values = comma_numbers(text)
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"path positions must lie in [0, 1], got {text!r}")
    return values


def weight_pair(text: str) -> tuple[float, float]:
    """argparse type: 'W_PRES,W_PERS', each in [0, 2]."""
    values = comma_numbers(text)
    if len(values) != 2 or any(not 0.0 <= v <= 2.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected W_PRES,W_PERS, each in [0, 2], got {text!r}")
    return values


def measured_path(profile, start=None, end=None):
    """The path to measure: the flags' ends, else the path an earlier calibration of this profile measured (its
    curve's ends were cut at saturation, and a second calibration must not shrink the range again), else the ends
    of the profile's curve (w_pres = t, w_pers = 1 - t for the linear one)."""
    from flexip_core.evaluation.calibration import WeightPath

    earlier = (profile.calibration or {}).get("path") or {}
    start = start or earlier.get("start") or profile.gate_curve.weights(0.0)
    end = end or earlier.get("end") or profile.gate_curve.weights(1.0)
    if tuple(start) == tuple(end):
        raise ValueError(f"the path starts and ends at the same branch weights {tuple(start)}; give --path-start and "
                         "--path-end")
    return WeightPath(tuple(float(w) for w in start), tuple(float(w) for w in end))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flexip_core.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--subjects", required=True,
                        help="folder with one sub-folder of photos per subject (DreamBench's layout)")
    parser.add_argument("--prompts", default=None,
                        help="prompt templates, one a line ({1}: the class word), or DreamBench's "
                             "prompts_and_classes.txt (default: the one in --subjects)")
    parser.add_argument("--out", type=output_file(".json"), required=True,
                        help="the calibrated profile to write (.json)")
    parser.add_argument("--gates", type=grid_points, default=25,
                        help="positions measured along the path: a number N (default 25, denser toward both ends) "
                             "or comma-separated positions in [0, 1]")
    parser.add_argument("--seeds", type=comma_ints, default=(0, 1), help="comma-separated seeds (default 0,1)")
    parser.add_argument("--subject", action="append", default=None, help="only this subject (repeatable)")
    parser.add_argument("--max-subjects", type=whole_number(1), default=None, help="the first N subjects only")
    parser.add_argument("--prompts-per-subject", type=whole_number(1), default=None,
                        help="N prompts per subject, subject i taking prompts i, i+1, ... of its list (wrapping), so "
                             "that few per subject still cover the list (default: every prompt)")
    parser.add_argument("--token", default="", help="DreamBench's unique token for {0} in the prompts (default none)")
    parser.add_argument("--condition-images", type=whole_number(1), default=1,
                        help="subject photos given to the adapters (the scores compare with all of them)")
    parser.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=whole_number(1),
                        default=None, help="denoising steps (default: the profile's)")
    parser.add_argument("--guidance-scale", "--guidance", dest="guidance_scale", type=float, default=None,
                        help="guidance scale (default: the profile's)")
    parser.add_argument("--size", type=int, default=None, help="square size in pixels (default: the profile's)")
    parser.add_argument("--path-start", type=weight_pair, default=None,
                        help="W_PRES,W_PERS at the prompt end of the measured path (default: the profile's weights at "
                             "γ = 0, or the path an earlier calibration of it measured)")
    parser.add_argument("--path-end", type=weight_pair, default=None,
                        help="W_PRES,W_PERS at the identity end (default: the profile's weights at γ = 1, or the path "
                             "an earlier calibration measured)")
    parser.add_argument("--saturation", type=float, default=0.02,
                        help="share of its whole change below which a score counts as saturated; γ = 0 and 1 go "
                             "where every score is (default 0.02; 0 keeps the path's own ends)")
    parser.add_argument("--points", type=whole_number(2), default=None,
                        help="write the curve at N evenly spaced γ (default: through the measured positions)")
    parser.add_argument("--clip-metric", default=None, help="CLIPModel for CLIP-I/CLIP-T (default: the evaluator's)")
    parser.add_argument("--dino-metric", default=None, help="DINO ViTModel for DINO-I (default: the evaluator's)")
    return parser


def profile_file(name: str) -> Path:
    """The JSON file of a profile given by name or path (load_profile has checked that it exists)."""
    from flexip_core.loading.profiles import PROFILE_DIR

    path = Path(name).expanduser()
    return path if path.suffix == ".json" else PROFILE_DIR / f"{name}.json"


def jobs_for(subjects, benchmark, prompts_per_subject: int | None, token: str):
    """One Job per (subject, prompt): subject i takes prompts i, i+1, ... of its template list (wrapping)."""
    from flexip_core.evaluation.calibration import Job
    from flexip_core.evaluation.run import prompt_text
    from flexip_core.generation.images import load_reference_image

    jobs = []
    for i, (name, photos) in enumerate(subjects):
        templates = benchmark.templates_for(name)
        cls = benchmark.class_of(name)
        loaded = tuple(load_reference_image(p) for p in photos)
        for j in range(min(prompts_per_subject or len(templates), len(templates))):
            template = templates[(i + j) % len(templates)]
            jobs.append(Job(name, loaded, prompt_text(template, token, cls), prompt_text(template, "", cls)))
    return jobs


def written_profile(source: Path, out: Path, curve, record: dict, overrides: dict) -> dict:
    """The source profile's own JSON (its `{assets}`/`{build}` placeholders kept, so the copy loads from any
    folder) with the model overrides the measurement used, the new gate curve and the record."""
    data = json.loads(source.read_text())
    for name, value in overrides.items():
        local = Path(value).expanduser()
        data[name] = str(local.resolve()) if local.exists() else value  # a local file: found from any folder
    if (overrides.get("preservation") or overrides.get("personalization")) and not overrides.get("adapter"):
        data.pop("adapter", None)  # IP-Adapter files given as overrides replace the native adapter (as when loading)
    data["name"] = out.stem
    data["gate_curve"] = {"gammas": list(curve.gammas), "pres": list(curve.pres), "pers": list(curve.pers)}
    data["calibration"] = record
    return data


def main(argv: list[str] | None = None) -> int:
    """`python -m flexip_core.calibrate`: measure, calibrate and write the profile.

    Args:
        argv: the command's arguments (default: sys.argv[1:]); `--help` lists them.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return _run(args, argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args, argv: list[str]) -> int:
    from tqdm.auto import tqdm

    from flexip_core.cli import model_options, pipeline_from_args
    from flexip_core.evaluation import calibration
    from flexip_core.evaluation.run import read_prompts, select_subjects
    from flexip_core.generation.settings import Generation
    from flexip_core.loading.profiles import default_profile, load_profile

    # 1. Everything that can be wrong is named before any weights load
    if any(seed < 0 for seed in args.seeds):
        raise ValueError(f"--seeds must be 0 or more, got {','.join(map(str, args.seeds))}")
    if not 0.0 <= args.saturation < 0.5:
        raise ValueError(f"--saturation must be in [0, 0.5), got {args.saturation:g}")
    args.profile = args.profile or default_profile()
    profile = load_profile(args.profile)
    d = profile.defaults
    generation = Generation(
        num_inference_steps=args.num_inference_steps or d.num_inference_steps,
        guidance_scale=d.guidance_scale if args.guidance_scale is None else args.guidance_scale,
        height=args.size or d.height, width=args.size or d.width, scheduler=d.scheduler).check(d.max_side)
    for seed in args.seeds:
        Generation(seed=seed).check()
    path = measured_path(profile, args.path_start, args.path_end)
    positions = calibration.check_grid(calibration.grid(args.gates) if isinstance(args.gates, int) else args.gates)
    benchmark = read_prompts(args.prompts or Path(args.subjects) / "prompts_and_classes.txt")
    subjects = select_subjects(args.subjects, args.subject, args.max_subjects)
    jobs = jobs_for(subjects, benchmark, args.prompts_per_subject, args.token)

    # 2. The pipeline and the scores: the profile world's own when it has them, else DreamBench's metrics
    pipe = pipeline_from_args(args)
    metric_models = {}
    if pipe.world is not None and hasattr(pipe.world, "prompt_scores"):
        scorer = calibration.WorldScores(pipe.world)
    else:
        from flexip_core.evaluation.metrics import MetricConfig, MetricModels

        defaults = MetricConfig()
        config = MetricConfig(clip=args.clip_metric or defaults.clip, dino=args.dino_metric or defaults.dino)
        scorer = calibration.MetricScores(MetricModels.load(config, device=pipe.device))
        metric_models = {"clip_metric": config.clip, "dino_metric": config.dino}

    # 3. Measure along the path and invert the trade-off
    batches = -(-len(positions) // calibration.MAX_BATCH)
    bar = tqdm(total=len(jobs) * len(args.seeds) * batches, desc="calibrate", unit="call")
    started = time.perf_counter()
    measured = calibration.measure(pipe, scorer, jobs, positions, args.seeds, generation, path,
                                   condition_images=args.condition_images, progress=lambda n: bar.update(1))
    bar.close()
    seconds = time.perf_counter() - started
    result = calibration.calibrate(measured, saturation=args.saturation, points=args.points)

    # 4. The copy of the profile, with what was measured
    record = {
        "command": "python -m flexip_core.calibrate " + shlex.join(argv),
        "profile": args.profile,
        "subjects_folder": str(Path(args.subjects).resolve()),
        "subjects": sorted({job.subject for job in jobs}),
        "prompts": list(dict.fromkeys(job.prompt for job in jobs)),
        "seeds": list(args.seeds),
        "generation": {"num_inference_steps": generation.num_inference_steps,
                       "guidance_scale": generation.guidance_scale, "height": generation.height,
                       "width": generation.width, "scheduler": generation.scheduler},
        "scores": {"identity": list(scorer.identity), "prompt": list(scorer.prompt), **metric_models},
        "samples": len(jobs) * len(args.seeds),
        "path": {"start": list(measured.path.start), "end": list(measured.path.end)},
        "saturation": args.saturation,
        **result.record(),
        "seconds": round(seconds, 1),
        "measured": measured.rows(),
    }
    overrides = {k: v for k, v in model_options(args).items() if k in MODEL_FLAGS}
    data = written_profile(profile_file(args.profile), args.out, result.curve, record, overrides)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    load_profile(str(args.out))  # what was written loads as a profile
    logger.info("measured %d images in %.0f s; wrote %s (γ 0..1 on path positions %.3f..%.3f)",
                record["samples"] * len(positions), seconds, args.out, result.low, result.high)
    print(args.out)
    return 0


if __name__ == "__main__":
    from flexip_core.calibrate import main as _main

    sys.exit(_main())
