"""Item 4: peak resident memory of the pipeline (measured in a child process) and of the studio app.

`python -m benchmarks.memory --child MODE` builds the pipeline of that mode, encodes one photo, generates one
image and prints its own peak RSS as JSON; the parent reads it. The app's figure comes from the server run.
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time

from .common import MODES, PROMPT, Mode, Section, gib, synthetic_photo

logger = logging.getLogger(__name__)


def peak_rss_self() -> int:
    """Peak resident set size of this process in bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_of(pid: int) -> int | None:
    """VmHWM (peak resident set) of a running process, in bytes; None where /proc is not available."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            line = next(line for line in handle if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def child(mode: Mode) -> dict:
    from .common import build_bench

    started = time.perf_counter()
    bench = build_bench(mode)
    pipe = bench.pipe
    built = peak_rss_self()
    modules = [pipe.unet, pipe.vae, pipe.text_encoder, pipe.adapter, pipe.encoder.clip]
    modules += [pipe.encoder.dino] if pipe.encoder.dino is not None else []
    weights = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    subject = pipe.encode_subject([synthetic_photo(0)])
    pipe(PROMPT, subject=subject, gate=0.5, num_inference_steps=1, height=mode.size, width=mode.size, seed=0)
    return dict(peak_rss=peak_rss_self(), peak_rss_after_build=built, weights_bytes=weights,
                seconds=time.perf_counter() - started, description=bench.description)


def run(mode: Mode, app: dict | None) -> Section:
    """Peak RSS of a child process holding the mode's pipeline, plus the app's (from the server run)."""
    section = Section(4, "Peak memory (RSS): the pipeline in fp32, and the studio app with the tiny profile")
    result = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", mode.name], capture_output=True,
                            text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"the memory child failed ({result.returncode}):\n{result.stderr[-3000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    label = "sd15-architecture" if mode.arch == "sd15" else "tiny"
    section.add(f"{label} pipeline, fp32: weights (all components)", gib(figures["weights_bytes"]))
    section.add(f"{label} pipeline, fp32: peak RSS after building", gib(figures["peak_rss_after_build"]))
    section.add(f"{label} pipeline, fp32: peak RSS after encode + one {mode.size} px generation",
                gib(figures["peak_rss"]))
    section.data = dict(pipeline=figures)
    if app is None or app.get("peak_rss") is None:
        reason = (app or {}).get("skipped", "item 5 (the server run) did not run")
        section.add("studio app (tiny profile): peak RSS", f"skipped: {reason}")
    else:
        section.add(f"studio app (tiny profile): peak RSS after {app['requests']} renders", gib(app["peak_rss"]))
        section.data["app"] = app
    section.notes.append("random weights are built in memory; loading real files may peak higher while copying")
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description="child process of the memory benchmark")
    parser.add_argument("--child", choices=sorted(MODES), required=True, help="mode whose pipeline to measure")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(child(MODES[args.child])))


if __name__ == "__main__":
    main()
