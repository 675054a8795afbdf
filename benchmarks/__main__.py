"""`python -m benchmarks [--full | --smoke] [--out DIR]`: what the slider costs, as ratios measured side by side.

Prints one table of all the items, then one `TARGET ...` line per target, and writes the same as JSON
(`<out>/<mode>.json`). Quick mode (default) and --full use random weights in the real SD1.5, OpenCLIP ViT-H/14 and
DINOv2-L architectures on the CPU in fp32; --smoke runs everything once on the tiny test models.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from flexip_core.cli import output_folder

from .common import MODES, Section, describe_machine, machine

logger = logging.getLogger("benchmarks")

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
TITLES = {1: "UNet step", 2: "Slider move", 3: "Sweep", 4: "Memory", 5: "Server", 6: "Load", 7: "Scrubbing"}


def item_numbers(text: str) -> set[int]:
    """argparse type of --only: '1,3' -> {1, 3}, numbers of TITLES only."""
    try:
        items = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        items = set()
    if not items or not items <= set(TITLES):
        names = ", ".join(f"{number} {title}" for number, title in TITLES.items())
        raise argparse.ArgumentTypeError(f"expected item numbers from 1 to {max(TITLES)} ({names}), got {text!r}")
    return items


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="more repeats and steps (about 3x the quick run)")
    size.add_argument("--smoke", action="store_true", help="tiny models, one repeat: checks that everything runs")
    parser.add_argument("--out", type=output_folder, default=DEFAULT_OUT, help="folder for the JSON results")
    parser.add_argument("--only", type=item_numbers, default=",".join(map(str, TITLES)),
                        help="comma-separated item numbers to run (default: all)")
    parser.add_argument("--breakdown", action="store_true",
                        help="profile one UNet step of each variant by op group (done anyway when a target misses)")
    parser.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO",
                        help="progress messages on stderr")
    return parser.parse_args(argv)


def guarded(number: int, run) -> Section:
    """Run one item; a failure becomes a section saying why, so the other items still report."""
    logger.info("item %d (%s)...", number, TITLES[number])
    started = time.perf_counter()
    try:
        section = run()
    except Exception as error:  # reported in the table and the exit status, not swallowed
        logger.exception("item %d failed", number)
        section = Section(number, TITLES[number], skipped=f"failed: {type(error).__name__}: {error}")
    section.data["wall_seconds"] = time.perf_counter() - started
    logger.info("item %d done in %.0f s", number, section.data["wall_seconds"])
    return section


def run_items(mode, items: set[int], breakdown: bool) -> list[Section]:
    from . import load, memory, scrub, server

    sections: dict[int, Section] = {}
    app: dict | None = None
    if 5 in items:  # the tiny app is small; its peak memory feeds item 4
        def serve() -> Section:
            nonlocal app
            section, app = server.run(mode)
            return section

        sections[5] = guarded(5, serve)
    if 6 in items:  # a server of its own, before this process holds the models
        sections[6] = guarded(6, lambda: load.run(mode))
    if 7 in items:
        sections[7] = guarded(7, lambda: scrub.run(mode))
    if 4 in items:  # a child process, run before this one holds the models so the two never add up
        sections[4] = guarded(4, lambda: memory.run(mode, app))
    if items & {1, 2, 3}:
        from . import slider, sweep, unet_step
        from .common import build_bench

        started = time.perf_counter()
        bench = build_bench(mode)
        logger.info("models ready in %.0f s: %s", time.perf_counter() - started, bench.description)
        if 1 in items:
            sections[1] = guarded(1, lambda: unet_step.run(bench, mode, breakdown))
        if 2 in items:
            sections[2] = guarded(2, lambda: slider.run(bench, mode))
        if 3 in items:
            sections[3] = guarded(3, lambda: sweep.run(bench, mode))
        for section in sections.values():
            section.data.setdefault("models", bench.description)
    return [sections[n] for n in sorted(sections)]


def report(mode, command: str, info: dict, sections: list[Section], wall: float) -> str:
    lines = [f"FlexIP Studio benchmarks: {mode.name} mode ({wall:.0f} s; load average {os.getloadavg()[0]:.2f} at "
             "the end)", f"command: {command}",
             f"machine: {describe_machine(info)}"]
    models = next((s.data["models"] for s in sections if "models" in s.data), None)
    if models:
        lines.append(f"models: {models}")
    lines += ["", "| # | figure | value |", "|---|---|---|"]
    for s in sections:
        lines.append(f"| {s.number} | **{s.title}** | {'skipped: ' + s.skipped if s.skipped else ''} |")
        lines += [f"| {s.number} | {figure} | {value} |" for figure, value in s.rows]
    notes = [f"[{s.number}] {note}" for s in sections for note in s.notes]
    if mode.arch == "tiny":
        notes.insert(0, "smoke mode: tiny models, so timings measure Python overhead, not model cost; "
                        "the targets mean something in quick and full mode only")
    if notes:
        lines += ["", "notes:"] + [f"- {note}" for note in notes]
    lines.append("")
    lines += [target.line() for s in sections for target in s.targets]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    mode = MODES["full" if args.full else "smoke" if args.smoke else "quick"]
    items = args.only
    command = "python -m benchmarks" + (" --full" if args.full else " --smoke" if args.smoke else "")
    info = machine()
    started = time.perf_counter()
    sections = run_items(mode, items, args.breakdown)
    wall = time.perf_counter() - started
    print(report(mode, command, info, sections, wall), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{mode.name}.json"
    payload = dict(mode=asdict(mode), command=command, machine=info, finished=datetime.now(timezone.utc).isoformat(),
                   wall_seconds=wall, sections=[asdict(s) for s in sections],
                   targets=[dict(asdict(t), passed=t.passed) for s in sections for t in s.targets])
    path.write_text(json.dumps(payload, indent=1, default=str))
    logger.info("results written to %s", path)
    return 1 if any(s.skipped and s.skipped.startswith("failed") for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
