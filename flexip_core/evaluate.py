"""DreamBench evaluation of the gate: CLIP-I, DINO-I and CLIP-T across gamma, with an IP-Adapter scale baseline.

    python -m flexip_core.evaluate --profile sd15 --subjects dreambench/dataset --gates 0,0.25,0.5,0.75,1 --out eval
    torchrun --nproc_per_node 4 -m flexip_core.evaluate ...   # or: accelerate launch -m flexip_core.evaluate ...

For every subject, prompt and seed (4 seeds by default), one batched call generates the whole gamma sweep from
the same noise; the IP-Adapter baseline sweeps its single scale s (branch weights (s, 0)) on the same seeds.
Several processes split the (subject, prompt, seed) jobs and write the same scores.csv as one. Writes
OUT/scores.csv (one row per image), OUT/summary.csv and OUT/summary.json (means per method and setting,
monotonicity and smoothness of each curve, Spearman correlations of the setting with each score, throughput),
OUT/tradeoff.png (identity against prompt score) and, unless --no-images, the images under OUT/images/.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from flexip_core.cli import (
    add_generation_flags,
    add_model_flags,
    comma_ints,
    comma_numbers,
    gate_values,
    output_folder,
    whole_number,
)
from flexip_core.evaluation.run import (
    DEFAULT_SEEDS,
    EvalSettings,
    evaluate,
    is_ip_adapter,
    plan,
    process_state,
    read_prompts,
    select_subjects,
)

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flexip_core.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--subjects", required=True,
                        help="DreamBench-layout folder: one sub-folder of photos per subject")
    parser.add_argument("--prompts", default=None, help="prompts_and_classes.txt (default: the one in --subjects)")
    parser.add_argument("--out", type=output_folder, required=True,
                        help="folder for scores.csv, summary.*, tradeoff.png and images/")
    parser.add_argument("--gates", type=gate_values, default=(0.0, 0.25, 0.5, 0.75, 1.0),
                        help="gamma values, e.g. 0,0.5,1")
    parser.add_argument("--seeds", type=comma_ints, default=DEFAULT_SEEDS,
                        help="comma-separated seeds shared by every sweep (default "
                             f"{','.join(map(str, DEFAULT_SEEDS))})")
    parser.add_argument("--subject", action="append", default=None, help="evaluate only this subject (repeatable)")
    parser.add_argument("--max-subjects", type=whole_number(1), default=None, help="first N subjects only (quick runs)")
    parser.add_argument("--max-prompts", type=whole_number(1), default=None, help="first N prompts per subject only")
    parser.add_argument("--token", default="", help="DreamBench's unique token for {0} in the prompts (default none)")
    parser.add_argument("--condition-images", type=whole_number(1), default=1,
                        help="subject photos given to the adapters (the first ones, by name)")
    parser.add_argument("--exclude-reference", action="store_true",
                        help="score identity only against the photos the adapters did not see")
    add_generation_flags(parser, per_image=False)
    parser.add_argument("--baseline", default="auto",
                        help="'auto' (the profile itself when its preservation branch is an IP-Adapter), 'none', "
                             "or a profile whose preservation branch is an IP-Adapter")
    parser.add_argument("--baseline-scales", type=comma_numbers, default=None,
                        help="IP-Adapter scales (default: --gates)")
    parser.add_argument("--clip-metric", default=None, help=f"CLIPModel for CLIP-I/CLIP-T (default {_default('clip')})")
    parser.add_argument("--dino-metric", default=None, help=f"DINO ViTModel for DINO-I (default {_default('dino')})")
    parser.add_argument("--no-images", action="store_true", help="do not write the generated images")
    return parser


def _default(field: str) -> str:
    from flexip_core.evaluation.metrics import MetricConfig

    return getattr(MetricConfig(), field)


def _baseline(args, pipe):
    from flexip_core.generation.pipeline import FlexIPPipeline

    if args.baseline == "none":
        return None
    if args.baseline == "auto":
        if is_ip_adapter(pipe):
            return pipe
        logger.info("no IP-Adapter baseline: profile %s has a native FlexIP adapter; pass --baseline PROFILE "
                    "naming IP-Adapter weights to draw one", pipe.profile.name)
        return None
    if args.baseline == (args.profile or pipe.profile.name) and is_ip_adapter(pipe):
        return pipe  # the same weights: no second copy of the model
    baseline = FlexIPPipeline.from_profile(args.baseline, device=args.device, dtype=args.dtype,
                                           attention=args.attention)
    if not is_ip_adapter(baseline):
        logger.warning("baseline profile %s has no IP-Adapter preservation branch; its (s, 0) sweep is drawn anyway",
                       args.baseline)
    return baseline


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation from command-line arguments (see `python -m flexip_core.evaluate --help`).

    Args:
        argv: the arguments (None: sys.argv).

    Returns:
        0 on success, 2 when an argument or an input is wrong (the message goes to stderr).
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        from flexip_core.cli import generation_from_args, pipeline_from_args
        from flexip_core.evaluation.metrics import MetricConfig, MetricModels
        from flexip_core.loading.profiles import load_profile

        if any(seed < 0 for seed in args.seeds):
            raise ValueError(f"--seeds must be 0 or more, got {','.join(map(str, args.seeds))}")
        args.profile, generation, _ = generation_from_args(args)
        if args.baseline not in ("auto", "none"):
            load_profile(args.baseline)  # an unknown baseline profile is named now, not after the evaluation
        benchmark = read_prompts(args.prompts or Path(args.subjects) / "prompts_and_classes.txt")
        subjects = select_subjects(args.subjects, args.subject, args.max_subjects)
        for seed in args.seeds:
            replace(generation, seed=seed).check()
        settings = EvalSettings(gates=args.gates, baseline_scales=args.baseline_scales or args.gates, seeds=args.seeds,
                                token=args.token, condition_images=args.condition_images,
                                exclude_reference=args.exclude_reference, generation=generation,
                                save_images=not args.no_images)
        plan(benchmark, subjects, args.max_prompts, settings)  # refuses a subject left without references now
        state = process_state()
        if state.num_processes > 1:
            if not state.is_main_process:
                logging.getLogger("flexip_core").setLevel(logging.WARNING)  # one copy of each progress message
            args.device = args.device or str(state.device)  # each process on its own GPU
        defaults = MetricConfig()
        metrics_config = MetricConfig(clip=args.clip_metric or defaults.clip, dino=args.dino_metric or defaults.dino)
        pipe = pipeline_from_args(args)
        metrics = MetricModels.load(metrics_config, device=pipe.device)
        evaluate(pipe, metrics, benchmark, subjects, args.max_prompts, settings, args.out, _baseline(args, pipe))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from flexip_core.evaluate import main as _main

    sys.exit(_main())
